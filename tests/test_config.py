"""The AdapterConfig travels with the adapters: each silent wrong number the probe found is now an error or right.

Every test here failed on the code before the config existed (rssbl_jax 0.1): there, ``merge`` and ``load_adapters``
took the settings separately and defaulted what was not restated, ``inject`` swallowed a model's own ``p``, the ``p``
normalisation was stored but never applied, and ``partition`` decided by leaf name alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from rssbl_jax import nnx as rss_nnx
from tests import reference


def f64(tree):
    return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def randomized(tree, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(scale * rng.standard_normal(np.shape(v)), jnp.float32), tree)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.tanh(nn.Dense(8, name="hidden")(x)))


X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)
P = jnp.asarray(np.random.default_rng(1).standard_normal((6, 2)), jnp.float32)


def adapted_mlp(**settings):
    adapted = rssbl_jax.inject(MLP(), "hidden|head", **({"rank": 2, "lora_alpha": 4.0} | settings))
    params = randomized(adapted.init(jax.random.key(0), X, p=P)["params"], 2)
    return adapted, params


def test_config_validates_and_round_trips():
    config = rssbl_jax.AdapterConfig(
        rank=4, lora_alpha=8.0, targets="a|b", rank_pattern={"a": 2}, alpha_pattern={"b": 1.0}, gate="mlp",
        p_mean=np.array([0.5, 1.0]), p_std=[2.0, 3.0], modules_to_save=["head/kernel"], exclude=["c"],
    )  # fmt: skip
    assert rssbl_jax.AdapterConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(rssbl_jax.AdapterConfig.from_dict(config.to_dict()))
    assert config.resolve("a").rank == 2 and config.resolve("b").scale == 1.0 / 4 and config.scale == 2.0
    for bad, message in [
        ({"lora_alpha": 0.0}, "lora_alpha must be > 0"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be finite"),
        ({"gate_offset": float("nan")}, "gate_offset must be finite"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"gate": "cubic"}, "gate must be one of"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"p_mean": [0.0], "p_std": [0.0]}, "p_std must be > 0"),
        ({"p_mean": [0.0]}, "p_mean and p_std must be given together"),
        ({"targets": "("}, "targets has an invalid regex"),
        ({"p_keyword": "not a name"}, "p_keyword must be a Python identifier"),
    ]:
        with pytest.raises(ValueError, match=message):
            rssbl_jax.AdapterConfig(**({"rank": 2, "lora_alpha": 4.0} | bad))


def test_merge_takes_the_config_and_a_bare_alpha_is_refused():
    # Before: merge(params, p0, lora_alpha=4.0) of a gate_offset=1 layer silently used offset 0 (off by 3.2).
    layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0, gate_offset=1.0)
    p0 = jnp.array([0.3, -0.7])
    params = randomized(layer.init(jax.random.key(0), X, p0)["params"], 3)
    with pytest.raises(TypeError, match="AdapterConfig"):
        rssbl_jax.merge(params, p0, 4.0)
    merged = rssbl_jax.merge(params, p0, layer.adapter_config)
    np.testing.assert_allclose(nn.Dense(4).apply({"params": merged}, X), layer.apply({"params": params}, X, p0),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_merge_reads_alpha_pattern_and_rank_pattern_from_the_config():
    adapted, params = adapted_mlp(alpha_pattern={"head": 16.0}, rank_pattern={"head": 3}, gate_offset=1.0)
    p0 = P[2]
    merged = rssbl_jax.merge(params, p0, adapted)
    np.testing.assert_allclose(MLP().apply({"params": merged}, X), adapted.apply({"params": params}, X, p=p0),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"head: adapter factors do not fit rank r=2"):  # a forgotten rank_pattern
        rssbl_jax.merge(params, p0, adapted.config.replace(rank_pattern=(), alpha_pattern=()))


def test_load_adapters_refuses_another_config_and_names_both_values(tmp_path):
    # Before: adapters saved at alpha=4 loaded into an alpha=16 model silently (outputs off by 16.6).
    adapted, params = adapted_mlp()
    rssbl_jax.save_adapters(tmp_path / "a", params, adapted)
    other = rssbl_jax.inject(MLP(), "hidden|head", rank=2, lora_alpha=16.0, gate_offset=1.0)
    with pytest.raises(ValueError) as info:
        rssbl_jax.load_adapters(tmp_path / "a", params, other)
    text = str(info.value)
    assert "lora_alpha: 4.0" in text and "!= 16.0" in text and "gate_offset: 0.0" in text and "!= 1.0" in text
    loaded, config = rssbl_jax.load_adapters(tmp_path / "a", params, adapted)
    assert config == adapted.config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_linen_and_nnx_merge_agree_from_the_same_weights():
    # Before: linen merge needed the settings restated while NNX read them from the layer.
    settings = dict(rank=2, lora_alpha=4.0, alpha_pattern={"head": 1.0}, gate="affine", gate_offset=0.5)
    adapted, params = adapted_mlp(**settings)

    class NNXMLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden, self.head = nnx.Linear(5, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.tanh(self.hidden(x)))

    nnx_adapted = rss_nnx.inject(NNXMLP(nnx.Rngs(0)), "hidden|head", d_p=2, rngs=nnx.Rngs(1), **settings)
    nnx.update(nnx_adapted.model, nnx.State(params))  # the linen weights, same tree
    p0 = P[1]
    linen_merged = rssbl_jax.merge(params, p0, adapted)
    nnx_merged = nnx.state(rss_nnx.merge(nnx_adapted, p0), nnx.Param).to_pure_dict()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), linen_merged, nnx_merged)
    np.testing.assert_allclose(nnx_adapted(X, p=p0), adapted.apply({"params": params}, X, p=p0), rtol=1e-5, atol=1e-5)


class TakesP(nn.Module):
    @nn.compact
    def __call__(self, x, p):
        return nn.Dense(3, name="head")(x) * p


def test_inject_refuses_to_shadow_a_model_argument_and_the_keyword_is_configurable():
    # Before: inject's p= swallowed the model's own argument p (output off by 3.2 even with B = 0).
    with pytest.raises(ValueError, match=r"TakesP.__call__ already has an argument named 'p'"):
        rssbl_jax.inject(TakesP(), "head", rank=2, lora_alpha=4.0)
    adapted = rssbl_jax.inject(TakesP(), "head", rank=2, lora_alpha=4.0, p_keyword="condition")
    scale = jnp.full((6, 3), 3.0)
    variables = adapted.init(jax.random.key(0), X, scale, condition=P)
    np.testing.assert_array_equal(  # B = 0: exactly the model, with its own p
        adapted.apply(variables, X, scale, condition=P), TakesP().apply(variables, X, scale)
    )
    with pytest.raises(TypeError, match="keyword condition="):
        adapted.apply(variables, X, scale)

    class NNXTakesP(nnx.Module):
        def __init__(self, rngs):
            self.head = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x, p):
            return self.head(x) * p

    with pytest.raises(ValueError, match=r"NNXTakesP.__call__ already has an argument named 'p'"):
        rss_nnx.inject(NNXTakesP(nnx.Rngs(0)), "head", rank=2, lora_alpha=4.0, d_p=2, rngs=nnx.Rngs(1))


def test_p_normalisation_is_applied_by_the_model_and_folded_by_merge(tmp_path):
    # Before: save_adapters(p_mean, p_std) recorded a normalisation that nothing applied.
    mean, std = np.array([10.0, -2.0]), np.array([4.0, 0.5])
    adapted, params = adapted_mlp(p_mean=mean, p_std=std)
    plain, _ = adapted_mlp()
    raw = P * std[None] + mean[None]  # physical units
    np.testing.assert_allclose(adapted.apply({"params": params}, X, p=raw), plain.apply({"params": params}, X, p=P),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    hidden = f64(params["hidden"])
    normalised = reference.dense_update(X, raw, hidden, kind="linear", scale=2.0, mean=mean, std=std)
    np.testing.assert_allclose(normalised, reference.dense_update(X, P, hidden, kind="linear", scale=2.0), atol=1e-5)
    captured = {}

    def grab(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "hidden" and context.method_name == "__call__":
            captured["y"] = out
        return out

    with nn.intercept_methods(grab):
        adapted.apply({"params": params}, X, p=raw)
    base = np.asarray(X, np.float64) @ hidden["kernel"] + hidden["bias"][None]
    np.testing.assert_allclose(captured["y"], base + normalised, rtol=1e-5, atol=1e-5)
    merged = rssbl_jax.merge(params, raw[0], adapted)
    np.testing.assert_allclose(MLP().apply({"params": merged}, X), adapted.apply({"params": params}, X, p=raw[0]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    rssbl_jax.save_adapters(tmp_path / "a", params, adapted)
    assert rssbl_jax.load_adapters(tmp_path / "a", params)[1].p_mean == tuple(mean)


def test_a_user_leaf_named_lora_a_is_not_an_adapter():
    # Before: partition / freeze_base / count_parameters decided by leaf name, so this leaf trained.
    adapted, params = adapted_mlp()
    params = {**params, "mine": {"lora_a": jnp.ones(3), "w": jnp.ones(2)}}
    trainable, _ = rssbl_jax.partition(params)
    assert trainable["mine"]["lora_a"] is None and trainable["hidden"]["lora_a"] is not None
    assert rssbl_jax.count_parameters(params).per_layer["mine"] == (5, 0)
    tx = rssbl_jax.freeze_base(optax.sgd(1.0))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["mine"]["lora_a"]).max()) == 0.0
    assert float(jnp.abs(updates["hidden"]["lora_a"]).max()) == 1.0


def test_partition_with_the_config_checks_identity_and_trains_modules_to_save():
    adapted, params = adapted_mlp(modules_to_save=[r"head/bias"])
    mask = rssbl_jax.trainable_mask(params, adapted)
    assert mask["head"]["bias"] and not mask["head"]["kernel"] and mask["hidden"]["lora_c"]
    assert not mask["hidden"]["bias"]
    tx = rssbl_jax.freeze_base(optax.sgd(1.0), adapted)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert float(jnp.abs(updates["head"]["bias"]).min()) == 1.0 and float(jnp.abs(updates["head"]["kernel"]).max()) == 0
    with pytest.raises(ValueError, match=r"modules_to_save \['nothing'\] matches no leaf"):
        rssbl_jax.trainable_mask(params, adapted.config.replace(modules_to_save=["nothing"]))
    with pytest.raises(ValueError, match=r"adapter layers \['head'\] are not adapted by the config"):
        rssbl_jax.partition(params, adapted.config.replace(targets=["hidden"]))


def test_a_config_that_does_not_adapt_a_layer_is_refused_by_merge_and_save(tmp_path):
    adapted, params = adapted_mlp()
    narrow = adapted.config.replace(targets=["hidden"])
    message = r"adapter layers \['head'\] are not adapted by the config \(targets=\('hidden',\)"
    with pytest.raises(ValueError, match=message + r".*; merge the params tree"):
        rssbl_jax.merge(params, P[0], narrow)
    with pytest.raises(ValueError, match=message + r".*; save the params tree"):
        rssbl_jax.save_adapters(tmp_path / "a", params, narrow)
    assert not (tmp_path / "a").exists()


def test_p_none_is_a_clear_error_everywhere():
    adapted, params = adapted_mlp()
    with pytest.raises(ValueError, match=r"operating parameters p=None"):
        adapted.apply({"params": params}, X, p=None)
    layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0)
    with pytest.raises(ValueError, match=r"operating_params \(p\) is None"):
        layer.init(jax.random.key(0), X, None)
    nnx_layer = rss_nnx.inject(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=4.0, d_p=2, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"p=None"):
        nnx_layer(X, p=None)


class ScannedBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(5, name="dense")(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scan(name="blocks")(x, None)[0]


def test_merge_of_scan_stacked_adapters():
    # Before: merge of nn.scan-stacked adapters failed with "too many values to unpack".
    adapted = rssbl_jax.inject(Stack(), "blocks/dense", rank=2, lora_alpha=4.0)
    params = randomized(adapted.init(jax.random.key(0), X, p=P[0])["params"], 7)
    assert params["blocks"]["dense"]["lora_c"].shape == (3, 2, 2)
    p0 = P[0]
    merged = rssbl_jax.merge(params, p0, adapted)
    assert merged["blocks"]["dense"]["kernel"].shape == (3, 5, 5)
    np.testing.assert_allclose(Stack().apply({"params": merged}, X), adapted.apply({"params": params}, X, p=p0),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_nnx_merge_of_a_merged_model_is_an_error():
    # Before: merging an NNX model twice silently returned a copy (linen raised).
    adapted = rss_nnx.inject(nnx.Linear(5, 3, rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=4.0, d_p=2, rngs=nnx.Rngs(1))
    merged = rss_nnx.merge(adapted, P[0])
    with pytest.raises(ValueError, match="no adapted layer"):
        rss_nnx.merge(merged, P[0])


def test_rslora_scale():
    layer = rssbl_jax.RSSBilinearLoRADense(4, rank=4, lora_alpha=8.0, use_rslora=True)
    params = randomized(layer.init(jax.random.key(0), X, P)["params"], 4)
    expected = reference.dense_update(X, P, params, kind="linear", scale=8.0 / math.sqrt(4))
    base = np.asarray(X, np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"])
    np.testing.assert_allclose(layer.apply({"params": params}, X, P), base + expected, rtol=1e-5, atol=1e-5)


def test_flags_parse_strictly_and_name_the_field():
    # Before: bool("false") is True, so use_rslora="false" scaled by alpha/sqrt(r) instead of alpha/r.
    config = rssbl_jax.AdapterConfig(rank=4, lora_alpha=8.0, use_rslora="false")
    assert config.use_rslora is False and config.scale == 8.0 / 4
    assert rssbl_jax.AdapterConfig(rank=4, lora_alpha=8.0, use_rslora="TRUE").scale == 8.0 / math.sqrt(4)
    base = {"rank": 4, "lora_alpha": 8.0}
    for text, value in [("0", False), ("1", True), ("false", False), (" True ", True), (0, False), (np.bool_(1), True)]:
        parsed = rssbl_jax.AdapterConfig.from_dict(base | {"use_rslora": text, "shift": text})
        assert parsed.use_rslora is value and parsed.shift is value, text
    assert rssbl_jax.AdapterConfig.from_dict(base | {"shift": None}).shift is None
    for field, bad in [
        ("use_rslora", "yes"),
        ("use_rslora", 2),
        ("use_rslora", None),
        ("shift", "none"),
        ("shift", 0.5),
    ]:
        with pytest.raises(ValueError, match=f"{field} must be True, False.*got {field}="):
            rssbl_jax.AdapterConfig(**base, **{field: bad})


def test_a_bare_string_is_one_pattern_and_other_sequences_refuse_it():
    # Before: from_dict({"targets": "abc"}) gave ('a', 'b', 'c'), three one-letter patterns.
    for field in ("targets", "exclude", "modules_to_save"):
        config = rssbl_jax.AdapterConfig.from_dict({"rank": 2, "lora_alpha": 4.0, field: "abc"})
        assert getattr(config, field) == ("abc",)
        assert getattr(rssbl_jax.AdapterConfig(rank=2, lora_alpha=4.0, **{field: "abc"}), field) == ("abc",)
    config = rssbl_jax.AdapterConfig.from_dict({"rank": 2, "lora_alpha": 4.0, "rank_pattern": {"a.*": 3}})
    assert config.rank_pattern == (("a.*", 3),) and config.resolve("ab").rank == 3
    for field, value in [("p_mean", "12"), ("rank_pattern", "a"), ("alpha_pattern", "ab")]:
        extra = {"p_std": [1.0, 1.0]} if field == "p_mean" else {}
        with pytest.raises(TypeError, match=field):
            rssbl_jax.AdapterConfig.from_dict({"rank": 2, "lora_alpha": 4.0, field: value, **extra})


def test_python_keywords_are_refused_as_p_keyword():
    for word in ("class", "lambda", "None", "if"):
        with pytest.raises(ValueError, match=f"p_keyword must be a Python identifier that is not a keyword.*{word}"):
            rssbl_jax.AdapterConfig(rank=2, lora_alpha=4.0, p_keyword=word)
    assert rssbl_jax.AdapterConfig(rank=2, lora_alpha=4.0, p_keyword="condition").p_keyword == "condition"


@pytest.mark.parametrize("field,value", [("lora_alpha", True), ("lora_alpha", "8"), ("gate_offset", True)])
def test_numbers_refuse_bools_and_strings(field, value):
    with pytest.raises(TypeError, match=f"{field} must be a number"):
        rssbl_jax.AdapterConfig(**({"rank": 2, "lora_alpha": 4.0} | {field: value}))


def test_integer_fields_take_numpy_integers():
    import numpy as np

    config = rssbl_jax.AdapterConfig(rank=np.int64(2), lora_alpha=np.float32(4.0), gate_hidden=np.int32(8))
    assert (config.rank, config.scale, config.gate_hidden) == (2, 2.0, 8) and type(config.rank) is int
