"""The condition-count sweep on the workloads: nested Sobol conditions, runs that sample only their first K
conditions, and a report whose cells are the draw-level statistics of the records."""

import numpy as np
import pytest

from configs import workload_counts as counts_config
from configs import workloads_tiny
from experiments import physics_data, stats, workload_counts, workloads


def _tiny():
    config = workloads_tiny.get_config()
    study = counts_config.get_config()
    for key in ("anchor", "val_points", "learning_rate", "seeds", "part", "lr_check_counts", "lr_check_factor"):
        config[key] = study[key]
    config.methods = ("frozen", "lora_concat", "rss")
    config.counts = (1, 2, 3)
    config.run_draws = (0, 1)
    return config


def test_the_config_pre_registers_the_sweep():
    config = counts_config.get_config()
    assert tuple(config.counts) == (4, 8, 16, 32, 64)
    assert set(config.methods) == {"frozen", "rss", "rss_affine", "film_branch0", "film_layer0", "lora_concat",
                                   "hypernet1_shift", "full_ft"}  # fmt: skip
    assert len(config.run_draws) >= 3 and config.anchor == "centre"
    assert all(m in config.learning_rate for m in config.methods if m != "frozen")


def test_sobol_conditions_are_nested_space_filling_and_inside_the_box():
    box = ((48.0, 96.0), (0.8, 1.4))
    a = physics_data.sobol_conditions(box, 64, seed=3)
    assert a.shape == (64, 2)
    assert np.all(a >= [48.0, 0.8]) and np.all(a <= [96.0, 1.4])
    # nested: the first 16 of 64 are the 16 points of the same sequence
    np.testing.assert_array_equal(physics_data.sobol_conditions(box, 16, seed=3), a[:16])
    # space-filling: the first 4 points fall in 4 different quadrants of the box
    quadrant = (a[:4] > [72.0, 1.1]).astype(int) @ [1, 2]
    assert sorted(quadrant.tolist()) == [0, 1, 2, 3]
    assert not np.allclose(physics_data.sobol_conditions(box, 4, seed=4), a[:4])  # another draw, other points


def test_rows_split_the_runs_by_count_and_seed():
    counts, seeds = [4, 8], 2
    rng = np.random.default_rng(0)
    records = []
    for d in range(3):
        for m in ("frozen", "rss"):
            runs = 1 if m == "frozen" else len(counts) * seeds
            metric = rng.uniform(0.5, 1.5, (runs, 5)).tolist()
            records.append({"method": m, "draw": d, "counts": counts, "lr": None if m == "frozen" else [0.01],
                            "metrics": {s: {"one_step": metric} for s in workload_counts.SETS}})  # fmt: skip
    rows = workload_counts.rows(records, "one_step")
    by = {(r["count"], r["method"]): r for r in rows}
    e = np.asarray(records[3]["metrics"]["heldout"]["one_step"]).mean(axis=1)  # rss, draw 1: runs (K, seed)
    np.testing.assert_allclose(by[(8, "rss")]["errors"]["heldout"][1], e[2:4])
    np.testing.assert_allclose(by[(4, "rss")]["errors"]["heldout"][1], e[0:2])
    assert np.asarray(by[(4, "frozen")]["errors"]["heldout"]).shape == (3, 1)
    line = workload_counts.gain_table(rows, "heldout")[2]
    hi = np.asarray(by[(8, "rss")]["errors"]["heldout"])
    lo = np.asarray(by[(4, "rss")]["errors"]["heldout"])
    r = stats.paired_ratio(hi, lo)
    assert line == f"| rss | {r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}] |"


@pytest.mark.slow
def test_a_tiny_sweep_trains_only_on_its_first_conditions_and_reports(tmp_path):
    config = _tiny()
    data_dir = tmp_path / "cache"
    work = workload_counts.sweep_workload("ks", config, data_dir, draw=0)
    assert work.x.shape[0] == 3 and work.sets["train"]["u"].shape[0] == 1
    np.testing.assert_allclose(work.conditions, physics_data.sobol_conditions(work.pretrain_config.data.box, 3, 0),
                               rtol=1e-6)  # fmt: skip
    # A run at K = 1 sees only condition 0: poison the others' targets; its training loss stays finite.
    poisoned = workload_counts.dataclasses.replace(work, y=work.y.copy())
    poisoned.y[1:] = np.nan
    sub = workload_counts.ml_collections.ConfigDict(config.to_dict())
    sub.draws, sub.seeds = 1, 1
    # runs of K = 1 and K = 3 share one compiled step; the K = 1 run's row indices are padded (with a poisoned row)
    record = workloads.run_method(poisoned, "rss", "all", sub, 0, [0.01, 0.01], [1, 3])
    by_run = np.asarray(record["val_curve"]["by_run"])  # validation on condition 0 only, per run
    assert np.all(np.isfinite(by_run[0]))  # K = 1 never drew the padding nor another condition
    assert not np.all(np.isfinite(by_run[1]))  # K = 3 reaches the poisoned conditions
    workload_counts.run(config, tmp_path / "out", data_dir)
    config.part, config.lr_check_counts, config.methods = "lr_check", (1, 3), ("frozen", "rss")
    workload_counts.run(config, tmp_path / "out", data_dir)
    checked = [workload_counts.json.loads(x) for x in (tmp_path / "out" / "ks_lr_check.jsonl").read_text().splitlines()]
    assert [(r["count"], [run[2] for run in r["runs"]]) for r in checked] == [
        (1, [0.01 / 3, 0.01, 0.03]),
        (3, [0.01 / 3, 0.01, 0.03]),
    ]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "### Learning-rate check at the extreme counts" in report
    assert "### one_step at heldout conditions" in report and "| rss | " in report
    assert (tmp_path / "out" / "ks.png").exists()
