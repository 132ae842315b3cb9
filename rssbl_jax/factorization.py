r"""The layer kinds an adapter can sit on, shared by linen and NNX: each kind's validation and factorization.

How each kind factors its kernel ``W`` (``r`` the rank); :func:`rssbl_jax.core.adapter_update` applies the two
maps around the rank-space modulation, and :func:`rssbl_jax.core.fold` folds ``A diag(g) B`` back into ``W``:

============  ======================  =================================  =======================  ==================
kind          linen / NNX             base weight                        ``lora_a``               ``lora_b``
============  ======================  =================================  =======================  ==================
Dense         ``Dense`` / ``Linear``  kernel ``(d_in, d_out)``           ``(d_in, r)``            ``(r, d_out)``
DenseGeneral  ``DenseGeneral`` /      kernel ``(*in, *features)``        ``(*in, r)``             ``(r, *features)``
              ``LinearGeneral``
Einsum        ``Einsum``              contracted + output axes           kernel, output axes → 1  kernel, input → 1
Conv          ``Conv``                kernel ``(*window, c_in, c_out)``  ``(*window, c_in, r)``   ``(r, c_out)``
Embed         ``Embed``               embedding ``(vocab, features)``    ``(vocab, r)``           ``(r, features)``
============  ======================  =================================  =======================  ==================

Factors are compact, ``(*in, r)``/``(r, *out)``, except for an Einsum kernel whose contracted axes do not all precede
its output axes: aligned, each factor keeping the kernel's axes with the other factor's set to 1. A Conv's ``A`` is a
convolution with the layer's strides, padding and dilations, ``B`` a 1×1 convolution (PEFT's approach); an Embed's
``A`` is a lookup table, ``A x = A[ids]``.

>>> import flax.linen as nn
>>> kind_of(nn.Dense(3)).name, kind_of(nn.Embed(10, 4)).kernel_name
('Dense', 'embedding')
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import opt_einsum
from flax import linen as nn
from flax import nnx

from rssbl_jax.fastpath import DEFAULT_THRESHOLDS, Thresholds, add_low_rank
from rssbl_jax.gates import PrecisionLike


class Factorization(NamedTuple):
    """How one layer kind factors its kernel: the factor shapes and the maps ``x ↦ A x`` and ``h ↦ B h``.

    ``down(x, lora_a)`` gives ``[..., r]`` whose leading axes are the input's non-contracted axes in order (so
    ``p [*lead, d_p]`` broadcasts over tokens/pixels); ``up(h, lora_b)`` gives the layer's output shape;
    ``kernel_name`` is the base weight the factors fold into; ``integer_inputs`` marks a lookup (Embed, no feature
    axis); ``up_add(y, h, lora_b)``, when set, is ``y + up(h, lora_b)`` without materialising the update
    (:func:`rssbl_jax.fastpath.add_low_rank`).
    """

    kind: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    down: Callable[[jax.Array, jax.Array], jax.Array]
    up: Callable[[jax.Array, jax.Array], jax.Array]
    kernel_name: str = "kernel"
    integer_inputs: bool = False
    up_add: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None


def dense_factorization(
    kernel_shape: Sequence[int],
    rank: int,
    precision: PrecisionLike = None,
    *,
    fused_max_b_size: int = DEFAULT_THRESHOLDS.fused_max_b_size,
) -> Factorization:
    """Dense kernel ``(d_in, d_out)``: ``A (d_in, r)``, ``B (r, d_out)``; the matmuls run on 2-D rows.

    (XLA differentiates a 2-D ``x @ A`` faster than a 3-D one on CPU.) ``up_add`` is
    :func:`~rssbl_jax.fastpath.add_low_rank` with ``fused_max_b_size``.
    """
    d_in, d_out = kernel_shape

    def down(x, a):
        return jnp.matmul(x.reshape(-1, d_in), a, precision=precision).reshape(*x.shape[:-1], rank)

    def up(h, b):
        return jnp.matmul(h.reshape(-1, rank), b, precision=precision).reshape(*h.shape[:-1], d_out)

    def up_add(y, h, b):
        out = add_low_rank(
            y.reshape(-1, d_out), h.reshape(-1, rank), b, precision=precision, fused_max_b_size=fused_max_b_size
        )
        return out.reshape(y.shape)

    return Factorization("Dense", (d_in, rank), (rank, d_out), down, up, up_add=up_add)


def _tensordot_up(precision: PrecisionLike) -> Callable[[jax.Array, jax.Array], jax.Array]:
    return lambda h, b: jnp.tensordot(h, b, axes=1, precision=precision)


def dense_general_factorization(
    kernel_shape: Sequence[int], axis: Sequence[int], x_ndim: int, rank: int, precision: PrecisionLike = None
) -> Factorization:
    """DenseGeneral kernel ``(*in, *features)`` contracting input ``axis``: ``A (*in, r)``, ``B (r, *features)``."""
    axis = tuple(sorted(ax if ax >= 0 else x_ndim + ax for ax in axis))
    n_in = len(axis)
    in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])

    def down(x, a):
        return jax.lax.dot_general(x, a, ((axis, tuple(range(n_in))), ((), ())), precision=precision)

    return Factorization("DenseGeneral", (*in_shape, rank), (rank, *out_shape), down, _tensordot_up(precision))


def einsum_factorization(
    equation: str, x_shape: Sequence[int], kernel_shape: Sequence[int], rank: int, precision: PrecisionLike = None
) -> Factorization:
    """Einsum ``"<x>,<kernel>-><out>"``: contracted kernel axes are the input, the others the output.

    Kernel axes that also index the input and the output (per-slice weights) are not supported.
    """
    shapes = [jax.ShapeDtypeStruct(tuple(shape), jnp.float32) for shape in (x_shape, kernel_shape)]
    operands, out, _ = opt_einsum.parser.parse_einsum_input((equation, *shapes))
    lhs, rhs = operands.split(",")
    shared = [c for c in rhs if c in lhs and c in out]
    if shared or len(set(rhs)) != len(rhs) or any(c not in lhs and c not in out for c in rhs):
        raise ValueError(
            f"cannot adapt Einsum {equation!r}: every kernel axis must be either contracted with the input or "
            f"an output axis (kernel axes {shared} index input, kernel and output)."
        )
    in_labels = "".join(c for c in rhs if c in lhs)
    out_labels = "".join(c for c in rhs if c in out)
    if out_labels != "".join(c for c in out if c in rhs):
        raise ValueError(
            f"cannot adapt Einsum {equation!r}: its output axes {out_labels!r} must appear in the same order in the "
            f"kernel and the result."
        )
    size = dict(zip(rhs, kernel_shape, strict=True))
    in_shape, out_shape = (tuple(size[c] for c in labels) for labels in (in_labels, out_labels))
    h_labels = "".join(dict.fromkeys(c for c in lhs if c in out))
    r_label = next(c for c in string.ascii_letters if c not in operands + out)
    compact = all(rhs.index(i) < rhs.index(o) for i in in_labels for o in out_labels)
    if compact:
        a_shape, b_shape = (*in_shape, rank), (rank, *out_shape)
    else:  # aligned: each factor keeps the kernel's axes, with the other factor's axes set to 1
        a_shape = (*(size[c] if c in in_labels else 1 for c in rhs), rank)
        b_shape = (rank, *(size[c] if c in out_labels else 1 for c in rhs))

    def down(x, a):
        return jnp.einsum(
            f"{lhs},{in_labels}{r_label}->{h_labels}{r_label}", x, a.reshape(*in_shape, rank), precision=precision
        )

    def up(h, b):
        return jnp.einsum(
            f"{h_labels}{r_label},{r_label}{out_labels}->{out}", h, b.reshape(rank, *out_shape), precision=precision
        )

    return Factorization("Einsum", a_shape, b_shape, down, up)


class RankConv(nn.Conv):
    """The adapter's own ``A`` convolution: a subclass, so injection (which adapts exact types) never adapts it."""


def conv_factorization(
    kernel_shape: Sequence[int],
    rank: int,
    *,
    kernel_size: Sequence[int],
    strides: Any,
    padding: Any,
    input_dilation: Any,
    kernel_dilation: Any,
    precision: PrecisionLike = None,
) -> Factorization:
    """Conv kernel ``(*window, c_in, c_out)``: ``A`` a conv ``(*window, c_in, r)`` like the layer's, ``B (r, c_out)``.

    ``A x`` is ``flax.linen.Conv`` itself (the layer's strides, padding, dilations, batches): the same output grid.
    """
    c_out = kernel_shape[-1]
    rank_conv = RankConv(
        features=rank,
        kernel_size=tuple(kernel_size),
        strides=strides,
        padding=padding,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
        use_bias=False,
        precision=precision,
        parent=None,  # a free-standing helper, not a child of the module being adapted
    )

    def down(x, a):
        return rank_conv.apply({"params": {"kernel": a}}, x)

    return Factorization("Conv", (*kernel_shape[:-1], rank), (rank, c_out), down, _tensordot_up(precision))


def embed_factorization(embedding_shape: Sequence[int], rank: int, precision: PrecisionLike = None) -> Factorization:
    """Embedding ``(vocab, features)``: ``A (vocab, r)`` a lookup table, ``B (r, features)``."""
    vocab, features = embedding_shape

    def down(ids, a):
        return jnp.take(a, ids, axis=0)

    return Factorization("Embed", (vocab, rank), (rank, features), down, _tensordot_up(precision), "embedding", True)


def _check_dense_general(module: Any, path: str) -> None:
    batch = getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None)
    if batch:
        raise ValueError(f"cannot adapt DenseGeneral/LinearGeneral {path!r} with batch axes {batch}.")


def _check_conv(module: Any, path: str) -> None:
    if module.feature_group_count != 1 or module.mask is not None:
        raise ValueError(
            f"cannot adapt Conv {path!r}: feature_group_count={module.feature_group_count} (must be 1) "
            f"and mask={'set' if module.mask is not None else None} (must be None)."
        )


def _dense(module, kernel_shape, rank, x_shape, args, kwargs, *, thresholds: Thresholds = DEFAULT_THRESHOLDS):
    return dense_factorization(kernel_shape, rank, module.precision, fused_max_b_size=thresholds.fused_max_b_size)


def _dense_general(module, kernel_shape, rank, x_shape, args, kwargs, *, thresholds=DEFAULT_THRESHOLDS):
    axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
    x_ndim = len(x_shape) if x_shape is not None else max(len(axis) + 1, *(abs(a) + 1 for a in axis))
    return dense_general_factorization(kernel_shape, axis, x_ndim, rank, module.precision)


def _einsum(module, kernel_shape, rank, x_shape, args, kwargs, *, thresholds=DEFAULT_THRESHOLDS):
    equation = kwargs.get("einsum_str", args[0] if args else None) or module.einsum_str
    equation = equation.replace(" ", "")
    if x_shape is None:  # any input with the right number of axes gives the factor shapes
        lhs = equation.split("->")[0].split(",")[0]
        x_shape = (1,) * (len(lhs.replace("...", "")) + ("..." in lhs))
    return einsum_factorization(equation, x_shape, kernel_shape, rank, module.precision)


def _conv(module, kernel_shape, rank, x_shape, args, kwargs, *, thresholds=DEFAULT_THRESHOLDS):
    kernel_size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    grid = {k: getattr(module, k) for k in ("strides", "padding", "input_dilation", "kernel_dilation")}
    return conv_factorization(kernel_shape, rank, kernel_size=kernel_size, precision=module.precision, **grid)


def _embed(module, kernel_shape, rank, x_shape, args, kwargs, *, thresholds=DEFAULT_THRESHOLDS):
    return embed_factorization(kernel_shape, rank, getattr(module, "precision", None))


class LayerKind(NamedTuple):
    """One adaptable layer kind: its linen and NNX classes, base weight name, validation and factorization.

    ``factorize(module, kernel_shape, rank, x_shape, call_args, call_kwargs, *, thresholds=...)`` builds the
    :class:`Factorization` (``x_shape=None``: factor shapes only, before any call; ``thresholds``: for the fused
    Dense add); ``check(module, path)`` raises for a configuration that cannot be adapted.
    """

    name: str
    linen: type
    nnx: type
    kernel_name: str
    check: Callable[[Any, str], None]
    factorize: Callable[..., Factorization]


KINDS = (
    LayerKind("Dense", nn.Dense, nnx.Linear, "kernel", lambda module, path: None, _dense),
    LayerKind("DenseGeneral", nn.DenseGeneral, nnx.LinearGeneral, "kernel", _check_dense_general, _dense_general),
    LayerKind("Einsum", nn.Einsum, nnx.Einsum, "kernel", lambda module, path: None, _einsum),
    LayerKind("Conv", nn.Conv, nnx.Conv, "kernel", _check_conv, _conv),
    LayerKind("Embed", nn.Embed, nnx.Embed, "embedding", lambda module, path: None, _embed),
)
"""Every adaptable kind. Types match exactly: a subclass may change what ``__call__`` computes."""

_BY_TYPE = {cls: kind for kind in KINDS for cls in (kind.linen, kind.nnx)}


def kind_of(module: Any) -> LayerKind | None:
    """The :class:`LayerKind` of a linen or NNX layer (exact type), or ``None`` when it cannot be adapted."""
    return _BY_TYPE.get(type(module))
