"""Flax linen front-end: a thin ``nn.Module`` over :func:`rssbl_jax.core.adapted_dense`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from rssbl_jax import core
from rssbl_jax.config import AdapterConfig

Initializer = jax.nn.initializers.Initializer

default_kernel_init = nn.initializers.lecun_normal()
default_lora_a_init = core.default_lora_a_init
default_lora_c_init = core.default_lora_c_init


class RSSBilinearLoRADense(nn.Module):
    r"""A Dense layer with a rank-space update modulated by operating parameters ``p``.

    .. math::

        y = W x + b + s\, B\big((A x) \odot g(\hat p) + S \hat p\big), \qquad s = \frac{\alpha_{\text{lora}}}{r}

    with the gate ``g`` of :class:`rssbl_jax.AdapterConfig` (the seed's ``g0 + C p`` by default).
    ``W`` (``kernel``) and ``b`` (``bias``) have exactly ``nn.Dense``'s names and shapes, so a pretrained
    Dense checkpoint loads unchanged; the adapter adds ``lora_a (d_in, r)``, ``lora_b (r, d_out)``,
    ``lora_c (d_p, r)`` and ``lora_s (d_p, r)`` (plus ``lora_c0`` and ``lora_gate_*`` for the affine and MLP
    gates), with ``d_p`` taken from ``p`` at ``init``. The layer's settings are :attr:`adapter_config`, which
    :func:`rssbl_jax.merge` and :func:`rssbl_jax.save_adapters` take.

    ``p`` is ``[d_p]`` (shared by all rows of ``x``) or ``[*lead, d_p]`` with ``lead`` a prefix of ``x``'s
    leading axes (one condition per example, broadcast over tokens/pixels). Anything else raises a
    ``ValueError`` naming ``d_p`` and both shapes, at trace time.

    Initialisation (:func:`rssbl_jax.core.adapter_params`): ``B = 0`` so the output equals the base layer;
    ``A`` as in PEFT's LoRA; ``C`` lecun-normal so ``∂L/∂B`` is non-zero for every ``p ≠ 0``; ``S = 0``. At
    ``p = 0`` exactly, the seed's gate ``C p`` and the shift ``S p`` both vanish, so no initialisation can make
    the adapter act there; ``gate_offset=1.0`` (gate ``1 + C p``, ``C = 0`` at init: plain LoRA) or
    ``gate="affine"`` does.

    Attributes:
      features: output width ``d_out``.
      rank: adapter rank ``r``.
      lora_alpha: scaling numerator; the update is multiplied by ``lora_alpha / rank`` (PEFT's convention).
      use_bias: whether the base layer has a bias.
      gate, gate_offset, gate_hidden, use_rslora, lora_dropout, lora_a_init, p_mean, p_std: as in
        :class:`rssbl_jax.AdapterConfig`.
      shift: whether to learn the shift ``S p``.
      deterministic: disable ``lora_dropout`` (may also be passed to ``__call__``); dropout draws from the
        ``"dropout"`` rng stream.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); inferred from inputs and params when ``None``.
      param_dtype: dtype of all parameters.
      precision: matmul precision, as in ``nn.Dense``.
      kernel_init, bias_init: initialisers of the base ``kernel`` and ``bias``.
      lora_a_init_fn, lora_b_init, lora_c_init, lora_s_init: initialiser overrides of the adapter factors
        (``None``: the defaults above).

    >>> import jax, jax.numpy as jnp
    >>> layer = RSSBilinearLoRADense(features=4, rank=2, lora_alpha=4.0)
    >>> x, p = jnp.ones((3, 5)), jnp.ones((3, 2))           # per-example p
    >>> variables = layer.init(jax.random.key(0), x, p)
    >>> sorted(variables["params"])
    ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_c', 'lora_s']
    >>> layer.apply(variables, x, p).shape, layer.adapter_config.scale
    ((3, 4), 2.0)
    """

    features: int
    rank: int
    lora_alpha: float
    use_bias: bool = True
    gate: str = "linear"
    gate_offset: float = 0.0
    gate_hidden: int = 16
    shift: bool = True
    use_rslora: bool = False
    lora_dropout: float = 0.0
    lora_a_init: str = "lora"
    p_mean: tuple[float, ...] | None = None
    p_std: tuple[float, ...] | None = None
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    lora_a_init_fn: Initializer | None = None
    lora_b_init: Initializer | None = None
    lora_c_init: Initializer | None = None
    lora_s_init: Initializer | None = None

    @property
    def adapter_config(self) -> AdapterConfig:
        """This layer's :class:`~rssbl_jax.AdapterConfig` (validated): what merge and checkpoints take."""
        return AdapterConfig(
            rank=self.rank,
            lora_alpha=self.lora_alpha,
            gate=self.gate,
            gate_offset=self.gate_offset,
            gate_hidden=self.gate_hidden,
            shift=self.shift,
            use_rslora=self.use_rslora,
            lora_dropout=self.lora_dropout,
            lora_a_init=self.lora_a_init,
            p_mean=self.p_mean,
            p_std=self.p_std,
        )

    @classmethod
    def from_config(cls, features: int, config: AdapterConfig, **kwargs: Any) -> RSSBilinearLoRADense:
        """A layer with the settings of ``config`` (patterns are not applied: one config, one layer)."""
        shift = kwargs.pop("shift", True if config.shift is None else config.shift)
        return cls(
            features=features,
            rank=config.rank,
            lora_alpha=config.lora_alpha,
            gate=config.gate,
            gate_offset=config.gate_offset,
            gate_hidden=config.gate_hidden,
            shift=shift,
            use_rslora=config.use_rslora,
            lora_dropout=config.lora_dropout,
            lora_a_init=config.lora_a_init,
            p_mean=config.p_mean,
            p_std=config.p_std,
            **kwargs,
        )

    @nn.compact
    def __call__(self, x: jax.Array, operating_params: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """Apply the adapted layer to ``x [..., d_in]`` under operating parameters ``p``."""
        layer = self.adapter_config.resolve(None)
        if self.features < 1:
            raise ValueError(f"features must be positive; got features={self.features}.")
        if operating_params is None:
            raise ValueError(f"operating_params (p) is None for x.shape={jnp.shape(x)}; pass p of shape [d_p].")
        x, p = jnp.asarray(x), jnp.asarray(operating_params)
        if self.has_variable("params", "lora_s") or self.has_variable("params", "lora_gate_w"):
            d_p = self.get_variable("params", "lora_gate_w" if layer.gate == "mlp" else "lora_s").shape[0]
        elif self.has_variable("params", "lora_c"):
            d_p = self.get_variable("params", "lora_c").shape[0]
        else:
            if p.ndim == 0:
                raise ValueError(f"operating_params must be [d_p] or [*lead, d_p]; got a scalar for x.shape={x.shape}.")
            d_p = p.shape[-1]
        core.lead_axes(x.shape, p.shape, d_p)
        if self.has_variable("params", "kernel"):
            d_in = self.get_variable("params", "kernel").shape[0]
            if x.shape[-1] != d_in:
                raise ValueError(f"x must be [..., d_in] with d_in={d_in}; got x.shape={x.shape}.")
        d_in = x.shape[-1]

        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        factorization = core.dense_factorization((d_in, self.features), layer.rank, self.precision)
        overrides = {
            "lora_a": self.lora_a_init_fn,
            "lora_b": self.lora_b_init,
            "lora_c": self.lora_c_init,
            "lora_s": self.lora_s_init,
        }
        specs = core.adapter_params(layer, factorization, d_p, shift=self.shift, initializers=overrides)
        factors = {name: self.param(name, init, shape, self.param_dtype) for name, (shape, init) in specs.items()}

        names = list(factors)
        x, p, kernel, bias, *values = promote_dtype(x, p, kernel, bias, *factors.values(), dtype=self.dtype)
        factors = dict(zip(names, values, strict=True))
        rng = None
        if layer.lora_dropout > 0 and not nn.merge_param("deterministic", self.deterministic, deterministic):
            rng = self.make_rng("dropout")
        return core.adapted_dense(x, p, kernel, bias, factors, layer, precision=self.precision, dropout_rng=rng)
