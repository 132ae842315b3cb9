"""Pure functions on arrays: the rank-space update, shape checks, merge math, parameter counts.

Every front-end (linen, NNX, injection, merge, baselines) calls :func:`rss_update`; nothing else in
the library computes the adapter.

Shapes use Flax's kernel convention (inputs on the left, ``x @ kernel``)::

    kernel (d_in, d_out)   bias (d_out,)
    lora_a (d_in, r)       lora_b (r, d_out)
    lora_c (d_p, r)        lora_s (d_p, r)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

ADAPTER_NAMES = ("lora_a", "lora_b", "lora_c", "lora_s")
"""Leaf names of the trainable adapter parameters; anything else is frozen base."""

PrecisionLike = Any


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


def modulate(
    h: Float[ArrayLike, "*batch r"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    lora_c: Float[ArrayLike, "d_p r"],
    lora_s: Float[ArrayLike, "d_p r"],
    *,
    gate_offset: float = 0.0,
    precision: PrecisionLike = None,
) -> Float[Array, "*batch r"]:
    r"""The rank-space modulation: ``h ⊙ (g_0 + C p) + S p`` for rank-space activations ``h = A x``.

    .. math::

        \tilde h = h \odot (g_0 + C p) + S p, \qquad h = A x \in \mathbb{R}^r,\ p \in \mathbb{R}^{d_p}

    (``C p`` and ``S p`` are ``p @ lora_c`` and ``p @ lora_s`` in the kernel convention). This is the one place
    the operating parameters act; :func:`rss_update` and every adapted layer kind (Dense, DenseGeneral, Einsum,
    Conv) apply their own ``A`` and ``B`` around it.

    Args:
      h: rank-space activations ``[..., r]``.
      operating_params: ``[d_p]`` or ``[*lead, d_p]`` with ``lead`` a prefix of ``h.shape[:-1]``.
      lora_c, lora_s: gate and shift weights ``(d_p, r)``.
      gate_offset: constant added to the gate (0.0: the seed's ``C p``; 1.0: ``1 + C p``).
      precision: passed to the two small matmuls with ``p``.

    Raises:
      ValueError: at trace time, naming ``d_p`` and both shapes, when ``p`` does not fit ``h``.

    >>> import numpy as np
    >>> modulate(np.ones((2, 3, 1)), np.array([[1.0], [2.0]]), np.array([[2.0]]), np.array([[1.0]]))[:, 0, 0].tolist()
    [3.0, 6.0]
    """
    h, p = jnp.asarray(h), jnp.asarray(operating_params)
    d_p, rank = jnp.shape(lora_c)
    if jnp.shape(lora_s) != (d_p, rank) or h.ndim < 1 or h.shape[-1] != rank:
        raise ValueError(
            f"rank-space shapes do not fit: h.shape={h.shape} must end in r={rank}, lora_c {jnp.shape(lora_c)} and "
            f"lora_s {jnp.shape(lora_s)} must both be (d_p, r)."
        )
    n_lead = lead_axes((*h.shape[:-1], rank), p.shape, d_p)
    lead_size = math.prod(h.shape[:n_lead]) if n_lead else 1
    rest_size = math.prod(h.shape[n_lead:-1])
    p2 = p.reshape(lead_size, d_p)
    gate = jnp.matmul(p2, lora_c, precision=precision)
    if gate_offset:
        gate = gate + jnp.asarray(gate_offset, gate.dtype)
    shift = jnp.matmul(p2, lora_s, precision=precision)
    out = h.reshape(lead_size, rest_size, rank) * gate[:, None, :] + shift[:, None, :]
    return out.reshape(h.shape)


def rss_update(
    x: Float[ArrayLike, "*batch d_in"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    lora_a: Float[ArrayLike, "d_in r"],
    lora_b: Float[ArrayLike, "r d_out"],
    lora_c: Float[ArrayLike, "d_p r"],
    lora_s: Float[ArrayLike, "d_p r"],
    *,
    scale: float,
    gate_offset: float = 0.0,
    precision: PrecisionLike = None,
) -> Float[Array, "*batch d_out"]:
    r"""The rank-space update of RSSBilinearLoRA, without the base layer.

    .. math::

        \Delta y = \alpha \, B\big((A x) \odot (g_0 + C p) + S p\big), \qquad \alpha = \text{scale}

    written in the kernel convention as
    ``scale * (((x @ A) * (gate_offset + p @ C) + p @ S) @ B)``. ``gate_offset = 0`` is the seed's formula;
    ``gate_offset = 1`` gives the gate ``1 + C p`` that starts as plain LoRA.

    The input is flattened to 2-D for the two matmuls (XLA differentiates a 2-D ``x @ A`` faster than a
    3-D one); :func:`modulate` applies the per-example gate on a ``[lead, rest, r]`` view, so no
    ``[..., r]`` copy of ``p`` is materialised. All arrays must already be in the compute dtype.

    Args:
      x: inputs ``[..., d_in]``.
      operating_params: ``[d_p]`` or ``[*lead, d_p]`` with ``lead`` a prefix of ``x.shape[:-1]``.
      lora_a, lora_b, lora_c, lora_s: the adapter factors.
      scale: ``lora_alpha / rank``.
      gate_offset: constant added to the gate ``C p``.
      precision: passed to the matmuls.

    Returns:
      ``[..., d_out]``, the update to add to the base layer's output.

    Raises:
      ValueError: at trace time, when ``x`` or ``operating_params`` does not fit the factors.

    >>> import numpy as np
    >>> x, p = np.ones((2, 3)), np.array([2.0])
    >>> a, b = np.ones((3, 1)), np.ones((1, 4))
    >>> c, s = np.array([[0.5]]), np.array([[1.0]])
    >>> rss_update(x, p, a, b, c, s, scale=2.0).tolist()[0]   # 2 * (3 * (0.5*2) + 1*2)
    [10.0, 10.0, 10.0, 10.0]
    """
    x, p = jnp.asarray(x), jnp.asarray(operating_params)
    _check_update_inputs(x, p, lora_a, lora_b, lora_c, lora_s)
    delta = _update_rows(x, p, lora_a, lora_b, lora_c, lora_s, scale, gate_offset, precision)
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def _check_update_inputs(x: Array, p: Array, lora_a, lora_b, lora_c, lora_s) -> None:
    """Raise ``ValueError`` naming the shapes when ``x``, ``p`` or the factors do not fit (at trace time)."""
    d_in, rank = jnp.shape(lora_a)
    d_p = jnp.shape(lora_c)[0]
    if x.ndim < 1 or x.shape[-1] != d_in:
        raise ValueError(
            f"x must be [..., d_in] with d_in={d_in} (lora_a.shape={jnp.shape(lora_a)}); got x.shape={x.shape}."
        )
    if jnp.shape(lora_b)[0] != rank or jnp.shape(lora_c) != (d_p, rank) or jnp.shape(lora_s) != (d_p, rank):
        raise ValueError(
            "adapter factors do not fit: expected lora_a (d_in, r), lora_b (r, d_out), lora_c and lora_s (d_p, r); "
            f"got lora_a {jnp.shape(lora_a)}, lora_b {jnp.shape(lora_b)}, lora_c {jnp.shape(lora_c)}, "
            f"lora_s {jnp.shape(lora_s)}."
        )
    lead_axes(x.shape, p.shape, d_p)  # report shapes in terms of x, before any reshape


def _update_rows(x, p, lora_a, lora_b, lora_c, lora_s, scale, gate_offset, precision) -> Array:
    """The update on rows ``[N, d_out]`` (``N = prod(x.shape[:-1])``), checked inputs.

    Everything large stays 2-D and ``scale`` is folded into ``B`` (``r × d_out``) rather than applied to the
    ``N × d_out`` result: measured on CPU, the 3-D adds and the separate scaling cost 15% of a train step.
    """
    d_in, rank = jnp.shape(lora_a)
    h = jnp.matmul(x.reshape(-1, d_in), lora_a, precision=precision).reshape(*x.shape[:-1], rank)
    h = modulate(h, p, lora_c, lora_s, gate_offset=gate_offset, precision=precision)
    lora_b = jnp.asarray(lora_b)
    return jnp.matmul(h.reshape(-1, rank), lora_b * jnp.asarray(scale, lora_b.dtype), precision=precision)


def rss_dense(
    x: Float[ArrayLike, "*batch d_in"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    kernel: Float[ArrayLike, "d_in d_out"],
    bias: Float[ArrayLike, " d_out"] | None,
    lora_a: Float[ArrayLike, "d_in r"],
    lora_b: Float[ArrayLike, "r d_out"],
    lora_c: Float[ArrayLike, "d_p r"],
    lora_s: Float[ArrayLike, "d_p r"],
    *,
    scale: float,
    gate_offset: float = 0.0,
    precision: PrecisionLike = None,
) -> Float[Array, "*batch d_out"]:
    r"""A dense layer with the RSSBilinearLoRA update: ``x @ kernel + bias + rss_update(...)``.

    .. math::

        y = W x + b + \alpha \, B\big((A x) \odot (g_0 + C p) + S p\big)

    Args:
      x, operating_params, lora_*: as in :func:`rss_update`.
      kernel: frozen base kernel ``(d_in, d_out)``; bias: ``(d_out,)`` or ``None``.
      scale, gate_offset, precision: as in :func:`rss_update`.

    >>> import numpy as np
    >>> x, p = np.ones((1, 2)), np.ones((1,))
    >>> w, b = np.eye(2), np.zeros(2)
    >>> a, bb, c, s = np.ones((2, 1)), np.zeros((1, 2)), np.ones((1, 1)), np.zeros((1, 1))
    >>> rss_dense(x, p, w, b, a, bb, c, s, scale=1.0).tolist()   # B = 0: the base layer
    [[1.0, 1.0]]
    """
    x = jnp.asarray(x)
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2 or x.shape[-1:] != kernel.shape[:1]:
        raise ValueError(
            f"x must be [..., d_in] with d_in = kernel.shape[0]; got x.shape={x.shape}, kernel.shape={kernel.shape}."
        )
    if bias is not None and jnp.shape(bias) != (kernel.shape[1],):
        raise ValueError(f"bias must be (d_out,)=({kernel.shape[1]},); got bias.shape={jnp.shape(bias)}.")
    p = jnp.asarray(operating_params)
    _check_update_inputs(x, p, lora_a, lora_b, lora_c, lora_s)
    y = jnp.matmul(x.reshape(-1, kernel.shape[0]), kernel, precision=precision)  # base, bias and update in 2-D
    if bias is not None:
        y = y + jnp.reshape(bias, (1, -1))
    y = y + _update_rows(x, p, lora_a, lora_b, lora_c, lora_s, scale, gate_offset, precision)
    return y.reshape(*x.shape[:-1], kernel.shape[1])


class MergedDense(NamedTuple):
    """Kernel and bias of a Dense layer equal to an adapted one at one operating point."""

    kernel: Array
    bias: Array


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
    r"""Fold the adapter into the base weights at one operating point ``p0``.

    .. math::

        W' = W + \alpha\, A \,\mathrm{diag}(g_0 + C p_0)\, B, \qquad b' = b + \alpha\, (S p_0)\, B

    (kernel convention). The result computes the same outputs as :func:`rss_dense` at ``p0`` at the cost of
    a plain Dense layer. A layer without bias gets one (its shift term is a constant), so it merges into a
    Dense with ``use_bias=True``. Vectorise over many operating points with ``jax.vmap``.

    Raises:
      ValueError: when ``operating_params`` is not ``[d_p]`` or the factors do not fit the kernel.

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
    r"""Fold the adapter of any kernel kind (Dense, DenseGeneral, Einsum, Conv) into it at one operating point.

    .. math::

        W' = W + \alpha \sum_k (g_0 + C p_0)_k\, A_{\ldots k} \otimes B_{k \ldots}, \qquad
        b' = b + \alpha\, (S p_0)\, B

    Two factor layouts are understood, told apart by their number of axes:

    - compact: ``lora_a (*in, r)``, ``lora_b (r, *out)`` with ``kernel.shape == (*in, *out)`` (Dense,
      DenseGeneral, Conv with ``in = (*window, c_in)``, Einsum with input axes first);
    - aligned: ``lora_a`` and ``lora_b`` both have the kernel's axes, each with the other factor's axes set
      to 1 (Einsum kernels whose input and output axes interleave); the outer product broadcasts.

    The bias update is ``(S p0) B`` reshaped to the bias; a layer without bias gets one of ``B``'s output
    shape. ``lora_s=None`` means no shift. Kernel and bias dtypes are preserved.

    Raises:
      ValueError: when ``operating_params`` is not ``[d_p]`` or the factors do not fit the kernel.

    >>> import numpy as np
    >>> kernel = np.zeros((3, 2, 4))                   # DenseGeneral: in (3,), features (2, 4)
    >>> a, b = np.ones((3, 1)), np.ones((1, 2, 4))
    >>> merged = merge_kernel(kernel, None, a, b, np.ones((1, 1)), None, np.array([2.0]), scale=0.5)
    >>> merged.kernel.shape, float(merged.kernel[0, 0, 0]), merged.bias.shape
    ((3, 2, 4), 1.0, (2, 4))
    """
    p0 = jnp.asarray(operating_params)
    d_p, rank = jnp.shape(lora_c)
    if p0.shape != (d_p,):
        raise ValueError(
            f"merge needs one operating point of shape (d_p,)=({d_p},); got operating_params.shape={p0.shape}. "
            "Use jax.vmap to merge a batch of operating points."
        )
    kernel, lora_a, lora_b = jnp.asarray(kernel), jnp.asarray(lora_a), jnp.asarray(lora_b)
    if lora_a.shape[-1] != rank or lora_b.shape[0] != rank:
        raise ValueError(f"lora_a {lora_a.shape} must end and lora_b {lora_b.shape} must start with r={rank}.")
    if lora_s is not None and jnp.shape(lora_s) != (d_p, rank):
        raise ValueError(f"lora_s {jnp.shape(lora_s)} must be (d_p, r)=({d_p}, {rank}) like lora_c.")
    gate = jnp.matmul(p0, lora_c, precision=precision) + gate_offset
    scaled_a = lora_a * gate.reshape((1,) * (lora_a.ndim - 1) + (rank,))
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
    if lora_s is None:
        bias_delta = jnp.zeros(out_shape, kernel_delta.dtype)
    else:
        shift = jnp.matmul(p0, lora_s, precision=precision)
        bias_delta = jnp.matmul(shift, lora_b.reshape(rank, -1), precision=precision)
        bias_delta = bias_delta.reshape(out_shape if bias is None else jnp.shape(bias))
    base_bias = jnp.zeros(out_shape, kernel.dtype) if bias is None else jnp.asarray(bias)
    return MergedDense(
        kernel=(kernel + scale * kernel_delta).astype(kernel.dtype),
        bias=(base_bias + scale * bias_delta).astype(base_bias.dtype),
    )


def is_adapter_path(path: Sequence[Any]) -> bool:
    """Whether a pytree key path ends in one of the adapter leaf names ``lora_a/b/c/s``."""
    if not path:
        return False
    key = path[-1]
    name = getattr(key, "key", getattr(key, "name", key))
    return isinstance(name, str) and name in ADAPTER_NAMES


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(name))
    return "/".join(parts)


class ParameterCount(NamedTuple):
    """Base (frozen) and trainable (adapter) parameter counts, per layer and in total.

    ``per_layer`` maps a layer path (``"Dense_0"``, ``"block/attn/query"``) to ``(base, trainable)``.
    ``str()`` renders a table.

    >>> count = ParameterCount(per_layer={"dense": (15, 18)}, base=15, trainable=18)
    >>> count.total, round(count.trainable_fraction, 3)
    (33, 0.545)
    >>> print(count)
    layer          base     trainable
    dense            15            18
    total            15            18
    trainable fraction: 54.5455% of 33
    """

    per_layer: dict[str, tuple[int, int]]
    base: int
    trainable: int

    @property
    def total(self) -> int:
        return self.base + self.trainable

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len("layer"), *(len(k) for k in self.per_layer)])
        lines = [f"{'layer':<{width}}  {'base':>12}  {'trainable':>12}"]
        for name, (base, trainable) in self.per_layer.items():
            lines.append(f"{name:<{width}}  {base:>12,}  {trainable:>12,}")
        lines.append(f"{'total':<{width}}  {self.base:>12,}  {self.trainable:>12,}")
        lines.append(f"trainable fraction: {self.trainable_fraction:.4%} of {self.total:,}")
        return "\n".join(lines)


def count_parameters(params: Any) -> ParameterCount:
    r"""Count frozen base and trainable adapter parameters in any params tree, per layer and in total.

    A leaf is trainable when its name is one of ``lora_a``, ``lora_b``, ``lora_c``, ``lora_s``; its layer is
    the path of its parent. For a Dense layer this gives

    .. math::

        \underbrace{d_{in} d_{out} + d_{out}}_{\text{base}}, \qquad
        \underbrace{r (d_{in} + d_{out})}_{\text{LoRA}} + \underbrace{2 r d_p}_{C,\ S}\ \text{trainable.}

    >>> import numpy as np
    >>> tree = {"dense": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3),
    ...                   "lora_a": np.zeros((4, 2)), "lora_b": np.zeros((2, 3)),
    ...                   "lora_c": np.zeros((1, 2)), "lora_s": np.zeros((1, 2))}}
    >>> count_parameters(tree).per_layer
    {'dense': (15, 18)}
    """
    per_layer: dict[str, list[int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        layer = _path_str(path[:-1]) or "(root)"
        counts = per_layer.setdefault(layer, [0, 0])
        counts[1 if is_adapter_path(path) else 0] += int(math.prod(jnp.shape(leaf)))
    table = {k: (v[0], v[1]) for k, v in per_layer.items()}
    return ParameterCount(
        per_layer=table,
        base=sum(v[0] for v in table.values()),
        trainable=sum(v[1] for v in table.values()),
    )
