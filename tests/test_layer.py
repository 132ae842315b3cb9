"""RSSBilinearLoRADense against the float64 reference: exact math, transformations, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from tests import reference

SHAPES = [
    # (x shape, p shape, features, rank)
    ((7, 5), (3,), 4, 2),  # shared p
    ((7, 5), (7, 3), 4, 2),  # per-example p, 2-D x
    ((4, 6, 8), (4, 2), 16, 4),  # per-example p over tokens
    ((4, 6, 8), (4, 6, 2), 16, 4),  # per-token p
    ((2, 3, 5, 8), (2, 1), 6, 3),  # two broadcast axes, d_p = 1
    ((8,), (5,), 3, 1),  # a single vector
]


def random_layer(key, x_shape, p_shape, features, rank, **kwargs):
    """A layer with all six params random (B is non-zero), and matching inputs."""
    layer = rssbl_jax.RSSBilinearLoRADense(features, rank, lora_alpha=2.0 * rank + 1.0, **kwargs)
    kx, kp, ki, kr = jax.random.split(key, 4)
    x = jax.random.normal(kx, x_shape)
    p = jax.random.normal(kp, p_shape)
    params = layer.init(ki, x, p)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(kr, len(leaves))
    params = jax.tree.unflatten(
        treedef, [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    )
    return layer, {"params": params}, x, p


def ref_apply(layer, params, x, p):
    return reference.rss_dense(
        x,
        p,
        params["kernel"],
        params.get("bias"),
        params["lora_a"],
        params["lora_b"],
        params["lora_c"],
        params["lora_s"],
        scale=layer.lora_alpha / layer.rank,
        gate_offset=layer.gate_offset,
    )


@pytest.mark.parametrize("x_shape,p_shape,features,rank", SHAPES)
@pytest.mark.parametrize("gate_offset", [0.0, 1.0])
def test_matches_float64_reference(x_shape, p_shape, features, rank, gate_offset):
    layer, variables, x, p = random_layer(jax.random.key(1), x_shape, p_shape, features, rank, gate_offset=gate_offset)
    y = layer.apply(variables, x, p)
    expected = ref_apply(layer, variables["params"], x, p)
    assert y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=2e-5 * np.abs(expected).max())


def test_no_bias_matches_reference():
    layer, variables, x, p = random_layer(jax.random.key(2), (4, 6, 8), (4, 2), 5, 3, use_bias=False)
    assert "bias" not in variables["params"]
    np.testing.assert_allclose(
        layer.apply(variables, x, p), ref_apply(layer, variables["params"], x, p), rtol=2e-5, atol=1e-4
    )


def test_param_layout_and_default_init_equals_base():
    layer = rssbl_jax.RSSBilinearLoRADense(features=6, rank=3, lora_alpha=6.0)
    x, p = jnp.ones((2, 9, 4)), jax.random.normal(jax.random.key(0), (2, 5))
    params = layer.init(jax.random.key(0), x, p)["params"]
    assert {k: v.shape for k, v in params.items()} == {
        "kernel": (4, 6),
        "bias": (6,),
        "lora_a": (4, 3),
        "lora_b": (3, 6),
        "lora_c": (5, 3),
        "lora_s": (5, 3),
    }
    base = nn.Dense(6).apply({"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x)
    np.testing.assert_array_equal(layer.apply({"params": params}, x, p), base)
    # Init lets training start for p != 0: the gate is non-zero and A is non-zero.
    assert np.abs(np.asarray(p) @ np.asarray(params["lora_c"])).min() > 0
    assert np.abs(params["lora_a"]).min() > 0


def test_gradient_nonzero_at_init_for_any_nonzero_p():
    layer = rssbl_jax.RSSBilinearLoRADense(features=3, rank=4, lora_alpha=4.0)
    x = jax.random.normal(jax.random.key(0), (16, 5))
    variables = layer.init(jax.random.key(1), x, jnp.ones(2))
    for p in [jnp.array([1e-3, 0.0]), jnp.array([0.0, -2.0]), jnp.array([5.0, 5.0])]:
        grads = jax.grad(lambda v, p=p: jnp.sum(layer.apply(v, x, p) ** 2 + layer.apply(v, x, p)))(variables)
        assert np.abs(grads["params"]["lora_b"]).max() > 0, p
    # gate_offset=1 starts as plain LoRA (C = 0), and its gradient is non-zero even at p = 0.
    layer1 = rssbl_jax.RSSBilinearLoRADense(features=3, rank=4, lora_alpha=4.0, gate_offset=1.0)
    v1 = layer1.init(jax.random.key(1), x, jnp.ones(2))
    np.testing.assert_array_equal(v1["params"]["lora_c"], 0.0)
    g1 = jax.grad(lambda v: jnp.sum(layer1.apply(v, x, jnp.zeros(2))))(v1)
    assert np.abs(g1["params"]["lora_b"]).max() > 0


def test_b_zero_reproduces_base():
    layer, variables, x, p = random_layer(jax.random.key(3), (4, 6, 8), (4, 2), 16, 4)
    params = dict(variables["params"], lora_b=jnp.zeros_like(variables["params"]["lora_b"]))
    base = np.asarray(x, np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"])
    y = layer.apply({"params": params}, x, p)
    np.testing.assert_allclose(y, base, rtol=1e-5, atol=1e-5)
    dense = nn.Dense(16).apply({"params": {"kernel": params["kernel"], "bias": params["bias"]}}, x)
    np.testing.assert_array_equal(y, dense)


def test_neutral_condition_reproduces_lora_against_flax_nnx():
    """p = [1], C = 1, S = 0 is exactly LoRA; flax's nnx.LoRALinear (no alpha/r scale) is the reference."""
    d_in, d_out, rank = 8, 5, 4
    key = jax.random.key(4)
    x = jax.random.normal(key, (3, 7, d_in))
    layer = rssbl_jax.RSSBilinearLoRADense(d_out, rank, lora_alpha=float(rank))  # scale 1, as nnx.LoRA
    params = layer.init(key, x, jnp.ones(1))["params"]
    params = dict(
        params,
        lora_b=jax.random.normal(jax.random.key(5), (rank, d_out)),
        lora_c=jnp.ones((1, rank)),
        lora_s=jnp.zeros((1, rank)),
        bias=jax.random.normal(jax.random.key(6), (d_out,)),
    )
    ours = layer.apply({"params": params}, x, jnp.ones(1))

    lora = nnx.LoRALinear(d_in, d_out, lora_rank=rank, rngs=nnx.Rngs(0))
    lora.kernel.value = params["kernel"]
    lora.bias.value = params["bias"]
    lora.lora.lora_a.value = params["lora_a"]
    lora.lora.lora_b.value = params["lora_b"]
    with jax.numpy_rank_promotion("allow"):  # nnx.LoRALinear adds its bias by rank promotion
        theirs = lora(x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)

    # And PEFT's scaling alpha / r, against the float64 formula x W + b + (alpha/r) x A B.
    layer16 = rssbl_jax.RSSBilinearLoRADense(d_out, rank, lora_alpha=16.0)
    x64 = np.asarray(x, np.float64)
    w, b, a, bb = (np.asarray(params[k], np.float64) for k in ("kernel", "bias", "lora_a", "lora_b"))
    expected = x64 @ w + b + 4.0 * (x64 @ a) @ bb
    np.testing.assert_allclose(layer16.apply({"params": params}, x, jnp.ones(1)), expected, rtol=2e-5, atol=2e-5)


def test_jit_equals_eager_and_reference():
    layer, variables, x, p = random_layer(jax.random.key(7), (4, 6, 8), (4, 2), 16, 4)
    y = jax.jit(layer.apply)(variables, x, p)
    np.testing.assert_allclose(y, ref_apply(layer, variables["params"], x, p), rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize("p_shape", [(2,), (4, 2), (4, 6, 2)])
@pytest.mark.parametrize("gate_offset", [0.0, 1.0])
def test_grad_matches_closed_form(p_shape, gate_offset):
    layer, variables, x, p = random_layer(jax.random.key(8), (4, 6, 8), p_shape, 5, 3, gate_offset=gate_offset)
    target = jax.random.normal(jax.random.key(9), (4, 6, 5))
    trainable, frozen = rssbl_jax.partition(variables["params"])

    def loss(trainable):
        y = layer.apply({"params": rssbl_jax.combine(trainable, frozen)}, x, p)
        return 0.5 * jnp.sum((y - target) ** 2)

    grads = jax.jit(jax.grad(loss))(trainable)
    params = variables["params"]
    expected = reference.rss_grads(
        x, p, params["kernel"], params["bias"], params["lora_a"], params["lora_b"], params["lora_c"], params["lora_s"],
        target, scale=layer.lora_alpha / layer.rank, gate_offset=gate_offset,
    )  # fmt: skip
    assert grads["kernel"] is None and grads["bias"] is None
    for name, value in expected.items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-4, atol=1e-4 * np.abs(value).max(), err_msg=name)


def test_vmap_sweep_over_operating_points():
    layer, variables, x, _ = random_layer(jax.random.key(10), (4, 6, 8), (3,), 16, 4)
    sweep = jax.random.normal(jax.random.key(11), (17, 3))
    ys = jax.jit(jax.vmap(lambda p: layer.apply(variables, x, p)))(sweep)
    assert ys.shape == (17, 4, 6, 16)
    for k in range(17):
        np.testing.assert_allclose(ys[k], ref_apply(layer, variables["params"], x, sweep[k]), rtol=2e-5, atol=1e-4)


def test_vmap_over_examples_with_per_example_p():
    layer, variables, x, p = random_layer(jax.random.key(12), (4, 6, 8), (4, 2), 16, 4)
    y = jax.vmap(lambda xi, pi: layer.apply(variables, xi, pi))(x, p)  # inside: x [6, 8], p [2] shared
    np.testing.assert_allclose(y, ref_apply(layer, variables["params"], x, p), rtol=2e-5, atol=1e-4)


def test_pmap_over_eight_host_devices():
    n = jax.local_device_count()
    assert n == 8, "conftest forces 8 host devices"
    layer, variables, x, p = random_layer(jax.random.key(13), (n, 2, 6, 8), (n, 2, 3), 16, 4)
    target = jax.random.normal(jax.random.key(14), (n, 2, 6, 16))

    def step(variables, x, p, target):
        def loss(v):
            return 0.5 * jnp.sum((layer.apply(v, x, p) - target) ** 2)

        value, grads = jax.value_and_grad(loss)(variables)
        return jax.lax.psum(value, "d"), jax.lax.psum(grads, "d")

    y = jax.pmap(layer.apply, in_axes=(None, 0, 0))(variables, x, p)
    expected = ref_apply(layer, variables["params"], x.reshape(-1, 6, 8), p.reshape(-1, 3)).reshape(y.shape)
    np.testing.assert_allclose(y, expected, rtol=2e-5, atol=1e-4)

    _, grads = jax.pmap(step, axis_name="d", in_axes=(None, 0, 0, 0))(variables, x, p, target)
    params = variables["params"]
    ref = reference.rss_grads(
        x.reshape(-1, 6, 8), p.reshape(-1, 3), params["kernel"], params["bias"], params["lora_a"], params["lora_b"],
        params["lora_c"], params["lora_s"], target.reshape(-1, 6, 16), scale=layer.lora_alpha / layer.rank,
    )  # fmt: skip
    for name, value in ref.items():
        np.testing.assert_allclose(grads["params"][name][0], value, rtol=1e-4, atol=1e-4 * np.abs(value).max())


def test_bfloat16_compute_close_to_float32():
    layer32, variables, x, p = random_layer(jax.random.key(15), (8, 32, 64), (8, 4), 64, 8)
    layer16 = layer32.clone(dtype=jnp.bfloat16)
    y32 = layer32.apply(variables, x, p)
    y16 = jax.jit(layer16.apply)(variables, x, p)
    assert y16.dtype == jnp.bfloat16
    assert jax.tree.all(jax.tree.map(lambda t: t.dtype == jnp.float32, variables))
    rel = np.linalg.norm(np.asarray(y16, np.float32) - y32) / np.linalg.norm(y32)
    assert rel < 1e-2, rel
    # Gradients flow to float32 params through bfloat16 compute.
    grads = jax.grad(lambda v: jnp.sum(layer16.apply(v, x, p).astype(jnp.float32) ** 2))(variables)
    assert grads["params"]["lora_b"].dtype == jnp.float32
    assert np.isfinite(grads["params"]["lora_b"]).all()


BAD_P = [
    ((4, 6, 8), (3,), "last axis d_p=2"),  # wrong width
    ((4, 6, 8), (5, 2), "prefix"),  # lead does not match batch
    ((4, 6, 8), (1, 2), "prefix"),  # a size-1 lead is not broadcast silently
    ((4, 6, 8), (6, 2), "prefix"),  # tokens axis where the batch axis belongs
    ((4, 6, 8), (4, 6, 8, 2), "prefix"),  # too many lead axes
    ((4, 6, 8), (), "d_p=2"),  # a scalar
]


@pytest.mark.parametrize("x_shape,p_shape,message", BAD_P)
def test_bad_operating_params_raise_at_trace_time(x_shape, p_shape, message):
    layer = rssbl_jax.RSSBilinearLoRADense(features=3, rank=2, lora_alpha=2.0)
    variables = layer.init(jax.random.key(0), jnp.ones(x_shape), jnp.ones((4, 2)))
    bad = jnp.ones(p_shape)
    for apply in (layer.apply, jax.jit(layer.apply)):
        with pytest.raises(ValueError) as info:
            apply(variables, jnp.ones(x_shape), bad)
        text = str(info.value)
        assert message in text and str(tuple(x_shape)) in text and str(tuple(p_shape)) in text, text


def test_bad_p_at_init_and_bad_x_width():
    layer = rssbl_jax.RSSBilinearLoRADense(features=3, rank=2, lora_alpha=2.0)
    with pytest.raises(ValueError, match=r"operating_params.*\(3, 2\).*\(4, 6, 8\)"):
        layer.init(jax.random.key(0), jnp.ones((4, 6, 8)), jnp.ones((3, 2)))
    variables = layer.init(jax.random.key(0), jnp.ones((4, 8)), jnp.ones(2))
    with pytest.raises(ValueError, match=r"d_in=8.*\(4, 7\)"):
        layer.apply(variables, jnp.ones((4, 7)), jnp.ones(2))
    with pytest.raises(ValueError, match="rank"):
        rssbl_jax.RSSBilinearLoRADense(features=3, rank=0, lora_alpha=2.0).init(
            jax.random.key(0), jnp.ones(8), jnp.ones(2)
        )


def test_count_parameters_per_layer_and_total():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, p):
            x = rssbl_jax.RSSBilinearLoRADense(32, rank=4, lora_alpha=8.0, name="hidden")(x, p)
            return rssbl_jax.RSSBilinearLoRADense(2, rank=2, lora_alpha=4.0, use_bias=False, name="out")(nn.relu(x), p)

    params = Net().init(jax.random.key(0), jnp.ones((1, 10)), jnp.ones(3))["params"]
    counts = rssbl_jax.count_parameters(params)
    assert counts.per_layer == {
        "hidden": (10 * 32 + 32, 10 * 4 + 4 * 32 + 2 * 3 * 4),
        "out": (32 * 2, 32 * 2 + 2 * 2 + 2 * 3 * 2),
    }
    assert counts.base == 352 + 64 and counts.trainable == 192 + 80 and counts.total == 352 + 64 + 192 + 80
    assert "hidden" in str(counts) and "total" in str(counts)
