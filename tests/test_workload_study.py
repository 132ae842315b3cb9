"""The workload study with independent draws: each draw has its own conditions and re-pretrained base, the lr grid
extends past an edge pick, statistics run over draws, and the report's ratios are the paired draw-level ones."""

import numpy as np
import pytest
import scipy.stats

from configs import workload_study as study_config
from configs import workloads_tiny
from experiments import report as report_lib
from experiments import stats, workload_study, workloads


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One data and base cache for the module's runs (the tiny data and bases are built once)."""
    return tmp_path_factory.mktemp("cache")


def _tiny():
    config = workloads_tiny.get_config()
    study = study_config.get_config()
    for key in ("part", "anchor", "seeds_at_lr", "val_points", "convergence_factor"):
        config[key] = study[key]
    config.methods = ("frozen", "lora", "rss")
    config.convergence_methods = ("rss",)
    config.draws = 2
    config.extend_edges = 1
    config.val_points = 2
    return config


def test_the_config_pre_registers_one_headline_variant_per_family():
    config = study_config.get_config()
    assert set(config.methods) == {"frozen", "lora", "lora_concat", "full_ft", "film_branch0", "film_layer0",
                                   "hypernet1_shift", "rss", "rss_affine"}  # fmt: skip
    assert config.draws >= 3 and config.seeds_at_lr + 1 >= 3
    assert len(config.learning_rates) >= 5 and len(config.full_ft_learning_rates) >= 5
    assert config.anchor == "centre"


@pytest.mark.parametrize("run_draws", [(2,), (), (0, -1)])
def test_run_draws_outside_the_draws_is_refused_before_any_training(tmp_path, run_draws):
    config = _tiny()
    config.run_draws = run_draws
    with pytest.raises(ValueError, match=r"run_draws must name draws in 0\.\.1; got"):
        workload_study.run(config, tmp_path)
    assert not list(tmp_path.glob("*.jsonl"))


def test_a_draw_moves_the_data_and_the_pretraining_seeds():
    config = study_config.get_config()
    base = workloads._surrogate_config("ks", config, 0)
    other = workloads._surrogate_config("ks", config, 2)
    assert base.seed == 0 and base.data.seed == 0
    assert other.seed == 2 and other.data.seed == 2
    assert other.data.box == base.data.box and other.model == base.model and other.steps == base.steps
    battery = workloads._surrogate_config("battery", config, 1)
    assert battery.seed == 1 and battery.data.seed == 1


def test_the_base_pretraining_budget_is_the_surrogates_own_unless_the_config_names_one():
    config = study_config.get_config()
    for name, own in (("ks", 1500), ("battery", 1000)):
        assert workloads._surrogate_config(name, config, 1).steps == own
        config[name].pretrain_steps = 4 * own
        longer = workloads._surrogate_config(name, config, 1)
        assert (longer.steps, longer.seed) == (4 * own, 1)
        assert longer.warmup == workloads._surrogate_config(name, study_config.get_config(), 1).warmup


@pytest.mark.slow  # ~40 s: two draws' data and four bases pretrained; make test-slow runs it
def test_the_base_part_pretrains_each_draws_base_at_every_budget_and_reports_it(tmp_path, cache_dir):
    config = _tiny()
    config.part, config.base_factors = "base", (1, 2)
    workload_study.run(config, tmp_path / "out", cache_dir)
    base = workload_study.read(tmp_path / "out")["ks"]["base"]
    own = config.ks.pretrain_steps
    assert sorted((r["draw"], r["pretrain_steps"]) for r in base) == [(0, own), (0, 2 * own), (1, own), (1, 2 * own)]
    assert all(r["method"] == "frozen" for r in base)
    e = {n: workload_study.errors([r for r in base if r["pretrain_steps"] == n], "frozen", "nominal", "one_step")
         for n in (own, 2 * own)}  # fmt: skip
    assert not np.array_equal(e[own], e[2 * own])  # another base
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## ks: the frozen base against its pretraining budget" in text and "2 draws;" in text
    assert "`nominal_fresh` is the next draw's nominal trajectories, which it never saw." in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {2 * own} |"))
    r = stats.paired_ratio(e[2 * own], e[own])
    assert f"{r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}]" in row
    # fresh nominal trajectories (the other draw's): another error than the in-sample nominal one, in the table
    fresh = {n: workload_study.errors([r for r in base if r["pretrain_steps"] == n], "frozen", "nominal_fresh",
                                      "one_step") for n in (own, 2 * own)}  # fmt: skip
    assert np.all(np.isfinite(fresh[own])) and not np.allclose(fresh[own], e[own])
    header = next(line for line in text.splitlines() if line.startswith("| pretraining steps |"))
    assert header.endswith(f"| nominal | nominal_fresh | / {own}: train | / {own}: heldout | / {own}: extrapolated | "
                           f"/ {own}: nominal | / {own}: nominal_fresh |")  # fmt: skip
    r = stats.paired_ratio(fresh[2 * own], fresh[own])
    assert f"{r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}]" in row.split("|")[-2]
    work = workloads.load_workload("ks", workload_study._sub(config), cache_dir, draw=1)
    with pytest.raises(ValueError, match="draw 1 shares a nominal trajectory with draw 0"):
        workload_study._fresh_nominal("ks", config, cache_dir, 0, work)  # draw 1's own trajectories are not fresh


def _records(rng, methods, draws=3, seeds=3, conditions=4):
    out = []
    for m in methods:
        for d in range(draws):
            scale = {"frozen": 2.0, "lora": 1.5, "rss": 1.0}[m] * (1 + 0.3 * d)
            metric = (scale * rng.uniform(0.8, 1.2, (seeds if m != "frozen" else 1, conditions))).tolist()
            out.append({"method": m, "draw": d, "trainable": 10, "lr": None if m == "frozen" else [0.01],
                        "metrics": {s: {"one_step": metric} for s in workload_study.SETS}})  # fmt: skip
    return out


def test_errors_are_draws_by_seeds_and_ratios_are_the_paired_draw_level_ones():
    rng = np.random.default_rng(0)
    records = _records(rng, ("frozen", "lora", "rss"))
    e = workload_study.errors(records, "lora", "heldout", "one_step")
    assert e.shape == (3, 3)
    expected = np.asarray(records[3]["metrics"]["heldout"]["one_step"]).mean(axis=1)  # lora, draw 0
    np.testing.assert_allclose(e[0], expected)
    lines = workload_study.ratio_table(records, "one_step", "rss")
    assert lines[2].startswith("| lora |")
    r = stats.paired_ratio(e, workload_study.errors(records, "rss", "heldout", "one_step"))
    cell = lines[2].split("|")[3].strip()
    assert cell.startswith(f"{r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}]")
    # the Holm family is the whole table: 4 sets of one method here
    pairs = [(workload_study.errors(records, "lora", s, "one_step"),
              workload_study.errors(records, "rss", s, "one_step")) for s in workload_study.SETS]  # fmt: skip
    assert [c.strip() for c in lines[2].split("|")[2:6]] == report_lib.holm_ratios(pairs)


def test_the_per_draw_table_has_each_draws_seed_mean_and_its_ratio_to_the_reference():
    rng = np.random.default_rng(2)
    records = _records(rng, ("frozen", "lora", "rss"))
    lines = workload_study.per_draw_table(records, "one_step", "rss")
    assert lines[0] == "| method | draw 0 | draw 1 | draw 2 |" and len(lines) == 4  # frozen is left out
    lora = [np.asarray(r["metrics"]["heldout"]["one_step"], np.float64) for r in records if r["method"] == "lora"]
    rss = [np.asarray(r["metrics"]["heldout"]["one_step"], np.float64) for r in records if r["method"] == "rss"]
    for d, cell in enumerate(lines[2].strip("|").split("|")[1:]):
        per_seed = lora[d].mean(axis=1), rss[d].mean(axis=1)  # each seed's mean over the conditions
        ratio = np.exp(np.mean(np.log(per_seed[0] / per_seed[1])))
        assert cell.strip() == f"{per_seed[0].mean():.4g} ({ratio:.3g})"
    assert lines[3].startswith("| rss |") and "(" not in lines[3]


def test_level_at_matched_parameters_is_an_equivalence_test_within_three_percent():
    rng = np.random.default_rng(1)
    rss = _records(rng, ("rss",))

    def scaled(name, factor, noise):  # the same draws and seeds as rss, times factor, with per-run noise
        out = []
        for r in rss:
            m = {s: {"one_step": (np.asarray(v["one_step"]) * factor * rng.uniform(1 - noise, 1 + noise, 1)).tolist()}
                 for s, v in r["metrics"].items()}  # fmt: skip
            out.append(r | {"method": name, "metrics": m})
        return out

    records = rss + scaled("tight", 1.0, 0.002) + scaled("off", 1.05, 0.002)
    lines = workload_study.equivalence_table(records, "one_step", "rss", margin=workload_study.LEVEL)
    tight, off = lines[2], lines[3]
    assert tight.startswith("| tight |") and tight.count("**≈**") == len(workload_study.SETS)
    assert off.startswith("| off |") and "**≈**" not in off  # 5 % off is outside ±3 %
    assert "**≈**" in workload_study.equivalence_table(records, "one_step", "rss", margin=0.10)[3]  # inside ±10 %


def _budget_dir(path, records, steps, base=6000):
    path.mkdir()
    rows = [r | {"workload": "ks", "part": "main", "steps": 0 if r["method"] == "frozen" else steps,
                 "pretrain_steps": base} for r in records]  # fmt: skip
    workload_study._write(path / "ks_draw0.jsonl", rows)
    return path


def test_the_budget_report_pairs_each_method_across_budgets_on_the_same_base_draws_and_seeds(tmp_path):
    rng = np.random.default_rng(3)
    short = _records(rng, ("frozen", "lora", "rss"))
    factor = {"frozen": (1.0, 1.0), "lora": (0.6, 0.7), "rss": (0.95, 1.05)}  # rss within the 10 % criterion
    longer = [r | {"metrics": {s: {"one_step": (np.asarray(v["one_step"]) * rng.uniform(*factor[r["method"]],
              (len(v["one_step"]), 1))).tolist()} for s, v in r["metrics"].items()}} for r in short]  # fmt: skip
    dirs = [_budget_dir(tmp_path / "a", longer, 1200), _budget_dir(tmp_path / "b", short, 600)]
    chains = workload_study.budget_chains(dirs)
    assert list(chains) == [("ks", 6000)] and [n for n, _ in chains[("ks", 6000)]] == [600, 1200]  # in step order
    lines = workload_study.budget_table(chains[("ks", 6000)], "one_step")
    assert lines[0] == "| method | steps | draws | heldout | extrapolated |" and len(lines) == 4
    lora = lines[2].split("|")
    assert [c.strip() for c in lora[1:4]] == ["lora", "600 → 1200", "3"]
    e = [workload_study.errors(r, "lora", "heldout", "one_step") for r in (longer, short)]
    r = stats.paired_ratio(*e)
    assert lora[4].strip().startswith(f"{r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}]") and r.high < 0.75
    assert "✓" not in lines[2] and lines[3].startswith("| rss |") and lines[3].split("|")[4].endswith("✓ ")
    equivalence = workload_study.budget_table(chains[("ks", 6000)], "one_step", report_lib.holm_equivalence)
    assert "**≈**" not in equivalence[2]  # a 35 % fall is not within ±10 %
    text = workload_study.write_budget_report(tmp_path / "out", dirs).read_text()
    assert "## ks, base pretrained 6000 steps: budgets 600, 1200" in text and lines[2] in text
    # a method that skipped a budget pairs its own consecutive budgets; the others keep their steps
    longest = [r | {"metrics": {s: {"one_step": (np.asarray(v["one_step"]) * 0.9).tolist()} for s, v in
                                r["metrics"].items()}} if r["method"] != "frozen" else r for r in longer]  # fmt: skip
    skipped = [r for r in longer if r["method"] != "lora"]
    three = workload_study.budget_chains(
        [dirs[1], _budget_dir(tmp_path / "s", skipped, 1200), _budget_dir(tmp_path / "l", longest, 2400)]
    )[("ks", 6000)]
    steps = [row.split("|")[1:3] for row in workload_study.budget_table(three, "one_step")[2:]]
    assert [[c.strip() for c in row] for row in steps] == [
        ["rss", "600 → 1200"], ["lora", "600 → 2400"], ["rss", "1200 → 2400"]
    ]  # fmt: skip
    # another base under the same label, or two record sets at one budget, are refused
    other = [r | {"metrics": {s: {"one_step": (np.asarray(v["one_step"]) * 1.1).tolist()} for s, v in
                              r["metrics"].items()}} if r["method"] == "frozen" else r for r in longer]  # fmt: skip
    moved = workload_study.budget_chains([_budget_dir(tmp_path / "c", other, 1200), dirs[1]])[("ks", 6000)]
    with pytest.raises(ValueError, match="frozen base's train one_step error differs between budgets"):
        workload_study.budget_table(moved, "one_step")
    with pytest.raises(ValueError, match="ks, base 6000 steps: two record sets at 600 steps"):
        workload_study.budget_chains([dirs[1], _budget_dir(tmp_path / "d", short, 600)])
    # the command's path: part "budgets" trains nothing and writes the same report
    config = _tiny()
    config.part, config.budget_workdirs = "budgets", tuple(str(d) for d in dirs)
    workload_study.run(config, tmp_path / "cli")
    assert (tmp_path / "cli" / "report.md").read_text() == text


@pytest.mark.slow
def test_two_draws_train_tune_and_report(tmp_path, cache_dir):
    config = _tiny()
    config.learning_rates = (1e-6, 2e-6)  # far too small: the pick sits at the upper edge and the grid extends
    data_dir = cache_dir
    workload_study.run(config, tmp_path / "out", data_dir)
    # a method added to the main part later: its own files, left out of the tables until every draw has it
    config.methods, config.records_tag, config.run_draws = ("lora_concat",), "more", (0,)
    workload_study.run(config, tmp_path / "out", data_dir)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Not tabulated until every draw has run: `lora_concat`." in report and "| lora_concat |" not in report
    config.run_draws = (1,)
    workload_study.run(config, tmp_path / "out", data_dir)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Not tabulated" not in report and "| lora_concat |" in report
    first_family, added = report.split("## ks: methods added later (`lora_concat`)")  # a Holm family of its own
    added = added.split("### Cost")[0]  # the cost table lists every method
    assert "| lora_concat |" not in first_family and "| lora_concat |" in added and "| lora |" not in added
    first = workload_study.read(tmp_path / "out")["ks"]["main"]
    assert sorted(r["method"] for r in first if r["draw"] == 0) == ["frozen", "lora", "lora_concat", "rss"]
    config.methods, config.records_tag, config.run_draws = ("frozen", "lora", "rss"), "", (0, 1)
    config.part = "convergence"
    workload_study.run(config, tmp_path / "out", data_dir)
    config.part, config.ablation_methods = "ablation", ("film_layer_affine0",)
    workload_study.run(config, tmp_path / "out", data_dir)
    config.ablation_methods, config.ablation_tag = ("film_layer0_r2",), "later"  # a later set, in its own files
    workload_study.run(config, tmp_path / "out", data_dir)
    parts = workload_study.read(tmp_path / "out")["ks"]
    assert sorted(r["method"] for r in parts["ablation"]) == ["film_layer0_r2"] * 2 + ["film_layer_affine0"] * 2
    trainable = {
        m: {r["trainable"] for r in parts["ablation"] if r["method"] == m}
        for m in ("film_layer0_r2", "film_layer_affine0")
    }
    assert max(trainable["film_layer0_r2"]) < min(trainable["film_layer_affine0"])  # rank 2 against rank 4
    assert {r["steps"] for r in parts["ablation"]} == {config.ks.steps}  # the main part's budget, not the longer one
    assert all(r["started_utc"].endswith("+00:00") for r in parts["ablation"])  # when each run began, in UTC
    main = parts["main"]
    assert sorted({r["draw"] for r in main}) == [0, 1]
    frozen = {r["draw"]: r for r in main if r["method"] == "frozen"}
    # independent draws: other held-out conditions and another base (its nominal error differs)
    assert frozen[0]["metrics"]["heldout"]["conditions"] != frozen[1]["metrics"]["heldout"]["conditions"]
    assert frozen[0]["metrics"]["nominal"]["one_step"] != frozen[1]["metrics"]["nominal"]["one_step"]
    for r in (r for r in main if r["method"] != "frozen"):
        assert len(r["runs"]) == 1 + config.seeds_at_lr
        assert r["lr_grid"] == [1e-6, 2e-6, 4e-6] and r["lr"] == [4e-6]  # one extension past the top edge
        assert len(r["val_curve"]["steps"]) == 2 and len(r["val_curve"]["by_run"]) == 3 + config.seeds_at_lr
    assert [r["method"] for r in parts["convergence"]] == ["frozen", "rss"]
    assert parts["convergence"][1]["steps"] == 2 * config.ks.steps
    assert {r["pretrain_steps"] for r in main} == {config.ks.pretrain_steps}  # the tiny config's base budget
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"steps of batch {config.ks.batch}; base pretrained {config.ks.pretrain_steps} steps;" in text
    assert "paired ratio method / `rss`" in text and "Convergence check" in text
    assert "Paired ratio variant / `rss`" in text and "| film_layer_affine0 |" in text
    assert "Paired ratio variant / `film_layer_affine0`" in text  # rank variants are also paired with the FiLM layers
    assert "Equivalence of variant and `film_layer_affine0` within ±3%" in text
    assert (tmp_path / "out" / "ks.png").exists()


def test_a_base_budget_that_fewer_draws_ran_pairs_on_its_own_draws_only():
    """The base table's ratio for a budget only draw 0 has reached is draw 0's own ratio, not one broadcast over
    the smaller budget's three draws."""
    rng = np.random.default_rng(4)
    short = [r | {"pretrain_steps": 100} for r in _records(rng, ("frozen",))]
    longer = [r | {"pretrain_steps": 200, "metrics": {s: {"one_step": (np.asarray(v["one_step"]) * 0.5).tolist()}
              for s, v in r["metrics"].items()}} for r in short if r["draw"] == 0]  # fmt: skip
    row = workload_study.base_table(short + longer, "one_step")[-1]
    assert row.startswith("| 200 |")
    assert [c.strip() for c in row.strip("|").split("|")[5:]] == ["0.5"] * 4  # one draw: its ratio, no interval


def test_a_diverged_run_is_named_and_the_ratios_are_given_again_without_it_and_its_pair():
    rng = np.random.default_rng(5)
    records = _records(rng, ("frozen", "lora", "rss"))
    for r in records:
        if r["method"] != "frozen":
            r["runs"] = [[0, i, 0.01] for i in range(3)]
            r["val_curve"] = {"steps": [1, 2], "runs": r["runs"], "by_run": [[1.0, 0.1], [1.0, 0.11], [1.0, 0.09]]}
    rss2 = next(r for r in records if r["method"] == "rss" and r["draw"] == 2)
    rss2["val_curve"]["by_run"][1] = [1.0, 5.0]  # seed 1 of draw 2 diverged
    assert workload_study.diverged_runs(records) == {("rss", 2): [1]}
    row = workload_study.without_diverged_table(records, "one_step")[2]
    lora = workload_study.errors(records, "lora", "heldout", "one_step")
    rss = workload_study.errors(records, "rss", "heldout", "one_step")
    keep = [[0, 1, 2], [0, 1, 2], [0, 2]]
    logs = np.array([np.log(lora[d, k] / rss[d, k]).mean() for d, k in enumerate(keep)])  # by hand
    half = scipy.stats.t.ppf(0.975, 2) * logs.std(ddof=1) / np.sqrt(3)
    expected = f"{np.exp(logs.mean()):.3g} [{np.exp(logs.mean() - half):.3g}, {np.exp(logs.mean() + half):.3g}]"
    assert row.startswith("| lora |") and row.split("|")[3].strip().startswith(expected)
