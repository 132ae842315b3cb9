"""The condition-count sweep, the Holm–Bonferroni correction and the condition designs, against hand computations."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import condition_count_pendulum, tiny
from experiments import condition_count, report, stats, tasks, train

# ------------------------------------------------------------------------------------------------ Holm


@pytest.mark.parametrize(
    "pvalues,expected",
    [
        # sorted 0.001, 0.02, 0.04, 0.5 with m = 4 (nan not counted): 4·0.001, 3·0.02, 2·0.04, 1·0.5
        ([0.02, 0.001, float("nan"), 0.5, 0.04], [0.06, 0.004, float("nan"), 0.5, 0.08]),
        # step-down monotonicity: 2·0.011 = 0.022 is raised to the previous 3·0.01 = 0.03
        ([0.011, 0.5, 0.01], [0.03, 0.5, 0.03]),
        # capped at 1
        ([0.6, 0.7], [1.0, 1.0]),
        ([0.03], [0.03]),
    ],
)
def test_holm_matches_hand_computation(pvalues, expected):
    np.testing.assert_allclose(stats.holm(pvalues), expected, rtol=1e-12)


def test_holm_rejects_what_bonferroni_rejects_and_not_more_than_uncorrected():
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 0.1, 40)
    adjusted = stats.holm(p)
    assert np.all(adjusted >= p)
    assert np.all((np.minimum(1, p * p.size) < 0.05) <= (adjusted < 0.05))


def test_paired_pvalue_is_the_t_test_of_the_interval():
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.3, 1.0):
        errors = np.exp(rng.normal(shift, 0.4, (4, 3)))
        reference = np.exp(rng.normal(0.0, 0.4, (4, 3)))
        p = stats.paired_pvalue(errors, reference)
        draws = np.log(errors / reference).mean(axis=1)
        assert p == pytest.approx(scipy.stats.ttest_1samp(draws, 0.0).pvalue, rel=1e-10)
        r = stats.paired_ratio(errors, reference)
        assert (p < 0.05) == (r.low > 1 or r.high < 1)
    assert math.isnan(stats.paired_pvalue(np.ones((1, 3)), np.ones((1, 3))))


def test_equivalence_pvalue_is_two_one_sided_t_tests_and_matches_the_90_percent_interval():
    rng = np.random.default_rng(2)
    bound = math.log(1.1)
    for shift, spread in ((0.0, 0.02), (0.05, 0.05), (0.3, 0.05), (0.0, 0.5)):
        errors = np.exp(rng.normal(shift, spread, (5, 3)))
        reference = np.exp(rng.normal(0.0, spread, (5, 3)))
        draws = np.log(errors / reference).mean(axis=1)
        expected = max(scipy.stats.ttest_1samp(draws, -bound, alternative="greater").pvalue,
                       scipy.stats.ttest_1samp(draws, bound, alternative="less").pvalue)  # fmt: skip
        p = stats.equivalence_pvalue(errors, reference, 0.1)
        assert p == pytest.approx(expected, rel=1e-10)
        cell = report.holm_equivalence([(errors, reference)], 0.1)[0]
        low, high = (float(v) for v in cell.split("]")[0].strip("[").split(","))
        inside = low > 1 / 1.1 * (1 + 1e-3) and high < 1.1 * (1 - 1e-3)  # the cell rounds to 3 digits
        outside = low < 1 / 1.1 * (1 - 1e-3) or high > 1.1 * (1 + 1e-3)
        assert ("**≈**" in cell) == (p < 0.05)
        assert (inside and p < 0.05) or (outside and p >= 0.05)
    assert math.isnan(stats.equivalence_pvalue(np.ones((1, 3)), np.ones((1, 3))))


def test_report_marks_are_holm_corrected():
    # three draw-level comparisons: an overwhelming one, one significant uncorrected (p ~ 0.035) but not after Holm
    # (2 x 0.035 > 0.05), and a null one
    reference = np.ones((3, 2))

    def errors(logs):
        return np.exp(np.repeat(np.asarray(logs)[:, None], 2, axis=1))

    strong, weak, null = errors([2.0, 2.1, 1.9]), errors([0.2, 0.3, 0.4]), errors([0.1, -0.1, 0.05])
    p_weak = stats.paired_pvalue(weak, reference)
    t = 0.3 / (0.1 / math.sqrt(3))  # mean / (sd / sqrt(draws)) of the weak logs, by hand
    assert p_weak == pytest.approx(2 * scipy.stats.t.sf(t, 2), rel=1e-9) and 0.025 < p_weak < 0.05
    assert "**>1**" in report._ratio(weak, reference)  # uncorrected
    cells = report.holm_ratios([(strong, reference), (weak, reference), (null, reference)])
    assert "**>1**" in cells[0] and "**" not in cells[1] and "**" not in cells[2]
    assert "**<1**" in report.holm_ratios([(reference, strong)])[0]


# ------------------------------------------------------------------------------------------------ conditions


def test_grid_design_draws_are_unchanged():
    key = jax.random.key(3)
    conds = tasks.condition_sets(2, 3, 10, key)
    k1, k2, k3 = jax.random.split(key, 3)
    inside = jax.random.uniform(k1, (10, 2), minval=-0.95, maxval=0.95)
    direction = jax.random.uniform(k2, (10, 2), minval=-1.0, maxval=1.0)
    direction = direction / jnp.max(jnp.abs(direction), axis=-1, keepdims=True)
    outside = direction * jax.random.uniform(k3, (10, 1), minval=1.1, maxval=2.0)
    np.testing.assert_array_equal(conds["interpolation"], inside)
    np.testing.assert_array_equal(conds["extrapolation"], outside)
    axis = np.linspace(-1, 1, 3)
    np.testing.assert_allclose(conds["train"], np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2))


def test_sobol_design_is_nested_space_filling_and_keyed():
    key = jax.random.key(5)
    small = np.asarray(tasks.condition_sets(2, 0, 4, key, design="sobol", count=4)["train"])
    large = np.asarray(tasks.condition_sets(2, 0, 4, key, design="sobol", count=64)["train"])
    assert large.shape == (64, 2) and np.abs(large).max() <= 1.0
    np.testing.assert_array_equal(small, large[:4])
    # a (0, m, 2)-net in base 2: the first 4 points fill the 4 quadrants, the first 16 the 4 x 4 cells, one each
    quadrants = {(int(a > 0), int(b > 0)) for a, b in small}
    assert len(quadrants) == 4
    cells = {tuple(c) for c in np.floor((large[:16] + 1) * 2).astype(int)}
    assert len(cells) == 16
    other = np.asarray(tasks.condition_sets(2, 0, 4, jax.random.key(6), design="sobol", count=4)["train"])
    assert not np.allclose(other, small)
    with pytest.raises(ValueError, match="count"):
        tasks.condition_sets(2, 0, 4, key, design="sobol")
    with pytest.raises(ValueError, match="design"):
        tasks.condition_sets(2, 3, 4, key, design="lhs")


def test_physically_valid_pendulum_extrapolation():
    key = jax.random.key(0)
    plain = tasks.condition_sets(2, 3, 200, key)["extrapolation"]
    zeta = np.asarray(tasks.to_physical(plain, tasks.PENDULUM_RANGE))[:, 0]
    assert (zeta <= 0).any()  # the unconstrained split does reach the anti-damped regime
    valid = tasks.condition_sets(2, 3, 200, key, valid=tasks.pendulum_damped)["extrapolation"]
    phys = np.asarray(tasks.to_physical(valid, tasks.PENDULUM_RANGE), np.float64)
    # ζ = 0.05 + (p + 1) / 2 * 0.3 > 0, computed here in float64
    zeta64 = 0.05 + (np.asarray(valid[:, 0], np.float64) + 1) / 2 * 0.3
    np.testing.assert_allclose(phys[:, 0], zeta64, atol=1e-6)
    assert valid.shape == (200, 2) and zeta64.min() > 0
    distance = np.asarray(tasks.distance_from_range(valid))
    assert distance.min() >= 0.1 - 1e-6 and distance.max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="valid"):
        tasks.condition_sets(2, 3, 5, key, valid=lambda p: jnp.zeros(p.shape[0], bool))


# ------------------------------------------------------------------------------------------------ the sweep


def _tiny_sweep_config():
    config = condition_count_pendulum.get_config()
    small = tiny.get_config()
    for field in ("steps", "batch_size", "points_per_condition", "n_test_conditions", "pde_hidden",
                  "pretrain_points", "pretrain_steps", "curve_points"):  # fmt: skip
        setattr(config, field, small[field])
    config.progress = False
    config.counts = (2, 4)
    config.methods = ("rss", "film_branch0")
    config.num_draws, config.num_seeds, config.tune_seeds = 2, 2, 1
    config.learning_rates = (3e-3, 3e-2)
    return config


@pytest.mark.slow
def test_centred_and_with_count_slice_the_draws():
    config = _tiny_sweep_config()
    sub = condition_count._variant(config)
    stacked = tasks.make_draws("pendulum_corner", sub, jax.random.key(0))
    n = stacked.per_condition
    assert stacked.train.x.shape[:2] == (2, 4 * n)
    centre = condition_count.centred(stacked)
    np.testing.assert_array_equal(centre.nominal, np.zeros((2, 2)))
    np.testing.assert_allclose(centre.train.p, np.asarray(stacked.train.p) + 1.0, atol=1e-6)  # nominal (-1, -1)
    np.testing.assert_allclose(centre.splits["extrapolation"].p, np.asarray(stacked.splits["extrapolation"].p) + 1.0,
                               atol=1e-6)  # fmt: skip
    two = condition_count.with_count(centre, 2)
    assert two.train.x.shape[1] == 2 * n and two.splits["validation"].x.shape[1] == 2 * n
    np.testing.assert_array_equal(two.train.p, np.asarray(centre.train.p)[:, : 2 * n])
    assert len(np.unique(np.asarray(two.train.p[0]), axis=0)) == 2
    np.testing.assert_array_equal(two.splits["interpolation"].y, centre.splits["interpolation"].y)
    with pytest.raises(ValueError, match="count=8"):
        condition_count.with_count(centre, 8)
    # each draw has its own base and its own conditions
    assert not np.allclose(stacked.base_params["dense_0"]["kernel"][0], stacked.base_params["dense_0"]["kernel"][1])
    assert not np.allclose(stacked.train.p[0], stacked.train.p[1])


@pytest.mark.slow
def test_sweep_runs_and_renders_the_same_report(tmp_path):
    config = _tiny_sweep_config()
    rows = condition_count.run(config, tmp_path)
    assert [(r["count"], r["method"]) for r in rows] == [(2, "rss"), (2, "film_branch0"), (4, "rss"),
                                                          (4, "film_branch0")]  # fmt: skip
    for r in rows:
        rel = np.asarray(r["errors"]["interpolation"])
        assert rel.shape == (2, 2) and np.all(np.isfinite(rel))
        assert len(r["base_mse"]["extrapolation"]) == 2
    text = (tmp_path / "report.md").read_text()
    assert "Holm" in text and "K = 4" in text and (tmp_path / "pendulum_corner.png").exists()
    first = text
    condition_count.write(condition_count.load(tmp_path), config, tmp_path)
    assert (tmp_path / "report.md").read_text() == first
    # the absolute table is the relative error times each draw's base MSE, geometric mean over draws x seeds
    r = rows[0]
    absolute = np.asarray(r["errors"]["interpolation"]) * np.asarray(r["base_mse"]["interpolation"])[:, None]
    g = stats.log_interval(absolute)
    assert f"{g.estimate:.3g} [{g.low:.3g}, {g.high:.3g}]" in text


@pytest.mark.slow  # ~15 s: make test-slow runs it
def test_anti_damped_table_counts_the_draws_the_study_builds():
    config = tiny.get_config()
    config.n_test_conditions = 40
    name = "pendulum_corner"
    stacked = tasks.make_draws(name, config, jax.random.fold_in(jax.random.key(config.seed), train.zlib_hash(name)))
    n = stacked.per_condition
    p = np.asarray(stacked.splits["extrapolation"].p)[:, ::n]  # [draws, conditions, 2]
    zeta = 0.05 + (p[..., 0].astype(np.float64) + 1) / 2 * 0.3
    counts = [int((z <= 0).sum()) for z in zeta]
    assert sum(counts) > 0
    row = tasks.anti_damped_table(config, (name,)).splitlines()[-1]
    assert row.startswith(f"| {name} | {', '.join(map(str, counts))} |"), row
    config.physical_extrapolation = True
    assert tasks.anti_damped_table(config, (name,)).splitlines()[-1].startswith(f"| {name} | 0, 0 |")


@pytest.mark.slow  # ~10 s: make test-slow runs it
def test_absolute_tables_multiply_by_the_rebuilt_base(tmp_path):
    config = tiny.get_config()
    config.tasks = ("pendulum_corner",)
    # the base's MSE from the rebuilt draws, computed independently: a float64 numpy forward of the frozen MLP
    key = jax.random.fold_in(jax.random.key(config.seed), train.zlib_hash("pendulum_corner"))
    stacked = tasks.make_draws("pendulum_corner", config, key)
    base = report.base_mse(config, "pendulum_corner")
    for d in range(config.num_draws):
        params = jax.tree.map(lambda a, d=d: np.asarray(a[d], np.float64), stacked.base_params)
        split = stacked.splits["interpolation"]
        h = np.asarray(split.x[d], np.float64)
        for i in range(len(stacked.widths)):
            h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
            h = np.tanh(h) if i < len(stacked.widths) - 1 else h
        expected = np.mean((h - np.asarray(split.y[d], np.float64)) ** 2)
        assert base["interpolation"][d] == pytest.approx(expected, rel=1e-4)
    rel = np.array([[0.5, 0.25], [0.1, 0.2]])  # [draws, seeds]
    errors = {s: rel.tolist() for s in ("seen", "interpolation", "extrapolation")}
    summary = {"results": [{"task": "pendulum_corner", "method": "rss", "errors": errors}]}
    text = report.absolute_tables(summary, config)
    g = stats.log_interval(rel * base["interpolation"][:, None])
    assert f"{g.estimate:.3g} [{g.low:.3g}, {g.high:.3g}]" in text


def test_lr_check_report_picks_each_methods_rate_and_pairs_them(tmp_path):
    """Two methods × two rates × one count, errors chosen so that the training-condition pick and the held-out
    (oracle) pick differ for ``b``: the report pairs each method at its own pick, by hand in log space."""
    rng = np.random.default_rng(0)
    noise = np.exp(rng.normal(0.0, 0.05, (3, 2)))
    errors = {  # (method, lr) -> (seen, interpolation) scales
        ("a", 0.01): (1.0, 1.0), ("a", 0.1): (2.0, 3.0),
        ("b", 0.01): (3.0, 3.0), ("b", 0.1): (0.5, 8.0),  # b fits the training conditions best at 0.1
    }  # fmt: skip
    for lr in (0.01, 0.1):
        (tmp_path / f"lr{lr}").mkdir()
        rows = [{"kind": "condition_count", "task": "t", "method": m, "count": 4, "lr": lr,
                 "trainable": {"a": 1156, "b": 2198}[m],
                 "errors": {"seen": (seen * noise).tolist(), "interpolation": (interp * noise).tolist(),
                            "extrapolation": (interp * noise).tolist()}}
                for (m, rate), (seen, interp) in errors.items() if rate == lr]  # fmt: skip
        (tmp_path / f"lr{lr}" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = condition_count.lr_check_report(tmp_path, reference="a").read_text()
    assert "Trainable parameters: `a` 1,156, `b` 2,198." in text
    sweeps, oracle = text.split("## Each method at the rate with the lowest")[1:]
    assert "`a` 0.01, `b` 0.1" in sweeps and "`a` 0.01, `b` 0.01" in oracle
    # interpolation: b at 0.1 is 8 x a's at 0.01, b at 0.01 is 3 x (the noise cancels in the pair)
    ratio = lambda table: float(table.split("| b | ")[1].split(" [")[0])  # noqa: E731
    assert ratio(sweeps.split("interpolation, paired ratio")[1]) == pytest.approx(8.0, rel=1e-2)
    assert ratio(oracle.split("interpolation, paired ratio")[1]) == pytest.approx(3.0, rel=1e-2)


def test_budget_tables_pair_each_cell_across_budgets_and_apply_the_doubling_criterion():
    """Two methods × one count: ``flat`` moves under 10 % on every draw (the criterion is met, and TOST shows it),
    ``falls`` halves (a paired ratio of 0.5 by hand); a base that differs between the budgets is refused."""
    rng = np.random.default_rng(1)
    noise = np.exp(rng.normal(0.0, 0.05, (3, 2)))
    then = {"flat": noise, "falls": 2.0 * noise}
    now = {"flat": noise * np.exp(rng.normal(0.0, 0.002, (3, 2))), "falls": noise}

    def rows(errors, base=1.0):
        return [{"task": "t", "method": m, "count": 4, "base_mse": {"interpolation": [base] * 3},
                 "errors": {s: e.tolist() for s in condition_count.SPLITS}} for m, e in errors.items()]  # fmt: skip

    lines = condition_count.budget_tables(rows(now), rows(then), "t")
    assert lines[0] == "interpolation, this budget / the earlier one (1 of 2 cells meet the criterion, ✓):"
    flat, falls = lines[4], lines[5]
    assert flat.startswith("| flat | 1") and flat.endswith("✓ |")
    r = stats.paired_ratio(now["falls"], then["falls"])
    assert falls.startswith(f"| falls | {r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}]") and "✓" not in falls
    assert r.estimate == pytest.approx(0.5, rel=1e-9)  # the noise cancels in the pair
    tost = lines[lines.index("interpolation, equivalence of the two budgets within ±10% (TOST):") + 4 :][:2]
    assert "**≈**" in tost[0] and "**≈**" not in tost[1]
    with pytest.raises(ValueError, match="the frozen bases differ between the budgets"):
        condition_count.budget_tables(rows(now, base=1.5), rows(then), "t")


@pytest.mark.parametrize("fn", [stats.paired_ratio, stats.paired_pvalue, stats.equivalence_pvalue])
def test_paired_statistics_refuse_arrays_of_other_shapes(fn):
    """One draw against three is refused by name and shapes, never broadcast into three pairs."""
    with pytest.raises(ValueError, match=r"same \[draws, seeds\] shape; got \(1, 2\) and \(3, 2\)"):
        fn(np.ones((1, 2)), np.ones((3, 2)))
