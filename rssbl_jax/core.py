r"""Pure functions on arrays: the one place the RSSBilinearLoRA update is computed, and its merge.

.. math::

    \Delta y = s\, B\big((A x) \odot g(\hat p) + S \hat p\big), \qquad \hat p = (p - \mu) / \sigma

Read this file top to bottom to see the whole method:

- :func:`gate_and_shift` is the one place the operating parameters act: it normalises ``p`` and evaluates the
  gate family (``linear`` ``g0 + C p``, ``affine`` ``c0 + C p``, ``mlp`` ``c0 + C tanh(W p + b)``) and the shift;
- :func:`adapter_update` is the one function that computes the update for every layer kind: a
  :class:`Factorization` supplies the kind's two linear maps ``x ↦ A x`` and ``h ↦ B h``
  (:mod:`rssbl_jax.factorization` holds them for Dense, DenseGeneral, Einsum, Conv and Embed), and the scale is
  folded into ``B`` here and nowhere else;
- :func:`fold` merges an adapter into its kernel at one operating point, with the same :func:`gate_and_shift`.

The linen layer, :func:`rss_update`, injection (linen and NNX), the NNX layers and :func:`rssbl_jax.merge` all
call these. Shapes use Flax's kernel convention (inputs on the left, ``x @ kernel``)::

    kernel (d_in, d_out)   bias (d_out,)
    lora_a (d_in, r)       lora_b (r, d_out)
    lora_c (d_p, r)        lora_s (d_p, r)         (mlp gate: lora_c (hidden, r))
    lora_c0 (r,)           lora_gate_w (d_p, hidden)   lora_gate_b (hidden,)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn
from jaxtyping import Array, ArrayLike, Float

from rssbl_jax.config import LayerConfig

ADAPTER_NAMES = ("lora_a", "lora_b", "lora_c", "lora_s", "lora_c0", "lora_gate_w", "lora_gate_b")
"""Leaf names of the RSS adapter parameters (``lora_s``, ``lora_c0`` and the ``lora_gate_*`` leaves are optional).

An adapter layer is identified by holding ``lora_a``, ``lora_b`` and ``lora_c``; every ``lora_*`` leaf in it is an
adapter leaf (an :class:`AdapterMethod` plug-in may add leaves of its own under that prefix)."""


def is_adapter_leaf_name(name: str) -> bool:
    """Whether a leaf name inside an adapter layer names an adapter leaf (``lora_*``)."""
    return isinstance(name, str) and name.startswith("lora_")


PrecisionLike = Any
Factors = Mapping[str, Any]
Initializer = jax.nn.initializers.Initializer

default_lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
"""PEFT's LoRA ``A`` initialiser (Kaiming-uniform with a=√5): U(-1/√d_in, 1/√d_in)."""
default_lora_c_init = nn.initializers.lecun_normal()
"""Gate weights with variance 1/d_p, so ``C p`` is O(1) for standardised ``p``."""


def lead_axes(x_shape: Sequence[int], p_shape: Sequence[int], d_p: int) -> int:
    """Check an operating-parameter shape against an input shape and return its number of lead axes.

    ``p`` is either ``[d_p]`` (one condition shared by every row of ``x``) or ``[*lead, d_p]`` where
    ``lead`` equals a prefix of ``x.shape[:-1]`` (one condition per example, broadcast over the remaining
    axes, e.g. tokens or pixels). Sizes must match exactly: a lead axis of size 1 is not broadcast.

    Args:
      x_shape: shape of the input, ``[..., d_in]``.
      p_shape: shape of the operating parameters.
      d_p: the number of operating parameters the layer was built for.

    Returns:
      ``len(lead)``: 0 for a shared condition.

    Raises:
      ValueError: naming ``d_p`` and both shapes, when ``p`` does not fit.

    >>> lead_axes((4, 16, 32), (4, 3), d_p=3)
    1
    >>> lead_axes((4, 16, 32), (3,), d_p=3)
    0
    """
    x_shape, p_shape = tuple(x_shape), tuple(p_shape)
    if len(p_shape) == 0 or p_shape[-1] != d_p:
        raise ValueError(
            f"operating_params must have last axis d_p={d_p}; got operating_params.shape={p_shape} "
            f"for x.shape={x_shape}."
        )
    lead = p_shape[:-1]
    if len(x_shape) < 1 or len(lead) > len(x_shape) - 1 or x_shape[: len(lead)] != lead:
        raise ValueError(
            f"operating_params of shape {p_shape} (d_p={d_p}) must be [d_p] or [*lead, d_p] with lead a "
            f"prefix of x's leading axes {x_shape[:-1]}; x.shape={x_shape}."
        )
    return len(lead)


# --------------------------------------------------------------------------------------------------
# The operating parameters act here and nowhere else
# --------------------------------------------------------------------------------------------------


def d_p_of(factors: Factors, layer: LayerConfig) -> int:
    """The number of operating parameters an adapter was built for."""
    return jnp.shape(factors["lora_gate_w" if layer.gate == "mlp" else "lora_c"])[-2]


def check_factors(factors: Factors, layer: LayerConfig) -> None:
    """Raise ``ValueError`` naming the leaves and shapes when the gate/shift factors do not fit ``layer``."""
    required = {"linear": ("lora_c",), "affine": ("lora_c", "lora_c0"), "mlp": ("lora_c", "lora_c0", "lora_gate_w")}
    missing = [name for name in ("lora_a", "lora_b", *required[layer.gate]) if factors.get(name) is None]
    if missing:
        raise ValueError(f"the {layer.gate!r} gate needs adapter leaves {missing}; have {sorted(factors)}.")
    shape = {name: tuple(jnp.shape(value)) for name, value in factors.items() if value is not None}
    rank = shape["lora_a"][-1]
    d_p = d_p_of(factors, layer)
    gate_in = layer.gate_hidden if layer.gate == "mlp" else d_p
    gate_out = 1 if layer.scalar_gate else rank
    expected = {"lora_c": (gate_in, gate_out), "lora_s": (d_p, rank), "lora_c0": (gate_out,)}
    if layer.gate == "mlp":
        expected |= {"lora_gate_w": (d_p, layer.gate_hidden), "lora_gate_b": (layer.gate_hidden,)}
    bad = {
        name: expected[name]
        for name in expected
        if name in shape and shape[name][-len(expected[name]) :] != expected[name]
    }
    if bad or shape["lora_b"][0] != rank or rank != layer.rank:
        raise ValueError(
            f"adapter factors do not fit rank r={layer.rank}, d_p={d_p}, gate={layer.gate!r} "
            "(expected lora_a (..., r), "
            f"lora_b (r, ...){''.join(f', {name} {s}' for name, s in bad.items())}); got "
            + ", ".join(f"{name} {s}" for name, s in shape.items())
            + "."
        )
    if layer.p_mean is not None and len(layer.p_mean) != d_p:
        raise ValueError(f"p_mean/p_std have {len(layer.p_mean)} entries but the adapter has d_p={d_p}.")


def gate_and_shift(
    p: Float[ArrayLike, "n d_p"], factors: Factors, layer: LayerConfig, *, precision: PrecisionLike = None
) -> tuple[Float[Array, "n r"], Float[Array, "n r"] | None]:
    r"""The rank-wise gate ``g(p̂)`` and shift ``S p̂`` for rows of operating parameters: where ``p`` acts.

    .. math::

        \hat p = (p - \mu)/\sigma, \qquad
        g(\hat p) = \begin{cases} g_0 + C \hat p & \text{linear} \\ c_0 + C \hat p & \text{affine} \\
        c_0 + C \tanh(W_g \hat p + b_g) & \text{mlp} \end{cases}, \qquad b(\hat p) = S \hat p

    Args:
      p: operating parameters ``[n, d_p]``.
      factors: ``lora_c`` (and ``lora_s``, ``lora_c0``, ``lora_gate_w``, ``lora_gate_b`` as the gate needs).
      layer: the layer's resolved settings.
      precision: of the small matmuls with ``p``.

    Returns:
      ``(gate [n, r], shift [n, r] or None)``.

    >>> import numpy as np
    >>> from rssbl_jax.config import LayerConfig
    >>> layer = LayerConfig(rank=1, lora_alpha=1.0, scale=1.0, gate="affine")
    >>> gate, shift = gate_and_shift(np.array([[2.0]]), {"lora_c": np.array([[3.0]]), "lora_c0": np.array([1.0])},
    ...                              layer)
    >>> gate.tolist(), shift
    ([[7.0]], None)
    """
    p = jnp.asarray(p)
    if layer.p_mean is not None:
        p = (p - jnp.asarray(layer.p_mean, p.dtype)[None]) / jnp.asarray(layer.p_std, p.dtype)[None]
    features = p
    if layer.gate == "mlp":
        hidden = jnp.matmul(p, jnp.asarray(factors["lora_gate_w"]), precision=precision)
        if factors.get("lora_gate_b") is not None:
            hidden = hidden + jnp.asarray(factors["lora_gate_b"])[None]
        features = jnp.tanh(hidden)
    gate = jnp.matmul(features, jnp.asarray(factors["lora_c"]), precision=precision)
    if layer.gate == "linear":
        if layer.gate_offset:
            gate = gate + jnp.asarray(layer.gate_offset, gate.dtype)
    else:
        gate = gate + jnp.asarray(factors["lora_c0"])[None]
    if layer.scalar_gate:  # one value per condition, the same for every rank
        gate = jnp.broadcast_to(gate, (gate.shape[0], layer.rank))
    lora_s = factors.get("lora_s")
    shift = None if lora_s is None else jnp.matmul(p, jnp.asarray(lora_s), precision=precision)
    return gate, shift


def modulate(
    h: Float[ArrayLike, "*batch r"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    factors: Factors,
    layer: LayerConfig,
    *,
    precision: PrecisionLike = None,
) -> Float[Array, "*batch r"]:
    r"""The rank-space modulation ``h ⊙ g(p̂) + S p̂`` of rank-space activations ``h = A x``.

    ``p`` is ``[d_p]`` or ``[*lead, d_p]`` with ``lead`` a prefix of ``h.shape[:-1]``; the gate is applied on a
    ``[lead, rest, r]`` view, so no ``[..., r]`` copy of ``p`` is materialised.

    Raises:
      ValueError: at trace time, naming ``d_p`` and both shapes, when ``p`` does not fit ``h``.

    >>> import numpy as np
    >>> from rssbl_jax.config import LayerConfig
    >>> layer = LayerConfig(rank=1, lora_alpha=1.0, scale=1.0)
    >>> factors = {"lora_c": np.array([[2.0]]), "lora_s": np.array([[1.0]])}
    >>> modulate(np.ones((2, 3, 1)), np.array([[1.0], [2.0]]), factors, layer)[:, 0, 0].tolist()
    [3.0, 6.0]
    """
    h, p = jnp.asarray(h), jnp.asarray(operating_params)
    rank = h.shape[-1] if h.ndim else 0
    d_p = d_p_of(factors, layer)
    n_lead = lead_axes((*h.shape[:-1], rank), p.shape, d_p)
    lead_size = math.prod(h.shape[:n_lead]) if n_lead else 1
    rest_size = math.prod(h.shape[n_lead:-1])
    gate, shift = gate_and_shift(p.reshape(lead_size, d_p), factors, layer, precision=precision)
    out = h.reshape(lead_size, rest_size, rank) * gate[:, None, :]
    if shift is not None:
        out = out + shift[:, None, :]
    return out.reshape(h.shape)


# --------------------------------------------------------------------------------------------------
# The update, for every layer kind
# --------------------------------------------------------------------------------------------------


class Factorization(NamedTuple):
    """How one layer kind factors its kernel: the factor shapes and the maps ``x ↦ A x`` and ``h ↦ B h``.

    ``down(x, lora_a)`` returns rank-space activations ``[..., r]`` whose leading axes are the input's
    non-contracted axes in order (so ``p`` of shape ``[*lead, d_p]`` broadcasts over tokens/pixels);
    ``up(h, lora_b)`` returns an array of the layer's output shape. ``kernel_name`` is the base weight the
    factors fold into (``"kernel"``, or ``"embedding"`` for Embed); ``rows(x_shape)`` is the shape of the input's
    row axes, against which ``p``'s lead axes are checked. ``up_add(y, h, lora_b)``, when set, returns
    ``y + up(h, lora_b)`` without materialising the update (see :func:`add_low_rank`).
    """

    kind: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    down: Callable[[jax.Array, jax.Array], jax.Array]
    up: Callable[[jax.Array, jax.Array], jax.Array]
    kernel_name: str = "kernel"
    integer_inputs: bool = False
    up_add: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None


FUSED_MAX_B_SIZE = 32768
"""Up to this many elements of ``B`` (``r × d_out``) :func:`add_low_rank` adds ``h B`` inside the output's elementwise
loop; above it, a matmul and an add.

The loop reads all of ``B`` for every row, so it pays while ``B`` stays in the core's cache. Measured on CPU
(fused / matmul time of the forward and the train step, 2-4k tokens): ``r × d_out`` = 16384 (r = 16, d_out = 1024):
0.71-0.73 / 0.75-0.78; 32768 (r = 16, d_out = 2048): 0.94 / 0.97; 65536 (r = 16, d_out = 4096; r = 32,
d_out = 2048; r = 64, d_out = 1024): 1.03-1.22 / 1.04-1.18. The matmul form costs memory: one ``n × d_out`` update
array per layer while it is added (the pod-shaped model of BENCHMARKS.md: compiled-step temporaries 230 MiB against
198 MiB fused). It is read when a function is traced, so ``rssbl_jax.core.FUSED_MAX_B_SIZE = 2**62`` before tracing
trades that speed back for the memory."""


def _fused_sum(y: jax.Array, h: jax.Array, b: jax.Array) -> jax.Array:
    return y + jnp.sum(h[:, :, None] * b[None, :, :], axis=1)


@jax.custom_jvp
def _add_low_rank_fused(y: jax.Array, h: jax.Array, b: jax.Array) -> jax.Array:
    return _fused_sum(y, h, b)


@_add_low_rank_fused.defjvp
def _add_low_rank_jvp(primals, tangents):
    # the tangent in matmul form: linear in the tangents, so reverse mode transposes it into ∂h = ȳ bᵀ, ∂b = hᵀ ȳ
    y, h, b = primals
    dy, dh, db = tangents
    return _add_low_rank_fused(y, h, b), dy + jnp.matmul(dh, b) + jnp.matmul(h, db)


def add_low_rank(
    y: Float[ArrayLike, "n d_out"],
    h: Float[ArrayLike, "n r"],
    b: Float[ArrayLike, "r d_out"],
    *,
    precision: PrecisionLike = None,
) -> Float[Array, "n d_out"]:
    r"""``y + h @ b`` for a small rank ``r``, without an ``n × d_out`` update array in the forward pass.

    .. math::

        y'_{ne} = y_{ne} + \sum_{k<r} h_{nk}\, b_{ke}

    For ``r × d_out ≤`` :data:`FUSED_MAX_B_SIZE` the sum is written as a broadcast-multiply-reduce, which XLA fuses
    with the add into one elementwise pass over ``y`` (the pass a bias add already makes): the update is never
    written and read back. A ``h @ b`` matmul would write it (``n × d_out``) and the add read it again; at
    d = 1024 on CPU that was most of the adapter's forward cost. Derivatives use the matmul form (``custom_jvp``
    with the tangent ``ẏ + ḣ b + h ḃ``, whose transpose gives ``∂h = ȳ bᵀ``, ``∂b = hᵀ ȳ``), since the reduce
    form's transpose would be a reduction over ``n`` that XLA does not turn back into a matmul; forward mode
    (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) works too. Above the threshold, and under ``precision`` other
    than ``None``, it is ``y + h @ b``.

    >>> import numpy as np
    >>> add_low_rank(np.zeros((2, 3)), np.ones((2, 1)), np.arange(3.0)[None]).tolist()
    [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
    """
    y, h, b = jnp.asarray(y), jnp.asarray(h), jnp.asarray(b)
    if b.size > FUSED_MAX_B_SIZE or precision is not None:
        return y + jnp.matmul(h, b, precision=precision).astype(y.dtype)
    return _add_low_rank_fused(y, h, b).astype(y.dtype)


SWEEP_MAX_BASIS = 128
"""The largest number of basis outputs ``M`` for which :func:`modulated_add` sweeps through the condition basis.

Measured on CPU (d = 1024, K = 256): the basis sweep took 1.03-1.15× the time of writing the outputs at M ≤ 65,
1.7× at M = 129 and 2.2× at M = 201, against 2.0-2.3× for the vmapped one-condition form."""

GATE_FACTOR_NAMES = ("lora_c", "lora_s", "lora_c0", "lora_gate_w", "lora_gate_b")
"""The factors through which ``p`` acts (:func:`gate_and_shift`)."""


def sweep_coefficients(
    p: Float[ArrayLike, "k d_p"], factors: Factors, layer: LayerConfig, *, precision: PrecisionLike = None
) -> Float[Array, "k m"]:
    r"""The coordinates ``c(p)`` in which the update is linear: ``Δy(p) = Σ_m c_m(p) M_m`` (see :func:`modulated_add`).

    ``c = [1, \hat p]`` for the ``linear`` and ``affine`` gates; ``[1, tanh(W_g \hat p + b_g)]``, then ``\hat p``
    when the layer has a shift, for the ``mlp`` gate.
    """
    p = normalize_operating_params(jnp.asarray(p), layer)
    columns = [jnp.ones((p.shape[0], 1), p.dtype)]
    if layer.gate == "mlp":
        hidden = jnp.matmul(p, jnp.asarray(factors["lora_gate_w"]), precision=precision)
        if factors.get("lora_gate_b") is not None:
            hidden = hidden + jnp.asarray(factors["lora_gate_b"])[None]
        columns.append(jnp.tanh(hidden))
        if factors.get("lora_s") is not None:
            columns.append(p)
    else:
        columns.append(p)
    return jnp.concatenate(columns, axis=1)


def _rank_space_basis(h: jax.Array, factors: Factors, layer: LayerConfig) -> tuple[jax.Array | None, jax.Array]:
    """``(Z_0, [Z_1, …])`` with ``modulate(h, p) = Z_0 + Σ_m c_m(p) Z_m`` (``Z_0`` is ``None`` when it is zero)."""
    expand = (1,) * (h.ndim - 1)
    lora_c = jnp.asarray(factors["lora_c"], h.dtype)
    stack = h[None] * lora_c.reshape(lora_c.shape[0], *expand, lora_c.shape[1])
    lora_s = factors.get("lora_s")
    if lora_s is not None:
        rows = jnp.asarray(lora_s, h.dtype).reshape(lora_s.shape[0], *expand, lora_s.shape[1])
        if layer.gate == "mlp":
            stack = jnp.concatenate([stack, jnp.broadcast_to(rows, (rows.shape[0], *h.shape))], axis=0)
        else:
            stack = stack + rows
    if layer.gate == "linear":
        constant = None if not layer.gate_offset else h * jnp.asarray(layer.gate_offset, h.dtype)
    else:
        constant = h * jnp.asarray(factors["lora_c0"], h.dtype).reshape(*expand, -1)
    return constant, stack


def modulated_add(
    factorization: Factorization,
    y: jax.Array,
    h: jax.Array,
    operating_params: jax.Array,
    factors: Factors,
    scaled_b: jax.Array,
    layer: LayerConfig,
    *,
    precision: PrecisionLike = None,
) -> jax.Array:
    r"""``y + up(h ⊙ g(p̂) + S p̂, sB)``: the last step of the update, where ``p`` enters, with a rule for sweeps.

    Called on one condition it is :func:`modulate` followed by the kind's ``up`` (for Dense, :func:`add_low_rank`:
    the update added inside the output's elementwise pass). Under ``jax.vmap`` over ``p`` alone, with ``x`` and the
    weights shared (a sweep over operating conditions), it uses that the update is linear in the coordinates
    ``c(p)`` of :func:`sweep_coefficients`:

    .. math::

        y_k = \Big(y + \mathrm{up}(Z_0)\Big) + \sum_{m} c_m(p_k)\, \mathrm{up}(Z_m),
        \qquad Z_0 = h \odot g_0, \quad Z_m = h \odot C_m + S_m

    so the ``K`` outputs are one ``[K, M] @ [M, |y|]`` matmul over ``M = 1 + d_p`` basis outputs (``1 + hidden
    (+ d_p)`` for the ``mlp`` gate): each output element is written once, with ``M`` multiply-adds, and the base
    output enters the sum as the basis element of coefficient 1 instead of in a second pass. Used when ``M ≤ K``
    and ``M ≤`` :data:`SWEEP_MAX_BASIS`, ``p`` has one row per condition (``[d_p]``), and nothing else is
    batched; otherwise the vmapped one-condition computation. Derivatives (``custom_jvp``, forward and reverse
    mode) are those of the one-condition form, and differentiating a sweep batches them as usual.
    """
    gate_factors = {name: factors[name] for name in GATE_FACTOR_NAMES if factors.get(name) is not None}

    def one_condition(y, h, p, gate_factors, b):
        z = modulate(h, p, gate_factors, layer, precision=precision)
        if factorization.up_add is not None:
            return factorization.up_add(y, z, b)
        return y + factorization.up(z, b).astype(y.dtype)

    def sweep(y, h, ps, gate_factors, b):
        constant, stack = _rank_space_basis(h, gate_factors, layer)
        coefficients = sweep_coefficients(ps, gate_factors, layer, precision=precision)
        first = y if constant is None else y + factorization.up(constant, b).astype(y.dtype)
        rest = jax.vmap(lambda z: factorization.up(z, b))(stack).astype(y.dtype)
        basis = jnp.concatenate([first[None], rest], axis=0).reshape(1 + rest.shape[0], -1)
        out = jnp.matmul(coefficients.astype(y.dtype), basis, precision=precision)
        return out.reshape(ps.shape[0], *y.shape)

    unit = jax.custom_batching.custom_vmap(one_condition)

    @unit.def_vmap
    def _rule(axis_size, in_batched, y, h, p, gate_factors, b):
        y_batched, h_batched, p_batched, factors_batched, b_batched = in_batched
        shared = not (y_batched or h_batched or b_batched or any(jax.tree.leaves(factors_batched)))
        if shared and p_batched and p.ndim == 2:
            n_basis = 1 + p.shape[1] + (layer.gate_hidden if layer.gate == "mlp" else 0)
            if layer.gate == "mlp" and "lora_s" not in gate_factors:
                n_basis -= p.shape[1]
            if n_basis <= min(axis_size, SWEEP_MAX_BASIS):
                return sweep(y, h, p, gate_factors, b), True
        axes = tuple(jax.tree.map(lambda batched: 0 if batched else None, ib) for ib in in_batched)
        return jax.vmap(one_condition, in_axes=axes)(y, h, p, gate_factors, b), True

    @jax.custom_jvp
    def add(y, h, p, gate_factors, b):
        return unit(y, h, p, gate_factors, b)

    @add.defjvp
    def _jvp(primals, tangents):
        y, h, p, gate_factors, b = primals
        dy, dh, dp, dfactors, db = tangents
        z, dz = jax.jvp(
            lambda h, p, f: modulate(h, p, f, layer, precision=precision), (h, p, gate_factors), (dh, dp, dfactors)
        )
        dout = dy + (factorization.up(dz, b) + factorization.up(z, db)).astype(dy.dtype)
        return add(y, h, p, gate_factors, b), dout

    return add(y, h, operating_params, gate_factors, scaled_b)


def dense_factorization(kernel_shape: Sequence[int], rank: int, precision: PrecisionLike = None) -> Factorization:
    """Dense kernel ``(d_in, d_out)``: ``A (d_in, r)``, ``B (r, d_out)``; the matmuls run on 2-D rows.

    (XLA differentiates a 2-D ``x @ A`` faster than a 3-D one on CPU.)
    """
    d_in, d_out = kernel_shape

    def down(x, a):
        return jnp.matmul(x.reshape(-1, d_in), a, precision=precision).reshape(*x.shape[:-1], rank)

    def up(h, b):
        return jnp.matmul(h.reshape(-1, rank), b, precision=precision).reshape(*h.shape[:-1], d_out)

    def up_add(y, h, b):
        out = add_low_rank(y.reshape(-1, d_out), h.reshape(-1, rank), b, precision=precision)
        return out.reshape(y.shape)

    return Factorization("Dense", (d_in, rank), (rank, d_out), down, up, up_add=up_add)


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
) -> jax.Array:
    r"""The update of any layer kind, the one function that computes it.

    .. math::

        \Delta y = s\, B\big((A\, \mathrm{dropout}(x)) \odot g(\hat p) + S \hat p\big)

    computed as ``up(modulate(down(x, A), p), s · B)``: the scale ``s`` is folded into ``B`` (``r × out``), never
    applied to the ``[..., out]`` result. Dropout acts only when ``layer.lora_dropout > 0`` and a
    ``dropout_rng`` is given (training). Arrays must already be in the compute dtype. With ``add_to`` (an array of the
    output's shape, e.g. the base layer's output) it returns ``add_to + Δy`` through :func:`modulated_add`: for a
    Dense kernel without materialising ``Δy`` (:func:`add_low_rank`), and under ``jax.vmap`` over ``p`` alone as one
    matmul over a basis of the conditions.

    Raises:
      ValueError: at trace time, naming ``d_p`` and the shapes of ``x`` and ``p`` (checked against the layer's own
        input, before any reshape) when ``p`` does not fit, or the factors do not fit ``layer``.

    >>> import numpy as np
    >>> from rssbl_jax.config import LayerConfig
    >>> factorization = dense_factorization((3, 2), rank=1)
    >>> factors = {"lora_a": np.ones((3, 1)), "lora_b": np.ones((1, 2)), "lora_c": np.array([[2.0]])}
    >>> adapter_update(factorization, np.ones((1, 3)), np.array([0.5]), factors, LayerConfig(1, 1.0, 1.0)).tolist()
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
    return modulated_add(factorization, add_to, h, p, factors, scaled_b, layer, precision=precision)


def adapter_params(
    layer: LayerConfig,
    factorization: Factorization,
    d_p: int,
    *,
    shift: bool,
    initializers: Mapping[str, Initializer | None] | None = None,
) -> dict[str, tuple[tuple[int, ...], Initializer]]:
    """The adapter leaves of one layer: ``{name: (shape, initializer)}``, shared by every front-end.

    Default initialisation, so that training starts for every ``p`` and the model starts as its base: ``B = 0``;
    ``A`` PEFT's Kaiming-uniform (``lora_a_init="lora"``), ``N(0, 1/r²)`` (``"gaussian"``), or ``N(0, 1)`` rows
    for an embedding table; ``C`` lecun-normal, so ``∂L/∂B = (A x ⊙ C p)ᵀ ∂L/∂y ≠ 0`` for every ``p ≠ 0`` (zeros for
    the linear gate with an offset ``g0 ≠ 0``, which then starts as plain LoRA); ``c0 = gate_offset``; the MLP
    gate's hidden layer lecun-normal with zero bias; ``S = 0``. ``initializers`` overrides any of them by name.
    """
    if d_p < 1:
        raise ValueError(f"d_p must be positive; got d_p={d_p}.")
    rank = layer.rank
    if factorization.integer_inputs:
        a_init = nn.initializers.normal(1.0)
    elif layer.lora_a_init == "gaussian":
        a_init = nn.initializers.normal(1.0 / rank)
    else:
        a_init = default_lora_a_init
    linear_offset = layer.gate == "linear" and layer.gate_offset != 0
    gate_in = layer.gate_hidden if layer.gate == "mlp" else d_p
    gate_out = 1 if layer.scalar_gate else rank
    specs = {
        "lora_a": (factorization.a_shape, a_init),
        "lora_b": (factorization.b_shape, nn.initializers.zeros_init()),
        "lora_c": ((gate_in, gate_out), nn.initializers.zeros_init() if linear_offset else default_lora_c_init),
    }
    if layer.gate != "linear":
        specs["lora_c0"] = ((gate_out,), nn.initializers.constant(layer.gate_offset))
    if layer.gate == "mlp":
        specs["lora_gate_w"] = ((d_p, layer.gate_hidden), default_lora_c_init)
        specs["lora_gate_b"] = ((layer.gate_hidden,), nn.initializers.zeros_init())
    if shift:
        specs["lora_s"] = ((d_p, rank), nn.initializers.zeros_init())
    for name, init in (initializers or {}).items():
        if init is not None and name in specs:
            specs[name] = (specs[name][0], init)
    return specs


class AdapterMethod(Protocol):
    """What an injected adapter computes: the extension point of :func:`rssbl_jax.inject` (linen and NNX).

    RSSBilinearLoRA is :data:`RSS`; other conditional adapters (the baselines of ``experiments/``) plug in the same
    way and so reach every layer kind through the same injection and factorizations. ``params`` names the adapter
    leaves (``lora_*``; ``lora_a`` and ``lora_b`` must be among them, which marks the layer as adapted) with
    their shapes and initialisers; ``update`` returns the layer's output update. A method with a true
    ``needs_base_output`` attribute also receives the base layer's output as ``base_output=``.
    """

    def params(
        self, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool
    ) -> dict[str, tuple[tuple[int, ...], Initializer]]: ...

    def update(
        self,
        factorization: Factorization,
        x: jax.Array,
        operating_params: jax.Array,
        factors: Factors,
        layer: LayerConfig,
        *,
        precision: PrecisionLike = None,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array: ...


def normalize_operating_params(p: jax.Array, layer: LayerConfig) -> jax.Array:
    """``(p - p_mean) / p_std`` over the last axis when the layer has a normalisation, else ``p`` itself.

    RSS applies it inside :func:`gate_and_shift` (so :func:`fold` folds it in); injection applies it before any other
    :class:`AdapterMethod`'s ``update``, so every method sees the same standardised ``p``.

    >>> from rssbl_jax.config import LayerConfig
    >>> layer = LayerConfig(1, 1.0, 1.0, p_mean=(10.0,), p_std=(2.0,))
    >>> normalize_operating_params(jnp.array([[14.0]]), layer).tolist()
    [[2.0]]
    """
    if layer.p_mean is None:
        return p
    p = jnp.asarray(p)
    shape = (1,) * (p.ndim - 1) + (-1,)
    mean = jnp.asarray(layer.p_mean, p.dtype).reshape(shape)
    return (p - mean) / jnp.asarray(layer.p_std, p.dtype).reshape(shape)


class RSSMethod(NamedTuple):
    """RSSBilinearLoRA as an :class:`AdapterMethod`: :func:`adapter_params` and :func:`adapter_update`."""

    def params(self, layer, factorization, d_p, *, shift):
        return adapter_params(layer, factorization, d_p, shift=shift)

    def update(self, factorization, x, operating_params, factors, layer, *, precision=None, dropout_rng=None):
        return adapter_update(
            factorization, x, operating_params, factors, layer, precision=precision, dropout_rng=dropout_rng
        )


RSS = RSSMethod()
"""The default method of :func:`rssbl_jax.inject`."""


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
    r"""The seed's dense update without the base layer, on plain arrays: :func:`adapter_update` for a Dense kernel.

    .. math::

        \Delta y = \alpha \, B\big((A x) \odot (g_0 + C p) + S p\big), \qquad \alpha = \text{scale}

    written in the kernel convention as ``scale * (((x @ A) * (gate_offset + p @ C) + p @ S) @ B)``.

    Raises:
      ValueError: at trace time, when ``x`` or ``operating_params`` does not fit the factors.

    >>> import numpy as np
    >>> x, p = np.ones((2, 3)), np.array([2.0])
    >>> a, b = np.ones((3, 1)), np.ones((1, 4))
    >>> c, s = np.array([[0.5]]), np.array([[1.0]])
    >>> rss_update(x, p, a, b, c, s, scale=2.0).tolist()[0]   # 2 * (3 * (0.5*2) + 1*2)
    [10.0, 10.0, 10.0, 10.0]
    """
    x, lora_a, lora_b = jnp.asarray(x), jnp.asarray(lora_a), jnp.asarray(lora_b)
    rank = jnp.shape(lora_c)[-1]
    _check_dense(x, lora_a, lora_b)
    layer = LayerConfig(rank=rank, lora_alpha=scale * rank, scale=scale, gate_offset=gate_offset)
    factors = {"lora_a": lora_a, "lora_b": lora_b, "lora_c": lora_c, "lora_s": lora_s}
    factorization = dense_factorization((lora_a.shape[0], lora_b.shape[1]), rank, precision)
    return adapter_update(factorization, x, operating_params, factors, layer, precision=precision)


def _check_dense(x: Array, lora_a: Array, lora_b: Array) -> None:
    if lora_a.ndim != 2 or lora_b.ndim != 2 or x.ndim < 1 or x.shape[-1] != lora_a.shape[0]:
        raise ValueError(
            f"x must be [..., d_in] with d_in = lora_a.shape[0]; got x.shape={x.shape}, lora_a {lora_a.shape}, "
            f"lora_b {lora_b.shape}."
        )


def adapted_dense(
    x: Float[ArrayLike, "*batch d_in"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    kernel: Float[ArrayLike, "d_in d_out"],
    bias: Float[ArrayLike, " d_out"] | None,
    factors: Factors,
    layer: LayerConfig,
    *,
    precision: PrecisionLike = None,
    dropout_rng: jax.Array | None = None,
) -> Float[Array, "*batch d_out"]:
    r"""A dense layer with the update: ``x @ kernel + bias + adapter_update(...)``, base and update kept in 2-D.

    .. math::

        y = W x + b + s\, B\big((A x) \odot g(\hat p) + S \hat p\big)

    >>> import numpy as np
    >>> from rssbl_jax.config import LayerConfig
    >>> x, p = np.ones((1, 2)), np.ones((1,))
    >>> factors = {"lora_a": np.ones((2, 1)), "lora_b": np.zeros((1, 2)), "lora_c": np.ones((1, 1))}
    >>> adapted_dense(x, p, np.eye(2), np.zeros(2), factors, LayerConfig(1, 1.0, 1.0)).tolist()   # B = 0: the base
    [[1.0, 1.0]]
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if kernel.ndim != 2 or x.shape[-1:] != kernel.shape[:1]:
        raise ValueError(
            f"x must be [..., d_in] with d_in = kernel.shape[0]; got x.shape={x.shape}, kernel.shape={kernel.shape}."
        )
    if bias is not None and jnp.shape(bias) != (kernel.shape[1],):
        raise ValueError(f"bias must be (d_out,)=({kernel.shape[1]},); got bias.shape={jnp.shape(bias)}.")
    factorization = dense_factorization(kernel.shape, layer.rank, precision)
    y = jnp.matmul(x.reshape(-1, kernel.shape[0]), kernel, precision=precision)
    if bias is not None:
        y = y + jnp.reshape(bias, (1, -1))
    y = y.reshape(*x.shape[:-1], kernel.shape[1])
    # the update is added inside the bias-add pass over y (add_low_rank), never written out on its own
    return adapter_update(
        factorization, x, operating_params, factors, layer, precision=precision, dropout_rng=dropout_rng, add_to=y
    )


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
) -> Float[Array, "*batch d_out"]:
    r"""The seed's dense layer on plain arrays: ``x @ kernel + bias + rss_update(...)`` (:func:`adapted_dense`).

    .. math::

        y = W x + b + \alpha \, B\big((A x) \odot (g_0 + C p) + S p\big)

    >>> import numpy as np
    >>> x, p = np.ones((1, 2)), np.ones((1,))
    >>> w, b = np.eye(2), np.zeros(2)
    >>> a, bb, c, s = np.ones((2, 1)), np.zeros((1, 2)), np.ones((1, 1)), np.zeros((1, 1))
    >>> rss_dense(x, p, w, b, a, bb, c, s, scale=1.0).tolist()   # B = 0: the base layer
    [[1.0, 1.0]]
    """
    rank = jnp.shape(lora_c)[-1]
    _check_dense(jnp.asarray(x), jnp.asarray(lora_a), jnp.asarray(lora_b))
    layer = LayerConfig(rank=rank, lora_alpha=scale * rank, scale=scale, gate_offset=gate_offset)
    factors = {"lora_a": lora_a, "lora_b": lora_b, "lora_c": lora_c, "lora_s": lora_s}
    return adapted_dense(x, operating_params, kernel, bias, factors, layer, precision=precision)


# --------------------------------------------------------------------------------------------------
# Merge at one operating point
# --------------------------------------------------------------------------------------------------


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

    .. math::

        W' = W + s \sum_k g(\hat p_0)_k\, A_{\ldots k} \otimes B_{k \ldots}, \qquad b' = b + s\, (S \hat p_0)\, B

    with ``g`` and ``S p̂0`` from :func:`gate_and_shift`, the same function the update uses. Two factor layouts:

    - compact: ``lora_a (*in, r)``, ``lora_b (r, *out)`` with ``kernel.shape == (*in, *out)`` (Dense,
      DenseGeneral, Conv with ``in = (*window, c_in)``, Embed, Einsum with input axes first);
    - aligned: ``lora_a`` and ``lora_b`` both have the kernel's axes, each with the other factor's axes set
      to 1 (Einsum kernels whose input and output axes interleave); the outer product broadcasts.

    Adapters stacked over leading axes (``nn.scan``/``nn.vmap`` over layers: ``lora_c (L, d_p, r)``, ``kernel
    (L, ...)``) are folded slice by slice. A layer without bias gets one of ``B``'s output shape. Kernel and bias
    dtypes are preserved.

    Raises:
      ValueError: when ``operating_params`` is not ``[d_p]`` or the factors do not fit the kernel.

    >>> import numpy as np
    >>> from rssbl_jax.config import LayerConfig
    >>> factors = {"lora_a": np.ones((2, 1)), "lora_b": np.ones((1, 2)), "lora_c": np.array([[2.0]]),
    ...            "lora_c0": np.array([1.0])}                                    # affine gate: 1 + 2 p
    >>> merged = fold(np.zeros((2, 2)), None, factors, np.array([0.5]), LayerConfig(1, 1.0, 1.0, gate="affine"))
    >>> merged.kernel.tolist(), merged.bias.tolist()
    ([[2.0, 2.0], [2.0, 2.0]], [0.0, 0.0])
    """
    lora_c = factors["lora_c"]
    n_stack = jnp.ndim(lora_c) - 2
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
    r""":func:`fold` for the seed's linear gate on plain arrays (any kernel kind; ``lora_s=None``: no shift).

    .. math::

        W' = W + \alpha \sum_k (g_0 + C p_0)_k\, A_{\ldots k} \otimes B_{k \ldots}, \qquad
        b' = b + \alpha\, (S p_0)\, B

    >>> import numpy as np
    >>> kernel = np.zeros((3, 2, 4))                   # DenseGeneral: in (3,), features (2, 4)
    >>> a, b = np.ones((3, 1)), np.ones((1, 2, 4))
    >>> merged = merge_kernel(kernel, None, a, b, np.ones((1, 1)), None, np.array([2.0]), scale=0.5)
    >>> merged.kernel.shape, float(merged.kernel[0, 0, 0]), merged.bias.shape
    ((3, 2, 4), 1.0, (2, 4))
    """
    rank = jnp.shape(lora_c)[-1]
    layer = LayerConfig(rank=rank, lora_alpha=scale * rank, scale=scale, gate_offset=gate_offset)
    factors = {"lora_a": lora_a, "lora_b": lora_b, "lora_c": lora_c, "lora_s": lora_s}
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

    .. math::

        W' = W + \alpha\, A \,\mathrm{diag}(g_0 + C p_0)\, B, \qquad b' = b + \alpha\, (S p_0)\, B

    >>> import numpy as np
    >>> kernel, bias = np.zeros((2, 2)), np.zeros(2)
    >>> a, b = np.array([[1.0], [0.0]]), np.array([[0.0, 1.0]])        # A e_1, B e_2: one rank direction
    >>> c, s = np.array([[2.0]]), np.array([[3.0]])                    # gate 2 p, shift 3 p
    >>> merged = merge_dense(kernel, bias, a, b, c, s, np.array([0.5]), scale=1.0)
    >>> merged.kernel.tolist(), merged.bias.tolist()
    ([[0.0, 1.0], [0.0, 0.0]], [0.0, 1.5])
    """
    shapes = (jnp.shape(kernel), jnp.shape(lora_a), jnp.shape(lora_b))
    if any(len(shape) != 2 for shape in shapes):
        raise ValueError(f"merge_dense needs 2-D kernel, lora_a and lora_b; got {shapes} (use merge_kernel).")
    return merge_kernel(
        kernel, bias, lora_a, lora_b, lora_c, lora_s, operating_params,
        scale=scale, gate_offset=gate_offset, precision=precision,
    )  # fmt: skip
