"""rssbl_jax.sharding: adapter specs follow their kernel, validation names paths, sharded forward = unsharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from rssbl_jax import sharding
from tests import reference
from tests.workers import common


@pytest.fixture
def params():
    return common.init_params(0)


def test_specs_follow_the_kernel_tree_form(params):
    base = {
        "hidden": {"kernel": P(None, "model"), "bias": P("model")},
        "head": {"kernel": P("model", None), "bias": P()},
    }
    specs = sharding.adapter_partition_specs(params, base)
    assert jax.tree.structure(specs) == jax.tree.structure(params)
    assert specs["hidden"] == {
        "kernel": P(None, "model"),
        "bias": P("model"),
        "lora_a": P(None, None),
        "lora_b": P(None, "model"),
        "lora_c": P(),
        "lora_s": P(),
    }
    assert specs["head"] == {
        "kernel": P("model", None),
        "bias": P(),
        "lora_a": P("model", None),
        "lora_b": P(None, None),
        "lora_c": P(),
        "lora_s": P(),
    }


def test_rules_form_fsdp_and_derived_bias(params):
    # FSDP-style: every kernel's input axis over "fsdp", output over "model"; the bias follows the kernel.
    specs = sharding.adapter_partition_specs(params, [(r".*kernel", P("fsdp", "model"))])
    for layer in ("hidden", "head"):
        assert specs[layer]["lora_a"] == P("fsdp", None)
        assert specs[layer]["lora_b"] == P(None, "model")
        assert specs[layer]["bias"] == P("model")
        assert specs[layer]["lora_c"] == specs[layer]["lora_s"] == P()


def test_conv_and_dense_general_kernels():
    # Conv: kernel (*window, c_in, c_out), lora_a (*window, c_in, r), lora_b (r, c_out).
    conv = {
        "kernel": jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32),
        "bias": jax.ShapeDtypeStruct((16,), jnp.float32),
        "lora_a": jax.ShapeDtypeStruct((3, 3, 8, 4), jnp.float32),
        "lora_b": jax.ShapeDtypeStruct((4, 16), jnp.float32),
        "lora_c": jax.ShapeDtypeStruct((2, 4), jnp.float32),
        "lora_s": jax.ShapeDtypeStruct((2, 4), jnp.float32),
    }
    specs = sharding.adapter_partition_specs({"conv": conv}, [(".*kernel", P(None, None, "data", "model"))])["conv"]
    assert specs["lora_a"] == P(None, None, "data", None)
    assert specs["lora_b"] == P(None, "model")
    assert specs["bias"] == P("model")
    # DenseGeneral with two output axes (heads, head_dim): lora_b (r, heads, head_dim).
    attn = {
        "kernel": jax.ShapeDtypeStruct((32, 8, 4), jnp.float32),
        "lora_a": jax.ShapeDtypeStruct((32, 2), jnp.float32),
        "lora_b": jax.ShapeDtypeStruct((2, 8, 4), jnp.float32),
        "lora_c": jax.ShapeDtypeStruct((3, 2), jnp.float32),
        "lora_s": jax.ShapeDtypeStruct((3, 2), jnp.float32),
    }
    specs = sharding.adapter_partition_specs({"query": attn}, [(".*kernel", P("fsdp", "model", None))])["query"]
    assert specs["lora_a"] == P("fsdp", None)
    assert specs["lora_b"] == P(None, "model", None)


def test_errors_name_the_path_and_shapes(params):
    mesh = jax.make_mesh((8,), ("model",), (AxisType.Auto,))
    with pytest.raises(ValueError, match=r"no partition spec for base parameter 'head/kernel' of shape \(16, 4\)"):
        sharding.adapter_partition_specs(params, [("hidden/kernel", P())])
    # The head's output (4) cannot be split 8 ways: the error names the leaf, its shape and the mesh axis.
    with pytest.raises(
        ValueError, match=r"does not fit 'head/kernel' of shape \(16, 4\): axis 1 has size 4, not divisible by the 8"
    ):
        sharding.adapter_partition_specs(params, [(".*/kernel", P(None, "model"))], mesh=mesh)
    # Several mesh axes on one dimension multiply: the rank axis (4) cannot be split 4 x 2 = 8 ways.
    with pytest.raises(
        ValueError, match=r"'hidden/lora_b' of shape \(4, 16\): axis 0 has size 4, not divisible by the 8"
    ):
        sharding.validate_specs(
            {"hidden": {"lora_b": params["hidden"]["lora_b"]}},
            {"hidden": {"lora_b": P(("model", "a"))}},
            jax.make_mesh((4, 2), ("model", "a"), (AxisType.Auto,) * 2),
        )
    with pytest.raises(ValueError, match=r"names mesh axis 'tensor', not in the mesh axes"):
        sharding.validate_specs(params["head"]["kernel"], P(None, "tensor"), mesh)
    with pytest.raises(ValueError, match=r"'x/lora_a' \(lora_a\) has no 'kernel' beside it"):
        sharding.adapter_partition_specs(
            {"x": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2)), "lora_c": jnp.ones((1, 1))}},
            [("kernel", P())],
        )
    with pytest.raises(ValueError, match=r"has 3 entries but the leaf has 2 axes"):
        sharding.adapter_partition_specs(params, [(".*kernel", P(None, None, None))])


def test_batch_and_operating_param_specs():
    assert sharding.batch_spec() == P("data")
    assert sharding.operating_params_spec(np.ones((32, 3))) == P("data")
    assert sharding.operating_params_spec(np.ones((32, 7, 3)), ("replica", "data")) == P(("replica", "data"))
    assert sharding.operating_params_spec(np.ones(3)) == P()


@pytest.mark.parametrize("layout", ["data", "model"])
def test_sharded_forward_matches_float64_reference(params, layout):
    mesh = common.mesh_for(layout)
    specs = sharding.adapter_partition_specs(params, common.base_specs(layout), mesh=mesh)
    placed = sharding.shard_params(params, mesh, specs)
    if layout == "model":  # each device holds a quarter of the tensor-parallel factors
        assert placed["hidden"]["lora_b"].addressable_shards[0].data.shape == (common.RANK, common.HIDDEN // 4)
        assert placed["head"]["lora_a"].addressable_shards[0].data.shape == (common.HIDDEN // 4, common.RANK)
        assert placed["hidden"]["bias"].addressable_shards[0].data.shape == (common.HIDDEN // 4,)
    batch = common.global_batch(0)
    p_spec = sharding.operating_params_spec(batch["p"])
    x, p = (
        sharding.shard_batch(batch["x"], mesh, sharding.batch_spec()),
        sharding.shard_batch(batch["p"], mesh, p_spec),
    )
    assert x.sharding.spec == P("data") and p.sharding.spec == P("data")
    model = common.AdaptedMLP()
    out = jax.jit(lambda q, x, p: model.apply({"params": q}, x, p))(placed, x, p)
    # float64 numpy reference of the two layers
    names = ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s")
    scale = common.ALPHA / common.RANK
    h = np.tanh(reference.rss_dense(batch["x"], batch["p"], *(params["hidden"][k] for k in names), scale=scale))
    expected = reference.rss_dense(h, batch["p"], *(params["head"][k] for k in names), scale=scale)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_local_batch_slice_and_shared_p():
    mesh = common.mesh_for("data")
    assert sharding.local_batch_slice(mesh, 16) == slice(0, 16)  # one process holds every row
    p = sharding.shard_batch(np.arange(3.0, dtype=np.float32), mesh, sharding.operating_params_spec(np.ones(3)))
    assert p.sharding.is_fully_replicated and p.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    "kind,kernel_shape,kernel_axes,leaves",
    [  # (leaf, shape, expected axes) for every adapter leaf of the kind
        ("Dense", (8, 16), ("embed", "mlp"),
         [("lora_a", (8, 4), ("embed", None)), ("lora_b", (4, 16), (None, "mlp")), ("bias", (16,), ("mlp",)),
          ("lora_c", (3, 4), (None, None)), ("lora_s", (3, 4), (None, None))]),
        ("Conv", (3, 3, 2, 6), (None, None, "in", "out"),
         [("lora_a", (3, 3, 2, 4), (None, None, "in", None)), ("lora_b", (4, 6), (None, "out"))]),
        ("DenseGeneral", (8, 2, 5), ("embed", "heads", "kv"),
         [("lora_a", (8, 4), ("embed", None)), ("lora_b", (4, 2, 5), (None, "heads", "kv"))]),
        # an Einsum whose input and output axes interleave: each factor keeps the kernel's axes, the other's set to 1
        ("Einsum aligned", (2, 8, 5), ("heads", "embed", "kv"),
         [("lora_a", (1, 8, 1, 4), (None, "embed", None, None)),
          ("lora_b", (4, 2, 1, 5), (None, "heads", None, "kv"))]),
    ],
)  # fmt: skip
def test_one_rule_a_keeps_the_input_axes_b_the_output_axes(kind, kernel_shape, kernel_axes, leaves):
    """tree.axes_from_kernel, the rule injection and NNX annotate with, is the rule of adapter_partition_specs."""
    from rssbl_jax import tree

    params = {"kernel": np.zeros(kernel_shape)} | {name: np.zeros(shape) for name, shape, _ in leaves}
    specs = sharding.adapter_partition_specs(params, [("kernel", P(*kernel_axes))])
    for name, shape, expected in leaves:
        assert tree.axes_from_kernel(name, shape, kernel_axes, kernel_shape) == expected, (kind, name)
        assert (*specs[name], *(None,) * (len(shape) - len(specs[name]))) == expected, (kind, name)  # P() = P(None…)
