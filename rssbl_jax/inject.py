"""Adapt an existing, unmodified Flax linen model by module-path patterns.

:func:`inject` wraps a model so that, while it runs, every matching ``nn.Dense``, ``nn.DenseGeneral``,
``nn.Einsum`` or ``nn.Conv`` call returns its own output plus the rank-space update

.. math::

    \\Delta y = \\frac{\\alpha_{\\text{lora}}}{r}\\, B\\big((A x) \\odot (g_0 + C p) + S p\\big)

with ``lora_a``, ``lora_b``, ``lora_c`` and ``lora_s`` created beside the layer's own ``kernel``. The
model's code is not touched (method interception, as qwix does), so ``variables["params"]`` is the
model's own tree plus ``lora_*`` leaves, and pretrained weights load with :func:`load_base`.

How each layer kind factors its kernel ``W`` (``r`` the rank):

============  ==============================  ==========================  ====================
kind          kernel                          ``lora_a``                  ``lora_b``
============  ==============================  ==========================  ====================
Dense         ``(d_in, d_out)``               ``(d_in, r)``               ``(r, d_out)``
DenseGeneral  ``(*in, *features)``            ``(*in, r)``                ``(r, *features)``
Einsum        contracted + output axes        kernel, output axes → 1     kernel, input axes → 1
Conv          ``(*window, c_in, c_out)``      ``(*window, c_in, r)``      ``(r, c_out)``
============  ==============================  ==========================  ====================

An Einsum kernel whose contracted axes all come before its output axes uses the compact
``(*in, r)``/``(r, *out)`` layout instead; either way :func:`rssbl_jax.merge` folds
``A diag(g) B`` back into the kernel's own shape. ``A`` of a Conv is a convolution with the layer's
strides, padding and dilations, ``B`` a 1×1 convolution (PEFT's approach). The rank-space activations
of every kind go through :func:`rssbl_jax.core.modulate`, the one place ``p`` acts.
"""

from __future__ import annotations

import dataclasses
import re
import string
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import opt_einsum
from flax import linen as nn
from flax.core import meta
from flax.linen.dtypes import promote_dtype

from rssbl_jax import core
from rssbl_jax import linen as rss_linen

PyTree = Any


# --------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------


def _as_patterns(targets: str | Sequence[str]) -> tuple[str, ...]:
    patterns = (targets,) if isinstance(targets, str) else tuple(targets)
    if not patterns:
        raise ValueError("targets must be a regex or a non-empty sequence of regexes over module paths.")
    for pattern in patterns:
        re.compile(pattern)
    return patterns


def _as_pairs(mapping: Mapping[str, Any] | None, name: str) -> tuple[tuple[str, Any], ...]:
    pairs = tuple((mapping or {}).items())
    for pattern, _ in pairs:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} keys must be regex strings; got {pattern!r}.")
        re.compile(pattern)
    return pairs


def _first_match(pairs: Sequence[tuple[str, Any]], path: str, default: Any) -> Any:
    for pattern, value in pairs:
        if re.fullmatch(pattern, path):
            return value
    return default


def resolve_alpha(path: str, lora_alpha: float, alpha_pattern: Mapping[str, float] | None = None) -> float:
    """The ``lora_alpha`` of the layer at ``path``: the first fully matching ``alpha_pattern`` regex, else the default.

    >>> resolve_alpha("block/attention/value", 16.0, {r".*/value": 4.0})
    4.0
    """
    return float(_first_match(tuple((alpha_pattern or {}).items()), path, lora_alpha))


def unmatched_patterns(patterns: Sequence[str], paths: Sequence[str]) -> list[str]:
    """The regexes among ``patterns`` that fully match none of ``paths``.

    >>> unmatched_patterns([r".*/value", "head"], ["block/attention/value"])
    ['head']
    """
    return [pattern for pattern in patterns if not any(re.fullmatch(pattern, path) for path in paths)]


def _check_patterns_matched(
    patterns: Sequence[str],
    rank_pattern: Sequence[tuple[str, Any]],
    alpha_pattern: Sequence[tuple[str, Any]],
    adaptable: Mapping[str, str],
    adapted: Sequence[str],
) -> None:
    """Raise when a target regex matches no adaptable path, or an override regex matches no adapted one."""
    listing = "\n".join(f"  {path}  ({kind})" for path, kind in adaptable.items()) or "  (none)"
    for pattern in patterns:
        if not any(re.fullmatch(pattern, path) for path in adaptable):
            raise ValueError(
                f"target pattern {pattern!r} matches no adaptable layer (regex fullmatch on the module path). "
                f"Adaptable paths:\n{listing}"
            )
    for name, pairs in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for pattern, _ in pairs:
            if not any(re.fullmatch(pattern, path) for path in adapted):
                raise ValueError(
                    f"{name} key {pattern!r} matches no adapted layer; adapted paths: {sorted(set(adapted))}."
                )


# --------------------------------------------------------------------------------------------------
# Kind-specific factorisation: shapes of A and B, and the two linear maps around core.modulate
# --------------------------------------------------------------------------------------------------


class Factorization(NamedTuple):
    """How one layer kind factors its kernel: stored factor shapes and the maps ``x ↦ A x`` and ``h ↦ B h``.

    ``down(x, lora_a)`` returns rank-space activations ``[..., r]`` whose leading axes are the input's
    non-contracted axes in order (so ``p`` of shape ``[*lead, d_p]`` broadcasts over tokens/pixels);
    ``up(h, lora_b)`` returns an array of the layer's output shape.
    """

    kind: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    down: Callable[[jax.Array, jax.Array], jax.Array]
    up: Callable[[jax.Array, jax.Array], jax.Array]


def _normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    return tuple(sorted(ax if ax >= 0 else ndim + ax for ax in axes))


def dense_factorization(kernel_shape: Sequence[int], rank: int, precision: Any = None) -> Factorization:
    """Dense kernel ``(d_in, d_out)``: ``A (d_in, r)``, ``B (r, d_out)``."""
    d_in, d_out = kernel_shape

    def down(x, a):
        return jnp.matmul(x.reshape(-1, d_in), a, precision=precision).reshape(*x.shape[:-1], rank)

    def up(h, b):
        return jnp.matmul(h.reshape(-1, rank), b, precision=precision).reshape(*h.shape[:-1], d_out)

    return Factorization("Dense", (d_in, rank), (rank, d_out), down, up)


def dense_general_factorization(
    kernel_shape: Sequence[int], axis: Sequence[int], x_ndim: int, rank: int, precision: Any = None
) -> Factorization:
    """DenseGeneral kernel ``(*in, *features)`` contracting input ``axis``: ``A (*in, r)``, ``B (r, *features)``."""
    axis = _normalize_axes(axis, x_ndim)
    n_in = len(axis)
    in_shape, out_shape = tuple(kernel_shape[:n_in]), tuple(kernel_shape[n_in:])

    def down(x, a):
        return jax.lax.dot_general(x, a, ((axis, tuple(range(n_in))), ((), ())), precision=precision)

    def up(h, b):
        return jnp.tensordot(h, b, axes=1, precision=precision)

    return Factorization("DenseGeneral", (*in_shape, rank), (rank, *out_shape), down, up)


def einsum_factorization(
    equation: str, x_shape: Sequence[int], kernel_shape: Sequence[int], rank: int, precision: Any = None
) -> Factorization:
    """Einsum ``"<x>,<kernel>-><out>"``: contracted kernel axes are the input, the others the output.

    Kernel axes that also index the input and the output (per-slice weights) are not supported.
    """
    operands, out, _ = opt_einsum.parser.parse_einsum_input(
        (
            equation,
            jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
            jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
        )
    )
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
    in_shape = tuple(size[c] for c in in_labels)
    out_shape = tuple(size[c] for c in out_labels)
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


_STATE = threading.local()


def _adapter_computation() -> Any:
    """Context in which interceptors pass calls through (the adapter's own helper modules)."""

    class _Guard:
        def __enter__(self):
            _STATE.depth = getattr(_STATE, "depth", 0) + 1

        def __exit__(self, *exc):
            _STATE.depth -= 1

    return _Guard()


def _in_adapter_computation() -> bool:
    return getattr(_STATE, "depth", 0) > 0


def conv_factorization(
    kernel_shape: Sequence[int],
    rank: int,
    *,
    kernel_size: Sequence[int],
    strides: Any,
    padding: Any,
    input_dilation: Any,
    kernel_dilation: Any,
    precision: Any = None,
) -> Factorization:
    """Conv kernel ``(*window, c_in, c_out)``: ``A`` a conv ``(*window, c_in, r)`` like the layer's, ``B (r, c_out)``.

    ``A x`` is computed by ``flax.linen.Conv`` itself (same strides, padding modes, dilations and batch
    handling as the base layer), so the update matches the layer's output grid exactly.
    """
    c_out = kernel_shape[-1]
    rank_conv = nn.Conv(
        features=rank,
        kernel_size=tuple(kernel_size),
        strides=strides,
        padding=padding,
        input_dilation=input_dilation,
        kernel_dilation=kernel_dilation,
        use_bias=False,
        precision=precision,
        parent=None,  # a free-standing helper, not a child of the module being intercepted
    )

    def down(x, a):
        with _adapter_computation():
            return rank_conv.apply({"params": {"kernel": a}}, x)

    def up(h, b):
        return jnp.tensordot(h, b, axes=1, precision=precision)

    return Factorization("Conv", (*kernel_shape[:-1], rank), (rank, c_out), down, up)


def adapter_delta(
    factorization: Factorization,
    x: jax.Array,
    operating_params: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    lora_c: jax.Array,
    lora_s: jax.Array | None,
    *,
    scale: float,
    gate_offset: float = 0.0,
    precision: Any = None,
) -> jax.Array:
    r"""The update of any layer kind: ``up(modulate(down(x, A), p, C, S), scale * B)``.

    .. math::

        \Delta y = \alpha\, B\big((A x) \odot (g_0 + C p) + S p\big)

    ``lora_s=None`` drops the shift term. Arrays must already be in the compute dtype.

    Raises:
      ValueError: naming ``d_p`` and the shapes of ``x`` and ``p`` when ``p`` does not fit ``x``.
    """
    # p is checked against the layer's own input, before any factorization reshapes it
    core.lead_axes(jnp.shape(x), jnp.shape(operating_params), jnp.shape(lora_c)[0])
    lora_s = jnp.zeros_like(lora_c) if lora_s is None else lora_s
    h = factorization.down(x, lora_a)
    h = core.modulate(h, operating_params, lora_c, lora_s, gate_offset=gate_offset, precision=precision)
    lora_b = jnp.asarray(lora_b)
    # alpha/r is folded into B (r x out) rather than applied to the update, as in core.rss_update
    return factorization.up(h, lora_b * jnp.asarray(scale, lora_b.dtype))


# --------------------------------------------------------------------------------------------------
# Linen
# --------------------------------------------------------------------------------------------------

ADAPTABLE_LINEN = {nn.Dense: "Dense", nn.DenseGeneral: "DenseGeneral", nn.Einsum: "Einsum", nn.Conv: "Conv"}
"""Linen layer classes :func:`inject` adapts (exact types: a subclass may change what ``__call__`` computes)."""


def _linen_factorization(
    module: nn.Module, where: str, args: tuple, kwargs: dict, kernel_shape: tuple, rank: int
) -> Factorization:
    x = jnp.asarray(args[0] if args else kwargs["inputs"])
    kind = ADAPTABLE_LINEN[type(module)]
    if kind == "Dense":
        return dense_factorization(kernel_shape, rank, module.precision)
    if kind == "DenseGeneral":
        if tuple(module.batch_dims):
            raise ValueError(f"cannot adapt DenseGeneral {where!r} with batch_dims={module.batch_dims}.")
        axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        return dense_general_factorization(kernel_shape, axis, x.ndim, rank, module.precision)
    if kind == "Einsum":
        equation = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
        return einsum_factorization(equation.replace(" ", ""), x.shape, kernel_shape, rank, module.precision)
    if module.feature_group_count != 1 or module.mask is not None:
        raise ValueError(
            f"cannot adapt Conv {where!r}: feature_group_count={module.feature_group_count} (must be 1) "
            f"and mask={'set' if module.mask is not None else None} (must be None)."
        )
    kernel_size = (module.kernel_size,) if isinstance(module.kernel_size, int) else tuple(module.kernel_size)
    return conv_factorization(
        kernel_shape,
        rank,
        kernel_size=kernel_size,
        strides=module.strides,
        padding=module.padding,
        input_dilation=module.input_dilation,
        kernel_dilation=module.kernel_dilation,
        precision=module.precision,
    )


@dataclasses.dataclass
class _Trace:
    """What one run of the model saw: adaptable layer paths and the ones adapted."""

    adaptable: dict[str, str] = dataclasses.field(default_factory=dict)
    adapted: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Adapted:
    r"""An unmodified linen ``model`` whose target layers carry a rank-space update modulated by ``p``.

    Built by :func:`inject`; see there. ``init`` and ``apply`` are ``model.init`` and ``model.apply``
    (every keyword such as ``method``, ``mutable`` or ``rngs`` is passed through) run under a method
    interceptor that replaces each target layer's output ``y`` by ``y + (α/r) B((A x) ⊙ (g_0 + C p) + S p)``
    and creates the ``lora_*`` params in that layer's own scope, so the params keep ``model.init``'s
    paths, lifted transforms (``nn.remat``, ``nn.scan``) included.

    Attributes:
      model: the linen model to adapt (not modified).
      targets: regexes matched with ``re.fullmatch`` against each layer's path in the model, the names of
        its params' keys joined by ``/`` (``"block_0/attention/query"``).
      rank: default adapter rank ``r``.
      lora_alpha: default scaling numerator; the update is multiplied by ``lora_alpha / rank``.
      rank_pattern, alpha_pattern: ``(regex, value)`` pairs overriding rank/alpha per path (first match wins).
      gate_offset: constant ``g_0`` added to the gate (0.0: the seed's ``C p``; 1.0: ``1 + C p``).
      shift: learn the shift ``S p`` on every target (``True``), none (``False``), or only on targets
        with a bias (``None``), so that every adapted model merges into the unmodified architecture.
      param_dtype: dtype of the adapter parameters.
    """

    model: nn.Module
    targets: tuple[str, ...]
    rank: int
    lora_alpha: float
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    gate_offset: float = 0.0
    shift: bool | None = None
    param_dtype: Any = jnp.float32

    @property
    def adapter_config(self) -> dict[str, Any]:
        """The injection settings, as keyword arguments of :func:`rssbl_jax.save_adapters`."""
        return {
            "targets": list(self.targets),
            "rank": self.rank,
            "lora_alpha": float(self.lora_alpha),
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "gate_offset": float(self.gate_offset),
            "shift": self.shift,
        }

    def init(self, rngs: Any, *args: Any, p: jax.Array, **kwargs: Any) -> Any:
        """``model.init(rngs, *args, **kwargs)`` plus adapters beside each target's kernel; ``d_p`` from ``p``."""
        return self._run(self.model.init, rngs, args, p, kwargs)

    def apply(self, variables: Any, *args: Any, p: jax.Array, **kwargs: Any) -> Any:
        """``model.apply(variables, *args, **kwargs)`` with the target layers adapted under operating parameters ``p``.

        ``p`` is ``[d_p]`` (one condition for everything) or ``[batch, d_p]`` (one per example; every
        target layer's input must then lead with the batch axis).
        """
        return self._run(self.model.apply, variables, args, p, kwargs)

    def _run(self, fun, first, args, p, kwargs):
        trace = _Trace()
        with nn.intercept_methods(self._interceptor(trace, p)):
            out = fun(first, *args, **kwargs)
        if kwargs.get("method") is None:  # another method may legitimately skip some targets
            _check_patterns_matched(self.targets, self.rank_pattern, self.alpha_pattern, trace.adaptable, trace.adapted)
        return out

    def _interceptor(self, trace: _Trace, operating_params: jax.Array):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or _in_adapter_computation() or type(module) not in ADAPTABLE_LINEN:
                return next_fun(*args, **kwargs)
            path = "/".join(str(name) for name in module.path)
            trace.adaptable[path] = ADAPTABLE_LINEN[type(module)]
            if not any(re.fullmatch(pattern, path) for pattern in self.targets):
                return next_fun(*args, **kwargs)
            trace.adapted.append(path)
            y = next_fun(*args, **kwargs)
            return y + self._adapter(module, path, args, kwargs, operating_params, y)

        return interceptor

    def _adapter(self, module, path, args, kwargs, operating_params, y):
        """Create (or read) ``lora_*`` in ``module``'s scope and return the update for this call."""
        rank = int(_first_match(self.rank_pattern, path, self.rank))
        alpha = float(_first_match(self.alpha_pattern, path, self.lora_alpha))
        if rank < 1:
            raise ValueError(f"rank must be positive; got rank={rank} for {path!r}.")
        p = jnp.asarray(operating_params)
        if module.has_variable("params", "lora_c"):
            d_p = jnp.shape(meta.unbox(module.get_variable("params", "lora_c")))[0]
        else:
            if p.ndim == 0:
                raise ValueError(f"p must be [d_p] or [batch, d_p]; got a scalar at {path!r}.")
            d_p = p.shape[-1]
        kernel = meta.unbox(module.get_variable("params", "kernel"))
        has_bias = module.has_variable("params", "bias")
        factorization = _linen_factorization(module, path, args, kwargs, tuple(kernel.shape), rank)
        c_init = rss_linen.default_lora_c_init if self.gate_offset == 0 else nn.initializers.zeros_init()
        lora_a = module.param("lora_a", rss_linen.default_lora_a_init, factorization.a_shape, self.param_dtype)
        lora_b = module.param("lora_b", nn.initializers.zeros_init(), factorization.b_shape, self.param_dtype)
        lora_c = module.param("lora_c", c_init, (d_p, rank), self.param_dtype)
        use_shift = has_bias if self.shift is None else self.shift
        lora_s = (
            module.param("lora_s", nn.initializers.zeros_init(), (d_p, rank), self.param_dtype) if use_shift else None
        )
        x = jnp.asarray(args[0] if args else kwargs["inputs"])
        x, p, lora_a, lora_b, lora_c, lora_s = promote_dtype(x, p, lora_a, lora_b, lora_c, lora_s, dtype=module.dtype)
        try:
            delta = adapter_delta(
                factorization, x, p, lora_a, lora_b, lora_c, lora_s,
                scale=alpha / rank, gate_offset=self.gate_offset, precision=module.precision,
            )  # fmt: skip
        except ValueError as error:
            raise ValueError(f"adapted layer {path!r}: {error}") from None
        if delta.shape != y.shape:
            raise ValueError(f"adapter update of {path!r} has shape {delta.shape}, the layer output {y.shape}.")
        return delta.astype(y.dtype)


def inject(
    model: nn.Module,
    targets: str | Sequence[str],
    rank: int,
    lora_alpha: float,
    *,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    gate_offset: float = 0.0,
    shift: bool | None = None,
    param_dtype: Any = jnp.float32,
) -> Adapted:
    r"""Adapt the layers of an unmodified linen model whose path matches ``targets``.

    .. math::

        y_\ell = f_\ell(x_\ell)
            + \frac{\alpha_\ell}{r_\ell}\, B_\ell\big((A_\ell x_\ell) \odot (g_0 + C_\ell p) + S_\ell p\big)

    for every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum`` and ``nn.Conv`` layer ``ℓ`` whose path in
    the model (its params' keys joined by ``/``, e.g. ``"block_0/attention/query"``) fully matches one
    of ``targets`` (``re.fullmatch``).
    ``adapted.init(key, *args, p=p)`` returns ``model.init``'s variables with ``lora_a``, ``lora_b``,
    ``lora_c`` (and ``lora_s``) added beside each target's ``kernel``; ``d_p`` is read from ``p``. At
    init ``B = 0``, so the adapted model computes exactly the base model. ``partition``, ``freeze_base``
    and ``merge`` apply to its params unchanged.

    Args:
      model: any linen model; it is not modified.
      targets: a regex or regexes over module paths. Each must match at least one adaptable layer when
        the model runs, else ``ValueError`` lists the adaptable paths.
      rank: adapter rank ``r``.
      lora_alpha: scaling numerator; the update is multiplied by ``lora_alpha / rank`` (PEFT's convention).
      rank_pattern, alpha_pattern: ``{regex: value}`` overrides per path, as PEFT's; the first full match wins.
      gate_offset: constant ``g_0`` added to the gate: 0.0 is the seed's ``C p``, 1.0 gives ``1 + C p``.
      shift: learn the shift ``S p`` on all targets (``True``), none (``False``), or by default only on
        targets that have a bias: a bias-free layer cannot absorb ``S p B`` when merged.
      param_dtype: dtype of the adapter parameters.

    Returns:
      An :class:`Adapted`, used as the model: ``adapted.init(key, *args, p=p)``,
      ``adapted.apply(variables, *args, p=p, **kwargs)``.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> adapted = inject(model, targets=r"layers_0", rank=2, lora_alpha=4.0)
    >>> x, p = jnp.ones((3, 5)), jnp.ones((3, 2))
    >>> variables = adapted.init(jax.random.key(0), x, p=p)
    >>> sorted(variables["params"]["layers_0"])
    ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_c', 'lora_s']
    >>> bool(jnp.all(adapted.apply(variables, x, p=p) == model.apply(variables, x)))   # B = 0 at init
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"inject expects a flax.linen Module; got {type(model).__name__} (for NNX use rssbl_jax.nnx.inject)."
        )
    return Adapted(
        model=model,
        targets=_as_patterns(targets),
        rank=int(rank),
        lora_alpha=float(lora_alpha),
        rank_pattern=_as_pairs(rank_pattern, "rank_pattern"),
        alpha_pattern=_as_pairs(alpha_pattern, "alpha_pattern"),
        gate_offset=float(gate_offset),
        shift=shift,
        param_dtype=param_dtype,
    )


def adaptable_paths(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, str]:
    """The paths and kinds of the layers of a linen ``model`` that :func:`inject` can adapt.

    Found by one abstract trace (``jax.eval_shape`` of ``model.init``), without computing anything.

    >>> import jax.numpy as jnp, flax.linen as nn
    >>> adaptable_paths(nn.Sequential([nn.Dense(8), nn.Conv(4, (3,))]), jnp.ones((2, 6, 3)))
    {'layers_0': 'Dense', 'layers_1': 'Conv'}
    """
    found: dict[str, str] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and type(context.module) in ADAPTABLE_LINEN:
            found["/".join(context.module.path)] = ADAPTABLE_LINEN[type(context.module)]
        return next_fun(*args, **kwargs)

    def init():
        with nn.intercept_methods(record):
            return model.init(jax.random.key(0), *args, **kwargs)

    jax.eval_shape(init)
    return found


# --------------------------------------------------------------------------------------------------
# Pretrained base weights
# --------------------------------------------------------------------------------------------------


def _flat(tree: PyTree) -> dict[str, Any]:
    return {core._path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_base(variables: PyTree, pretrained: PyTree) -> PyTree:
    """Replace every non-adapter leaf of an adapted model's ``variables`` by the pretrained one.

    ``pretrained`` is the unmodified model's params (``model.init(...)["params"]`` or a checkpoint of
    them), or its whole variables dict (then every collection it holds, e.g. ``batch_stats``, is
    loaded). Paths and shapes must match the adapted tree's non-``lora_*`` leaves exactly; values keep
    ``pretrained``'s dtype. The ``lora_*`` leaves are kept.

    Raises:
      ValueError: naming the first path that is missing, unexpected or of another shape.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Dense(3)
    >>> adapted = inject(model, targets="", rank=1, lora_alpha=1.0)   # the root layer's path is ""
    >>> variables = adapted.init(jax.random.key(0), jnp.ones((1, 2)), p=jnp.ones(1))
    >>> pretrained = model.init(jax.random.key(1), jnp.ones((1, 2)))["params"]
    >>> loaded = load_base(variables, pretrained)
    >>> bool(jnp.all(loaded["params"]["kernel"] == pretrained["kernel"])), sorted(loaded["params"])
    (True, ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_c', 'lora_s'])
    """
    if (
        isinstance(variables, Mapping)
        and "params" in variables
        and not (isinstance(pretrained, Mapping) and "params" in pretrained)
    ):
        pretrained = {"params": pretrained}
    elif not (isinstance(variables, Mapping) and "params" in variables):
        return load_base({"params": variables}, {"params": pretrained})["params"]

    flat_pretrained = _flat(pretrained)
    collections = {str(name) for name in pretrained}
    frozen = {
        path: leaf
        for path, leaf in _flat(variables).items()
        if path.split("/")[0] in collections and path.rsplit("/", 1)[-1] not in core.ADAPTER_NAMES
    }
    for path, leaf in frozen.items():
        if path not in flat_pretrained:
            raise ValueError(
                f"pretrained weights have no leaf {path!r} (shape {jnp.shape(leaf)} in the adapted model)."
            )
        if jnp.shape(flat_pretrained[path]) != jnp.shape(leaf):
            raise ValueError(
                f"pretrained {path!r} has shape {jnp.shape(flat_pretrained[path])}; "
                f"the adapted model expects {jnp.shape(leaf)}."
            )
    for path, leaf in flat_pretrained.items():
        if path not in frozen:
            raise ValueError(f"pretrained leaf {path!r} (shape {jnp.shape(leaf)}) does not exist in the adapted model.")

    def pick(path, leaf):
        key = core._path_str(path)
        return jnp.asarray(flat_pretrained[key]) if key in frozen else leaf

    return jax.tree_util.tree_map_with_path(pick, variables)
