r"""The two fast paths of the update: the fused Dense add (``custom_jvp``) and the sweep over ``p`` (``custom_vmap``).

:func:`add_low_rank` adds :math:`h B` in one elementwise pass; :func:`modulated_add` computes a sweep
:math:`p_1, \dots, p_K` as one matmul. Why a module of its own: both change *how* the update is computed, never
*what*, and each has a derivative or batching rule the rest of the library need not read. Their thresholds are
arguments (:class:`Thresholds`, carried from :func:`rssbl_jax.core.adapter_update` and
:func:`rssbl_jax.core.dense_factorization` to the trace), not globals read while tracing: a global set later does
nothing to a function already jitted, and two models in one program could not use different limits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from rssbl_jax import gates
from rssbl_jax.contract import normalize_operating_params
from rssbl_jax.gates import Factors, PrecisionLike

FUSED_MAX_B_SIZE = 32768
"""Default of :attr:`Thresholds.fused_max_b_size`: up to this many elements of ``B`` (``r × d_out``)
:func:`add_low_rank` adds ``h B`` inside the output's elementwise loop; above it, a matmul and an add.

The loop reads all of ``B`` per row, so it pays while ``B`` stays in cache: on CPU, fused / matmul time (forward and
train step) 0.71-0.78 at ``r × d_out`` = 16384, 0.94-0.97 at 32768, 1.03-1.22 at 65536 (BENCHMARKS.md). The matmul
form keeps one ``n × d_out`` array per layer (pod-shaped model: step temporaries 230 MiB against 198 MiB fused);
``Thresholds(fused_max_b_size=2**62)`` trades that speed back for the memory."""

SWEEP_MAX_BASIS = 128
"""Default of :attr:`Thresholds.sweep_max_basis`: the largest basis ``M`` :func:`modulated_add` sweeps through.

CPU, d = 1024, K = 256: the sweep took 1.03-1.15× the time of writing the outputs at M ≤ 65, 1.7× at M = 129 and
2.2× at M = 201, against 2.0-2.3× for the vmapped one-condition form."""


class Thresholds(NamedTuple):
    """When each fast path runs (:data:`FUSED_MAX_B_SIZE`, :data:`SWEEP_MAX_BASIS`); hashable: static in ``jit``.

    Attributes:
      fused_max_b_size: the largest ``B`` (``r × d_out`` elements) added in the output's elementwise pass.
      sweep_max_basis: the largest condition basis ``M`` swept as one matmul under ``jax.vmap`` over ``p``.
    """

    fused_max_b_size: int = FUSED_MAX_B_SIZE
    sweep_max_basis: int = SWEEP_MAX_BASIS


DEFAULT_THRESHOLDS = Thresholds()


@jax.custom_jvp
def _add_low_rank_fused(y: jax.Array, h: jax.Array, b: jax.Array) -> jax.Array:
    return y + jnp.sum(h[:, :, None] * b[None, :, :], axis=1)


@_add_low_rank_fused.defjvp
def _add_low_rank_jvp(primals, tangents):
    y, h, b = primals
    dy, dh, db = tangents
    return _add_low_rank_fused(y, h, b), dy + jnp.matmul(dh, b) + jnp.matmul(h, db)


def add_low_rank(
    y: Float[ArrayLike, "n d_out"],
    h: Float[ArrayLike, "n r"],
    b: Float[ArrayLike, "r d_out"],
    *,
    precision: PrecisionLike = None,
    fused_max_b_size: int = FUSED_MAX_B_SIZE,
) -> Float[Array, "n d_out"]:
    r"""``y + h @ b`` for a small rank ``r``, without an ``n × d_out`` update array in the forward pass.

    :math:`y'_{ne} = y_{ne} + \sum_{k<r} h_{nk}\, b_{ke}`. For ``r × d_out ≤ fused_max_b_size`` it is a
    broadcast-multiply-reduce that XLA fuses into the elementwise pass over ``y`` a bias add makes, so the update is
    never written and read back (at d = 1024 on CPU, that was most of the adapter's forward cost). Derivatives use
    the matmul form (``custom_jvp``, tangent ``ẏ + ḣ b + h ḃ``, transposed to ``∂h = ȳ bᵀ``, ``∂b = hᵀ ȳ``): the
    reduce form would transpose into a reduction over ``n`` that XLA does not turn back into a matmul. Forward mode
    works too. Above the threshold, or with a ``precision``, it is ``y + h @ b``.

    >>> add_low_rank(jnp.zeros((2, 3)), jnp.ones((2, 1)), jnp.arange(3.0)[None]).tolist()
    [[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]
    """
    y, h, b = jnp.asarray(y), jnp.asarray(h), jnp.asarray(b)
    if b.size > fused_max_b_size or precision is not None:
        return y + jnp.matmul(h, b, precision=precision).astype(y.dtype)
    return _add_low_rank_fused(y, h, b).astype(y.dtype)


def sweep_coefficients(
    p: Float[ArrayLike, "k d_p"], factors: Factors, layer: Any, *, precision: PrecisionLike = None
) -> Float[Array, "k m"]:
    r"""The coordinates ``c(p)`` in which the update is linear, ``Δy(p) = Σ_m c_m(p) M_m`` (:func:`modulated_add`).

    ``c = [1, φ(p̂)]``, plus ``p̂`` when there is a shift and ``φ(p̂) ≠ p̂`` (``mlp``: ``[1, tanh(W_g p̂ + b_g), p̂]``).
    """
    gate = gates.get(layer.gate)
    p = normalize_operating_params(jnp.asarray(p), layer)
    columns = [jnp.ones((p.shape[0], 1), p.dtype), gate.features(p, factors, precision=precision)]
    if not gate.features_are_p and factors.get("lora_s") is not None:
        columns.append(p)
    return jnp.concatenate(columns, axis=1)


def _rank_space_basis(h: jax.Array, factors: Factors, layer: Any) -> tuple[jax.Array | None, jax.Array]:
    """``(Z_0, [Z_1, …])`` with ``modulate(h, p) = Z_0 + Σ_m c_m(p) Z_m`` (``Z_0`` is ``None`` when it is zero)."""
    gate = gates.get(layer.gate)
    expand = (1,) * (h.ndim - 1)
    directions = jnp.asarray(gate.directions(factors), h.dtype)
    stack = h[None] * directions.reshape(directions.shape[0], *expand, directions.shape[1])
    if (lora_s := factors.get("lora_s")) is not None:
        rows = jnp.asarray(lora_s, h.dtype).reshape(lora_s.shape[0], *expand, lora_s.shape[1])
        if gate.features_are_p:
            stack = stack + rows
        else:
            stack = jnp.concatenate([stack, jnp.broadcast_to(rows, (rows.shape[0], *h.shape))], axis=0)
    constant = gate.constant(factors, layer)
    if constant is None:
        return None, stack
    return h * jnp.asarray(constant, h.dtype).reshape(() if jnp.ndim(constant) == 0 else (*expand, -1)), stack


def modulated_add(
    factorization: Any,
    y: jax.Array,
    h: jax.Array,
    operating_params: jax.Array,
    factors: Factors,
    scaled_b: jax.Array,
    layer: Any,
    *,
    precision: PrecisionLike = None,
    sweep_max_basis: int = SWEEP_MAX_BASIS,
) -> jax.Array:
    r"""``y + up(h ⊙ g(p̂) + S p̂, sB)``: the last step of the update, where ``p`` enters, with a rule for sweeps.

    On one condition: :func:`rssbl_jax.gates.modulate`, then the kind's ``up_add`` or ``up`` (Dense:
    :func:`add_low_rank`). Under ``jax.vmap`` over ``p`` alone (``x`` and weights shared) it uses that the update is
    linear in the coordinates ``c(p)`` of :func:`sweep_coefficients`:
    :math:`y_k = (y + \mathrm{up}(Z_0)) + \sum_m c_m(p_k)\, \mathrm{up}(Z_m)`, :math:`Z_0 = h \odot g_0`,
    :math:`Z_m = h \odot C_m + S_m`. The ``K`` outputs are one ``[K, M] @ [M, |y|]`` matmul over ``M = 1 + d_p``
    basis outputs (``mlp``: ``1 + hidden (+ d_p)``), each written once, the base output the coefficient-1 element. Used
    when ``M ≤ min(K, sweep_max_basis)``, ``p`` is ``[d_p]`` per condition and nothing else is batched; otherwise the
    vmapped one-condition form, whose derivatives (``custom_jvp``) it always uses.
    """
    gate_factors = {n: v for n, v in factors.items() if n not in ("lora_a", "lora_b") and v is not None}

    def one_condition(y, h, p, gate_factors, b):
        z = gates.modulate(h, p, gate_factors, layer, precision=precision)
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
            gate = gates.get(layer.gate)  # M: the constant, one per feature, d_p for a shift outside their span
            n_basis = 1 + jnp.shape(gate.directions(gate_factors))[0]
            if not gate.features_are_p and gate_factors.get("lora_s") is not None:
                n_basis += gates.d_p_of(gate_factors, layer)
            if n_basis <= min(axis_size, sweep_max_basis):
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
            lambda h, p, f: gates.modulate(h, p, f, layer, precision=precision),
            (h, p, gate_factors),
            (dh, dp, dfactors),
        )
        dout = dy + (factorization.up(dz, b) + factorization.up(z, db)).astype(dy.dtype)
        return add(y, h, p, gate_factors, b), dout

    return add(y, h, operating_params, gate_factors, scaled_b)
