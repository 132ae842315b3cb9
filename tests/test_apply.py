"""The one function that applies an adapter: the protocol, p's path, the zero-p warning, config ergonomics."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from rssbl_jax import apply, core
from rssbl_jax import nnx as rss_nnx
from rssbl_jax.config import LayerConfig

X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)


@dataclasses.dataclass(frozen=True)
class ScaledByNorm:
    """A plug-in written outside the library: ``y + s |p| B A x``."""

    uses_p = True
    mergeable = False

    def params(self, layer, factorization, d_p, *, shift):
        del d_p, shift
        return {
            "lora_a": (factorization.a_shape, nn.initializers.ones),
            "lora_b": (factorization.b_shape, nn.initializers.ones),
        }

    def adapt(self, y, factorization, x, p, factors, layer, *, precision=None):
        del precision
        norm = jnp.linalg.norm(p, axis=-1, keepdims=True)
        return y + norm * factorization.up(factorization.down(x, factors["lora_a"]), layer.scale * factors["lora_b"])

    def vanishes_at_zero(self, layer):
        del layer
        return True


def test_a_plug_in_method_runs_in_linen_and_nnx_with_normalised_p():
    """p arrives normalised, the scale is the layer's, and linen and NNX give the float64 result."""
    mean, std = np.array([1.0, -2.0]), np.array([2.0, 4.0])
    p = jnp.asarray([[3.0, 2.0], [1.0, -2.0], [-1.0, 6.0], [5.0, 0.0]], jnp.float32)
    p_hat = (np.asarray(p, np.float64) - mean) / std
    linen = rssbl_jax.inject(nn.Dense(3), "", rank=2, lora_alpha=3.0, p_mean=mean, p_std=std, method=ScaledByNorm())
    params = linen.init(jax.random.key(0), X, p=p)["params"]
    x64, w, b = (np.asarray(v, np.float64) for v in (X, params["kernel"], params["bias"]))
    expected = (
        x64 @ w + b + 1.5 * np.linalg.norm(p_hat, axis=-1, keepdims=True) * (x64 @ np.ones((5, 2)) @ np.ones((2, 3)))
    )
    np.testing.assert_allclose(jax.jit(linen.apply)({"params": params}, X, p=p), expected, rtol=1e-5, atol=1e-5)
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    adapted = rss_nnx.inject(model, "", rank=2, lora_alpha=3.0, d_p=2, p_mean=mean, p_std=std, rngs=nnx.Rngs(1),
                             method=ScaledByNorm())  # fmt: skip
    x64, w, b = (np.asarray(v, np.float64) for v in (X, model.kernel[...], model.bias[...]))
    expected = (
        x64 @ w + b + 1.5 * np.linalg.norm(p_hat, axis=-1, keepdims=True) * (x64 @ np.ones((5, 2)) @ np.ones((2, 3)))
    )
    np.testing.assert_allclose(nnx.jit(lambda m, q: m(X, p=q))(adapted, p), expected, rtol=1e-5, atol=1e-5)


def test_p_that_does_not_fit_p_mean_is_named():
    layer = LayerConfig(rank=1, lora_alpha=1.0, scale=1.0, p_mean=(0.0, 0.0), p_std=(1.0, 1.0))
    factorization = core.dense_factorization((5, 3), 1)
    factors = {"lora_a": jnp.ones((5, 1)), "lora_b": jnp.ones((1, 3)), "lora_c": jnp.ones((3, 1))}
    with pytest.raises(ValueError, match=r"'x': p_mean/p_std have 2 entries but operating_params.shape=\(3,\)"):
        apply.apply_adapter(
            rssbl_jax.RSS(), layer, factorization, X, jnp.ones(3), jnp.zeros((4, 3)), factors, where="'x'"
        )
    with pytest.raises(ValueError, match=r"initializers \['lora_q'\] name no adapter leaf"):
        apply.leaf_specs(rssbl_jax.RSS(), layer, factorization, 2, shift=True, initializers={"lora_q": jnp.zeros})


def test_a_linear_gate_initialised_at_p_zero_warns_once_and_names_the_fix():
    layer = rssbl_jax.RSSBilinearLoRADense(3, rank=2, lora_alpha=2.0)
    p = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.5, 2.0]])
    with pytest.warns(UserWarning, match=r"2 of 4 rows of p are all 0 and no p_mean.*p_mean.*gate='affine'") as record:
        layer.init(jax.random.key(0), X, p)
    assert len(record) == 1
    adapted = rssbl_jax.inject(nn.Sequential([nn.Dense(4), nn.Dense(2)]), r"layers_\d", rank=2, lora_alpha=2.0)
    with pytest.warns(UserWarning, match="rows of p are all 0") as record:
        adapted.init(jax.random.key(0), X, p=jnp.zeros(2))
    assert len(record) == 1  # two adapted layers, one warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for quiet in (
            layer.clone(gate="affine"),
            layer.clone(gate_offset=1.0),
            layer.clone(p_mean=(1.0, 0.0), p_std=(1.0, 1.0)),
        ):
            quiet.init(jax.random.key(0), X, p)
        jax.jit(layer.init)(jax.random.key(0), X, p)  # a traced p is not inspected
        layer.init(jax.random.key(0), X, p[1])


def test_linen_inject_names_unknown_keywords_and_accepts_peft_target_modules():
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['lora_rank'\]"):
        rssbl_jax.inject(nn.Dense(3), "", rank=2, lora_alpha=2.0, lora_rank=4)
    adapted = rssbl_jax.inject(nn.Dense(3), rank=2, lora_alpha=2.0, target_modules=[""])
    assert adapted.config.targets == ("",)
    with pytest.raises(TypeError, match="both target_modules= .* and targets="):
        rssbl_jax.inject(nn.Dense(3), rank=2, lora_alpha=2.0, target_modules=[""], targets=[""])


@pytest.mark.parametrize("shift", [None, True, False])
def test_the_linen_layer_returns_the_config_it_was_built_from(shift):
    config = rssbl_jax.AdapterConfig(rank=2, lora_alpha=4.0, targets=("hidden",), rank_pattern={"hidden": 2},
                                     gate="affine", gate_offset=0.5, shift=shift, p_mean=(1.0,),
                                     p_std=(2.0,))  # fmt: skip
    for use_bias in (True, False):
        layer = rssbl_jax.RSSBilinearLoRADense.from_config(3, config, use_bias=use_bias)
        assert layer.adapter_config == config
        params = layer.init(jax.random.key(0), X, jnp.ones(1))["params"]
        assert ("lora_s" in params) == (use_bias if shift is None else shift)
        assert params["lora_c0"].tolist() == [0.5, 0.5]
    overridden = rssbl_jax.RSSBilinearLoRADense.from_config(3, config, shift=True, gate_offset=1.0)
    assert overridden.adapter_config == config.replace(shift=True, gate_offset=1.0)


def test_the_linen_layer_settings_default_to_the_configs():
    layer = rssbl_jax.RSSBilinearLoRADense(3, rank=2, lora_alpha=4.0)
    default = rssbl_jax.AdapterConfig(rank=2, lora_alpha=4.0)
    assert layer.adapter_config.differences(default) == [("shift", True, None)]


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.tanh(nn.Dense(4, name="proj")(x))


class Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="head")(Inner(name="encoder")(x))


def test_tabulate_lists_the_adapters_and_a_nested_model_is_adapted_by_its_full_path():
    adapted = rssbl_jax.inject(Outer(), "encoder/proj", rank=2, lora_alpha=2.0)
    table = adapted.tabulate(jax.random.key(0), X, p=jnp.ones(3))
    base, lora = 5 * 4 + 4 + 4 * 2 + 2, 5 * 2 + 2 * 4 + 2 * (3 * 2)  # the adapters are in the table and its total
    assert "lora_c" in table and "encoder/proj" in table and f"Total Parameters: {base + lora}" in table
    params = adapted.init(jax.random.key(0), X, p=jnp.ones(3))["params"]
    assert sorted(params["encoder"]["proj"]) == ["bias", "kernel", "lora_a", "lora_b", "lora_c", "lora_s"]
    assert sorted(params["head"]) == ["bias", "kernel"]


def test_a_method_that_ignores_p_needs_no_p_in_linen():
    adapted = rssbl_jax.inject(nn.Dense(3), "", rank=2, lora_alpha=2.0, method=rssbl_jax.LoRA())
    params = adapted.init(jax.random.key(0), X)["params"]
    assert sorted(params) == ["bias", "kernel", "lora_a", "lora_b"]
    params = dict(params, lora_b=jnp.ones((2, 3)))
    a, w, b = (np.asarray(params[k], np.float64) for k in ("lora_a", "kernel", "bias"))
    x64 = np.asarray(X, np.float64)
    np.testing.assert_allclose(adapted.apply({"params": params}, X), x64 @ w + b + (x64 @ a).sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(TypeError, match="keyword p="):
        rssbl_jax.inject(nn.Dense(3), "", rank=2, lora_alpha=2.0).init(jax.random.key(0), X)


def test_linen_p_is_an_argument_of_each_call_under_jit():
    adapted = rssbl_jax.inject(nn.Dense(3), "", rank=2, lora_alpha=2.0, gate="affine")
    params = adapted.init(jax.random.key(0), X, p=jnp.ones(2))["params"]
    params = dict(params, lora_b=jnp.ones((2, 3)), lora_s=jnp.ones((2, 2)))
    f = jax.jit(lambda v, q: adapted.apply(v, X, p=q))
    for q in (jnp.asarray([1.0, 2.0]), jnp.asarray([-3.0, 0.5])):
        f64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
        q64, x64 = np.asarray(q, np.float64), np.asarray(X, np.float64)
        gate = f64["lora_c0"] + q64 @ f64["lora_c"]
        expected = (
            x64 @ f64["kernel"] + f64["bias"] + ((x64 @ f64["lora_a"]) * gate + q64 @ f64["lora_s"]) @ f64["lora_b"]
        )
        np.testing.assert_allclose(f({"params": params}, q), expected, rtol=1e-5, atol=1e-5)
