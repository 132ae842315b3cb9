r"""Every method of the comparison as an injectable adapter: ``rssbl_jax.inject(model, config, method=...)``.

The baselines are :class:`rssbl_jax.core.AdapterMethod` plug-ins, so they reach every layer kind (Dense,
DenseGeneral, Einsum, Conv, Embed) of an unmodified model through the same injection and the same factorizations
(``down(x, A)`` and ``up(h, B)``) as RSSBilinearLoRA. With ``s = α / r``, ``branch = s B A x`` and ``y`` the base
layer's output, the update each one adds is

=====================  ===========================================================  ==============================
method                 Δy                                                           leaves (besides ``lora_a/b``)
=====================  ===========================================================  ==============================
``lora``               ``branch``                                                   —
``lora_concat``        ``s B (A x + A_p p)``: p concatenated to the adapter's input ``lora_ap (d_p, r)``
``film_branch{o}``     ``(o + Γ p) ⊙ branch + Β p`` (output-space FiLM, LoRA branch) ``lora_gamma``, ``lora_beta``
``film_layer{o}``      ``o·branch + Γ p ⊙ (y + branch) + Β p`` (FiLM on the whole    ``lora_gamma``, ``lora_beta``
                       layer: ``y' = (1 + Γp)(y + branch) + Βp`` for o = 1)
``hypernet{w}``        ``s B(p) A(p) x``, ``[A(p); B(p)] = u·[A0; B0] + H tanh(P p)`` ``lora_hyper_*``
``rss*``               the library's own method (``rssbl_jax.core.RSS``) and gate family
=====================  ===========================================================  ==============================

``o`` is the offset: 0 means the update vanishes at ``p = 0`` (like the seed's gate ``C p``), 1 means an
unconditioned update is there at ``p = 0`` (like ``1 + C p``). Every conditional baseline gets both, so offsets are
compared like with like. The hypernetwork's unconditioned term ``u·[A0; B0]`` can be switched off (``u = 0``; then
``A(p) = H_a tanh(P p)`` and ``lora_a``/``lora_b`` *are* ``H_a``/``H_b``).

Initialisation: every method starts at ``Δy = 0`` (``B``-like factors, ``Β`` and the hypernetwork heads that feed ``B``
are zero) and with a non-zero gradient for ``p ≠ 0`` on its multiplicative factors: ``Γ`` is zero except for
``film_branch0``, where it starts random as RSS's ``C`` does (with ``Γ = B = 0`` neither would ever move).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

import rssbl_jax
from rssbl_jax import core
from rssbl_jax.config import LayerConfig
from rssbl_jax.core import Factorization

zeros = nn.initializers.zeros_init()
lecun = nn.initializers.lecun_normal()


def _rows(x_shape: tuple[int, ...], p: jax.Array, d_p: int, integer_inputs: bool) -> tuple[jax.Array, int]:
    """``p`` as ``[n_lead, d_p]`` and its number of lead axes, checked against the layer input."""
    shape = (*x_shape, 1) if integer_inputs else x_shape
    n_lead = core.lead_axes(shape, p.shape, d_p)
    lead = math.prod(shape[:n_lead]) if n_lead else 1
    return p.reshape(lead, d_p), n_lead


def _per_lead(values: jax.Array, y: jax.Array) -> jax.Array:
    """Broadcast ``values [n_lead, *out]`` (one row per example) over ``y [*lead, *rest, *out]``."""
    n_lead = values.shape[0]
    out = values.shape[1:]
    rest = y.size // (n_lead * math.prod(out))
    return jnp.broadcast_to(values[:, None], (n_lead, rest, *out)).reshape(y.shape)


def _out_shape(factorization: Factorization) -> tuple[int, ...]:
    b_shape = factorization.b_shape[1:]
    if 1 in b_shape and factorization.kind == "Einsum":
        raise ValueError("output-space FiLM needs a compact factorization (Einsum kernels with interleaved axes: no).")
    return tuple(b_shape)


def _a_init(factorization: Factorization):
    return nn.initializers.normal(1.0) if factorization.integer_inputs else core.default_lora_a_init


class LoRA(NamedTuple):
    """Plain LoRA: ``Δy = s B A x`` (no p)."""

    def params(self, layer, factorization, d_p, *, shift):
        del d_p, shift
        return {"lora_a": (factorization.a_shape, _a_init(factorization)), "lora_b": (factorization.b_shape, zeros)}

    def update(self, factorization, x, p, factors, layer, *, precision=None, dropout_rng=None):
        del p, precision, dropout_rng
        b = factors["lora_b"]
        return factorization.up(factorization.down(x, factors["lora_a"]), b * jnp.asarray(layer.scale, b.dtype))


class LoRAConcat(NamedTuple):
    """LoRA with p concatenated to its input: ``Δy = s B (A x + A_p p)``."""

    def params(self, layer, factorization, d_p, *, shift):
        del shift
        specs = LoRA().params(layer, factorization, d_p, shift=False)
        specs["lora_ap"] = ((d_p, layer.rank), core.default_lora_a_init)
        return specs

    def update(self, factorization, x, p, factors, layer, *, precision=None, dropout_rng=None):
        del dropout_rng
        p2, _ = _rows(x.shape, p, factors["lora_ap"].shape[0], factorization.integer_inputs)
        h = factorization.down(x, factors["lora_a"])
        h = h + _per_lead(jnp.matmul(p2, factors["lora_ap"], precision=precision), h)
        b = factors["lora_b"]
        return factorization.up(h, b * jnp.asarray(layer.scale, b.dtype))


@dataclasses.dataclass(frozen=True)
class FiLM:
    """Output-space FiLM on the LoRA branch (``on_layer=False``) or on the whole layer's output (``True``)."""

    offset: float
    on_layer: bool = False

    @property
    def needs_base_output(self) -> bool:
        return self.on_layer

    def params(self, layer, factorization, d_p, *, shift):
        del shift
        out = math.prod(_out_shape(factorization))
        specs = LoRA().params(layer, factorization, d_p, shift=False)
        # offset 0 on the branch: Γ starts random (like RSS's C with the seed's gate), otherwise Γ = 0 and B = 0
        # would give every factor but Β a zero gradient forever; on the layer Γ multiplies y, so it starts at 0.
        gamma_init = lecun if (self.offset == 0 and not self.on_layer) else zeros
        specs["lora_gamma"] = ((d_p, out), gamma_init)
        specs["lora_beta"] = ((d_p, out), zeros)
        return specs

    def update(self, factorization, x, p, factors, layer, *, precision=None, dropout_rng=None, base_output=None):
        del dropout_rng
        out_shape = _out_shape(factorization)
        d_p = factors["lora_gamma"].shape[0]
        p2, _ = _rows(x.shape, p, d_p, factorization.integer_inputs)
        branch = LoRA().update(factorization, x, p, factors, layer)
        gamma = jnp.matmul(p2, factors["lora_gamma"], precision=precision).reshape(-1, *out_shape)
        beta = jnp.matmul(p2, factors["lora_beta"], precision=precision).reshape(-1, *out_shape)
        gamma, beta = _per_lead(gamma, branch), _per_lead(beta, branch)
        if self.on_layer:
            return self.offset * branch + gamma * (base_output.astype(branch.dtype) + branch) + beta
        return (self.offset + gamma) * branch + beta


@dataclasses.dataclass(frozen=True)
class HyperNet:
    """A hypernetwork that generates the LoRA factors from p: ``[A(p); B(p)] = u·[A0; B0] + H tanh(P p)``."""

    hidden: int
    unconditioned: bool = True

    def params(self, layer, factorization, d_p, *, shift):
        del shift
        a_size, b_size = math.prod(factorization.a_shape), math.prod(factorization.b_shape)
        specs = {"lora_hyper_p": ((d_p, self.hidden), lecun)}
        if self.unconditioned:
            specs |= LoRA().params(layer, factorization, d_p, shift=False)
            specs["lora_hyper_a"] = ((self.hidden, a_size), zeros)
            specs["lora_hyper_b"] = ((self.hidden, b_size), zeros)
        else:  # the heads are the only factors: A(p) = H_a z starts random, B(p) = H_b z starts at 0
            specs["lora_a"] = ((self.hidden, a_size), nn.initializers.normal(1.0 / math.sqrt(a_size / layer.rank)))
            specs["lora_b"] = ((self.hidden, b_size), zeros)
        return specs

    def update(self, factorization, x, p, factors, layer, *, precision=None, dropout_rng=None):
        del dropout_rng
        d_p = factors["lora_hyper_p"].shape[0]
        p2, n_lead = _rows(x.shape, p, d_p, factorization.integer_inputs)
        z = jnp.tanh(jnp.matmul(p2, factors["lora_hyper_p"], precision=precision))  # [n_lead, hidden]
        head_a, head_b = ("lora_hyper_a", "lora_hyper_b") if self.unconditioned else ("lora_a", "lora_b")
        a = jnp.matmul(z, factors[head_a], precision=precision).reshape(-1, *factorization.a_shape)
        b = jnp.matmul(z, factors[head_b], precision=precision).reshape(-1, *factorization.b_shape)
        if self.unconditioned:
            a, b = a + factors["lora_a"][None], b + factors["lora_b"][None]
        b = b * jnp.asarray(layer.scale, b.dtype)
        if n_lead == 0:  # one condition: one pair of factors
            return factorization.up(factorization.down(x, a[0]), b[0])
        lead = x.shape[:n_lead]
        xs = x.reshape(-1, *x.shape[n_lead:])

        def one(xi, ai, bi):
            return factorization.up(factorization.down(xi[None], ai), bi)[0]

        out = jax.vmap(one)(xs, a, b)
        return out.reshape(*lead, *out.shape[1:])


# --------------------------------------------------------------------------------------------------
# The method table
# --------------------------------------------------------------------------------------------------


class Spec(NamedTuple):
    """How to build one method: the plug-in (``None``: the library's RSS), config overrides, frozen leaves."""

    method: Any
    settings: dict[str, Any]
    frozen_leaves: tuple[str, ...] = ()
    trains_base: bool = False


def spec(name: str) -> Spec:
    """The :class:`Spec` of a method name (``film_branch0``, ``hypernet8``, ``hypernet8_nou``, ``rss_mlp``, ...)."""
    if name == "frozen":
        return Spec(LoRA(), {}, frozen_leaves=("lora_a", "lora_b"))
    if name in ("lora", "lora_wide"):
        return Spec(LoRA(), {})
    if name == "lora_concat":
        return Spec(LoRAConcat(), {})
    if name == "full_ft":
        return Spec(LoRAConcat(), {}, trains_base=True)
    for prefix, on_layer in (("film_branch", False), ("film_layer", True)):
        if name.startswith(prefix):
            return Spec(FiLM(float(name[len(prefix) :]), on_layer), {})
    if name.startswith("hypernet"):
        body = name[len("hypernet") :]
        unconditioned = not body.endswith("_nou")
        return Spec(HyperNet(int(body.removesuffix("_nou")), unconditioned), {})
    rss = {
        "rss": {},
        "rss_one_plus": {"gate_offset": 1.0},
        "rss_affine": {"gate": "affine", "gate_offset": 0.0},
        "rss_affine1": {"gate": "affine", "gate_offset": 1.0},
        "rss_mlp": {"gate": "mlp", "gate_hidden": 8},
        "rss_gate_only": {"shift": False},
        "rss_shift_only": {"gate_offset": 1.0},
    }
    if name in rss:
        frozen = ("lora_c",) if name == "rss_shift_only" else ()
        return Spec(core.RSS, {"shift": True} | rss[name], frozen_leaves=frozen)
    raise ValueError(f"unknown method {name!r}.")


def inject(model: nn.Module, name: str, targets: Any, rank: int, lora_alpha: float, **settings: Any):
    """``rssbl_jax.inject`` of method ``name`` into the unmodified ``model``; returns the adapted model."""
    s = spec(name)
    config = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=lora_alpha, targets=targets, **(s.settings | settings))
    return rssbl_jax.inject(model, config, method=s.method)


def trainable_mask(params: Any, name: str) -> Any:
    """Which leaves method ``name`` trains: its adapter leaves (minus its frozen ones), or everything (full_ft)."""
    s = spec(name)
    adapters = rssbl_jax.trainable_mask(params)
    if s.trains_base:
        return jax.tree.map(lambda _: True, adapters)

    def rule(path, is_adapter):
        return bool(is_adapter) and getattr(path[-1], "key", None) not in s.frozen_leaves

    return jax.tree_util.tree_map_with_path(rule, adapters)


def count_trainable(params: Any, name: str) -> int:
    """Number of parameters method ``name`` trains in ``params``."""
    mask = trainable_mask(params, name)
    return int(sum(jnp.size(v) for v, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m))


def layer_config(rank: int, lora_alpha: float, **settings: Any) -> LayerConfig:
    """A :class:`~rssbl_jax.LayerConfig` for calling a method's ``update`` directly (tests, analysis)."""
    return rssbl_jax.AdapterConfig(rank=rank, lora_alpha=lora_alpha, **settings).resolve(None)
