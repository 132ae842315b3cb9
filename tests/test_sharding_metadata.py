"""Adapters inherit their base kernel's partitioning from Flax's own metadata, at creation (as qwix does)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import rssbl_jax

RULES = (("embed", "data"), ("mlp", "model"))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        up = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
        down = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed"))
        h = nn.relu(nn.Dense(16, kernel_init=up, name="up")(x))
        return nn.Dense(8, kernel_init=down, name="down")(h)


def test_linen_logical_partitioning_annotates_the_adapters_and_shards_them():
    adapted = rssbl_jax.inject(Block(), "up|down", rank=2, lora_alpha=2.0)
    x, p = jnp.ones((4, 8)), jnp.ones((4, 3))
    abstract = jax.eval_shape(adapted.init, jax.random.key(0), x, p=p)
    specs = nn.get_partition_spec(abstract)["params"]
    assert specs["up"]["lora_a"] == P("embed", None) and specs["up"]["lora_b"] == P(None, "mlp")
    assert specs["down"]["lora_a"] == P("mlp", None) and specs["down"]["lora_b"] == P(None, "embed")
    assert specs["up"]["lora_c"] == P(None, None) and specs["up"]["lora_s"] == P(None, None)
    mesh = jax.make_mesh((2, 4), ("data", "model"), (AxisType.Auto,) * 2)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    variables = jax.jit(adapted.init, out_shardings=shardings)(jax.random.key(0), x, p=p)
    lora_b = variables["params"]["up"]["lora_b"].value
    assert lora_b.sharding.spec == P(None, "model") and lora_b.addressable_shards[0].data.shape == (2, 4)
    assert variables["params"]["down"]["lora_a"].value.addressable_shards[0].data.shape == (4, 2)
    unboxed = nn.meta.unbox(variables)
    y = jax.jit(adapted.apply)(unboxed, x, p=p)
    np.testing.assert_allclose(y, Block().apply(unboxed, x), rtol=1e-6)  # B = 0


def test_nnx_sharding_metadata_is_inherited_under_a_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "model"), (AxisType.Explicit,) * 2)
    with jax.set_mesh(mesh):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
        layer = nnx.Linear(8, 16, kernel_init=init, rngs=nnx.Rngs(0))
        adapted = rssbl_jax.nnx.inject(layer, "", rank=2, lora_alpha=2.0, d_p=3, rngs=nnx.Rngs(1))
        assert adapted.model.lora_a[...].sharding.spec == P("data", None)
        assert adapted.model.lora_b[...].sharding.spec == P(None, "model")
        assert adapted.model.lora_b[...].addressable_shards[0].data.shape == (2, 4)
