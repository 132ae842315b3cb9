"""Every method of the comparison as a Dense-like linen layer ``(x, p) -> y`` over the same frozen base.

All layers name their base parameters ``kernel``/``bias`` (``nn.Dense``'s names) so one pretrained base loads
into any of them; what a method may train is given by :func:`trainable_mask`. RSSBilinearLoRA and its ablations
are the library's own layer (``rssbl_jax.RSSBilinearLoRADense``), the ablations obtained by freezing factors:

==================  ==============================================================  =========================
method              y - (W x + b)                                                   trained
==================  ==============================================================  =========================
frozen              0                                                               nothing
lora                α B A x                                                         A, B
lora_wide           α B' A' x, rank r' chosen to match RSS's parameter count        A', B'
lora_concat         α B A [x; p]                                                    A, B
film_branch         α (1 + Γ p) ⊙ (B A x) + Β p          (FiLM on the LoRA output)  A, B, Γ, Β
film_layer          (1 + Γ p) ⊙ (W x + b + α B A x) + Β p - (W x + b)       A, B, Γ, Β
hypernet            α B(p) A(p) x,  [A(p); B(p)] = [A0; B0] + H tanh(P p)          A0, B0, H, P
full_ft             (W' - W) x + (b' - b) + V p             (all weights, p as input) W, b, V
rss                 α B((A x) ⊙ (C p) + S p)                                        A, B, C, S
rss_one_plus        α B((A x) ⊙ (1 + C p) + S p)                                    A, B, C, S
rss_gate_only       α B((A x) ⊙ (C p))                                              A, B, C
rss_shift_only      α B(A x + S p)                                                  A, B, S
==================  ==============================================================  =========================

(α = lora_alpha / r; matrices written as acting on column vectors.)

The baselines other than the RSS family compute their own updates here (they are not the library's method, so
the house rule that one function computes the update applies to RSSBilinearLoRA only); each is checked against
its formula in float64 by ``tests/test_experiments.py``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

import rssbl_jax
from rssbl_jax.linen import default_lora_a_init

METHODS = (
    "frozen",
    "lora",
    "lora_wide",
    "lora_concat",
    "film_branch",
    "film_layer",
    "hypernet",
    "full_ft",
    "rss",
    "rss_one_plus",
    "rss_gate_only",
    "rss_shift_only",
)

RSS_METHODS = ("rss", "rss_one_plus", "rss_gate_only", "rss_shift_only")

_ADAPTER_PREFIXES = ("lora_", "film_", "hyper_", "cond_")


def _row_p(x: jax.Array, p: jax.Array) -> jax.Array:
    """Per-example p ``[n, d_p]`` for 2-D ``x [n, d_in]`` (p shared as ``[d_p]`` is tiled)."""
    return jnp.broadcast_to(p, (x.shape[0], p.shape[-1])) if p.ndim == 1 else p


def wide_rank(rank: int, d_in: int, d_out: int, d_p: int) -> int:
    """Rank of plain LoRA with at least as many parameters as RSSBilinearLoRA of rank ``rank``."""
    return rank + math.ceil(2 * rank * d_p / (d_in + d_out))


class MethodDense(nn.Module):
    """A Dense layer ``(x [n, d_in], p [n, d_p] or [d_p]) -> [n, features]`` adapted by ``method``."""

    features: int
    method: str
    rank: int
    lora_alpha: float
    hyper_hidden: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, p: jax.Array) -> jax.Array:
        method, rank, d_in = self.method, self.rank, x.shape[-1]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")
        if method in RSS_METHODS:
            raise ValueError(f"{method} is the library's layer: build it with make_layer, not MethodDense.")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (d_in, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        base = x @ kernel + bias[None, :]
        if method in ("frozen", "full_ft"):
            if method == "full_ft":
                v = self.param("cond_v", nn.initializers.zeros_init(), (p.shape[-1], self.features))
                base = base + _row_p(x, p) @ v
            return base

        if method == "lora_wide":
            rank = wide_rank(rank, d_in, self.features, p.shape[-1])
        scale = self.lora_alpha / self.rank  # same α for every method; lora_wide keeps the scale of rank r
        inputs = jnp.concatenate([x, _row_p(x, p)], axis=-1) if method == "lora_concat" else x
        a_init, zeros = default_lora_a_init, nn.initializers.zeros_init()
        if method == "hypernet":
            d_p, hidden = p.shape[-1], self.hyper_hidden
            a0 = self.param("lora_a", a_init, (d_in, rank))
            b0 = self.param("lora_b", zeros, (rank, self.features))
            proj = self.param("hyper_p", nn.initializers.lecun_normal(), (d_p, hidden))
            head_a = self.param("hyper_a", zeros, (hidden, d_in * rank))
            head_b = self.param("hyper_b", zeros, (hidden, rank * self.features))
            z = jnp.tanh(_row_p(x, p) @ proj)  # [n, hidden]
            a = a0[None] + (z @ head_a).reshape(-1, d_in, rank)  # per-example factors
            b = b0[None] + (z @ head_b).reshape(-1, rank, self.features)
            return base + scale * jnp.einsum("nr,nro->no", jnp.einsum("ni,nir->nr", x, a), b)

        a = self.param("lora_a", a_init, (inputs.shape[-1], rank))
        b = self.param("lora_b", zeros, (rank, self.features))
        branch = scale * (inputs @ a) @ b
        if method in ("lora", "lora_wide", "lora_concat"):
            return base + branch
        d_p = p.shape[-1]
        gamma = _row_p(x, p) @ self.param("film_gamma", zeros, (d_p, self.features))
        beta = _row_p(x, p) @ self.param("film_beta", zeros, (d_p, self.features))
        if method == "film_branch":
            return base + (1.0 + gamma) * branch + beta
        return (1.0 + gamma) * (base + branch) + beta  # film_layer


def make_layer(method: str, features: int, rank: int, lora_alpha: float, hyper_hidden: int = 4, **kw: Any) -> nn.Module:
    """The layer of ``method``: ``rssbl_jax.RSSBilinearLoRADense`` for the RSS family, else :class:`MethodDense`."""
    if method in RSS_METHODS:
        return rssbl_jax.RSSBilinearLoRADense(
            features,
            rank,
            lora_alpha,
            gate_offset=1.0 if method in ("rss_one_plus", "rss_shift_only") else 0.0,
            lora_c_init=nn.initializers.zeros_init() if method == "rss_shift_only" else None,
            **kw,
        )
    return MethodDense(features, method, rank, lora_alpha, hyper_hidden, **kw)


def trainable_mask(params: Any, method: str) -> Any:
    """Boolean tree: which leaves ``method`` trains (the rest stay at their loaded or initial values)."""

    def rule(path: tuple, _: Any) -> bool:
        name = getattr(path[-1], "key", str(path[-1]))
        if method == "frozen":
            return False
        if method == "full_ft":
            return True
        if method == "rss_gate_only" and name == "lora_s":
            return False
        if method == "lora" and name in ("lora_c", "lora_s"):  # injected LoRA: gate 1 + C p with C = S = 0
            return False
        if method == "rss_shift_only" and name == "lora_c":
            return False
        return name.startswith(_ADAPTER_PREFIXES)

    return jax.tree_util.tree_map_with_path(rule, params)


def count_trainable(params: Any, method: str) -> int:
    """Number of parameters ``method`` trains in ``params``."""
    mask = trainable_mask(params, method)
    return int(sum(leaf.size for leaf, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m))


class MLP(nn.Module):
    """The network every task adapts: Dense layers with tanh between, each one a :class:`MethodDense`."""

    widths: tuple[int, ...]
    method: str = "frozen"
    rank: int = 4
    lora_alpha: float = 8.0
    hyper_hidden: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, p: jax.Array) -> jax.Array:
        for i, width in enumerate(self.widths):
            x = make_layer(self.method, width, self.rank, self.lora_alpha, self.hyper_hidden, name=f"dense_{i}")(x, p)
            if i < len(self.widths) - 1:
                x = jnp.tanh(x)
        return x
