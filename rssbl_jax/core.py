r"""The update and the fold: the one place the RSSBilinearLoRA update is computed, and its merge at a point.

:math:`\Delta y = s\, B\big((A x) \odot g(\hat p) + S \hat p\big),\ \hat p = (p - \mu) / \sigma`:
:func:`adapter_update` computes it for every layer kind, :func:`adapter_params` names the leaves for every front-end
and :func:`fold` merges at one operating point with the same gate. Split so each concern can be read and changed on
its own; the rest lives in :mod:`rssbl_jax.contract` (the ``p`` contract), :mod:`rssbl_jax.gates` (the gates and
their leaves), :mod:`rssbl_jax.fastpath` and :mod:`rssbl_jax.factorization` (the layer kinds), their names importable
from here.
Flax's kernel convention (``x @ kernel``): ``kernel (d_in, d_out)``, ``lora_a (d_in, r)``, ``lora_b (r, d_out)``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from rssbl_jax import gates
from rssbl_jax.config import LayerConfig
from rssbl_jax.contract import lead_axes as lead_axes
from rssbl_jax.contract import normalize_operating_params as normalize_operating_params
from rssbl_jax.factorization import Factorization as Factorization
from rssbl_jax.factorization import dense_factorization as dense_factorization
from rssbl_jax.fastpath import DEFAULT_THRESHOLDS, Thresholds, modulated_add
from rssbl_jax.fastpath import FUSED_MAX_B_SIZE as FUSED_MAX_B_SIZE
from rssbl_jax.fastpath import SWEEP_MAX_BASIS as SWEEP_MAX_BASIS
from rssbl_jax.fastpath import add_low_rank as add_low_rank
from rssbl_jax.fastpath import sweep_coefficients as sweep_coefficients
from rssbl_jax.gates import Factors, LeafSpecs, PrecisionLike
from rssbl_jax.gates import Initializer as Initializer
from rssbl_jax.gates import check_factors as check_factors
from rssbl_jax.gates import d_p_of as d_p_of
from rssbl_jax.gates import default_lora_c_init as default_lora_c_init
from rssbl_jax.gates import gate_and_shift as gate_and_shift
from rssbl_jax.gates import modulate as modulate
from rssbl_jax.tree import ADAPTER_NAMES as ADAPTER_NAMES
from rssbl_jax.tree import is_adapter_leaf_name as is_adapter_leaf_name

default_lora_a_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""PEFT's LoRA ``A`` initialiser (Kaiming-uniform with a=√5): U(-1/√d_in, 1/√d_in)."""


def adapter_update(
    factorization: Factorization,
    x: jax.Array,
    operating_params: jax.Array,
    factors: Factors,
    layer: LayerConfig,
    *,
    precision: PrecisionLike = None,
    dropout_rng: jax.Array | None = None,
    add_to: jax.Array | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> jax.Array:
    r"""The update of any layer kind, the one function that computes it.

    :math:`\Delta y = s\, B\big((A\, \mathrm{dropout}(x)) \odot g(\hat p) + S \hat p\big)`, computed as
    ``up(modulate(down(x, A), p), s · B)`` in the compute dtype (dropout when ``layer.lora_dropout > 0`` and
    ``dropout_rng`` is given). With ``add_to`` (the base output) it returns ``add_to + Δy`` through the fast paths of
    :func:`~rssbl_jax.fastpath.modulated_add` as ``thresholds`` allow (the fused add's threshold is applied by
    :func:`dense_factorization`).
    Raises ``ValueError`` at trace time, naming ``d_p`` and the shapes of ``x`` and ``p``, when ``p`` does not fit ``x``
    (checked against the layer's own input, before any reshape) or the factors do not fit ``layer``.

    >>> from rssbl_jax import LayerConfig
    >>> factorization = dense_factorization((3, 2), rank=1)
    >>> factors = {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2)), "lora_c": jnp.array([[2.0]])}
    >>> adapter_update(factorization, jnp.ones((1, 3)), jnp.array([0.5]), factors, LayerConfig(1, 1.0, 1.0)).tolist()
    [[3.0, 3.0]]
    """
    if operating_params is None:
        raise ValueError(
            f"operating_params (p) is None for an adapted {factorization.kind} layer with input shape "
            f"{jnp.shape(x)}; pass p of shape [d_p] or [*lead, d_p]."
        )
    x, p = jnp.asarray(x), jnp.asarray(operating_params)
    check_factors(factors, layer)
    lead_axes((*x.shape, 1) if factorization.integer_inputs else x.shape, p.shape, d_p_of(factors, layer))
    if layer.lora_dropout > 0 and dropout_rng is not None and not factorization.integer_inputs:
        keep = 1.0 - layer.lora_dropout
        mask = jax.random.bernoulli(dropout_rng, keep, x.shape)
        x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
    h = factorization.down(x, factors["lora_a"])
    lora_b = jnp.asarray(factors["lora_b"])
    scaled_b = lora_b * jnp.asarray(layer.scale, lora_b.dtype)
    if add_to is None:
        return factorization.up(modulate(h, p, factors, layer, precision=precision), scaled_b)
    return modulated_add(
        factorization, add_to, h, p, factors, scaled_b, layer,
        precision=precision, sweep_max_basis=thresholds.sweep_max_basis,
    )  # fmt: skip


def adapter_params(layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool) -> LeafSpecs:
    """The adapter leaves of one layer, ``{name: (shape, initializer)}``, shared by every front-end.

    Defaults start the model as its base and let training start for every ``p``: ``B = S = 0``; ``A`` PEFT's
    Kaiming-uniform (``"lora"``), ``N(0, 1/r²)`` (``"gaussian"``) or ``N(0, 1)`` for embeddings; the gate's leaves from
    :meth:`rssbl_jax.gates.Gate.leaves`. Front-ends override any by name (:func:`rssbl_jax.apply.leaf_specs`).
    """
    if d_p < 1:
        raise ValueError(f"d_p must be positive; got d_p={d_p}.")
    if factorization.integer_inputs:
        a_init = jax.nn.initializers.normal(1.0)
    elif layer.lora_a_init == "gaussian":
        a_init = jax.nn.initializers.normal(1.0 / layer.rank)
    else:
        a_init = default_lora_a_init
    specs = {
        "lora_a": (factorization.a_shape, a_init),
        "lora_b": (factorization.b_shape, jax.nn.initializers.zeros),
        **gates.get(layer.gate).leaves(layer, d_p),
    }
    if shift:
        specs["lora_s"] = ((d_p, layer.rank), jax.nn.initializers.zeros)
    return specs


def _linear_gate_layer(
    lora_a: ArrayLike, lora_b: ArrayLike, lora_c: ArrayLike, lora_s: ArrayLike | None, scale: float, gate_offset: float
) -> tuple[LayerConfig, dict[str, Any]]:
    """The settings and factors of the plain-array functions: the linear gate ``g0 + C p``, no normalisation."""
    rank = jnp.shape(lora_c)[-1]
    layer = LayerConfig(rank=rank, lora_alpha=scale * rank, scale=scale, gate_offset=gate_offset)
    return layer, {"lora_a": lora_a, "lora_b": lora_b, "lora_c": lora_c, "lora_s": lora_s}


def _check_dense(x: ArrayLike, lora_a: ArrayLike, lora_b: ArrayLike) -> None:
    x_shape, a_shape, b_shape = jnp.shape(x), jnp.shape(lora_a), jnp.shape(lora_b)
    if len(a_shape) != 2 or len(b_shape) != 2 or len(x_shape) < 1 or x_shape[-1] != a_shape[0]:
        raise ValueError(
            f"x must be [..., d_in] with d_in = lora_a.shape[0]; got x.shape={x_shape}, lora_a {a_shape}, "
            f"lora_b {b_shape}."
        )


def rss_update(
    x: Float[ArrayLike, "*batch d_in"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    lora_a: Float[ArrayLike, "d_in r"],
    lora_b: Float[ArrayLike, "r d_out"],
    lora_c: Float[ArrayLike, "d_p r"],
    lora_s: Float[ArrayLike, "d_p r"] | None,
    *,
    scale: float,
    gate_offset: float = 0.0,
    precision: PrecisionLike = None,
) -> Float[Array, "*batch d_out"]:
    r"""The original formulation's dense update on plain arrays: :func:`adapter_update` for a Dense kernel.

    ``scale * (((x @ A) * (gate_offset + p @ C) + p @ S) @ B)``; ``ValueError`` when ``x`` or ``p`` does not fit.

    >>> a, b, c, s = jnp.ones((3, 1)), jnp.ones((1, 4)), jnp.array([[0.5]]), jnp.array([[1.0]])
    >>> rss_update(jnp.ones((2, 3)), jnp.array([2.0]), a, b, c, s, scale=2.0).tolist()[0]  # 2 * (3 * (0.5*2) + 1*2)
    [10.0, 10.0, 10.0, 10.0]
    """
    _check_dense(x, lora_a, lora_b)
    layer, factors = _linear_gate_layer(lora_a, lora_b, lora_c, lora_s, scale, gate_offset)
    factorization = dense_factorization((jnp.shape(lora_a)[0], jnp.shape(lora_b)[1]), layer.rank, precision)
    return adapter_update(factorization, x, operating_params, factors, layer, precision=precision)


def rss_dense(
    x: Float[ArrayLike, "*batch d_in"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    kernel: Float[ArrayLike, "d_in d_out"],
    bias: Float[ArrayLike, " d_out"] | None,
    lora_a: Float[ArrayLike, "d_in r"],
    lora_b: Float[ArrayLike, "r d_out"],
    lora_c: Float[ArrayLike, "d_p r"],
    lora_s: Float[ArrayLike, "d_p r"] | None,
    *,
    scale: float,
    gate_offset: float = 0.0,
    precision: PrecisionLike = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> Float[Array, "*batch d_out"]:
    r"""The original formulation's dense layer on plain arrays: ``x @ kernel + bias`` plus :func:`rss_update`.

    :math:`y = W x + b + \alpha\, B\big((A x) \odot (g_0 + C p) + S p\big)`, with the fast paths of
    :func:`adapter_update` as ``thresholds`` allow; ``ValueError`` when ``x``, ``bias`` or ``p`` does not fit.

    >>> a, bb, c, s = jnp.ones((2, 1)), jnp.zeros((1, 2)), jnp.ones((1, 1)), jnp.zeros((1, 1))
    >>> rss_dense(jnp.ones((1, 2)), jnp.ones(1), jnp.eye(2), jnp.zeros(2), a, bb, c, s, scale=1.0).tolist()  # B = 0
    [[1.0, 1.0]]
    """
    _check_dense(x, lora_a, lora_b)
    layer, factors = _linear_gate_layer(lora_a, lora_b, lora_c, lora_s, scale, gate_offset)
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if kernel.ndim != 2 or x.shape[-1:] != kernel.shape[:1]:
        raise ValueError(
            f"x must be [..., d_in] with d_in = kernel.shape[0]; got x.shape={x.shape}, kernel.shape={kernel.shape}."
        )
    if bias is not None and jnp.shape(bias) != (kernel.shape[1],):
        raise ValueError(f"bias must be (d_out,)=({kernel.shape[1]},); got bias.shape={jnp.shape(bias)}.")
    factorization = dense_factorization(
        kernel.shape, layer.rank, precision, fused_max_b_size=thresholds.fused_max_b_size
    )
    y = jnp.matmul(x.reshape(-1, kernel.shape[0]), kernel, precision=precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1, -1))
    y = y.reshape(*x.shape[:-1], kernel.shape[1])
    return adapter_update(
        factorization, x, operating_params, factors, layer, precision=precision, add_to=y, thresholds=thresholds
    )


class MergedDense(NamedTuple):
    """Kernel and bias of a plain layer equal to an adapted one at one operating point."""

    kernel: Array
    bias: Array


def fold(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    factors: Factors,
    operating_params: Float[ArrayLike, " d_p"],
    layer: LayerConfig,
    *,
    precision: PrecisionLike = None,
) -> MergedDense:
    r"""Fold the adapter of any kernel kind into it at one operating point ``p0``.

    :math:`W' = W + s \sum_k g(\hat p_0)_k\, A_{\ldots k} \otimes B_{k \ldots}`, :math:`b' = b + s\, (S \hat p_0)\, B`
    (:func:`gate_and_shift`; factors compact or aligned, :mod:`rssbl_jax.factorization`). Stacked adapters (``nn.scan``:
    ``lora_c (L, d_p, r)``) fold slice by slice; a layer without bias gets one; dtypes are kept. ``ValueError`` when
    ``p`` is not ``[d_p]`` or the factors do not fit the kernel.

    >>> from rssbl_jax import LayerConfig
    >>> f = dict(lora_a=jnp.ones((2, 1)), lora_b=jnp.ones((1, 2)), lora_c=jnp.array([[2.0]]), lora_c0=jnp.ones(1))
    >>> merged = fold(jnp.zeros((2, 2)), None, f, jnp.array([0.5]), LayerConfig(1, 1.0, 1.0, gate="affine"))  # 1 + 2p
    >>> merged.kernel.tolist(), merged.bias.tolist()
    ([[2.0, 2.0], [2.0, 2.0]], [0.0, 0.0])
    """
    gates.require_leaves(factors, layer)
    n_stack = jnp.ndim(factors["lora_c"]) - 2
    if n_stack > 0:
        in_axes = {name: (None if value is None else 0) for name, value in factors.items()}
        fn = lambda k, b, f: fold(k, b, f, operating_params, layer, precision=precision)  # noqa: E731
        for _ in range(n_stack):
            fn = jax.vmap(fn, in_axes=(0, None if bias is None else 0, in_axes))
        return fn(kernel, bias, dict(factors))
    p0 = jnp.asarray(operating_params)
    d_p = d_p_of(factors, layer)
    if p0.shape != (d_p,):
        raise ValueError(
            f"merge needs one operating point of shape (d_p,)=({d_p},); got operating_params.shape={p0.shape}. "
            "Use jax.vmap to merge a batch of operating points."
        )
    check_factors(factors, layer)
    kernel, lora_a, lora_b = jnp.asarray(kernel), jnp.asarray(factors["lora_a"]), jnp.asarray(factors["lora_b"])
    rank = layer.rank
    gate, shift = gate_and_shift(p0[None], factors, layer, precision=precision)
    scaled_a = lora_a * gate[0].reshape((1,) * (lora_a.ndim - 1) + (rank,))
    n_a, n_b = lora_a.ndim - 1, lora_b.ndim - 1
    if n_a + n_b == kernel.ndim and lora_a.shape[:-1] + lora_b.shape[1:] == kernel.shape:
        kernel_delta = jnp.tensordot(scaled_a, lora_b, axes=1, precision=precision)
        out_shape = lora_b.shape[1:]
    elif n_a == n_b == kernel.ndim:
        kernel_delta = jnp.einsum("...r,r...->...", scaled_a, lora_b, precision=precision)
        out_shape = tuple(d for d, a_dim in zip(lora_b.shape[1:], lora_a.shape[:-1], strict=True) if a_dim == 1)
    else:
        kernel_delta = None
    if kernel_delta is None or kernel_delta.shape != kernel.shape:
        raise ValueError(
            f"adapter factors lora_a {lora_a.shape} and lora_b {lora_b.shape} do not fit kernel {kernel.shape}."
        )
    if bias is not None and math.prod(jnp.shape(bias)) != math.prod(out_shape):
        raise ValueError(f"bias {jnp.shape(bias)} does not fit the kernel's output axes {out_shape}.")
    if shift is None:
        bias_delta = jnp.zeros(out_shape, kernel_delta.dtype)
    else:
        bias_delta = jnp.matmul(shift[0], lora_b.reshape(rank, -1), precision=precision)
        bias_delta = bias_delta.reshape(out_shape if bias is None else jnp.shape(bias))
    base_bias = jnp.zeros(out_shape, kernel.dtype) if bias is None else jnp.asarray(bias)
    return MergedDense(
        kernel=(kernel + layer.scale * kernel_delta).astype(kernel.dtype),
        bias=(base_bias + layer.scale * bias_delta).astype(base_bias.dtype),
    )


def merge_kernel(
    kernel: ArrayLike,
    bias: ArrayLike | None,
    lora_a: ArrayLike,
    lora_b: ArrayLike,
    lora_c: Float[ArrayLike, "d_p r"],
    lora_s: Float[ArrayLike, "d_p r"] | None,
    operating_params: Float[ArrayLike, " d_p"],
    *,
    scale: float,
    gate_offset: float = 0.0,
    precision: PrecisionLike = None,
) -> MergedDense:
    r""":func:`fold` for the linear gate on plain arrays (any kernel kind; ``lora_s=None``: no shift).

    :math:`W' = W + \alpha \sum_k (g_0 + C p_0)_k\, A_{\ldots k} \otimes B_{k \ldots}`,
    :math:`b' = b + \alpha\, (S p_0)\, B`.

    >>> a, b = jnp.ones((3, 1)), jnp.ones((1, 2, 4))  # DenseGeneral: in (3,), features (2, 4)
    >>> merged = merge_kernel(jnp.zeros((3, 2, 4)), None, a, b, jnp.ones((1, 1)), None, jnp.array([2.0]), scale=0.5)
    >>> merged.kernel.shape, float(merged.kernel[0, 0, 0]), merged.bias.shape
    ((3, 2, 4), 1.0, (2, 4))
    """
    layer, factors = _linear_gate_layer(lora_a, lora_b, lora_c, lora_s, scale, gate_offset)
    return fold(kernel, bias, factors, operating_params, layer, precision=precision)


def merge_dense(
    kernel: Float[ArrayLike, "d_in d_out"],
    bias: Float[ArrayLike, " d_out"] | None,
    lora_a: Float[ArrayLike, "d_in r"],
    lora_b: Float[ArrayLike, "r d_out"],
    lora_c: Float[ArrayLike, "d_p r"],
    lora_s: Float[ArrayLike, "d_p r"],
    operating_params: Float[ArrayLike, " d_p"],
    *,
    scale: float,
    gate_offset: float = 0.0,
    precision: PrecisionLike = None,
) -> MergedDense:
    r"""Fold a dense adapter (linear gate) into its kernel at ``p0``: :func:`merge_kernel` for 2-D kernels.

    :math:`W' = W + \alpha\, A \,\mathrm{diag}(g_0 + C p_0)\, B`, :math:`b' = b + \alpha\, (S p_0)\, B`.

    >>> a, b, c, s = jnp.array([[1.0], [0.0]]), jnp.array([[0.0, 1.0]]), jnp.array([[2.0]]), jnp.array([[3.0]])
    >>> merged = merge_dense(jnp.zeros((2, 2)), jnp.zeros(2), a, b, c, s, jnp.array([0.5]), scale=1.0)  # g=2p, Sp=3p
    >>> merged.kernel.tolist(), merged.bias.tolist()
    ([[0.0, 1.0], [0.0, 0.0]], [0.0, 1.5])
    """
    shapes = (jnp.shape(kernel), jnp.shape(lora_a), jnp.shape(lora_b))
    if any(len(shape) != 2 for shape in shapes):
        raise ValueError(f"merge_dense needs 2-D kernel, lora_a and lora_b; got {shapes} (use merge_kernel).")
    layer, factors = _linear_gate_layer(lora_a, lora_b, lora_c, lora_s, scale, gate_offset)
    return fold(kernel, bias, factors, operating_params, layer, precision=precision)
