r"""The gate family as objects: one class per gate, registered by the name an :class:`~rssbl_jax.AdapterConfig` uses.

:math:`g(\hat p) = g_0 + \phi(\hat p)\, C,\ b(\hat p) = S \hat p,\ \Delta y = s\, B((A x) \odot g(\hat p) + b(\hat p))`.
The gates, each with its leaves: :class:`Linear` (the default) ``lora_c (d_p, r)``; :class:`Affine` adds
``lora_c0 (r,)``; :class:`MLP` has ``lora_gate_w (d_p, hidden)``, ``lora_gate_b (hidden,)``, ``lora_c (hidden, r)``,
``lora_c0 (r,)``; the shift ``lora_s (d_p, r)`` is the same for all. With ``scalar_gate=True``, ``C (m, 1)`` and
``c0 (1,)``: one value per condition for every rank, as CoLoRA. Why objects in one registry: parameter creation,
shape checks, the update, the fold, the sweep basis of :mod:`rssbl_jax.fastpath`, :func:`rssbl_jax.init_principal`
and d_p discovery ask the :class:`Gate` instead of switching on a string, so a new gate is one registered subclass;
since ``g`` is affine in ``φ(p̂)``, the update at a fixed ``p0`` is still ``B diag(g(p̂0)) A`` plus a bias, and merge
and the sweep serve it unchanged.

>>> class Cubic(Gate):             # register(Cubic) would make gate="cubic" work everywhere
...     name = "cubic"
...     def features(self, p, factors, *, precision=None):
...         return p**3
>>> Cubic()(jnp.array([[2.0]]), {"lora_c": jnp.array([[0.5]])}, None).tolist()     # g = (p̂³) C
[[4.0]]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from rssbl_jax.contract import lead_axes, normalize_operating_params

PrecisionLike = Any
Factors = Mapping[str, Any]
Initializer = jax.nn.initializers.Initializer
LeafSpecs = dict[str, tuple[tuple[int, ...], Initializer]]

default_lora_c_init = jax.nn.initializers.lecun_normal()
"""Gate weights with variance 1/d_p, so ``C p`` is O(1) for standardised ``p``."""


def width(layer: Any) -> int:
    """The number of gate values per condition: ``r``, or 1 with ``scalar_gate`` (one value for every rank)."""
    return 1 if getattr(layer, "scalar_gate", False) else layer.rank


class Gate:
    """One member of the gate family, ``g(p̂) = g0 + φ(p̂) C``; subclass it and :func:`register` it.

    Override the methods that differ from the linear gate's, and the class attributes ``features_are_p``
    (``φ(p̂) = p̂``: ``S p̂`` shares the sweep basis), ``optional`` (leaves that may be absent), ``linear_leaves`` (all
    zero gives ``g ≡ 0``, as :func:`rssbl_jax.init_principal` starts it).
    """

    name: ClassVar[str] = ""
    features_are_p: ClassVar[bool] = True
    optional: ClassVar[tuple[str, ...]] = ()
    linear_leaves: ClassVar[tuple[str, ...]] = ("lora_c",)

    def leaves(self, layer: Any, d_p: int) -> LeafSpecs:
        """``{name: (shape, initializer)}`` of the gate's leaves for ``layer`` (a :class:`~rssbl_jax.LayerConfig`)."""
        return {"lora_c": ((d_p, width(layer)), default_lora_c_init)}

    def d_p(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """The number of operating parameters, read from the gate leaves' shapes (``lora_c (..., d_p, r)``)."""
        return tuple(shapes["lora_c"])[-2]

    def features(self, p: jax.Array, factors: Factors, *, precision: PrecisionLike = None) -> jax.Array:
        """``φ(p̂)`` for rows ``p̂ [n, d_p]``: ``[n, m]``."""
        return p

    def directions(self, factors: Factors) -> jax.Array:
        """``C``, the ``[m, r]`` rank-space directions the features weigh."""
        return jnp.asarray(factors["lora_c"])

    def constant(self, factors: Factors, layer: Any) -> Any:
        """``g0``: ``None`` (zero), a scalar, or an ``[r]`` array."""
        return None

    def fixed_offset(self, layer: Any) -> float:
        """The part of ``g0`` no leaf can change (0 unless the gate has a constant offset)."""
        return 0.0

    def vanishes_at_zero(self, layer: Any) -> bool:
        """Whether ``g(0) = 0`` whatever the leaves hold, so rows with ``p̂ = 0`` learn nothing (``False``: unknown)."""
        return False

    def __call__(
        self, p: Float[ArrayLike, "n d_p"], factors: Factors, layer: Any, *, precision: PrecisionLike = None
    ) -> Float[Array, "n r"]:
        """``g(p̂) = g0 + φ(p̂) C`` for rows of already standardised ``p̂``."""
        gate = jnp.matmul(self.features(p, factors, precision=precision), self.directions(factors), precision=precision)
        if (constant := self.constant(factors, layer)) is not None:
            gate = gate + (
                jnp.asarray(constant, gate.dtype) if jnp.ndim(constant) == 0 else jnp.asarray(constant)[None]
            )
        if getattr(layer, "scalar_gate", False):  # one value per condition, the same for every rank
            gate = jnp.broadcast_to(gate, (gate.shape[0], layer.rank))
        return gate


_REGISTRY: dict[str, Gate] = {}


def register(cls: type[Gate]) -> type[Gate]:
    """Register a :class:`Gate` subclass under its ``name`` (a class decorator); ``ValueError`` if empty or taken."""
    name = cls.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"a gate needs a non-empty string name; {cls.__name__}.name={name!r}.")
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"gate {name!r} is already registered ({type(_REGISTRY[name]).__name__}).")
    _REGISTRY[name] = cls()
    return cls


def get(name: str) -> Gate:
    """The registered gate called ``name``; ``ValueError`` naming the known gates otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"gate must be one of {names()}; got gate={name!r}.") from None


def names() -> tuple[str, ...]:
    """The registered gates' names, in registration order: ``('linear', 'affine', 'mlp', ...)``."""
    return tuple(_REGISTRY)


@register
class Linear(Gate):
    """The original formulation's gate ``g0 + C p̂``, ``g0 = gate_offset`` fixed (0 by default).

    ``C`` starts lecun-normal (``∂L/∂B ≠ 0`` for ``p ≠ 0``), or zero when ``g0 ≠ 0``: then plain LoRA scaled by ``g0``.
    """

    name = "linear"

    def leaves(self, layer: Any, d_p: int) -> LeafSpecs:
        init = jax.nn.initializers.zeros if layer.gate_offset != 0 else default_lora_c_init
        return {"lora_c": ((d_p, width(layer)), init)}

    def constant(self, factors: Factors, layer: Any) -> Any:
        return layer.gate_offset or None

    def fixed_offset(self, layer: Any) -> float:
        return layer.gate_offset

    def vanishes_at_zero(self, layer: Any) -> bool:
        return layer.gate_offset == 0


@register
class Affine(Gate):
    """``c0 + C p̂`` with ``c0`` learnable (``lora_c0``, initialised to ``gate_offset``): never silent at ``p̂ = 0``."""

    name = "affine"
    linear_leaves = ("lora_c", "lora_c0")

    def leaves(self, layer: Any, d_p: int) -> LeafSpecs:
        return super().leaves(layer, d_p) | {
            "lora_c0": ((width(layer),), jax.nn.initializers.constant(layer.gate_offset))
        }

    def constant(self, factors: Factors, layer: Any) -> Any:
        return factors["lora_c0"]


@register
class MLP(Affine):
    """``c0 + C tanh(W p̂ + b)``, ``gate_hidden`` units: ``lora_gate_w`` lecun-normal, ``lora_gate_b`` 0, ``C (h, r)``"""

    name = "mlp"
    features_are_p = False
    optional = ("lora_gate_b",)

    def leaves(self, layer: Any, d_p: int) -> LeafSpecs:
        hidden, init = layer.gate_hidden, jax.nn.initializers
        return {
            "lora_c": ((hidden, width(layer)), default_lora_c_init),
            "lora_c0": ((width(layer),), init.constant(layer.gate_offset)),
            "lora_gate_w": ((d_p, hidden), default_lora_c_init),
            "lora_gate_b": ((hidden,), init.zeros),
        }

    def d_p(self, shapes: Mapping[str, Sequence[int]]) -> int:
        return tuple(shapes["lora_gate_w"])[-2]

    def features(self, p: jax.Array, factors: Factors, *, precision: PrecisionLike = None) -> jax.Array:
        hidden = jnp.matmul(p, jnp.asarray(factors["lora_gate_w"]), precision=precision)
        if factors.get("lora_gate_b") is not None:
            hidden = hidden + jnp.asarray(factors["lora_gate_b"])[None]
        return jnp.tanh(hidden)


def d_p_of(factors: Factors, layer: Any) -> int:
    """The number of operating parameters an adapter was built for, read from its leaves' shapes."""
    return get(layer.gate).d_p({name: jnp.shape(value) for name, value in factors.items() if value is not None})


def d_p_from_shapes(shapes: Mapping[str, Sequence[int]], layer: Any) -> int | None:
    """d_p from the adapter leaves created so far, ``None`` before they exist (lazy front-ends: take it from ``p``).

    >>> from rssbl_jax.config import LayerConfig
    >>> layer = LayerConfig(rank=2, lora_alpha=2.0, scale=1.0, gate="mlp")
    >>> d_p_from_shapes({"lora_c": (16, 2), "lora_gate_w": (3, 16)}, layer), d_p_from_shapes({}, layer)
    (3, None)
    """
    try:
        return get(layer.gate).d_p(shapes)
    except KeyError:
        return None


def require_leaves(factors: Factors, layer: Any) -> None:
    """Raise ``ValueError`` naming the missing leaves when ``factors`` lacks one that ``A``, ``B`` or the gate needs."""
    gate = get(layer.gate)
    required = [name for name in gate.leaves(layer, 1) if name not in gate.optional]
    missing = [name for name in ("lora_a", "lora_b", *required) if factors.get(name) is None]
    if missing:
        raise ValueError(f"the {layer.gate!r} gate needs adapter leaves {missing}; have {sorted(factors)}.")


def check_factors(factors: Factors, layer: Any) -> None:
    """Raise ``ValueError`` naming the leaves and shapes when the gate/shift factors do not fit ``layer``."""
    require_leaves(factors, layer)
    gate = get(layer.gate)
    shape = {name: tuple(jnp.shape(value)) for name, value in factors.items() if value is not None}
    rank = shape["lora_a"][-1]
    d_p = gate.d_p(shape)
    expected = {name: spec[0] for name, spec in gate.leaves(layer, d_p).items()} | {"lora_s": (d_p, rank)}
    bad = {name: want for name, want in expected.items() if name in shape and shape[name][-len(want) :] != want}
    if bad or shape["lora_b"][0] != rank or rank != layer.rank:
        extra, got = "".join(f", {n} {s}" for n, s in bad.items()), ", ".join(f"{n} {s}" for n, s in shape.items())
        raise ValueError(
            f"adapter factors do not fit rank r={layer.rank}, d_p={d_p}, gate={layer.gate!r} "
            f"(expected lora_a (..., r), lora_b (r, ...){extra}); got {got}."
        )
    if layer.p_mean is not None and len(layer.p_mean) != d_p:
        raise ValueError(f"p_mean/p_std have {len(layer.p_mean)} entries but the adapter has d_p={d_p}.")


def gate_and_shift(
    p: Float[ArrayLike, "n d_p"], factors: Factors, layer: Any, *, precision: PrecisionLike = None
) -> tuple[Float[Array, "n r"], Float[Array, "n r"] | None]:
    r"""``(gate [n, r], shift [n, r] or None)``: ``g(p̂)`` and ``S p̂`` for rows ``p [n, d_p]``, where ``p`` acts.

    :math:`\hat p = (p - \mu)/\sigma`, then the layer's gate (:func:`get`) and ``lora_s`` as in the module's formula.

    >>> from rssbl_jax.config import LayerConfig
    >>> factors = {"lora_c": jnp.array([[3.0]]), "lora_c0": jnp.array([1.0])}
    >>> gate_and_shift(jnp.array([[2.0]]), factors, LayerConfig(1, 1.0, 1.0, gate="affine"))[0].tolist()
    [[7.0]]
    """
    p = normalize_operating_params(jnp.asarray(p), layer)
    gate = get(layer.gate)(p, factors, layer, precision=precision)
    lora_s = factors.get("lora_s")
    shift = None if lora_s is None else jnp.matmul(p, jnp.asarray(lora_s), precision=precision)
    return gate, shift


def modulate(
    h: Float[ArrayLike, "*batch r"],
    operating_params: Float[ArrayLike, "*lead d_p"],
    factors: Factors,
    layer: Any,
    *,
    precision: PrecisionLike = None,
) -> Float[Array, "*batch r"]:
    r"""The rank-space modulation ``h ⊙ g(p̂) + S p̂`` of rank-space activations ``h = A x``.

    ``p`` is ``[d_p]`` or ``[*lead, d_p]`` (:func:`rssbl_jax.contract.lead_axes`), applied on a ``[lead, rest, r]``
    view of ``h``: no ``[..., r]`` copy of ``p``. Raises ``ValueError`` at trace time, naming ``d_p`` and the shapes.

    >>> from rssbl_jax.config import LayerConfig
    >>> factors = {"lora_c": jnp.array([[2.0]]), "lora_s": jnp.array([[1.0]])}
    >>> modulate(jnp.ones((2, 3, 1)), jnp.array([[1.0], [2.0]]), factors, LayerConfig(1, 1.0, 1.0))[:, 0, 0].tolist()
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
