"""Adapter-only orbax checkpoints: exact round trip, stored config, small size, atomic writes, clear mismatch errors."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from rssbl_jax import nnx as rss_nnx
from rssbl_jax.checkpoint import load_adapter_config, load_adapters, save_adapters
from rssbl_jax.inject import inject
from tests.test_inject import ALPHA_PATTERN, D_P, RANK_PATTERN, TARGETS, Transformer, random_params


def manifest(path) -> dict:
    """The checkpoint's ``config`` item as stored, read with orbax alone."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        return checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def transformer():
    model = Transformer()
    adapted = inject(model, TARGETS, rank=2, lora_alpha=4.0, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    tokens = jnp.zeros((2, 5), jnp.int32)
    abstract = jax.eval_shape(adapted.init, jax.random.key(0), tokens, p=jnp.ones((2, D_P)))["params"]
    return adapted, abstract


def test_round_trip_is_exact_and_config_is_stored(transformer, tmp_path):
    adapted, abstract = transformer
    params = random_params(abstract, 0)
    path = tmp_path / "adapters"
    config = adapted.config.replace(p_mean=[0.5, 0.0, -1.0], p_std=np.array([2.0, 1.0, 3.0]))
    save_adapters(path, params, config)

    other = random_params(abstract, 1)  # different base and adapter values
    restored, stored = load_adapters(path, other, config)
    assert stored == config
    for (key, leaf), saved, before in zip(
        jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(params), jax.tree.leaves(other), strict=True
    ):
        expected = saved if key[-1].key.startswith("lora_") else before
        np.testing.assert_array_equal(leaf, expected)
        assert leaf.dtype == expected.dtype

    assert load_adapter_config(path) == config
    stored_json = manifest(path)  # what a reader of the checkpoint finds beside the config
    assert stored_json["d_p"] == D_P and stored_json["adapter_config"]["gate_offset"] == 0.0
    assert stored_json["adapter_config"]["targets"] == [TARGETS]
    assert dict(map(tuple, stored_json["adapter_config"]["rank_pattern"])) == RANK_PATTERN
    assert stored_json["rank"]["block_0/mlp_in"] == 3 and stored_json["rank"]["block_0/attention/query"] == 2
    assert stored_json["lora_alpha"]["block_1/attention/value"] == 2.0 and stored_json["lora_alpha"]["head"] == 4.0
    assert stored_json["adapter_config"]["p_mean"] == [0.5, 0.0, -1.0]
    assert stored_json["adapter_config"]["p_std"] == [2.0, 1.0, 3.0]
    heads_a = stored_json["leaves"]["heads/lora_a"]
    assert {k: heads_a[k] for k in ("shape", "dtype")} == {"shape": [1, 16, 1, 2], "dtype": "float32"}
    assert heads_a["sha256"] == hashlib.sha256(np.asarray(params["heads"]["lora_a"]).tobytes()).hexdigest()
    # Adapters loaded into the same base, merged with the stored config, give the same weights.
    zeroed = jax.tree_util.tree_map_with_path(lambda k, x: x * 0 if k[-1].key.startswith("lora_") else x, params)
    p0 = jnp.ones(D_P)
    loaded, stored = load_adapters(path, zeroed)
    merged = rssbl_jax.merge(loaded, p0, stored)
    jax.tree.map(np.testing.assert_array_equal, merged, rssbl_jax.merge(params, p0, config))

    with pytest.raises(ValueError, match="exist|already"):
        save_adapters(path, params, adapted.config)
    save_adapters(path, params, adapted.config, force=True)
    assert load_adapter_config(path) == adapted.config and load_adapter_config(path).p_mean is None


def test_checkpoint_is_a_small_fraction_of_the_base_model(tmp_path):
    model = nn.Sequential([nn.Dense(512), nn.relu, nn.Dense(512), nn.relu, nn.Dense(10)])
    adapted = inject(model, "layers_[02]", rank=4, lora_alpha=8.0)
    x = jnp.ones((2, 256))
    params = random_params(jax.eval_shape(adapted.init, jax.random.key(0), x, p=jnp.ones(4))["params"], 2)
    save_adapters(tmp_path / "adapters", params, adapted.config)
    base = {name: {k: v for k, v in layer.items() if k in ("kernel", "bias")} for name, layer in params.items()}
    with ocp.StandardCheckpointer() as checkpointer:  # the same writer, for the base params alone
        checkpointer.save(tmp_path / "base", base)
    adapter_bytes, base_bytes = directory_bytes(tmp_path / "adapters"), directory_bytes(tmp_path / "base")
    counts = rssbl_jax.count_parameters(params)
    assert counts.trainable / counts.base < 0.03
    assert adapter_bytes < 0.05 * base_bytes, (adapter_bytes, base_bytes)


def test_a_crash_while_saving_leaves_nothing_at_the_final_path(transformer, tmp_path, monkeypatch):
    adapted, abstract = transformer
    params = random_params(abstract, 3)

    async def crash(self, *args, **kwargs):  # the config item fails after the arrays were scheduled
        raise RuntimeError("simulated crash while writing the config")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", crash)
    path = tmp_path / "adapters"
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_adapters(path, params, adapted.config)
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        load_adapters(path, params)


def test_mismatched_models_give_clear_errors(transformer, tmp_path):
    adapted, abstract = transformer
    params = random_params(abstract, 4)
    path = tmp_path / "adapters"
    save_adapters(path, params, adapted.config)
    tokens = jnp.zeros((2, 5), jnp.int32)

    def abstract_of(d_p=D_P, **kwargs):
        settings = dict(targets=TARGETS, rank=2, lora_alpha=4.0, rank_pattern=RANK_PATTERN) | kwargs
        return jax.eval_shape(inject(Transformer(), **settings).init, jax.random.key(0), tokens, p=jnp.ones((2, d_p)))[
            "params"
        ]

    with pytest.raises(
        ValueError,
        match=r"adapter 'block_0/mlp_in/lora_a' has shape \(16, 3\) in the checkpoint but \(16, 5\) in params",
    ):
        load_adapters(path, abstract_of(rank_pattern={r".*/mlp_in": 5}))
    with pytest.raises(
        ValueError, match=r"params adapter 'block_0/attention/key/lora_a' \(shape \(16, 2\)\) is missing"
    ):
        load_adapters(path, abstract_of(targets=TARGETS + r"|.*/attention/key"))
    with pytest.raises(
        ValueError, match=r"checkpoint adapter 'block_0/attention/out/lora_a' \(shape \(2, 8, 2\)\) has no counterpart"
    ):
        load_adapters(path, abstract_of(targets=r".*/attention/(query|value)|.*/mlp_in|heads|head"))
    with pytest.raises(
        ValueError, match=r"'block_0/attention/out/lora_c' has shape \(3, 2\) in the checkpoint but \(4, 2\)"
    ):
        load_adapters(path, abstract_of(d_p=4))
    with pytest.raises(ValueError, match="no adapter layer"):
        save_adapters(tmp_path / "empty", rssbl_jax.partition(params)[1], adapted.config)


def test_nnx_adapters_load_into_the_linen_layer(tmp_path):
    layer = rss_nnx.RSSBilinearLoRALinear(6, 4, rank=2, lora_alpha=2.0, d_p=3, rngs=nnx.Rngs(0))
    layer.lora_b[...] = jnp.ones((2, 4))
    state = nnx.state(layer, nnx.Param).to_pure_dict()
    save_adapters(tmp_path / "adapters", state, layer.adapter_config)
    linen_layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=2.0)
    linen_params = linen_layer.init(jax.random.key(1), jnp.ones((1, 6)), jnp.ones(3))
    restored, _ = load_adapters(tmp_path / "adapters", linen_params["params"], linen_layer)
    for name in ("lora_a", "lora_b", "lora_c", "lora_s"):
        np.testing.assert_array_equal(restored[name], state[name])
    np.testing.assert_array_equal(restored["kernel"], linen_params["params"]["kernel"])


def test_an_nnx_adapted_model_round_trips_directly(tmp_path):
    """save_adapters/load_adapters take the NNX adapted model itself: no state dicts by hand."""

    def adapted(seed):
        model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(7)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(8)))
        return rss_nnx.inject(model, r"layers/\d", rank=2, lora_alpha=4.0, d_p=2, gate="affine", rngs=nnx.Rngs(seed))

    trained = adapted(0)
    adapters = nnx.state(trained, nnx.LoRAParam)
    names = sorted({path[-1] for path, _ in adapters.flat_state()})
    assert names == ["lora_a", "lora_b", "lora_c", "lora_c0", "lora_s"], names
    rng = np.random.default_rng(0)  # every factor nonzero (lora_b starts at 0, where any update is the base's)
    nnx.update(trained, jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), adapters))
    save_adapters(tmp_path / "adapters", trained)
    # only parameters are saved: the adapted layers' operating_params variable (graph state, None) is not
    assert any(isinstance(v, rss_nnx.OperatingParams) for _, v in nnx.iter_graph(trained))
    stored = json.loads((tmp_path / "adapters" / "config" / "metadata").read_text())["leaves"]
    assert sorted(stored) == [f"layers/{i}/{n}" for i in (0, 2) for n in names], sorted(stored)

    x = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    p = jnp.asarray(rng.standard_normal((5, 2)), jnp.float32)
    fresh = adapted(1)  # the same base, other adapters
    before = fresh(x, p=p)
    assert not np.allclose(before, trained(x, p=p))
    loaded, config = load_adapters(tmp_path / "adapters", fresh)
    assert config == trained.config
    np.testing.assert_array_equal(loaded(x, p=p), trained(x, p=p))
    run = nnx.jit(lambda model, x, p: model(x, p=p))
    np.testing.assert_array_equal(run(loaded, x, p), run(trained, x, p))
    np.testing.assert_array_equal(fresh(x, p=p), before)  # the argument is left as it was
    # The same checkpoint loads into a pure state dict of the model, as before.
    state = nnx.state(fresh.model, nnx.Param).to_pure_dict()
    restored, _ = load_adapters(tmp_path / "adapters", state, fresh)
    np.testing.assert_array_equal(
        restored["layers"][0]["lora_c0"], nnx.state(trained.model)["layers"][0]["lora_c0"][...]
    )
    with pytest.raises(ValueError, match=r"lora_alpha: 4.0 \(checkpoint .*\) != 8.0"):
        load_adapters(tmp_path / "adapters", fresh, trained.config.replace(lora_alpha=8.0))
