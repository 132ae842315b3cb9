"""Flax NNX front-end: RSSBilinearLoRALinear, injection into an NNX model, equality with linen, training, merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from rssbl_jax import nnx as rss_nnx
from rssbl_jax.inject import inject as inject_linen
from tests import reference


class NNXMLP(nnx.Module):
    """An ordinary NNX model: Linear, LinearGeneral, a Conv over the token axis and an Einsum readout."""

    def __init__(self, d_in, rngs):
        self.encoder = nnx.Linear(d_in, 12, rngs=rngs)
        self.mixer = nnx.LinearGeneral(12, (2, 6), rngs=rngs)
        self.conv = nnx.Conv(12, 8, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.readout = nnx.Einsum("btd,dk->btk", (8, 4), (4,), rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.encoder(x))
        h = self.mixer(h).reshape(h.shape)
        h = nnx.relu(self.conv(h))
        return self.readout(h)


class LinenMLP(nn.Module):
    """The same computation in linen, with the same param names and shapes."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(12, name="encoder")(x))
        h = nn.DenseGeneral((2, 6), name="mixer")(h).reshape(h.shape)
        h = nn.relu(nn.Conv(8, (3,), padding="SAME", name="conv")(h))
        return nn.Einsum((8, 4), "btd,dk->btk", name="readout")(h)


TARGETS = "encoder|mixer|conv|readout"
D_IN, D_P = 5, 3


def randomized(adapted, seed):
    """Random values for every Param of an NNX model (B != 0), set in place; returns the pure dict."""
    state = nnx.state(adapted.model, nnx.Param)
    pure = state.to_pure_dict()
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda leaf: jnp.asarray(0.4 * rng.standard_normal(leaf.shape), leaf.dtype), pure)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(adapted.model, state)
    return pure


@pytest.fixture(scope="module")
def models():
    adapted = rss_nnx.inject(NNXMLP(D_IN, nnx.Rngs(0)), TARGETS, rank=2, lora_alpha=3.0, d_p=D_P, rngs=nnx.Rngs(1),
                             rank_pattern={"conv": 3})  # fmt: skip
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, D_IN)), jnp.float32)
    p = jnp.asarray(np.random.default_rng(3).standard_normal((2, D_P)), jnp.float32)
    return adapted, x, p


def test_injected_state_layout_and_lora_params(models):
    adapted, x, p = models
    model = adapted.model
    assert type(model.encoder) is rss_nnx.RSSBilinearLoRALinear and isinstance(model.encoder, nnx.Linear)
    lora = nnx.state(adapted, nnx.LoRAParam).to_pure_dict()["model"]
    shapes = {f"{layer}/{name}": v.shape for layer, leaves in lora.items() for name, v in leaves.items()}
    assert shapes == {
        "encoder/lora_a": (D_IN, 2), "encoder/lora_b": (2, 12), "encoder/lora_c": (D_P, 2), "encoder/lora_s": (D_P, 2),
        "mixer/lora_a": (12, 2), "mixer/lora_b": (2, 2, 6), "mixer/lora_c": (D_P, 2), "mixer/lora_s": (D_P, 2),
        "conv/lora_a": (3, 12, 3), "conv/lora_b": (3, 8), "conv/lora_c": (D_P, 3), "conv/lora_s": (D_P, 3),
        "readout/lora_a": (8, 2), "readout/lora_b": (2, 4), "readout/lora_c": (D_P, 2), "readout/lora_s": (D_P, 2),
    }  # fmt: skip
    assert all(
        isinstance(v, rss_nnx.RSSBilinearLoRAParam)
        for v in jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam), is_leaf=lambda v: isinstance(v, nnx.Variable))
    )
    assert adapted.config.rank_pattern == (("conv", 3),)


def test_b_zero_equals_unmodified_model():
    model = NNXMLP(D_IN, nnx.Rngs(0))
    x = jnp.ones((2, 6, D_IN))
    before = model(x)
    adapted = rss_nnx.inject(model, TARGETS, rank=2, lora_alpha=3.0, d_p=D_P, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(adapted(x, p=jnp.ones(D_P)), before)


def test_nnx_and_linen_give_the_same_outputs_from_the_same_weights(models):
    adapted, x, p = models
    pure = randomized(adapted, 4)
    linen_adapted = inject_linen(LinenMLP(), TARGETS, rank=2, lora_alpha=3.0, rank_pattern={"conv": 3})
    abstract = jax.eval_shape(linen_adapted.init, jax.random.key(0), x, p=p)["params"]
    assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, pure)
    y_linen = jax.jit(linen_adapted.apply)({"params": pure}, x, p=p)
    y_nnx = nnx.jit(lambda m, x, p: m(x, p=p))(adapted, x, p)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-5, atol=1e-5)
    base = LinenMLP().apply({"params": rssbl_jax.partition(pure)[1]}, x)
    assert np.abs(np.asarray(y_nnx) - np.asarray(base)).max() > 0.1  # the adapters act


def test_train_adapters_with_nnx_optimizer_and_merge(models):
    adapted, x, p = models
    randomized(adapted, 5)
    target = jnp.asarray(np.random.default_rng(6).standard_normal((2, 6, 4)), jnp.float32)
    base_before = nnx.state(adapted, nnx.Not(nnx.LoRAParam)).to_pure_dict()
    lora_before = nnx.state(adapted, nnx.LoRAParam).to_pure_dict()
    optimizer = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(adapted, optimizer, x, p):
        def loss(adapted):
            return jnp.mean((adapted(x, p=p) - target) ** 2)

        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(adapted)
        optimizer.update(adapted, grads)
        return value

    losses = [float(step(adapted, optimizer, x, p)) for _ in range(4)]
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(adapted, nnx.Not(nnx.LoRAParam)).to_pure_dict(), base_before)
    changed = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), nnx.state(adapted, nnx.LoRAParam).to_pure_dict(), lora_before
    )
    assert all(jax.tree.leaves(changed))

    # Merge at an operating point: the unmodified classes, the adapted output.
    p0 = p[1]
    merged = rss_nnx.merge(adapted, p0)
    assert type(merged) is NNXMLP and type(merged.encoder) is nnx.Linear and type(merged.conv) is nnx.Conv
    assert not nnx.state(merged, nnx.LoRAParam).to_pure_dict()
    np.testing.assert_allclose(merged(x), adapted(x, p=p0), rtol=1e-4, atol=1e-5)
    assert type(adapted.model.encoder) is rss_nnx.RSSBilinearLoRALinear  # the adapted model is untouched
    # The params-level merge on the NNX state, vmapped over operating points, agrees.
    pure = nnx.state(adapted.model, nnx.Param).to_pure_dict()
    batch = jax.vmap(lambda q: rssbl_jax.merge(pure, q, adapted.config))(p)
    np.testing.assert_allclose(batch["conv"]["kernel"][1], merged.conv.kernel[...], rtol=1e-5, atol=1e-6)


def test_linear_layer_matches_reference_and_linen_layer():
    layer = rss_nnx.RSSBilinearLoRALinear(8, 5, rank=3, lora_alpha=7.0, d_p=2, gate_offset=1.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.lora_c[...], 0.0)
    rng = np.random.default_rng(7)
    for name in ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s"):
        variable = getattr(layer, name)
        variable[...] = jnp.asarray(rng.standard_normal(variable[...].shape), jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 6, 8)), jnp.float32)
    p = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    params = {name: getattr(layer, name)[...] for name in ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s")}
    expected = reference.rss_dense(x, p, *params.values(), scale=7.0 / 3, gate_offset=1.0)
    np.testing.assert_allclose(layer(x, p), expected, rtol=2e-5, atol=1e-4)
    linen = rssbl_jax.RSSBilinearLoRADense(5, rank=3, lora_alpha=7.0, gate_offset=1.0)
    np.testing.assert_allclose(layer(x, p), linen.apply({"params": params}, x, p), rtol=1e-5, atol=1e-5)
    with rss_nnx.operating_params(layer, p):
        np.testing.assert_array_equal(layer(x), layer(x, p))
    assert layer.operating_params.get_value() is None  # restored after the block
    with pytest.raises(ValueError, match=r"d_p=2"):
        layer(x, jnp.ones(3))


def test_errors_bad_targets_and_missing_p():
    with pytest.raises(
        ValueError, match=r"(?s)'attention' matches no adaptable layer.*encoder  \(Dense\).*readout  \(Einsum\)"
    ):
        rss_nnx.inject(
            NNXMLP(D_IN, nnx.Rngs(0)), ["encoder", "attention"], rank=2, lora_alpha=1.0, d_p=1, rngs=nnx.Rngs(1)
        )
    assert rss_nnx.adaptable_paths(NNXMLP(D_IN, nnx.Rngs(0))) == {
        "encoder": "Dense", "mixer": "DenseGeneral", "conv": "Conv", "readout": "Einsum",
    }  # fmt: skip
    adapted = rss_nnx.inject(NNXMLP(D_IN, nnx.Rngs(0)), "encoder", rank=2, lora_alpha=1.0, d_p=1, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"without operating parameters.*adapted\(x, p=p\)"):
        adapted.model(jnp.ones((1, 3, D_IN)))
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['target'\]"):
        rss_nnx.inject(NNXMLP(D_IN, nnx.Rngs(0)), rank=2, lora_alpha=1.0, d_p=1, rngs=nnx.Rngs(1), target="encoder")
    aliased = rss_nnx.inject(NNXMLP(D_IN, nnx.Rngs(0)), rank=2, lora_alpha=1.0, d_p=1, rngs=nnx.Rngs(1),
                             target_modules=["encoder"])  # fmt: skip
    assert aliased.config.targets == ("encoder",)


class Square(nnx.Module):
    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


@pytest.fixture(scope="module")
def square():
    adapted = rss_nnx.inject(Square(nnx.Rngs(0)), "a|b", rank=2, lora_alpha=2.0, d_p=2, rngs=nnx.Rngs(1))
    randomized(adapted, 9)
    x = jnp.asarray(np.random.default_rng(10).standard_normal((3, 4)), jnp.float32)
    ps = jnp.asarray(np.random.default_rng(11).standard_normal((5, 2)), jnp.float32)
    eager = jnp.stack([adapted(x, p=q) for q in ps])
    return adapted, x, ps, eager


def test_no_stale_p_under_nnx_transforms(square):
    """p set outside a transformed function is an input of its trace: a second p gives the second output.

    With p held in a thread-local context, the first trace of ``f`` baked p[0] in and returned it for p[1].
    """
    adapted, x, ps, eager = square
    assert not np.allclose(eager[0], eager[1], atol=1e-3)
    f = nnx.jit(lambda m, x: m.model(x))
    for i in (0, 1):
        with rss_nnx.operating_params(adapted, ps[i]):
            np.testing.assert_allclose(f(adapted, x), eager[i], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without operating parameters"):
        f(adapted, x)  # outside any call or block: no p at all, never the last one
    rows = nnx.vmap(lambda m, row: m.model(row[None])[0], in_axes=(None, 0))
    rematted = nnx.remat(lambda m, x: m.model(x))

    def step(m, carry, row):
        out = m.model(row[None])[0] + carry
        return out, out

    scanned = nnx.scan(step, in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    for i in (2, 3):
        with rss_nnx.operating_params(adapted, ps[i]):
            np.testing.assert_allclose(nnx.jit(rows)(adapted, x), eager[i], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(nnx.jit(rematted)(adapted, x), eager[i], rtol=1e-5, atol=1e-6)
            _, partial = nnx.jit(scanned)(adapted, jnp.zeros(4), x)
            np.testing.assert_allclose(partial, np.cumsum(eager[i], axis=0), rtol=1e-5, atol=1e-5)


def test_the_innermost_p_wins(square):
    adapted, x, ps, eager = square
    with rss_nnx.operating_params(adapted, ps[0]):
        np.testing.assert_allclose(adapted(x, p=ps[1]), eager[1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(nnx.jit(lambda m, q: m(x, p=q))(adapted, ps[2]), eager[2], rtol=1e-5, atol=1e-6)
        with rss_nnx.operating_params(adapted.model, ps[3]):
            np.testing.assert_allclose(adapted.model(x), eager[3], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(adapted.model(x), eager[0], rtol=1e-5, atol=1e-6)  # the outer p is back
    assert adapted.operating_params.get_value() is None


def test_inject_leaves_the_callers_model_unchanged_and_p_free_methods_need_no_p():
    model = Square(nnx.Rngs(0))
    before = nnx.state(model).to_pure_dict()
    adapted = rss_nnx.inject(model, "a", rank=2, lora_alpha=2.0, d_p=2, rngs=nnx.Rngs(1))
    assert type(model.a) is nnx.Linear and not hasattr(model.a, "lora_a") and adapted.model.a is not model.a
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model).to_pure_dict(), before)
    lora = rss_nnx.inject(model, "a|b", rank=2, lora_alpha=2.0, rngs=nnx.Rngs(1), method=rssbl_jax.LoRA())
    x = jnp.ones((3, 4))
    np.testing.assert_array_equal(lora(x), model(x))  # B = 0, and no p needed
    with pytest.raises(ValueError, match=r"^a was adapted with LoRA\(\), which merge cannot fold"):
        rss_nnx.merge(lora, jnp.ones(1))
    no_bias = rss_nnx.inject(nnx.Linear(4, 3, use_bias=False, rngs=nnx.Rngs(0)), "", 2, 2.0, d_p=1, shift=True,
                             rngs=nnx.Rngs(1))  # fmt: skip
    with pytest.raises(ValueError, match=r"^layer has no bias but a shift S p \(lora_s \(1, 2\)\).*shift=None or Fals"):
        rss_nnx.merge(no_bias, jnp.ones(1))  # its S p0 B would have no bias to go into


def test_operating_params_reach_injected_layers_under_nnx_transforms(square):
    """p passed to the adapted model reaches its layers inside nnx.jit, nnx.vmap, nnx.scan and nnx.remat."""
    adapted, x, ps, eager = square

    swept = nnx.vmap(lambda m, q: m(x, p=q), in_axes=(None, 0))(adapted, ps)
    np.testing.assert_allclose(swept, eager, rtol=1e-5, atol=1e-6)
    jitted = nnx.jit(lambda m, q: m(x, p=q))(adapted, ps[2])
    np.testing.assert_allclose(jitted, eager[2], rtol=1e-5, atol=1e-6)

    def step(m, carry, q):
        out = m(carry, p=q)
        return out, out

    final, trajectory = nnx.scan(step, in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(adapted, x, ps)
    carry, expected = x, []
    for q in ps:
        carry = adapted(carry, p=q)
        expected.append(carry)
    np.testing.assert_allclose(trajectory, jnp.stack(expected), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(final, carry, rtol=1e-4, atol=1e-5)

    def loss(m, remat):
        call = nnx.remat(lambda m, q: m(x, p=q)) if remat else (lambda m, q: m(x, p=q))
        return jnp.sum(call(m, ps[1]) ** 2)

    grad = nnx.grad(lambda m: loss(m, True), argnums=nnx.DiffState(0, nnx.LoRAParam))(adapted)
    plain = nnx.grad(lambda m: loss(m, False), argnums=nnx.DiffState(0, nnx.LoRAParam))(adapted)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, plain)


def test_modules_to_save_exclude_and_rslora_in_nnx():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b, self.head = (nnx.Linear(4, 4, rngs=rngs) for _ in range(3))

        def __call__(self, x):
            return self.head(jnp.tanh(self.b(jnp.tanh(self.a(x)))))

    adapted = rss_nnx.inject(Net(nnx.Rngs(0)), ".*", exclude=["head"], rank=4, lora_alpha=8.0, use_rslora=True,
                             modules_to_save=["head/bias"], d_p=2, rngs=nnx.Rngs(1))  # fmt: skip
    assert type(adapted.model.head) is nnx.Linear and type(adapted.model.a) is rss_nnx.RSSBilinearLoRALinear
    assert adapted.model.a.rss_adapter.layer.scale == 8.0 / 2  # alpha / sqrt(r)
    x, p = jnp.ones((3, 4)), jnp.ones((3, 2))
    kernel_before, bias_before = adapted.model.head.kernel[...], adapted.model.head.bias[...]
    optimizer = nnx.Optimizer(adapted, optax.sgd(0.1), wrt=rss_nnx.trainable(adapted))
    grads = nnx.grad(lambda m: jnp.sum(m(x, p=p) ** 2), argnums=nnx.DiffState(0, rss_nnx.trainable(adapted)))(adapted)
    optimizer.update(adapted, grads)
    np.testing.assert_array_equal(adapted.model.head.kernel[...], kernel_before)
    assert float(jnp.abs(adapted.model.head.bias[...] - bias_before).max()) > 0
