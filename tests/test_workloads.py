"""The workload adaptation harness on tiny surrogates: every method runs through inject, B = 0 at init is the frozen
base, an adapter trains, and the study writes records and a report."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import rssbl_jax
from configs import workloads as workloads_config
from configs import workloads_tiny
from experiments import adapters, surrogates, workloads


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("workloads_cache")


@pytest.fixture(scope="module")
def config():
    return workloads_tiny.get_config()


@pytest.fixture(scope="module")
def ks(config, data_dir):
    return workloads.load_workload("ks", config, data_dir)


@pytest.fixture(scope="module")
def battery(config, data_dir):
    return workloads.load_workload("battery", config, data_dir)


def _examples(work, k=3):
    x = jnp.asarray(work.x.reshape(-1, *work.x.shape[3:])[:k])
    p = jnp.asarray(np.repeat(work.conditions, work.x.shape[1] * work.x.shape[2], axis=0)[:k])
    return x, p


def test_config_names_every_method_of_the_comparison():
    config = workloads_config.get_config()
    names = {m for m, _ in config.part_jobs["main"]}
    assert {"frozen", "lora", "lora_concat", "full_ft", "film_branch0", "film_branch1", "film_layer0"} <= names
    assert {"film_layer1", "hypernet", "hypernet_nou", "rss", "rss_one_plus", "rss_mlp"} <= names
    assert all(t == "all" for _, t in config.part_jobs["main"])
    ablation = set(config.part_jobs["ablation"])
    for method in ("rss", "lora", "film_branch0", "film_branch1", "rss_mlp"):
        assert {(method, "attention"), (method, "mlp")} <= ablation


FAST = ("frozen", "lora", "film_layer1", "hypernet_nou", "rss")


@pytest.mark.parametrize(
    "method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in workloads_config.MAIN_METHODS]
)
def test_every_method_injects_and_starts_at_the_frozen_base(ks, config, method):
    """Each method adapts every attention q/k/v/out and MLP layer; at init the adapted surrogate is the base.

    Bit for bit, except FiLM on the whole layer, whose update reads the base output (``Γp ⊙ y`` with ``Γ = 0``):
    XLA then fuses the base matmul differently, which moves the last bit (float32 round-off, ~1e-7).
    """
    name, adapted = workloads.adapted_model(ks, method, "all", config)
    x, p = _examples(ks)
    variables = rssbl_jax.load_base(adapted.init(jax.random.key(1), x, p=p), ks.base)
    depth = ks.pretrain_config.model["depth"]
    assert len(adapted.adapted_paths(variables)) == 6 * depth
    out = jax.jit(lambda v, x, p: adapted.apply(v, x, p=p))(variables, x, p)
    base = jax.jit(ks.model.apply)({"params": ks.base}, x)
    if method.startswith("film_layer"):
        np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=2e-6, atol=2e-6)
    else:
        np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
    assert (adapters.count_trainable(variables["params"], name) > 0) == (method != "frozen")


@pytest.mark.slow  # a tiny pretrained surrogate end to end: tens of seconds
@pytest.mark.parametrize("targets,per_block", [("attention", 4), ("mlp", 2)])
def test_per_layer_targets(battery, config, targets, per_block):
    _, adapted = workloads.adapted_model(battery, "rss", targets, config)
    x, p = _examples(battery)
    variables = adapted.init(jax.random.key(0), x, p=p)
    paths = adapted.adapted_paths(variables)
    assert len(paths) == per_block * battery.pretrain_config.model["depth"]
    assert all(("attention" in q) == (targets == "attention") for q in paths)


@pytest.mark.slow
def test_an_adapter_trains_and_beats_the_frozen_base(ks, config):
    """rss on the tiny KS surrogate: the training loss falls and metrics come back for every reported run."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.ks.steps, cfg.ks.batch = 60, 8
    cfg.learning_rates = (1e-2,)
    record = workloads.run_method(ks, "rss", "all", cfg)
    curve = record["loss_curve"]
    assert curve[-1] < 0.8 * curve[0], curve
    assert len(record["runs"]) == 2 * cfg.draws and record["lr"] == [1e-2, 1e-2]  # seed 0, then seed 1
    assert record["step_ms_per_run"] > 0 and record["memory_mb"] > 0
    one_step = np.asarray(record["metrics"]["train"]["one_step"])
    assert one_step.shape == (2 * cfg.draws, ks.conditions.shape[0]) and np.isfinite(one_step).all()
    frozen = workloads.run_method(ks, "frozen", "all", cfg)
    # trained at the training conditions, the adapter beats the frozen base there (validation trajectories)
    assert np.mean(one_step) < np.mean(frozen["metrics"]["train"]["one_step"])


@pytest.mark.slow  # a tiny pretrained surrogate end to end: tens of seconds
def test_frozen_metrics_equal_surrogate_evaluate(ks, config):
    """The harness's frozen row is ``surrogates.ks_metrics`` of the base on the same trajectories."""
    record = workloads.run_method(ks, "frozen", "all", config)
    heldout = {f"heldout/{k}": v for k, v in ks.sets["heldout"].items()}
    heldout["heldout/u"] = heldout["heldout/u"][:, :, : config.horizon + 1]
    reference = surrogates.evaluate("ks_transformer", ks.model, ks.base, heldout, sets=("heldout",))["heldout"]
    for run in np.asarray(record["metrics"]["heldout"]["one_step"]):
        np.testing.assert_allclose(run, reference["one_step"], rtol=1e-5)


@pytest.mark.slow  # a tiny pretrained surrogate end to end: tens of seconds
def test_battery_harness_reports_voltage_and_temperature(battery, config):
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.val_trajectories = 1
    record = workloads.run_method(battery, "film_branch0", "all", cfg)
    for s in workloads.SETS:
        v = np.asarray(record["metrics"][s]["voltage_rmse_mv"])
        assert v.shape[0] == cfg.draws * (len(cfg.learning_rates) + 1) and np.isfinite(v).all() and (v > 0).all()
    assert record["edge"] in (True, False) and len(record["lr"]) == cfg.draws


@pytest.mark.slow
def test_study_writes_records_report_and_ablation_reuses_lr(tmp_path, data_dir):
    config = workloads_tiny.get_config()
    config.parts = ("main", "ablation")
    out = workloads.train_and_evaluate(config, str(tmp_path), data_dir)
    records = [json.loads(line) for line in (tmp_path / "ks_main.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["frozen", "lora", "rss"]
    (ablation,) = [json.loads(line) for line in (tmp_path / "ks_ablation.jsonl").read_text().splitlines()]
    assert ablation["targets"] == "mlp" and ablation["lr"] == records[2]["lr"]
    assert ablation["trainable"] < records[2]["trainable"]
    report = (tmp_path / "report.md").read_text()
    assert "## ks: all layers" in report and "## ks: per-layer ablation" in report
    assert out["seconds"] > 0


def test_every_method_sees_the_same_standardised_p(ks, config):
    """p is standardised outside the model (training conditions: mean 0, std 1; nominal away from 0), and no
    adapter normalises it again (``AdapterConfig.p_mean`` reaches RSS's gate only, not the plug-in baselines)."""
    p_hat = ks.standardise(ks.conditions)
    np.testing.assert_allclose(p_hat.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(p_hat.std(0), 1.0, atol=1e-5)
    assert np.abs(ks.standardise(ks.sets["nominal"]["conditions"])).max() > 0.1
    for method in ("rss", "film_branch0", "lora_concat"):
        _, adapted = workloads.adapted_model(ks, method, "all", config)
        assert adapted.config.p_mean is None and adapted.config.p_std is None


# ------------------------------------------------------------------------------------------------ anchoring


@pytest.fixture(scope="module")
def anchor_config():
    """The tiny config with one more nominal trajectory: 2 evaluated + 2 replayed (the tiny data has 3)."""
    config = workloads_tiny.get_config()
    config.ks.data.nominal_trajectories = 4
    return config


def _anchored(config, anchor, data_dir):
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.anchor = anchor
    return workloads.load_workload("ks", cfg, data_dir)


@pytest.mark.slow  # a tiny pretrained surrogate end to end: tens of seconds
def test_anchor_centre_puts_the_nominal_condition_at_zero(anchor_config, data_dir):
    none, centre = (_anchored(anchor_config, a, data_dir) for a in ("none", "centre"))
    nominal = none.sets["nominal"]["conditions"]
    assert np.all(centre.standardise(nominal) == 0.0)
    assert np.abs(none.standardise(nominal)).max() > 0.1
    assert centre.p_std == none.p_std  # only the mean moves
    np.testing.assert_array_equal(centre.x, none.x)  # the same data
    shift = (np.asarray(none.p_mean) - np.asarray(centre.p_mean)) / np.asarray(none.p_std)
    p_hat = none.standardise(none.conditions)
    np.testing.assert_allclose(centre.standardise(none.conditions), p_hat + shift, atol=1e-6)


def test_anchor_replay_adds_the_nominal_condition_with_unevaluated_trajectories(anchor_config, data_dir):
    none, replay = (_anchored(anchor_config, a, data_dir) for a in ("none", "replay"))
    c = none.x.shape[0]
    assert replay.x.shape == (c + 1, *none.x.shape[1:])
    np.testing.assert_array_equal(replay.x[:c], none.x[:c])  # the training conditions are unchanged
    np.testing.assert_array_equal(replay.conditions[c], none.sets["nominal"]["conditions"][0])
    assert replay.p_mean == none.p_mean and replay.p_std == none.p_std  # standardised as in "none"
    # the evaluation's nominal set: the first n_eval nominal trajectories; the replayed ones are the next ones
    n_eval = workloads.eval_trajectories("ks", none.sets, anchor_config)
    nominal_u = none.sets["nominal"]["u"][0]
    assert n_eval == 2 and replay.replay == (2, 3)
    assert not set(replay.replay) & set(range(n_eval))
    for k, t in enumerate(replay.replay):
        np.testing.assert_array_equal(replay.x[c, k], nominal_u[t, :-1])
        for e in range(n_eval):  # and none of them is an evaluated trajectory
            assert not np.array_equal(replay.x[c, k], nominal_u[e, :-1])
    # the evaluation inputs are the same for both (train = the original conditions' validation trajectories)
    orders = [workloads.draw_trajectories(replay.x.shape[1], 1, c + 1, 0, 0)]
    a, conditions_a, sizes_a = workloads._eval_inputs(replay, orders, 1, 3, 4)
    b, conditions_b, sizes_b = workloads._eval_inputs(none, [orders[0][:c]], 1, 3, 4)
    np.testing.assert_array_equal(a["u"], b["u"])
    assert sizes_a == sizes_b and sizes_a["train"] == c


@pytest.mark.slow
def test_anchor_centre_rss_is_the_frozen_base_at_nominal(anchor_config, data_dir):
    """With p̂_nominal = 0 the gate C p̂ and shift S p̂ vanish, so rss adds exactly nothing at nominal.

    Bit for bit within one evaluation program: random (non-zero) adapter weights give the nominal metrics of the
    same adapter with ``B = 0`` (the base), and not elsewhere. Against the record's frozen row (the plain model,
    evaluated in another XLA program and batch) the trained rss agrees to float32 round-off (XLA's CPU matmuls
    round differently in differently shaped programs, ~1e-7 on the base's own outputs).
    """
    centre = _anchored(anchor_config, "centre", data_dir)
    cfg = ml_collections.ConfigDict(anchor_config.to_dict())
    cfg.learning_rates = (1e-2,)
    name, adapted = workloads.adapted_model(centre, "rss", "all", cfg)
    x, p = _examples(centre, 1)
    params = rssbl_jax.load_base(adapted.init(jax.random.key(0), x, p=p), centre.base)["params"]
    trainable, frozen = rssbl_jax.partition(params, mask=adapters.trainable_mask(params, name))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    runs = jax.tree.map(lambda v: jax.random.normal(next(keys), (2, *v.shape)), trainable)  # 2 runs, every leaf
    no_update = jax.tree_util.tree_map_with_path(lambda k, v: v * (k[-1].key != "lora_b"), runs)
    orders = [workloads.draw_trajectories(centre.x.shape[1], 1, centre.x.shape[0], d, 0) for d in range(2)]
    a, b = (workloads.evaluate(centre, adapted, t, frozen, orders, cfg) for t in (runs, no_update))
    for metric in ("one_step", "rollout_mean"):
        np.testing.assert_array_equal(a["nominal"][metric], b["nominal"][metric])
        assert np.abs(np.subtract(a["heldout"][metric], b["heldout"][metric])).min() > 1e-3
    # trained through the harness: the record's nominal metrics are the frozen row's (round-off), not elsewhere
    rss = workloads.run_method(centre, "rss", "all", cfg)
    frozen_row = workloads.run_method(centre, "frozen", "all", cfg)
    assert rss["anchor"] == "centre" and rss["runs"][0][0] == frozen_row["runs"][0][0] == 0
    for metric in ("one_step", "rollout_mean"):
        nominal = np.ravel(rss["metrics"]["nominal"][metric])
        assert nominal.shape == (2 * cfg.draws,)
        np.testing.assert_allclose(nominal, frozen_row["metrics"]["nominal"][metric][0][0], rtol=1e-6)
        for s in ("train", "heldout"):  # run 0 of both: draw 0, the same validation trajectories
            assert np.abs(np.subtract(rss["metrics"][s][metric][0], frozen_row["metrics"][s][metric][0])).max() > 1e-4
    assert workloads.nominal_gap(rss, frozen_row) < 1e-6


def test_anchor_config_defaults_to_none_and_names_every_anchor():
    from configs import workloads_anchor

    assert workloads_config.get_config().anchor == "none"
    config = workloads_anchor.get_config()
    assert config.anchors == ("none", "centre", "replay", "centre+replay")
    assert config.workloads == ("ks",) and config.parts == ("main",)
    assert [m for m, _ in config.part_jobs["main"]] == list(workloads_anchor.METHODS)
    base = workloads_config.get_config()
    for key in ("draws", "seeds", "learning_rates", "rank", "lora_alpha", "horizon"):
        assert config[key] == base[key]
    assert config.ks.to_dict() == base.ks.to_dict()


@pytest.mark.slow  # a tiny pretrained surrogate end to end: tens of seconds
def test_anchor_replay_needs_enough_nominal_trajectories_and_replays_battery_profiles(config, data_dir):
    """The tiny data has 3 nominal KS trajectories: 2 evaluated + 2 replayed do not fit, and that is an error, not
    an overlap. The battery's profiles are replayed like the KS trajectories (its time grid ``t`` appended whole)."""
    with pytest.raises(ValueError, match="2 evaluated \\+ 2 replayed nominal trajectories; the data has 3"):
        _anchored(config, "replay", data_dir)
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.battery.data.nominal_profiles = 4
    cfg.anchor = "replay"
    replay = workloads.load_workload("battery", cfg, data_dir)
    nominal = replay.sets["nominal"]
    c = replay.sets["train"]["x"].shape[0]
    assert replay.replay == (2, 3) and replay.x.shape[0] == c + 1
    np.testing.assert_array_equal(replay.x[c, :, 0], nominal["x"][0, 2:4])
    np.testing.assert_array_equal(replay.w[c, :, 0, :, 0], nominal["valid"][0, 2:4])
    np.testing.assert_array_equal(replay.conditions[c], nominal["conditions"][0])


def test_references_table_reads_the_frozen_record():
    sets = workloads.SETS
    metrics = {s: {"one_step": [[0.1 * (i + 1), 0.1 * (i + 1)]], "persistence": [[0.2, 0.4]],
                   "rollout_mean": [[0.5, 0.7]]} for i, s in enumerate(sets)}  # fmt: skip
    metrics["heldout"]["rollout_persistence_mean"] = [[0.9, 1.1]]
    battery = {s: {"voltage_rmse_mv": [[10.0, 20.0]], "temperature_rmse_k": [[0.5, 1.5]]} for s in sets}
    records = {
        "ks": [{"method": "lora", "targets": "all", "metrics": {}},
               {"method": "frozen", "targets": "all", "metrics": metrics}],
        "battery": [{"method": "frozen", "targets": "all", "metrics": battery}],
    }  # fmt: skip
    text = workloads.references(records)
    assert "| train | 0.100 | 0.300 | 0.600 | – |" in text
    assert "| heldout | 0.200 | 0.300 | 0.600 | 1.000 |" in text
    assert "| nominal | 15.0 | 1.000 |" in text


def test_a_rank_suffix_changes_the_rank_and_keeps_the_scale(ks, config):
    """``rss_r6``: RSS at rank 6 with the scale α/r of rank 4 (the parameter-matched variants); every RSS leaf grows
    with the rank, so the trainable count grows by 6/4."""
    x, p = _examples(ks)
    counts = {}
    for method in ("rss", "rss_r6"):
        name, adapted = workloads.adapted_model(ks, method, "all", config)
        assert name == "rss"
        rank = 6 if method == "rss_r6" else config.rank
        assert adapted.adapter_config.rank == rank
        assert adapted.adapter_config.lora_alpha / rank == pytest.approx(config.lora_alpha / config.rank)
        variables = adapted.init(jax.random.key(0), x, p=p)
        counts[method] = adapters.count_trainable(variables["params"], name)
    assert counts["rss_r6"] * config.rank == counts["rss"] * 6
