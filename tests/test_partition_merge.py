"""partition / combine / freeze_base on a whole model, and merge at an operating point."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import rssbl_jax
from tests import reference

CONFIG = rssbl_jax.AdapterConfig(rank=4, lora_alpha=8.0)
NAMES = ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s")


class AdaptedMLP(nn.Module):
    """A two-layer network whose layers both see the operating parameters."""

    hidden: int = 32
    out: int = 3
    use_bias_out: bool = True
    gate_offset: float = 0.0

    @nn.compact
    def __call__(self, x, p):
        config = CONFIG.replace(gate_offset=self.gate_offset)
        x = nn.tanh(rssbl_jax.RSSBilinearLoRADense.from_config(self.hidden, config, name="hidden")(x, p))
        head = rssbl_jax.RSSBilinearLoRADense.from_config(self.out, config, use_bias=self.use_bias_out, shift=True,
                                                          name="head")  # a shift even without a bias  # fmt: skip
        return head(x, p)


class PlainMLP(nn.Module):
    """The same architecture built from nn.Dense: what a merged model loads into."""

    hidden: int = 32
    out: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.out, name="head")(nn.tanh(nn.Dense(self.hidden, name="hidden")(x)))


def randomized(params, key):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)])


@pytest.fixture
def model_and_data():
    model = AdaptedMLP()
    x = jax.random.normal(jax.random.key(0), (64, 5))
    p = jax.random.normal(jax.random.key(1), (64, 2))
    params = model.init(jax.random.key(2), x, p)["params"]
    return model, params, x, p


def test_partition_combine_roundtrip(model_and_data):
    _, params, _, _ = model_and_data
    trainable, frozen = rssbl_jax.partition(params)
    for layer in ("hidden", "head"):
        assert set(k for k, v in trainable[layer].items() if v is not None) == {"lora_a", "lora_b", "lora_c", "lora_s"}
        assert set(k for k, v in frozen[layer].items() if v is not None) == {"kernel", "bias"}
    restored = rssbl_jax.combine(trainable, frozen)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, restored, params))
    # Works on other containers too (lists, tuples, nested); adapters are known by identity (a layer holding
    # lora_a, lora_b and lora_c), so a lone leaf that merely has an adapter's name stays frozen.
    tree = [{"lora_a": 1.0, "w": (2.0, {"lora_a": 3.0, "lora_b": 4.0, "lora_c": 5.0, "kernel": 6.0})}]
    t, f = rssbl_jax.partition(tree)
    assert t == [{"lora_a": None, "w": (None, {"lora_a": 3.0, "lora_b": 4.0, "lora_c": 5.0, "kernel": None})}]
    assert rssbl_jax.combine(t, f) == tree


def real_training(model, params, x, p, tx, steps):
    target = jnp.sin(x[:, :3] * (1.0 + p[:, :1]))

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda q: jnp.mean((model.apply({"params": q}, x, p) - target) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return params, opt_state, losses


def test_freeze_base_trains_only_adapters(model_and_data):
    model, params, x, p = model_and_data
    tx = rssbl_jax.freeze_base(optax.adamw(1e-2, weight_decay=0.1))
    new, opt_state, losses = real_training(model, params, x, p, tx, steps=30)
    assert losses[-1] < 0.8 * losses[0], losses
    for layer in ("hidden", "head"):
        for name in ("kernel", "bias"):
            # bit-identical, despite weight decay and non-zero gradients for these leaves
            np.testing.assert_array_equal(
                np.asarray(new[layer][name]).view(np.uint32), np.asarray(params[layer][name]).view(np.uint32)
            )
        for name in ("lora_a", "lora_b", "lora_c", "lora_s"):
            assert np.abs(new[layer][name] - params[layer][name]).min() > 0, (layer, name)
    # No optimizer state for frozen leaves: adam's two moments cover exactly the adapter parameters.
    state_size = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert state_size == 2 * rssbl_jax.count_parameters(params).trainable


def dense_backward(x, p, f, g_y, scale):
    """Closed-form float64 backward of y = x W + b + s((x A) ⊙ (p C) + p S) B: adapter gradients and ∂L/∂x."""
    h = x @ f["lora_a"]
    gate = p @ f["lora_c"]
    z = h * gate + p @ f["lora_s"]
    g_z = scale * g_y @ f["lora_b"].T
    grads = {"lora_a": x.T @ (g_z * gate), "lora_b": scale * z.T @ g_y, "lora_c": p.T @ (g_z * h), "lora_s": p.T @ g_z}
    return grads, g_y @ f["kernel"].T + (g_z * gate) @ f["lora_a"].T


def test_grads_wrt_trainable_match_float64_backprop(model_and_data):
    """jax.grad w.r.t. the trainable half of partition (through combine) against a hand-written float64 backward."""
    model, params, x, p = model_and_data
    params = randomized(params, jax.random.key(3))
    trainable, frozen = rssbl_jax.partition(params)

    def loss(params):
        return jnp.mean(model.apply({"params": params}, x, p) ** 2)

    g_part = jax.jit(jax.grad(lambda t: loss(rssbl_jax.combine(t, frozen))))(trainable)
    f = {layer: {name: np.asarray(v, np.float64) for name, v in params[layer].items()} for layer in ("hidden", "head")}
    x64, p64, scale = np.asarray(x, np.float64), np.asarray(p, np.float64), CONFIG.scale
    u = np.tanh(reference.rss_dense(x64, p64, *(f["hidden"][k] for k in NAMES), scale=scale))
    y = reference.rss_dense(u, p64, *(f["head"][k] for k in NAMES), scale=scale)
    expected = {}
    expected["head"], g_u = dense_backward(u, p64, f["head"], 2 * y / y.size, scale)
    expected["hidden"], _ = dense_backward(x64, p64, f["hidden"], g_u * (1 - u**2), scale)
    for layer in ("hidden", "head"):
        assert g_part[layer]["kernel"] is None and g_part[layer]["bias"] is None
        for name in ("lora_a", "lora_b", "lora_c", "lora_s"):
            np.testing.assert_allclose(g_part[layer][name], expected[layer][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gate_offset", [0.0, 1.0])
def test_merge_single_layer_matches_float64_reference(gate_offset):
    layer = rssbl_jax.RSSBilinearLoRADense(6, rank=3, lora_alpha=5.0, gate_offset=gate_offset)
    x = jax.random.normal(jax.random.key(4), (10, 7))
    p0 = jax.random.normal(jax.random.key(5), (4,))
    params = randomized(layer.init(jax.random.key(6), x, p0)["params"], jax.random.key(7))
    merged = rssbl_jax.merge(params, p0, layer.adapter_config)
    assert set(merged) == {"kernel", "bias"}
    y_dense = nn.Dense(6).apply({"params": merged}, x)
    names = ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s")
    expected = reference.rss_dense(x, p0, *(params[k] for k in names), scale=5.0 / 3, gate_offset=gate_offset)
    np.testing.assert_allclose(y_dense, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_dense, layer.apply({"params": params}, x, p0), rtol=1e-5, atol=1e-5)


def test_merge_whole_model_loads_into_dense_architecture(model_and_data):
    model, params, x, _ = model_and_data
    params = randomized(params, jax.random.key(8))
    p0 = jnp.array([0.7, -1.3])
    merged = rssbl_jax.merge(params, p0, CONFIG)
    plain = PlainMLP()
    assert jax.tree.structure(merged) == jax.tree.structure(plain.init(jax.random.key(0), x)["params"])
    np.testing.assert_allclose(
        plain.apply({"params": merged}, x), model.apply({"params": params}, x, p0), rtol=1e-5, atol=1e-5
    )
    # Per-example p equal to p0 everywhere gives the same outputs as the merged model.
    p_rows = jnp.broadcast_to(p0, (x.shape[0], 2))
    np.testing.assert_allclose(
        plain.apply({"params": merged}, x), model.apply({"params": params}, x, p_rows), rtol=1e-5, atol=1e-5
    )


def test_merge_vmap_over_operating_points_and_no_bias(model_and_data):
    _, params, x, _ = model_and_data
    model = AdaptedMLP(use_bias_out=False)
    params = randomized(model.init(jax.random.key(9), x, jnp.ones(2))["params"], jax.random.key(10))
    assert "bias" not in params["head"]
    points = jax.random.normal(jax.random.key(11), (5, 2))
    with pytest.raises(ValueError, match="head has no bias but a shift"):  # nn.Dense(use_bias=False) would drop it
        rssbl_jax.merge(params, points[0], CONFIG)
    merged = jax.jit(jax.vmap(lambda q: rssbl_jax.merge(params, q, CONFIG, add_bias=True)))(points)
    assert merged["head"]["kernel"].shape == (5, 32, 3) and merged["head"]["bias"].shape == (5, 3)
    plain = PlainMLP()  # use_bias=True: the shift S p0 becomes the head's bias
    for k in range(5):
        one = jax.tree.map(lambda t, k=k: t[k], merged)
        np.testing.assert_allclose(
            plain.apply({"params": one}, x), model.apply({"params": params}, x, points[k]), rtol=1e-5, atol=1e-5
        )


def test_merge_errors(model_and_data):
    _, params, _, _ = model_and_data
    with pytest.raises(ValueError, match=r"\(d_p,\)=\(2,\).*\(3, 2\)"):
        rssbl_jax.merge(params, jnp.ones((3, 2)), CONFIG)
    with pytest.raises(ValueError, match="no adapted layer"):
        rssbl_jax.merge({"dense": {"kernel": jnp.ones((2, 2))}}, jnp.ones(2), CONFIG)


def test_one_definition_of_an_adapter_layer_everywhere():
    """partition, merge, init_principal, sharding and base_bytes agree on which leaves are the adapter."""
    from jax.sharding import PartitionSpec as P

    from rssbl_jax import quantize, tree

    tree_ = {
        "rss": {"kernel": np.ones((3, 2)), "lora_a": np.ones((3, 1)), "lora_b": np.ones((1, 2)),
                "lora_c": np.ones((1, 1))},
        "plugin": {"kernel": np.ones((3, 2)), "lora_a": np.ones((3, 1)), "lora_b": np.ones((1, 2)),
                   "lora_p": np.ones((1, 1))},  # a plug-in method's own leaf, no lora_c
        "mine": {"lora_a": np.ones(5), "w": np.ones(7)},  # merely named lora_a: a base leaf
    }  # fmt: skip
    assert tree.adapter_layers(tree_) == ["rss", "plugin"]
    assert rssbl_jax.adapter_layers(tree_) == ["rss", "plugin"]
    mask = rssbl_jax.trainable_mask(tree_)
    assert mask["plugin"]["lora_p"] and mask["rss"]["lora_c"] and not mask["mine"]["lora_a"]
    assert quantize.base_bytes(tree_) == 8 * (3 * 2 * 2 + 5 + 7)  # float64 kernels and mine's leaves
    specs = rssbl_jax.adapter_partition_specs(tree_, [(".*kernel", P(None, "m")), ("mine/.*", P())])
    assert (
        specs["plugin"]["lora_p"] == P()
        and specs["plugin"]["lora_b"] == P(None, "m")
        and specs["mine"]["lora_a"] == P()
    )
    config = rssbl_jax.AdapterConfig(rank=1, lora_alpha=1.0)
    # the plug-in layer is an adapter layer, so merge refuses it (no fold for its method) instead of skipping it
    with pytest.raises(ValueError, match=r"plugin: the 'linear' gate needs adapter leaves \['lora_c'\]"):
        rssbl_jax.merge(tree_, jnp.ones(1), config)
    with pytest.raises(ValueError, match="plugin"):
        rssbl_jax.init_principal({"plugin": {"lora_a": np.ones((3, 1)), "lora_b": np.ones((1, 2))}}, config)
    merged = rssbl_jax.merge({"rss": tree_["rss"], "mine": tree_["mine"]}, jnp.ones(1), config)
    assert sorted(merged["rss"]) == ["kernel"] and sorted(merged["mine"]) == ["lora_a", "w"]  # no bias, no shift
