r"""Adapter methods: RSSBilinearLoRA and the baselines it is compared with, behind one protocol.

An :class:`AdapterMethod` says which leaves an adapted layer holds (``params``) and what it outputs (``adapt``);
:func:`rssbl_jax.apply.apply_adapter` does the rest for every front-end, so every method reaches every layer kind
through the same factorizations ``down(x, A)``, ``up(h, B)``. The methods, each class giving its ``Δy`` and leaves
(``s`` the layer's scale, ``y`` the base output): :class:`RSS`, :class:`LoRA`, :class:`LoRAConcat` (``p``
concatenated to the input), :class:`FiLM` (output-space, on the LoRA branch or the whole layer), :class:`HyperNet`.

Every method starts at ``Δy = 0`` (``B``-like factors, ``Β``, ``S`` and the heads feeding ``B`` are zero) with a
non-zero gradient for ``p ≠ 0`` on its multiplicative factors: ``Γ`` starts random only on the branch with offset
0, where ``Γ = B = 0`` would never move (as RSS's ``C``); on the layer ``Γ`` multiplies ``y``, so it starts at 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import linen as nn

from rssbl_jax import core, gates
from rssbl_jax.config import LayerConfig
from rssbl_jax.core import Factorization
from rssbl_jax.fastpath import DEFAULT_THRESHOLDS, Thresholds
from rssbl_jax.gates import Initializer as Initializer
from rssbl_jax.gates import LeafSpecs as Specs

zeros = nn.initializers.zeros_init()
lecun = nn.initializers.lecun_normal()


class AdapterMethod(Protocol):
    """What an adapter computes: the extension point of every front-end (linen layer, ``inject``, NNX).

    ``params(layer, factorization, d_p, *, shift)``: ``{leaf name: (shape, initializer)}``, names ``lora_*`` (the
    trainable prefix) with ``lora_a``, ``lora_b``. ``adapt(y, factorization, x, p, factors, layer, *, precision)``:
    ``y + Δy`` (``Δy`` may join ``y``'s pass); ``x`` after dropout, ``p`` normalised (``None`` without ``uses_p``),
    all in the compute dtype; scale ``layer.scale``. ``vanishes_at_zero(layer)``: ``Δy ≡ 0`` where ``p̂ = 0``.

    Attributes:
      uses_p: whether the output depends on ``p``; a method that does not (:class:`LoRA`) needs no ``p``.
      mergeable: whether :func:`rssbl_jax.nnx.merge` can fold it into the base kernel (:class:`RSS` only).

    >>> from rssbl_jax import LayerConfig, core
    >>> layer, factorization = LayerConfig(2, 2.0, 1.0), core.dense_factorization((3, 4), rank=2)
    >>> {name: shape for name, (shape, _) in RSS().params(layer, factorization, 5, shift=True).items()}
    {'lora_a': (3, 2), 'lora_b': (2, 4), 'lora_c': (5, 2), 'lora_s': (5, 2)}
    """

    uses_p: bool
    mergeable: bool

    def params(self, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool) -> Specs: ...

    def adapt(
        self, y: jax.Array, factorization: Factorization, x: jax.Array, p: jax.Array | None,
        factors: dict[str, jax.Array], layer: LayerConfig, *, precision: Any = None,
    ) -> jax.Array: ...  # fmt: skip

    def vanishes_at_zero(self, layer: LayerConfig) -> bool: ...


@dataclasses.dataclass(frozen=True)
class RSS:
    r"""RSSBilinearLoRA: ``y + s B((A x) ⊙ g(p̂) + S p̂)`` with the config's gate, by :func:`core.adapter_update`.

    Leaves ``lora_c``, ``lora_s`` and the gate's own (:mod:`rssbl_jax.gates`).

    Attributes:
      thresholds: when the fast paths of :func:`rssbl_jax.fastpath.modulated_add` are taken (a
        :class:`rssbl_jax.fastpath.Thresholds`).

    >>> import flax.linen as nn
    >>> from rssbl_jax import inject
    >>> adapted = inject(nn.Dense(2, use_bias=False), "", rank=1, lora_alpha=1.0, method=RSS(), shift=True)
    >>> x, p = jnp.ones((1, 3)), jnp.array([[2.0]])                                        # p per example
    >>> f = adapted.init(jax.random.key(0), x, p=p)["params"] | {"lora_b": jnp.ones((1, 2))}   # B as if trained
    >>> delta = ((x @ f["lora_a"]) * (p @ f["lora_c"]) + p @ f["lora_s"]) @ f["lora_b"]
    >>> bool(jnp.allclose(adapted.apply({"params": f}, x, p=p), x @ f["kernel"] + delta))
    True
    """

    thresholds: Thresholds = DEFAULT_THRESHOLDS
    uses_p = True
    mergeable = True

    def params(self, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool) -> Specs:
        return core.adapter_params(layer, factorization, d_p, shift=shift)

    def adapt(self, y, factorization, x, p, factors, layer, *, precision=None):
        plain = layer._replace(p_mean=None, p_std=None)  # p arrives normalised: not a second time
        return core.adapter_update(
            factorization, x, p, factors, plain, precision=precision, add_to=y, thresholds=self.thresholds
        )

    def vanishes_at_zero(self, layer: LayerConfig) -> bool:
        return gates.get(layer.gate).vanishes_at_zero(layer)


def _rows(x_shape: tuple[int, ...], p: jax.Array, d_p: int, integer_inputs: bool) -> tuple[jax.Array, int]:
    """``p`` as ``[n_lead, d_p]`` and its number of lead axes, checked against the layer input."""
    shape = (*x_shape, 1) if integer_inputs else x_shape
    n_lead = core.lead_axes(shape, p.shape, d_p)
    lead = math.prod(shape[:n_lead]) if n_lead else 1
    return p.reshape(lead, d_p), n_lead


def _per_lead(values: jax.Array, y: jax.Array) -> jax.Array:
    """Broadcast ``values [n_lead, *out]`` (one row per example) over ``y [*lead, *rest, *out]``."""
    n_lead, out = values.shape[0], values.shape[1:]
    rest = y.size // (n_lead * math.prod(out))
    return jnp.broadcast_to(values[:, None], (n_lead, rest, *out)).reshape(y.shape)


def _out_shape(factorization: Factorization) -> tuple[int, ...]:
    b_shape = factorization.b_shape[1:]
    if 1 in b_shape and factorization.kind == "Einsum":
        raise ValueError("output-space FiLM needs a compact factorization (Einsum kernels with interleaved axes: no).")
    return tuple(b_shape)


def _scaled(b: jax.Array, layer: LayerConfig) -> jax.Array:
    return b * jnp.asarray(layer.scale, b.dtype)


class _Baseline:
    """What the baselines share: they read ``p`` (LoRA excepted), never fold into the kernel, and are not silent at
    ``p̂ = 0`` (FiLM's offset-0 branch form excepted)."""

    uses_p = True
    mergeable = False

    def vanishes_at_zero(self, layer: LayerConfig) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class LoRA(_Baseline):
    """Plain LoRA: ``y + s B A x``; it ignores ``p``, so an adapted model built with it needs none.

    >>> import flax.linen as nn
    >>> from rssbl_jax import inject
    >>> adapted, x = inject(nn.Dense(2, use_bias=False), "", rank=1, lora_alpha=2.0, method=LoRA()), jnp.ones((1, 3))
    >>> f = adapted.init(jax.random.key(0), x)["params"] | {"lora_b": jnp.ones((1, 2))}      # no p
    >>> bool(jnp.allclose(adapted.apply({"params": f}, x), x @ f["kernel"] + 2 * x @ f["lora_a"] @ f["lora_b"]))
    True
    """

    uses_p = False

    def params(self, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool) -> Specs:
        a_init = nn.initializers.normal(1.0) if factorization.integer_inputs else core.default_lora_a_init
        return {"lora_a": (factorization.a_shape, a_init), "lora_b": (factorization.b_shape, zeros)}

    def branch(self, factorization, x, factors, layer):
        """``s B A x``, the update every baseline builds on."""
        return factorization.up(factorization.down(x, factors["lora_a"]), _scaled(factors["lora_b"], layer))

    def adapt(self, y, factorization, x, p, factors, layer, *, precision=None):
        return y + self.branch(factorization, x, factors, layer).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class LoRAConcat(_Baseline):
    """LoRA with ``p`` concatenated to its input: ``y + s B (A x + A_p p)``, ``A_p`` = ``lora_ap (d_p, r)``.

    >>> import flax.linen as nn
    >>> from rssbl_jax import inject
    >>> adapted = inject(nn.Dense(2, use_bias=False), "", rank=1, lora_alpha=1.0, method=LoRAConcat())
    >>> x, p = jnp.ones((1, 3)), jnp.array([[2.0, -1.0]])
    >>> f = adapted.init(jax.random.key(0), x, p=p)["params"] | {"lora_b": jnp.ones((1, 2))}
    >>> delta = (x @ f["lora_a"] + p @ f["lora_ap"]) @ f["lora_b"]
    >>> bool(jnp.allclose(adapted.apply({"params": f}, x, p=p), x @ f["kernel"] + delta))
    True
    """

    def params(self, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool) -> Specs:
        return LoRA().params(layer, factorization, d_p, shift=False) | {
            "lora_ap": ((d_p, layer.rank), core.default_lora_a_init)
        }

    def adapt(self, y, factorization, x, p, factors, layer, *, precision=None):
        p2, _ = _rows(x.shape, p, factors["lora_ap"].shape[0], factorization.integer_inputs)
        h = factorization.down(x, factors["lora_a"])
        h = h + _per_lead(jnp.matmul(p2, factors["lora_ap"], precision=precision), h)
        return y + factorization.up(h, _scaled(factors["lora_b"], layer)).astype(y.dtype)


@dataclasses.dataclass(frozen=True)
class FiLM(_Baseline):
    """Output-space FiLM on the LoRA branch (``on_layer=False``) or on the whole layer's output (``True``).

    With ``branch = s B A x``: on the branch ``Δy = (o + γ(p)) ⊙ branch + Β p``, on the layer
    ``Δy = o ⊙ branch + γ(p) ⊙ (y + branch) + Β p``; leaves ``lora_gamma`` (Γ), ``lora_beta`` (Β).

    Attributes:
      offset: the constant ``o``, or the learnable one's start (0: ``Δy = 0`` at ``p = 0`` like ``C p``; 1: an
        unconditioned update there, like ``1 + C p``).
      on_layer: modulate the whole layer output ``y + branch`` instead of the branch.
      learn_offset: learn ``o`` per output unit (``lora_gamma0``), as the affine gate learns ``c0``.
      hidden: 0 for ``γ(p) = Γ p``; otherwise the width of ``γ(p) = Γ tanh(W p + b)`` (as the MLP gate).

    >>> import flax.linen as nn
    >>> from rssbl_jax import inject
    >>> adapted = inject(nn.Dense(2, use_bias=False), "", rank=1, lora_alpha=1.0, method=FiLM(0.0))  # s = 1, o = 0
    >>> x, p = jnp.ones((1, 3)), jnp.array([[2.0]])
    >>> f = adapted.init(jax.random.key(0), x, p=p)["params"] | {"lora_b": jnp.ones((1, 2))}
    >>> delta = (p @ f["lora_gamma"]) * (x @ f["lora_a"] @ f["lora_b"]) + p @ f["lora_beta"]
    >>> bool(jnp.allclose(adapted.apply({"params": f}, x, p=p), x @ f["kernel"] + delta))
    True
    """

    offset: float
    on_layer: bool = False
    learn_offset: bool = False
    hidden: int = 0

    def params(self, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool) -> Specs:
        out = math.prod(_out_shape(factorization))
        specs = LoRA().params(layer, factorization, d_p, shift=False)
        gamma_init = lecun if (self.offset == 0 and not self.on_layer) else zeros
        specs["lora_gamma"] = ((self.hidden or d_p, out), gamma_init)
        specs["lora_beta"] = ((d_p, out), zeros)
        if self.learn_offset:
            specs["lora_gamma0"] = ((out,), nn.initializers.constant(self.offset))
        if self.hidden:
            specs["lora_film_w"] = ((d_p, self.hidden), lecun)
            specs["lora_film_b"] = ((self.hidden,), zeros)
        return specs

    def adapt(self, y, factorization, x, p, factors, layer, *, precision=None):
        out_shape = _out_shape(factorization)
        p2, _ = _rows(x.shape, p, factors["lora_beta"].shape[0], factorization.integer_inputs)
        branch = LoRA().branch(factorization, x, factors, layer)
        features = p2
        if self.hidden:
            hidden = jnp.matmul(p2, factors["lora_film_w"], precision=precision)
            features = jnp.tanh(hidden + factors["lora_film_b"][None])
        gamma = jnp.matmul(features, factors["lora_gamma"], precision=precision).reshape(-1, *out_shape)
        beta = jnp.matmul(p2, factors["lora_beta"], precision=precision).reshape(-1, *out_shape)
        gamma, beta = _per_lead(gamma, branch), _per_lead(beta, branch)
        offset = self.offset
        if self.learn_offset:
            offset = factors["lora_gamma0"].reshape((1,) * (branch.ndim - len(out_shape)) + out_shape)
        if self.on_layer:
            delta = offset * branch + gamma * (y.astype(branch.dtype) + branch) + beta
        else:
            delta = (offset + gamma) * branch + beta
        return y + delta.astype(y.dtype)

    def vanishes_at_zero(self, layer: LayerConfig) -> bool:
        return self.offset == 0 and not self.learn_offset and not self.hidden


@dataclasses.dataclass(frozen=True)
class HyperNet(_Baseline):
    r"""A hypernetwork that generates the LoRA factors from p: ``[A(p); B(p)] = u·[A0; B0] + H tanh(P p)``.

    ``Δy = s B(p)(A(p) x + S p)``; leaves ``lora_hyper_*``.

    Attributes:
      hidden: the width of ``tanh(P p)``; parameters grow as ``hidden · (d_p + |A| + |B|)``: the knob that matches
        it to another method on parameters (:meth:`count`, :meth:`width_for`).
      unconditioned: keep ``A0``, ``B0`` (``u = 1``); else ``lora_a``/``lora_b`` are the heads ``H_a``/``H_b``.
      shift: add a rank-space shift ``S p`` (``lora_s (d_p, r)``, zero at init), as RSS's.

    >>> import flax.linen as nn
    >>> from rssbl_jax import core, inject
    >>> method = HyperNet(hidden=2)
    >>> adapted = inject(nn.Dense(2), "", rank=1, lora_alpha=1.0, method=method)
    >>> f = adapted.init(jax.random.key(0), jnp.ones((4, 3)), p=jnp.ones((4, 1)))["params"]
    >>> count = method.count(core.dense_factorization((3, 2), 1), 1)                      # 1·2 + (3 + 2)·3
    >>> sum(v.size for k, v in f.items() if k.startswith("lora_")), count
    (17, 17)
    """

    hidden: int
    unconditioned: bool = True
    shift: bool = False

    def params(self, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool) -> Specs:
        a_size, b_size = math.prod(factorization.a_shape), math.prod(factorization.b_shape)
        specs = {"lora_hyper_p": ((d_p, self.hidden), lecun)}
        if self.unconditioned:
            specs |= LoRA().params(layer, factorization, d_p, shift=False)
            specs["lora_hyper_a"] = ((self.hidden, a_size), zeros)
            specs["lora_hyper_b"] = ((self.hidden, b_size), zeros)
        else:  # the heads are the only factors: A(p) = H_a z starts random, B(p) = H_b z starts at 0
            specs["lora_a"] = ((self.hidden, a_size), nn.initializers.normal(1.0 / math.sqrt(a_size / layer.rank)))
            specs["lora_b"] = ((self.hidden, b_size), zeros)
        if self.shift:
            specs["lora_s"] = ((d_p, layer.rank), zeros)
        return specs

    def count(self, factorization: Factorization, d_p: int) -> int:
        """The number of trainable parameters :meth:`params` creates on one layer."""
        a_size, b_size = math.prod(factorization.a_shape), math.prod(factorization.b_shape)
        rank = factorization.a_shape[-1]
        return d_p * self.hidden + (a_size + b_size) * (self.hidden + self.unconditioned) + self.shift * d_p * rank

    @classmethod
    def width_for(
        cls, budget: int, factorization: Factorization, d_p: int, *, unconditioned: bool = True, shift: bool = False
    ) -> int:
        """The largest width whose :meth:`count` on this layer is at most ``budget`` (at least 1).

        >>> from rssbl_jax import core
        >>> HyperNet.width_for(1000, core.dense_factorization((16, 16), 4), 2)   # 2·6 + 128·7 = 908 ≤ 1000 < 1038
        6
        """
        a_size, b_size = math.prod(factorization.a_shape), math.prod(factorization.b_shape)
        fixed = (a_size + b_size) * unconditioned + shift * d_p * factorization.a_shape[-1]
        return max(1, (budget - fixed) // (d_p + a_size + b_size))

    def adapt(self, y, factorization, x, p, factors, layer, *, precision=None):
        d_p = factors["lora_hyper_p"].shape[0]
        p2, n_lead = _rows(x.shape, p, d_p, factorization.integer_inputs)
        z = jnp.tanh(jnp.matmul(p2, factors["lora_hyper_p"], precision=precision))  # [n_lead, hidden]
        head_a, head_b = ("lora_hyper_a", "lora_hyper_b") if self.unconditioned else ("lora_a", "lora_b")
        a = jnp.matmul(z, factors[head_a], precision=precision).reshape(-1, *factorization.a_shape)
        b = jnp.matmul(z, factors[head_b], precision=precision).reshape(-1, *factorization.b_shape)
        if self.unconditioned:
            a, b = a + factors["lora_a"][None], b + factors["lora_b"][None]
        b = _scaled(b, layer)
        rank = factorization.a_shape[-1]
        s = jnp.matmul(p2, factors["lora_s"], precision=precision) if self.shift else jnp.zeros((p2.shape[0], rank))

        def one(xi, ai, bi, si):
            h = factorization.down(xi, ai)
            if self.shift:
                h = h + si.astype(h.dtype).reshape((1,) * (h.ndim - 1) + (rank,))
            return factorization.up(h, bi)

        if n_lead == 0:  # one condition: one pair of factors
            delta = one(x, a[0], b[0], s[0])
        else:
            xs = x.reshape(-1, 1, *x.shape[n_lead:])
            delta = jax.vmap(one)(xs, a, b, s)
            delta = delta.reshape(*x.shape[:n_lead], *delta.shape[2:])
        return y + delta.astype(y.dtype)
