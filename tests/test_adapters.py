"""The baselines as injectable adapters (experiments/adapters.py), against their formulas in float64 numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from experiments import adapters
from tests import reference

X = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
P = jnp.asarray(np.random.default_rng(1).standard_normal((5, 2)), jnp.float32)
METHODS = ["lora", "lora_concat", "film_branch0", "film_branch1", "film_layer0", "film_layer1", "hypernet3",
           "hypernet3_nou", "rss", "rss_one_plus", "rss_affine", "rss_mlp", "full_ft",
           "film_branch_affine0", "film_branch_affine1", "film_layer_affine1", "film_branch_mlp0", "film_layer_mlp1",
           "hypernet3_shift", "hypernet2_nou_shift"]  # fmt: skip


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="dense")(x)


def randomized(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(0.4 * rng.standard_normal(np.shape(v)), jnp.float32), tree)


def expected_update(name, f, x, p, scale):
    x, p = np.asarray(x, np.float64), np.asarray(p, np.float64)
    f = {k: np.asarray(v, np.float64) for k, v in f.items()}
    y = x @ f["kernel"] + f["bias"]
    if name.startswith("rss"):
        kind = {"rss_affine": "affine", "rss_mlp": "mlp"}.get(name, "linear")
        return reference.dense_update(x, p, f, kind=kind, offset=1.0 if name == "rss_one_plus" else 0.0, scale=scale)
    if name.startswith("hypernet"):
        z = np.tanh(p @ f["lora_hyper_p"])
        out = []
        for i in range(x.shape[0]):
            if "_nou" in name:
                a, b = (z[i] @ f["lora_a"]).reshape(6, 2), (z[i] @ f["lora_b"]).reshape(2, 4)
            else:
                a = f["lora_a"] + (z[i] @ f["lora_hyper_a"]).reshape(6, 2)
                b = f["lora_b"] + (z[i] @ f["lora_hyper_b"]).reshape(2, 4)
            shift = p[i] @ f["lora_s"] if name.endswith("_shift") else 0.0
            out.append(scale * (x[i] @ a + shift) @ b)
        return np.stack(out)
    h = x @ f["lora_a"]
    if name in ("lora_concat", "full_ft"):
        h = h + p @ f["lora_ap"]
    branch = scale * h @ f["lora_b"]
    if "_affine" in name or "_mlp" in name:  # learnable offset; MLP conditioning
        features = np.tanh(p @ f["lora_film_w"] + f["lora_film_b"]) if "_mlp" in name else p
        gamma, offset = features @ f["lora_gamma"], f["lora_gamma0"]
        if name.startswith("film_branch"):
            return (offset + gamma) * branch + p @ f["lora_beta"]
        return offset * branch + gamma * (y + branch) + p @ f["lora_beta"]
    if name.startswith("film_branch"):
        return (float(name[-1]) + p @ f["lora_gamma"]) * branch + p @ f["lora_beta"]
    if name.startswith("film_layer"):
        return float(name[-1]) * branch + (p @ f["lora_gamma"]) * (y + branch) + p @ f["lora_beta"]
    return branch


@pytest.mark.parametrize("name", METHODS)
def test_method_matches_its_formula_and_starts_at_the_base(name):
    adapted = adapters.inject(Net(), name, "dense", rank=2, lora_alpha=4.0)
    init = adapted.init(jax.random.key(0), X, p=P)["params"]
    np.testing.assert_allclose(adapted.apply({"params": init}, X, p=P), Net().apply({"params": init}, X), atol=1e-6)
    params = randomized(init, 2)
    got = jax.jit(adapted.apply)({"params": params}, X, p=P)
    f = params["dense"]
    base = np.asarray(X, np.float64) @ np.asarray(f["kernel"], np.float64) + np.asarray(f["bias"], np.float64)
    np.testing.assert_allclose(got, base + expected_update(name, f, X, P, scale=2.0), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda q: jnp.sum(adapted.apply({"params": q}, X, p=P) ** 2))(init)
    mask = adapters.trainable_mask(init, name)
    trained = [np.abs(g).max() for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask), strict=True) if m]
    assert max(trained) > 0, name  # training can start
    assert adapters.count_trainable(init, name) == sum(
        np.size(v) for v, m in zip(jax.tree.leaves(init), jax.tree.leaves(mask), strict=True) if m
    )


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(5, (3, 3), strides=2, name="conv")(x)


@pytest.mark.parametrize(
    "name",
    ["lora_concat", "film_branch0", "film_layer1", "hypernet2", "hypernet2_nou", "film_layer_mlp1", "hypernet2_shift"],
)
def test_methods_reach_conv_layers_per_example(name):
    images = jnp.asarray(np.random.default_rng(3).standard_normal((3, 7, 7, 2)), jnp.float32)
    p = P[:3]
    adapted = adapters.inject(ConvNet(), name, "conv", rank=2, lora_alpha=2.0)
    params = randomized(adapted.init(jax.random.key(0), images, p=p)["params"], 4)
    batch = adapted.apply({"params": params}, images, p=p)
    for i in range(3):  # per-example p equals one call per example
        np.testing.assert_allclose(batch[i : i + 1], adapted.apply({"params": params}, images[i : i + 1], p=p[i]),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("name", ["lora_concat", "film_layer1", "hypernet3"])
def test_p_normalisation_reaches_plug_in_methods(name):
    """AdapterConfig(p_mean, p_std) standardises p for every method, not only RSS's gate (a confound found in the
    workloads study: baselines saw raw physical units while RSS saw standardised ones)."""
    mean, std = np.array([50.0, -3.0]), np.array([10.0, 0.5])
    raw = P * std[None] + mean[None]
    plain = adapters.inject(Net(), name, "dense", rank=2, lora_alpha=4.0)
    normalised = adapters.inject(Net(), name, "dense", rank=2, lora_alpha=4.0, p_mean=mean, p_std=std)
    params = randomized(plain.init(jax.random.key(0), X, p=P)["params"], 9)
    np.testing.assert_allclose(
        normalised.apply({"params": params}, X, p=raw), plain.apply({"params": params}, X, p=P), rtol=1e-4, atol=1e-4
    )


def test_new_variants_start_where_their_offset_says_and_unknown_names_are_refused():
    """Learnable offsets start at o (o = 1: an unconditioned update at p = 0; o = 0: none); existing names keep
    their constant offset; the hypernetwork's width is its parameter knob (count matches the created leaves)."""
    adapted = adapters.inject(Net(), "film_branch_affine1", "dense", rank=2, lora_alpha=4.0)
    init = adapted.init(jax.random.key(0), X, p=P)["params"]["dense"]
    np.testing.assert_array_equal(init["lora_gamma0"], np.ones(4))
    assert (
        "lora_gamma0"
        not in adapters.inject(Net(), "film_branch1", "dense", rank=2, lora_alpha=4.0).init(jax.random.key(0), X, p=P)[
            "params"
        ]["dense"]
    )
    for width in (3, 7):
        method = adapters.spec(f"hypernet{width}_shift").method
        params = adapters.inject(Net(), f"hypernet{width}_shift", "dense", rank=2, lora_alpha=4.0).init(
            jax.random.key(0), X, p=P
        )["params"]["dense"]
        created = sum(np.size(v) for k, v in params.items() if k.startswith("lora_"))
        factorization = rssbl_jax.core.dense_factorization((6, 4), 2)
        assert method.count(factorization, 2) == created == 2 * width + (12 + 8) * (width + 1) + 2 * 2
    factorization = rssbl_jax.core.dense_factorization((64, 32), 4)
    for budget, shift in ((5000, False), (20000, True)):
        width = rssbl_jax.HyperNet.width_for(budget, factorization, 3, shift=shift)
        count = [rssbl_jax.HyperNet(w, shift=shift).count(factorization, 3) for w in (width, width + 1)]
        assert count[0] <= budget < count[1], (budget, width, count)
    for bad in ("film_branch_affinex", "hypernetx", "film_cube1"):
        with pytest.raises(ValueError, match="unknown method"):
            adapters.spec(bad)


@pytest.mark.parametrize("name", ["lora", "lora_concat", "film_branch0", "film_layer_mlp1", "hypernet3_nou_shift"])
def test_nnx_injection_of_each_method_equals_linen_with_the_same_weights(name):
    """The library methods run unchanged in NNX: same leaves, same output as linen (checked against float64 above)."""
    s = adapters.spec(name)
    linen = adapters.inject(Net(), name, "dense", rank=2, lora_alpha=4.0)
    params = randomized(linen.init(jax.random.key(0), X, p=P)["params"], 5)
    config = rssbl_jax.AdapterConfig(rank=2, lora_alpha=4.0, targets="", **s.settings)
    adapted = rssbl_jax.nnx.inject(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), config, d_p=2, rngs=nnx.Rngs(1), method=s.method)
    state = nnx.state(adapted.model, nnx.Param)
    assert sorted(state.to_pure_dict()) == sorted(params["dense"])
    nnx.replace_by_pure_dict(state, params["dense"])
    nnx.update(adapted.model, state)
    np.testing.assert_allclose(adapted(X, p=P), linen.apply({"params": params}, X, p=P), rtol=1e-5, atol=1e-5)
