"""Flax linen front-end: a thin ``nn.Module`` over :func:`rssbl_jax.core.rss_dense`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen.dtypes import promote_dtype

from rssbl_jax import core

Initializer = jax.nn.initializers.Initializer

default_kernel_init = nn.initializers.lecun_normal()
default_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""PEFT's LoRA ``A`` initialiser (Kaiming-uniform with a=√5): U(-1/√d_in, 1/√d_in)."""
default_lora_c_init = nn.initializers.lecun_normal()
"""Gate weights with variance 1/d_p, so ``C p`` is O(1) for standardised ``p``."""


class RSSBilinearLoRADense(nn.Module):
    r"""A Dense layer with a rank-space update modulated by operating parameters ``p``.

    .. math::

        y = W x + b + \frac{\alpha_{\text{lora}}}{r}\, B\big((A x) \odot (g_0 + C p) + S p\big)

    ``W`` (``kernel``) and ``b`` (``bias``) have exactly ``nn.Dense``'s names and shapes, so a pretrained
    Dense checkpoint loads unchanged; the adapter adds ``lora_a (d_in, r)``, ``lora_b (r, d_out)``,
    ``lora_c (d_p, r)`` and ``lora_s (d_p, r)``, with ``d_p`` taken from ``p`` at ``init``.

    ``p`` is ``[d_p]`` (shared by all rows of ``x``) or ``[*lead, d_p]`` with ``lead`` a prefix of ``x``'s
    leading axes (one condition per example, broadcast over tokens/pixels). Anything else raises a
    ``ValueError`` naming ``d_p`` and both shapes, at trace time.

    Default initialisation: ``B = 0`` so the output equals the base layer; ``A`` as in PEFT's LoRA; ``C``
    lecun-normal so the gate is O(1) for standardised ``p`` and ``∂L/∂B = (A x ⊙ C p)ᵀ ∂L/∂y`` is non-zero
    for every ``p ≠ 0``; ``S = 0``. At ``p = 0`` exactly, the seed's gate ``C p`` and the shift ``S p``
    both vanish, so no initialisation can make the adapter act there; ``gate_offset=1.0`` (gate ``1 + C p``)
    does, and then ``C`` starts at zero so the layer starts as plain LoRA.

    Attributes:
      features: output width ``d_out``.
      rank: adapter rank ``r``.
      lora_alpha: scaling numerator; the update is multiplied by ``lora_alpha / rank`` (PEFT's convention).
      use_bias: whether the base layer has a bias.
      gate_offset: constant ``g_0`` added to the gate: 0.0 is the seed's formula, 1.0 gives ``1 + C p``.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); inferred from inputs and params when ``None``.
      param_dtype: dtype of all parameters.
      precision: matmul precision, as in ``nn.Dense``.
      kernel_init, bias_init: initialisers of the base ``kernel`` and ``bias``.
      lora_a_init, lora_b_init, lora_c_init, lora_s_init: initialisers of the adapter factors;
        ``lora_c_init=None`` picks lecun-normal for ``gate_offset == 0`` and zeros otherwise.

    >>> import jax, jax.numpy as jnp
    >>> layer = RSSBilinearLoRADense(features=4, rank=2, lora_alpha=4.0)
    >>> x, p = jnp.ones((3, 5)), jnp.ones((3, 2))           # per-example p
    >>> variables = layer.init(jax.random.key(0), x, p)
    >>> sorted(variables["params"])
    ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_c', 'lora_s']
    >>> layer.apply(variables, x, p).shape
    (3, 4)
    """

    features: int
    rank: int
    lora_alpha: float
    use_bias: bool = True
    gate_offset: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    lora_a_init: Initializer = default_lora_a_init
    lora_b_init: Initializer = nn.initializers.zeros_init()
    lora_c_init: Initializer | None = None
    lora_s_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array, operating_params: jax.Array) -> jax.Array:
        """Apply the adapted layer to ``x [..., d_in]`` under operating parameters ``p``."""
        if self.rank < 1 or self.features < 1:
            raise ValueError(f"rank and features must be positive; got rank={self.rank}, features={self.features}.")
        x, p = jnp.asarray(x), jnp.asarray(operating_params)
        if self.has_variable("params", "lora_c"):
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

        c_init = self.lora_c_init
        if c_init is None:
            c_init = default_lora_c_init if self.gate_offset == 0 else nn.initializers.zeros_init()
        kernel = self.param("kernel", self.kernel_init, (d_in, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        lora_a = self.param("lora_a", self.lora_a_init, (d_in, self.rank), self.param_dtype)
        lora_b = self.param("lora_b", self.lora_b_init, (self.rank, self.features), self.param_dtype)
        lora_c = self.param("lora_c", c_init, (d_p, self.rank), self.param_dtype)
        lora_s = self.param("lora_s", self.lora_s_init, (d_p, self.rank), self.param_dtype)

        x, p, kernel, bias, lora_a, lora_b, lora_c, lora_s = promote_dtype(
            x, p, kernel, bias, lora_a, lora_b, lora_c, lora_s, dtype=self.dtype
        )
        return core.rss_dense(
            x,
            p,
            kernel,
            bias,
            lora_a,
            lora_b,
            lora_c,
            lora_s,
            scale=self.lora_alpha / self.rank,
            gate_offset=self.gate_offset,
            precision=self.precision,
        )
