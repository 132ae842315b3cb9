"""Flax linen front-end: a thin ``nn.Module`` over :func:`rssbl_jax.apply.apply_adapter`.

``p`` is the layer's second argument on every call; nothing is stored between calls, so a traced function computes
with the ``p`` it was given.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta
from flax.linen.dtypes import promote_dtype

from rssbl_jax import apply, contract, core, gates, tree
from rssbl_jax.config import AdapterConfig
from rssbl_jax.fastpath import DEFAULT_THRESHOLDS, Thresholds
from rssbl_jax.methods import RSS

SETTINGS = tuple("gate gate_offset gate_hidden shift use_rslora lora_dropout lora_a_init p_mean p_std".split())
"""The :class:`~rssbl_jax.AdapterConfig` fields that are also fields of the layer (defaults read from the config)."""
_DEFAULT = {field.name: field.default for field in dataclasses.fields(AdapterConfig)}

Initializer = jax.nn.initializers.Initializer
default_kernel_init = nn.initializers.lecun_normal()
default_lora_a_init = core.default_lora_a_init
default_lora_c_init = gates.default_lora_c_init


class RSSBilinearLoRADense(nn.Module):
    r"""A Dense layer with a rank-space update modulated by operating parameters ``p``.

    .. math::

        y = W x + b + s\, B\big((A x) \odot g(\hat p) + S \hat p\big), \qquad s = \frac{\alpha_{\text{lora}}}{r}

    with the gate ``g`` of :class:`rssbl_jax.AdapterConfig` (the linear gate ``g0 + C p`` by default). ``kernel`` and
    ``bias`` are ``nn.Dense``'s, so a Dense checkpoint loads unchanged; the adapter adds ``lora_a (d_in, r)``,
    ``lora_b (r, d_out)``, ``lora_c (d_p, r)``, ``lora_s (d_p, r)`` (and the affine and MLP gates' leaves), ``d_p``
    from ``p`` at ``init``. ``p`` is ``[d_p]`` or ``[*lead, d_p]``, ``lead`` a prefix of ``x``'s leading axes (else a
    ``ValueError`` naming ``d_p`` and both shapes, at trace time). ``B = 0`` at init
    (:func:`rssbl_jax.core.adapter_params`); ``init`` warns when a concrete ``p`` has all-zero rows, where the linear
    gate and shift vanish, without ``p_mean`` (the ``p = 0`` pitfall of ``docs/guides/options.md``).

    Attributes:
      features, rank: output width ``d_out``; adapter rank ``r``.
      lora_alpha: the update is multiplied by ``lora_alpha / rank`` (PEFT's convention).
      use_bias: whether the base layer has a bias.
      gate, gate_offset, gate_hidden, use_rslora, lora_dropout, lora_a_init, p_mean, p_std: as in
        :class:`rssbl_jax.AdapterConfig`.
      shift: whether to learn the shift ``S p`` (``None``: where the layer has a bias).
      config: the :class:`~rssbl_jax.AdapterConfig` of :meth:`from_config`; ``None``: the one of the fields above.
      deterministic: disable ``lora_dropout`` (also a ``__call__`` argument); dropout uses the ``"dropout"`` rng.
      dtype, param_dtype: compute dtype (``None``: inferred from inputs and params); dtype of all parameters.
      precision, kernel_init, bias_init: as in ``nn.Dense``.
      thresholds: when the fast paths are taken (:class:`rssbl_jax.fastpath.Thresholds`); same output either way.
      lora_a_init_fn, lora_b_init, lora_c_init, lora_s_init: initialiser overrides (``None``: the defaults).

    >>> layer, x, p = RSSBilinearLoRADense(features=4, rank=2, lora_alpha=4.0), jnp.ones((3, 5)), jnp.ones((3, 2))
    >>> variables = layer.init(jax.random.key(0), x, p)                    # per-example p
    >>> layer.apply(variables, x, p).shape, layer.adapter_config.scale
    ((3, 4), 2.0)
    """

    features: int
    rank: int
    lora_alpha: float
    use_bias: bool = True
    gate: str = _DEFAULT["gate"]
    gate_offset: float = _DEFAULT["gate_offset"]
    gate_hidden: int = _DEFAULT["gate_hidden"]
    shift: bool | None = True
    use_rslora: bool = _DEFAULT["use_rslora"]
    lora_dropout: float = _DEFAULT["lora_dropout"]
    lora_a_init: str = _DEFAULT["lora_a_init"]
    p_mean: tuple[float, ...] | None = None
    p_std: tuple[float, ...] | None = None
    config: AdapterConfig | None = None
    deterministic: bool | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    thresholds: Thresholds = DEFAULT_THRESHOLDS
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    lora_a_init_fn: Initializer | None = None
    lora_b_init: Initializer | None = None
    lora_c_init: Initializer | None = None
    lora_s_init: Initializer | None = None

    @property
    def adapter_config(self) -> AdapterConfig:
        """This layer's validated :class:`~rssbl_jax.AdapterConfig` (``config`` with its fields): what merge takes."""
        settings = {name: getattr(self, name) for name in SETTINGS}
        if self.config is not None:  # the layer's own fields win over the config's (from_config(..., shift=True))
            return self.config.replace(rank=self.rank, lora_alpha=self.lora_alpha, **settings)
        return AdapterConfig(rank=self.rank, lora_alpha=self.lora_alpha, **settings)

    @classmethod
    def from_config(cls, features: int, config: AdapterConfig, **kwargs: Any) -> RSSBilinearLoRADense:
        """A layer with the settings of ``config`` (patterns not applied), which :attr:`adapter_config` returns.

        >>> from rssbl_jax import AdapterConfig
        >>> config = AdapterConfig(rank=2, lora_alpha=4.0, gate="affine", targets=("hidden",))
        >>> RSSBilinearLoRADense.from_config(8, config).adapter_config == config
        True
        """
        settings = {name: getattr(config, name) for name in SETTINGS}
        return cls(features=features, rank=config.rank, lora_alpha=config.lora_alpha, config=config,
                   **(settings | kwargs))  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array, operating_params: jax.Array, deterministic: bool | None = None) -> jax.Array:
        """Apply the adapted layer to ``x [..., d_in]`` under operating parameters ``p``."""
        layer = self.adapter_config.resolve(None)
        if self.features < 1:
            raise ValueError(f"features must be positive; got features={self.features}.")
        x = jnp.asarray(x)
        if self.has_variable("params", "kernel"):
            d_in = self.get_variable("params", "kernel").shape[0]
            if x.shape[-1] != d_in:
                raise ValueError(f"x must be [..., d_in] with d_in={d_in}; got x.shape={x.shape}.")
        d_in = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jnp.matmul(x.reshape(-1, d_in), kernel, precision=self.precision)
        if bias is not None:
            y = y + bias[None]
        y = y.reshape(*x.shape[:-1], self.features)

        method = RSS(thresholds=self.thresholds)
        factorization = core.dense_factorization(
            (d_in, self.features), layer.rank, self.precision, fused_max_b_size=self.thresholds.fused_max_b_size
        )
        shift = self.use_bias if self.shift is None else self.shift
        # d_p of the leaves that exist (None at init: from p), and p checked against x before any leaf is touched
        existing = {name: meta.unbox(self.get_variable("params", name)) for name in tree.ADAPTER_NAMES}
        d_p = gates.d_p_from_shapes({k: jnp.shape(v) for k, v in existing.items() if v is not None}, layer)
        if operating_params is not None and d_p is not None:
            try:
                contract.lead_axes(x.shape, jnp.shape(operating_params), d_p)
            except ValueError as error:
                raise ValueError(f"{type(self).__name__}: {error}") from None
        overrides = {"lora_a": self.lora_a_init_fn, "lora_b": self.lora_b_init, "lora_c": self.lora_c_init}
        overrides |= {"lora_s": self.lora_s_init} if shift else {}
        if self.is_initializing() and not self.has_variable("params", "lora_a"):
            apply.warn_if_silent(method, layer, operating_params, type(self).__name__)
        factors = apply.linen_leaves(
            self, method, layer, factorization, operating_params, shift=shift, param_dtype=self.param_dtype,
            initializers={name: init for name, init in overrides.items() if init is not None},
            where=type(self).__name__,
        )  # fmt: skip
        rng = None
        if layer.lora_dropout > 0 and not nn.merge_param("deterministic", self.deterministic, deterministic):
            rng = self.make_rng("dropout")
        return apply.apply_adapter(method, layer, factorization, x, operating_params, y, factors, dtype=self.dtype,
                                   precision=self.precision, dropout_rng=rng, where=type(self).__name__)  # fmt: skip
