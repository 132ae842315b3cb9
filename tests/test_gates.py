"""The gate family (linear, affine, MLP) and the LoRA options, in linen, injection and NNX, against float64 numpy."""

from __future__ import annotations

import contextlib
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from rssbl_jax import core, gates
from rssbl_jax import nnx as rss_nnx
from tests import reference

X = jnp.asarray(np.random.default_rng(0).standard_normal((7, 5)), jnp.float32)
P = jnp.asarray(np.random.default_rng(1).standard_normal((7, 3)), jnp.float32)
GATES = [("linear", 0.0), ("linear", 0.7), ("affine", 0.5), ("mlp", 0.0)]


def randomized(tree, seed, scale=0.4):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(scale * rng.standard_normal(np.shape(v)), jnp.float32), tree)


def f64(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def dense_ref(x, p, params, gate, offset, scale):
    base = np.asarray(x, np.float64) @ f64(params["kernel"]) + f64(params.get("bias", 0.0))
    return base + reference.dense_update(x, p, params, kind=gate, offset=offset, scale=scale)


@pytest.mark.parametrize("gate,offset", GATES)
def test_linen_layer_matches_reference_jit_vmap_and_merges(gate, offset):
    layer = rssbl_jax.RSSBilinearLoRADense(4, rank=3, lora_alpha=6.0, gate=gate, gate_offset=offset, gate_hidden=5)
    params = randomized(layer.init(jax.random.key(0), X, P)["params"], 2)
    expected_names = {"kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s"}
    expected_names |= {"linear": set(), "affine": {"lora_c0"}, "mlp": {"lora_c0", "lora_gate_w", "lora_gate_b"}}[gate]
    assert set(params) == expected_names
    if gate == "mlp":
        assert params["lora_c"].shape == (5, 3) and params["lora_gate_w"].shape == (3, 5)
    apply = jax.jit(lambda q, x, p: layer.apply({"params": q}, x, p))
    expected = dense_ref(X, P, params, gate, offset, scale=2.0)
    np.testing.assert_allclose(apply(params, X, P), expected, rtol=1e-5, atol=1e-5)
    # vmap over a sweep of shared operating points equals one call per point
    sweep = jax.vmap(lambda p: layer.apply({"params": params}, X, p))(P[:4])
    for k in range(4):
        np.testing.assert_allclose(sweep[k], dense_ref(X, np.broadcast_to(P[k], P.shape), params, gate, offset, 2.0),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    # merge at p0 evaluates the same gate
    merged = rssbl_jax.merge(params, P[3], layer.adapter_config)
    np.testing.assert_allclose(nn.Dense(4).apply({"params": merged}, X), sweep[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gate,offset", GATES)
def test_gradients_match_finite_differences_of_the_reference(gate, offset):
    layer = rssbl_jax.RSSBilinearLoRADense(2, rank=2, lora_alpha=2.0, gate=gate, gate_offset=offset, gate_hidden=3)
    x, p = X[:3], P[:3]
    params = randomized(layer.init(jax.random.key(0), x, p)["params"], 3)
    grads = jax.grad(lambda q: jnp.sum(layer.apply({"params": q}, x, p) ** 2))(params)
    base = f64(params)
    adapter_leaves = sorted(name for name in params if name.startswith("lora_"))
    assert {"lora_a", "lora_b", "lora_c", "lora_s"} <= set(adapter_leaves)  # every adapter leaf, lora_b included
    for name in adapter_leaves:
        flat = base[name].reshape(-1)
        for i in range(flat.size):
            step = np.zeros_like(flat)
            step[i] = 1e-6

            def value(delta, name=name, step=step, flat=flat):
                moved = dict(base, **{name: (flat + delta * step).reshape(base[name].shape)})
                return np.sum(dense_ref(x, p, moved, gate, offset, 1.0) ** 2)

            numeric = (value(1.0) - value(-1.0)) / 2e-6
            np.testing.assert_allclose(np.asarray(grads[name]).reshape(-1)[i], numeric, rtol=2e-3, atol=2e-4)


def test_affine_and_mlp_gates_are_not_silent_at_p_zero():
    zero = jnp.zeros((7, 3))
    for gate, silent in (("linear", True), ("affine", False), ("mlp", False)):
        layer = rssbl_jax.RSSBilinearLoRADense(
            4, rank=2, lora_alpha=2.0, gate=gate, gate_offset=1.0 * (gate != "linear")
        )
        with pytest.warns(UserWarning, match="p_mean") if silent else contextlib.nullcontext():  # said aloud at init
            params = layer.init(jax.random.key(0), X, zero)["params"]
        grads = jax.grad(lambda q, layer=layer: jnp.sum(layer.apply({"params": q}, X, zero) ** 2))(params)
        assert (float(jnp.abs(grads["lora_b"]).max()) == 0.0) == silent, gate


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(11, 6, name="embed")(ids)
        return nn.Dense(4, name="head")(nn.Dense(6, name="hidden")(h))


@pytest.mark.parametrize("gate", ["affine", "mlp"])
def test_inject_and_nnx_gates_match_the_reference_including_embeddings(gate):
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 11, (2, 4)))
    p = P[:2]
    adapted = rssbl_jax.inject(Net(), "embed|hidden", rank=2, lora_alpha=4.0, gate=gate, gate_offset=0.3, gate_hidden=4)
    params = randomized(adapted.init(jax.random.key(0), ids, p=p)["params"], 5)
    assert "lora_s" not in params["embed"] and params["embed"]["lora_a"].shape == (11, 2)
    e, hd, hp = f64(params["embed"]), f64(params["hidden"]), f64(params["head"])
    p_rows = np.repeat(np.asarray(p, np.float64), 4, axis=0)
    ids_flat = np.asarray(ids).reshape(-1)
    g, _ = reference.gate(p_rows, e, kind=gate)
    h = e["embedding"][ids_flat] + 2.0 * ((e["lora_a"][ids_flat] * g) @ e["lora_b"])
    h = h @ hd["kernel"] + hd["bias"] + reference.dense_update(h, p_rows, hd, kind=gate, scale=2.0)
    expected = (h @ hp["kernel"] + hp["bias"]).reshape(2, 4, 4)
    np.testing.assert_allclose(jax.jit(adapted.apply)({"params": params}, ids, p=p), expected, rtol=1e-5, atol=1e-5)
    merged = rssbl_jax.merge(params, p[1], adapted)
    np.testing.assert_allclose(Net().apply({"params": merged}, ids[1:]), expected[1:], rtol=1e-5, atol=1e-5)

    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.embed, self.hidden = nnx.Embed(11, 6, rngs=rngs), nnx.Linear(6, 6, rngs=rngs)
            self.head = nnx.Linear(6, 4, rngs=rngs)

        def __call__(self, ids):
            return self.head(self.hidden(self.embed(ids)))

    nnx_adapted = rss_nnx.inject(NNXNet(nnx.Rngs(0)), adapted.config, d_p=3, rngs=nnx.Rngs(1))
    state = nnx.state(nnx_adapted.model, nnx.Param).to_pure_dict()
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, params)
    nnx.update(nnx_adapted.model, nnx.State(params))
    np.testing.assert_allclose(nnx.jit(lambda m, i, q: m(i, p=q))(nnx_adapted, ids, p), expected, rtol=1e-5, atol=1e-5)


def test_lora_dropout_linen_inject_and_nnx():
    layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=2.0, lora_dropout=0.5)
    params = randomized(layer.init(jax.random.key(0), X, P, deterministic=True)["params"], 6)
    clean = layer.apply({"params": params}, X, P, deterministic=True)
    np.testing.assert_allclose(clean, dense_ref(X, P, params, "linear", 0.0, 1.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="deterministic"):
        layer.apply({"params": params}, X, P)
    draws = jax.vmap(lambda k: layer.apply({"params": params}, X, P, deterministic=False, rngs={"dropout": k}))(
        jax.random.split(jax.random.key(1), 4000)
    )
    assert float(jnp.abs(draws[0] - clean).max()) > 1e-3  # masks act
    np.testing.assert_allclose(draws.mean(0), clean, atol=0.05)  # inverted dropout: unbiased

    adapted = rssbl_jax.inject(Net(), "hidden", rank=2, lora_alpha=2.0, lora_dropout=0.5)
    ids = jnp.asarray([[1, 2, 3]])
    variables = adapted.init(jax.random.key(0), ids, p=P[0])
    variables = {"params": randomized(variables["params"], 8)}
    evaluation = adapted.apply(variables, ids, p=P[0])
    training = adapted.apply(variables, ids, p=P[0], rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(training - evaluation).max()) > 1e-4
    np.testing.assert_array_equal(adapted.apply(variables, ids, p=P[0]), evaluation)

    model = rss_nnx.inject(nnx.Linear(5, 4, rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=2.0, d_p=3, lora_dropout=0.5,
                           rngs=nnx.Rngs(1))  # fmt: skip
    model.model.lora_b[...] = jnp.ones((2, 4))
    train_out = model(X, p=P)
    model.eval()
    eval_out = model(X, p=P)
    assert float(jnp.abs(train_out - eval_out).max()) > 1e-4
    np.testing.assert_array_equal(model(X, p=P), eval_out)


def test_gaussian_init_exclude_and_rslora_through_inject():
    adapted = rssbl_jax.inject(Net(), ".*", exclude=["head"], rank=8, lora_alpha=8.0, lora_a_init="gaussian",
                               use_rslora=True)  # fmt: skip
    params = adapted.init(jax.random.key(0), jnp.zeros((64, 3), jnp.int32), p=P[0])["params"]
    assert "lora_a" not in params["head"] and "lora_a" in params["hidden"]
    assert abs(float(jnp.std(params["hidden"]["lora_a"])) - 1 / 8) < 0.03
    assert adapted.config.resolve("hidden").scale == pytest.approx(8.0 / np.sqrt(8))


class AdapterUpdateVariants(chex.TestCase):
    """The one update function, with and without jit (chex variants), against the float64 reference."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_every_gate(self):
        for gate, offset in GATES:
            layer = rssbl_jax.AdapterConfig(rank=3, lora_alpha=6.0, gate=gate, gate_offset=offset, gate_hidden=4)
            layer = layer.resolve(None)
            specs = core.adapter_params(layer, core.dense_factorization((5, 4), 3), 3, shift=True)
            factors = randomized({name: jnp.zeros(shape) for name, (shape, _) in specs.items()}, 11)
            update = self.variant(
                lambda x, p, f, layer=layer: core.adapter_update(core.dense_factorization((5, 4), 3), x, p, f, layer)
            )
            expected = reference.dense_update(X, P, factors, kind=gate, offset=offset, scale=2.0)
            chex.assert_trees_all_close(update(X, P, factors), expected.astype(np.float32), rtol=1e-5, atol=1e-5)
            chex.assert_shape(update(X, P[0], factors), (7, 4))


def test_principal_init_starts_at_the_base_trains_and_merges_exactly():
    model = Net()
    adapted = rssbl_jax.inject(
        model, "hidden|head", rank=3, lora_alpha=3.0, initializers={"lora_s": jax.nn.initializers.ones}
    )
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 11, (4, 3)))
    variables = adapted.init(jax.random.key(0), ids, p=P[:4])
    assert float(jnp.abs(variables["params"]["head"]["lora_s"] - 1.0).max()) == 0.0  # initializers reach inject
    base = randomized(variables["params"], 6)
    params = rssbl_jax.init_principal(base, adapted)
    kernel = np.asarray(base["hidden"]["kernel"], np.float64)
    u, sigma, vt = np.linalg.svd(kernel)
    product = np.asarray(params["hidden"]["lora_a"], np.float64) @ np.asarray(params["hidden"]["lora_b"], np.float64)
    np.testing.assert_allclose(product, (u[:, :3] * sigma[:3]) @ vt[:3], rtol=1e-5, atol=1e-5)  # top-3 of W
    np.testing.assert_array_equal(adapted.apply({"params": params}, ids, p=P[:4]), model.apply({"params": params}, ids))
    grads = jax.grad(lambda q: jnp.sum(adapted.apply({"params": q}, ids, p=P[:4]) ** 2))(params)
    assert float(jnp.abs(grads["hidden"]["lora_c"]).max()) > 0  # training starts
    with pytest.raises(ValueError, match="cannot"):
        rssbl_jax.init_principal(base, adapted.config.replace(gate_offset=1.0))


# ------------------------------------------------------------------ a gate added from outside the library


@gates.register
class QuadraticGate(gates.Gate):
    """``g(p̂) = c0 + C p̂ + Q (p̂ ⊙ p̂)``: one class, with a leaf of its own (``lora_q``), and nothing else."""

    name = "quadratic_test"
    features_are_p = False  # φ(p̂) = [p̂, p̂²]: the shift S p̂ needs basis rows of its own
    linear_leaves = ("lora_c", "lora_q", "lora_c0")

    def leaves(self, layer, d_p):
        init = jax.nn.initializers
        return {
            "lora_c": ((d_p, layer.rank), gates.default_lora_c_init),
            "lora_q": ((d_p, layer.rank), init.zeros),
            "lora_c0": ((layer.rank,), init.constant(layer.gate_offset)),
        }

    def features(self, p, factors, *, precision=None):
        return jnp.concatenate([p, p * p], axis=-1)

    def directions(self, factors):
        return jnp.concatenate([jnp.asarray(factors["lora_c"]), jnp.asarray(factors["lora_q"])], axis=0)

    def constant(self, factors, layer):
        return factors["lora_c0"]


def quadratic_net_ref(params, ids, p_rows, scale):
    """Net with the quadratic gate on ``embed`` and ``hidden``, row by row in float64 (p_rows: one per token)."""
    e, hd, hp = f64(params["embed"]), f64(params["hidden"]), f64(params["head"])
    p_rows = np.asarray(p_rows, np.float64)

    def g(f):
        return f["lora_c0"] + p_rows @ f["lora_c"] + (p_rows**2) @ f["lora_q"]

    ids = np.asarray(ids).reshape(-1)
    h = e["embedding"][ids] + scale * ((e["lora_a"][ids] * g(e)) @ e["lora_b"])  # an embedding: no bias, no shift
    h = h @ hd["kernel"] + hd["bias"] + scale * (((h @ hd["lora_a"]) * g(hd) + p_rows @ hd["lora_s"]) @ hd["lora_b"])
    return h @ hp["kernel"] + hp["bias"]


def test_a_gate_registered_from_a_test_runs_through_inject_jit_grad_sweep_and_merge():
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 11, (2, 4)))
    p = P[:2]
    adapted = rssbl_jax.inject(Net(), "embed|hidden", rank=2, lora_alpha=4.0, gate="quadratic_test", gate_offset=0.3)
    variables = adapted.init(jax.random.key(0), ids, p=p)
    assert float(jnp.abs(variables["params"]["hidden"]["lora_c0"] - 0.3).max()) == 0.0  # the gate's initialisers
    params = randomized(variables["params"], 9)
    assert params["hidden"]["lora_q"].shape == (3, 2) and "lora_s" not in params["embed"]
    p_rows = np.repeat(np.asarray(p, np.float64), 4, axis=0)
    expected = quadratic_net_ref(params, ids, p_rows, 2.0).reshape(2, 4, 4)
    apply = jax.jit(lambda q, p: adapted.apply({"params": q}, ids, p=p))
    np.testing.assert_allclose(apply(params, p), expected, rtol=1e-5, atol=1e-5)

    # grad through the new leaf and the others, against central differences of the float64 reference
    weights = np.asarray(np.random.default_rng(8).standard_normal((2, 4, 4)))
    grads = jax.jit(jax.grad(lambda q: jnp.sum(weights * adapted.apply({"params": q}, ids, p=p))))(params)
    assert rssbl_jax.trainable_mask(params)["hidden"]["lora_q"]  # lora_* of an adapter layer: trains
    base = f64(params)
    for layer, name in [("hidden", "lora_q"), ("hidden", "lora_c0"), ("hidden", "lora_s"), ("embed", "lora_q"),
                        ("embed", "lora_b")]:  # fmt: skip
        flat = base[layer][name].reshape(-1)
        for i in range(flat.size):
            step = np.zeros_like(flat)
            step[i] = 1e-6

            def value(delta, layer=layer, name=name, step=step, flat=flat):
                moved = {**base, layer: {**base[layer], name: (flat + delta * step).reshape(base[layer][name].shape)}}
                return np.sum(weights * quadratic_net_ref(moved, ids, p_rows, 2.0).reshape(2, 4, 4))

            numeric = (value(1.0) - value(-1.0)) / 2e-6
            np.testing.assert_allclose(np.asarray(grads[layer][name]).reshape(-1)[i], numeric, rtol=1e-3, atol=1e-4)

    # a sweep over shared conditions (vmap over p: the basis rule of the fast path) equals one call per condition
    conditions = jnp.asarray(np.random.default_rng(9).standard_normal((12, 3)), jnp.float32)
    swept = jax.jit(jax.vmap(lambda q: adapted.apply({"params": params}, ids, p=q)))(conditions)
    for k in range(12):
        rows = np.broadcast_to(np.asarray(conditions[k], np.float64), (8, 3))
        np.testing.assert_allclose(swept[k], quadratic_net_ref(params, ids, rows, 2.0).reshape(2, 4, 4),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip

    # merge at p0 folds the new gate: the plain Net reproduces the adapted one
    merged = rssbl_jax.merge(params, p[1], adapted)
    assert "lora_q" not in merged["hidden"]
    np.testing.assert_allclose(Net().apply({"params": merged}, ids[1:]), expected[1:], rtol=1e-5, atol=1e-5)
    # and the config keeps selecting it by name, through a checkpoint's dict
    assert rssbl_jax.AdapterConfig.from_dict(adapted.config.to_dict()).gate == "quadratic_test"


def test_registering_a_taken_name_or_an_unknown_gate_is_an_error():
    class Other(gates.Gate):
        name = "linear"

    with pytest.raises(ValueError, match="already registered"):
        gates.register(Other)
    with pytest.raises(ValueError, match=r"gate must be one of \('linear', 'affine', 'mlp'.*got gate='cubic'"):
        rssbl_jax.AdapterConfig(rank=2, lora_alpha=2.0, gate="cubic")


@gates.register
class PureQuadraticGate(gates.Gate):
    """``g(p̂) = (p̂ ⊙ p̂) C``: zero at ``p̂ = 0`` whatever ``C`` holds, and it says so."""

    name = "pure_quadratic_test"
    features_are_p = False

    def features(self, p, factors, *, precision=None):
        return p * p

    def vanishes_at_zero(self, layer):
        return True


def test_the_silent_at_zero_warning_asks_the_gate_not_its_name():
    p = jnp.asarray([[0.0, 0.0], [1.0, 0.5]])
    layer = rssbl_jax.RSSBilinearLoRADense(3, rank=2, lora_alpha=2.0, gate="pure_quadratic_test")
    with pytest.warns(UserWarning, match="1 of 2 rows of p are all 0"):
        params = layer.init(jax.random.key(0), X[:2], p)["params"]
    grad_b = [
        jax.grad(lambda q, i=i: jnp.sum(layer.apply({"params": q}, X[i], p[i]) ** 2))(params)["lora_b"] for i in (0, 1)
    ]
    assert float(jnp.abs(grad_b[0]).max()) == 0.0 < float(jnp.abs(grad_b[1]).max())  # the p = 0 row cannot train B
    with warnings.catch_warnings():  # a registered gate that says nothing (QuadraticGate, c0 learnable) is quiet
        warnings.simplefilter("error")
        quiet = rssbl_jax.RSSBilinearLoRADense(3, rank=2, lora_alpha=2.0, gate="quadratic_test")
        quiet.init(jax.random.key(0), X[:2], p)
