"""The transformer task: a small self-attention model adapted in its attention projections via ``rssbl_jax.inject``.

The model is an ordinary linen transformer (self-attention + MLP, pre-norm) that knows nothing of operating
parameters. The system under operating condition ``p`` is the same network with a planted conditional rank-k
update of its query and value projections (``W + α A diag(C p) B`` plus a shift): the frozen base is the
nominal network, and every method adapts the query and value projections through ``rssbl_jax.inject``:

* ``lora``: the injected adapter with gate ``1 + C p`` where ``C = 0`` and ``S = 0`` stay frozen, i.e. plain LoRA;
* ``rss``, ``rss_one_plus``, ``rss_gate_only``, ``rss_shift_only``: as in :mod:`experiments.methods`.

Output-space FiLM, hypernetworks and p-as-input are layer replacements, not injectable adapters, so this task
compares the injectable methods only (they are compared on the MLP tasks).
"""

from __future__ import annotations

import zlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

import rssbl_jax

INJECTABLE = ("frozen", "lora", "rss", "rss_one_plus", "rss_gate_only", "rss_shift_only")
TARGETS = r".*/attention/(query|value)"


class Block(nn.Module):
    """Pre-norm self-attention and MLP with residuals."""

    d_model: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.LayerNorm(name="norm_1")(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, name="attention")(h, h)
        h = nn.LayerNorm(name="norm_2")(x)
        return x + nn.Dense(self.d_model, name="mlp_out")(nn.gelu(nn.Dense(self.mlp, name="mlp_in")(h)))


class TinyTransformer(nn.Module):
    """Tokens ``[batch, seq, d_model]`` -> per-token outputs ``[batch, seq, d_out]``."""

    d_model: int = 32
    heads: int = 4
    mlp: int = 64
    layers: int = 1
    d_out: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.layers):
            x = Block(self.d_model, self.heads, self.mlp, name=f"block_{i}")(x)
        return nn.Dense(self.d_out, name="head")(x)


class InjectedModel:
    """``init(key, x, p)`` / ``apply(variables, x, p)`` of a method on the transformer (the MLP's signature)."""

    def __init__(self, model: TinyTransformer, method: str, rank: int, lora_alpha: float):
        if method not in INJECTABLE:
            raise ValueError(f"method {method!r} is not injectable; the transformer task runs {INJECTABLE}.")
        self.model, self.method = model, method
        offset = 1.0 if method in ("lora", "rss_one_plus", "rss_shift_only") else 0.0
        self.adapted = (
            None if method == "frozen" else rssbl_jax.inject(model, TARGETS, rank, lora_alpha, gate_offset=offset)
        )

    def init(self, key: jax.Array, x: jax.Array, p: jax.Array) -> Any:
        if self.adapted is None:
            return self.model.init(key, x)
        return self.adapted.init(key, x, p=p)

    def apply(self, variables: Any, x: jax.Array, p: jax.Array) -> jax.Array:
        if self.adapted is None:
            return self.model.apply(variables, x)
        return self.adapted.apply(variables, x, p=p)


def model(config: ml_collections.ConfigDict) -> TinyTransformer:
    return TinyTransformer(config.tf_d_model, config.tf_heads, config.tf_mlp, config.tf_layers, config.tf_d_out)


def planted_system(config: ml_collections.ConfigDict, key: jax.Array) -> tuple[Any, Any]:
    """Base params (the nominal network) and the planted teacher's params (base + random conditional adapters)."""
    net = model(config)
    teacher = rssbl_jax.inject(net, TARGETS, config.teacher_rank, float(config.teacher_rank))
    x = jnp.zeros((1, config.tf_seq, config.tf_d_model))
    k_init, k_adapter = jax.random.split(key)
    variables = teacher.init(k_init, x, p=jnp.zeros((1, config.d_p)))
    base = net.init(k_init, x)

    def plant(path, leaf):
        name = getattr(path[-1], "key", "")
        if not name.startswith("lora_"):
            return leaf
        k = jax.random.fold_in(k_adapter, zlib.crc32(jax.tree_util.keystr(path).encode()))
        if name == "lora_a":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jax.random.normal(k, leaf.shape) / np.sqrt(fan_in)
        if name == "lora_b":
            return config.teacher_strength * jax.random.normal(k, leaf.shape) / np.sqrt(leaf.shape[0])
        if name == "lora_c":
            return jax.random.normal(k, leaf.shape) / np.sqrt(leaf.shape[0])
        return 0.3 * jax.random.normal(k, leaf.shape) / np.sqrt(leaf.shape[0])  # lora_s

    planted = jax.tree_util.tree_map_with_path(plant, variables)
    return base, (teacher, planted)


def first_base_kernel(params: Any) -> jax.Array:
    """The first adapted projection's base kernel as a 2-D ``(d_model, heads * head_dim)`` matrix."""
    kernel = params["block_0"]["attention"]["query"]["kernel"]
    return kernel.reshape(kernel.shape[0], -1)


def first_update(params: Any, p: jax.Array, method: str, config: ml_collections.ConfigDict) -> jax.Array:
    """ΔW(p) of the first adapted projection (block_0 query), 2-D, from ``rssbl_jax.merge`` at ``p``."""
    query = params["block_0"]["attention"]["query"]
    if method == "frozen":
        return jnp.zeros_like(first_base_kernel(params))
    offset = 1.0 if method in ("lora", "rss_one_plus", "rss_shift_only") else 0.0
    adapter = rssbl_jax.AdapterConfig(rank=query["lora_c"].shape[-1], lora_alpha=config.lora_alpha, gate_offset=offset)
    merged = rssbl_jax.merge({"query": query}, p, adapter)["query"]["kernel"]
    return (merged - query["kernel"]).reshape(query["kernel"].shape[0], -1)
