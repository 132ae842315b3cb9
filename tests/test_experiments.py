"""Experiments: data generators against known solutions, the task variants, the statistics, the pipeline."""

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from configs import tiny
from experiments import adapters, pde, report, stats, tasks, train

# ------------------------------------------------------------------------------------------------ generators


@pytest.mark.parametrize("nu,a", [(0.1, 1.2), (0.2, 1.1), (0.05, 1.5)])
def test_burgers_matches_cole_hopf(nu, a):
    x = pde.grid(64)
    u = pde.burgers(pde.cole_hopf(x, 0.0, nu, a), nu, jnp.zeros(64), 1.0, 200)
    exact = np.asarray(pde.cole_hopf(x, 1.0, nu, a), np.float64)
    assert np.abs(exact).max() > 0.05  # not a trivially small solution
    np.testing.assert_allclose(u, exact, atol=2e-5 * np.abs(exact).max() + 1e-6)


def test_pendulum_small_angle_matches_damped_oscillator():
    zeta, omega, theta0 = 0.2, 1.1, 1e-3
    times = jnp.linspace(0.1, 10.0, 30)
    theta, _ = tasks.pendulum_trajectory(jnp.float32(theta0), jnp.float32(0.0), zeta, omega, times)
    t = np.asarray(times, np.float64)
    wd = omega * math.sqrt(1 - zeta**2)
    exact = theta0 * np.exp(-zeta * omega * t) * (np.cos(wd * t) + zeta * omega / wd * np.sin(wd * t))
    np.testing.assert_allclose(theta, exact, atol=2e-3 * theta0)


def test_pendulum_conserves_energy_without_damping():
    times = jnp.linspace(0.5, 20.0, 40)
    omega = 0.9
    theta, velocity = tasks.pendulum_trajectory(jnp.float32(2.5), jnp.float32(0.3), 0.0, omega, times)
    energy = 0.5 * velocity**2 + omega**2 * (1 - jnp.cos(theta))
    e0 = 0.5 * 0.3**2 + omega**2 * (1 - math.cos(2.5))
    np.testing.assert_allclose(energy, e0, rtol=1e-4)


def _np(tree):
    return jax.tree.map(lambda t: np.asarray(t, np.float64), tree)


def test_planted_teachers_have_the_stated_rank_structure():
    config = tiny.get_config()
    config.d_in, config.hidden, config.teacher_rank = 12, 20, 3
    p_grid = jax.random.normal(jax.random.key(1), (10, 2))
    for moving, stacked_more in ((False, False), (True, True)):
        teacher = tasks.planted_teacher(config, jax.random.key(0), moving)
        deltas = np.asarray(jax.vmap(tasks.planted_update, in_axes=(None, 0))(teacher, p_grid), np.float64)
        assert max(np.linalg.matrix_rank(d, tol=1e-5) for d in deltas) == 3
        stacked = np.linalg.matrix_rank(np.concatenate(list(deltas), axis=1), tol=1e-4)
        assert (stacked > 3) == stacked_more, stacked
        x = jax.random.normal(jax.random.key(2), (5, 12))
        t = _np(teacher)
        nominal = np.tanh(np.asarray(x) @ t["w1"] + t["b1"]) @ t["w2"] + t["b2"]
        np.testing.assert_allclose(tasks.planted_apply(teacher, x, jnp.zeros((5, 2))), nominal, rtol=1e-5, atol=1e-5)


def test_condition_sets_and_distances():
    conds = tasks.condition_sets(2, 3, 50, jax.random.key(0))
    assert conds["train"].shape == (9, 2) and float(jnp.abs(conds["train"]).max()) == 1.0
    assert float(tasks.distance_from_range(conds["interpolation"]).max()) == 0.0
    d = np.asarray(tasks.distance_from_range(conds["extrapolation"]))
    assert d.min() >= 0.1 - 1e-6 and d.max() <= 1.0 + 1e-6


# ------------------------------------------------------------------------------------------------ task variants


def _base_error_at(task, p0):
    """MSE of the frozen base against the system at condition p0, on the seen split's inputs."""
    rows = np.all(np.abs(np.asarray(task.splits["seen"].p[:, :2]) - np.asarray(p0)) < 1e-6, axis=-1)
    split = task.splits["seen"]
    pred = tasks.PlainMLP(task.widths).apply({"params": task.base_params}, split.x[rows])
    return float(np.mean((np.asarray(pred) - np.asarray(split.y)[rows]) ** 2)), np.asarray(split.y)[rows]


def test_corner_task_base_is_the_teacher_at_the_corner():
    config = tiny.get_config()
    task = tasks.make_task("planted_shared_corner", config, jax.random.key(0))
    np.testing.assert_array_equal(task.nominal, [-1.0, -1.0])
    err, _ = _base_error_at(task, [-1.0, -1.0])
    assert err < 1e-9  # exact at its nominal condition ...
    assert _base_error_at(task, [1.0, 1.0])[0] > 1e-3  # ... and not elsewhere


def test_the_base_activation_reaches_the_pretrained_physical_base():
    config = tiny.get_config()
    assert config.activation == "tanh"  # the default; the robustness check of RESULTS.md sets gelu
    activation = config.activation = "gelu"
    task = tasks.make_task("pendulum_corner", config, jax.random.key(0))
    assert task.activation == activation
    x = np.asarray(task.splits["seen"].x[:5], np.float64)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), task.base_params)
    h = x
    for i in range(len(task.widths)):
        h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]
        if i < len(task.widths) - 1:  # float64 references: tanh, and GELU's tanh approximation (jax.nn.gelu)
            g = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
            h = np.tanh(h) if activation == "tanh" else g
    model = tasks.PlainMLP(task.widths, task.activation)
    np.testing.assert_allclose(model.apply({"params": task.base_params}, x[:, :].astype(np.float32)), h, atol=2e-5)
    assert tasks.make_task("planted_shared", config, jax.random.key(0)).activation == "tanh"  # teacher's own


@pytest.mark.parametrize("name", ["pendulum_corner", "pendulum_imperfect"])
def test_pendulum_variants_pretrain_where_they_say(name):
    config = tiny.get_config()
    config.pretrain_steps, config.imperfect_pretrain_steps = 400, 5
    task = tasks.make_task(name, config, jax.random.key(0))
    p0 = [-1.0, -1.0] if name == "pendulum_corner" else [0.0, 0.0]
    np.testing.assert_array_equal(task.nominal, p0)
    x = task.splits["seen"].x

    def base_error(point):
        y = np.asarray(tasks._pendulum_system(x, jnp.broadcast_to(jnp.asarray(point), (x.shape[0], 2))))
        pred = np.asarray(tasks.PlainMLP(task.widths).apply({"params": task.base_params}, x))
        return float(np.mean((pred - y) ** 2)), float(np.mean((y - y.mean(axis=0)) ** 2))

    err, spread = base_error(p0)
    if name == "pendulum_corner":
        assert err < 0.5 * spread  # the base fits its (corner) nominal condition better than the mean ...
        assert base_error([1.0, 1.0])[0] > err  # ... and the far corner worse
    else:
        assert err > 0.3 * spread  # 5 pretraining steps: imperfect at its own nominal condition


def test_nuisance_dims_and_independent_draws():
    config = tiny.get_config()
    config.nuisance_dims, config.num_draws = 3, 2
    stacked = tasks.make_draws("planted_shared", config, jax.random.key(0))
    assert stacked.train.p.shape[-1] == 5 and stacked.nominal.shape == (2, 5)
    # the training conditions carry the same nuisance values in the train and seen splits
    np.testing.assert_array_equal(stacked.train.p, stacked.splits["seen"].p)
    # nuisance dims do not change the targets: the system sees p[:, :2] only
    one = tasks.draws(stacked, 0)
    teacher_free = tasks.make_task("planted_shared", tiny.get_config(), jax.random.fold_in(jax.random.key(0), 0))
    np.testing.assert_allclose(one.train.y, teacher_free.train.y, rtol=1e-6)
    # draws differ in the base, the held-out conditions and the inputs
    for leaf in (stacked.base_params["dense_0"]["kernel"], stacked.splits["interpolation"].p, stacked.train.x):
        assert not np.allclose(leaf[0], leaf[1])


# ------------------------------------------------------------------------------------------------ statistics


def test_draw_interval_is_a_t_interval_over_draw_means():
    errors = np.array([[0.5, 1.5], [2.0, 2.0], [2.5, 3.5]])  # draw means 1, 2, 3
    mean, half = stats.draw_interval(errors)
    assert mean == pytest.approx(2.0)
    assert half == pytest.approx(scipy.stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert math.isnan(stats.draw_interval(np.ones((1, 4)))[1])
    assert stats.median(errors) == pytest.approx(2.0)


def test_paired_ratio_and_log_interval():
    reference = np.array([[1.0, 2.0], [4.0, 8.0], [0.5, 0.25]])
    ratio = stats.paired_ratio(2.0 * reference, reference)  # exactly twice on every draw and seed
    assert ratio.estimate == pytest.approx(2.0) and ratio.low == pytest.approx(2.0) and ratio.high == pytest.approx(2.0)
    noisy = reference * np.array([[1.0, 4.0], [2.0, 2.0], [4.0, 1.0]])  # per-draw mean log ratio: log 2 each
    r = stats.paired_ratio(noisy, reference)
    assert r.estimate == pytest.approx(2.0) and r.low == pytest.approx(2.0)  # seed noise averages out per draw
    g = stats.log_interval(np.array([[1.0], [10.0], [100.0]]))
    half = scipy.stats.t.ppf(0.975, 2) * np.log(10.0) / math.sqrt(3)
    assert g.estimate == pytest.approx(10.0) and g.high == pytest.approx(10.0 * math.exp(half))


def test_choose_lr_ignores_diverged_runs():
    validation = np.array([[0.5, np.nan, 0.1], [0.5, 0.01, np.inf]])  # [seeds, lrs]
    assert train.choose_lr(validation) == 0


# ------------------------------------------------------------------------------------------------ methods


def test_film_branch_with_offset_zero_trains_its_gate_and_factors():
    """With Γ = B = 0 at init output-space FiLM at offset 0 would never move but its shift: Γ starts random."""
    config = tiny.get_config()
    task = tasks.make_task("planted_shared", config, jax.random.key(0))
    model = train.adapted_model(task, "film_branch0", config)
    params = train.init_params(model, task.base_params, task.train.x, task.train.p, jax.random.key(1))
    grads = jax.grad(lambda q: jnp.mean(train._mse_rows(model, q, task.train)))(params)
    assert float(jnp.abs(grads["dense_0"]["lora_b"]).max()) > 0
    np.testing.assert_allclose(model.apply({"params": params}, task.train.x, p=task.train.p),
                               tasks.PlainMLP(task.widths).apply({"params": task.base_params}, task.train.x),
                               atol=1e-6)  # fmt: skip


def test_wide_lora_matches_rss_budget():
    config = tiny.get_config()
    task = tasks.make_task("planted_shared", config, jax.random.key(0))
    r_wide = train.wide_rank(task, config)
    count = lambda m, r: train._shapes_count(train.adapted_model(task, m, config, r), task, m)  # noqa: E731
    assert count("lora", r_wide - 1) < count("rss", config.rank) <= count("lora", r_wide)


@pytest.mark.parametrize("method", ["lora_concat", "film_layer1", "hypernet3", "rss_affine"])
def test_layer_affine_recovers_each_method(method):
    """ΔW(p) and b(p) from probing a layer with I and 0 rebuild the layer's output at any x."""
    config = tiny.get_config()
    layer = adapters.inject(train._OneDense(5), method, "dense", 2, config.lora_alpha)
    x, p = jax.random.normal(jax.random.key(0), (4, 6)), jnp.array([0.3, -1.2])
    params = layer.init(jax.random.key(1), x, p=jnp.broadcast_to(p, (4, 2)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: jnp.asarray(0.5 * rng.standard_normal(v.shape), jnp.float32), params)
    kernel, bias = train.layer_affine(method, params["dense"], config, 2)(p)
    expected = layer.apply({"params": params}, x, p=jnp.broadcast_to(p, (4, 2)))
    np.testing.assert_allclose(x @ kernel + bias[None], expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ pipeline


@pytest.mark.slow  # 25-35 s: the whole pipeline; make test-slow runs it
def test_tiny_pipeline_end_to_end(tmp_path):
    config = tiny.get_config()
    summary = train.train_and_evaluate(config, tmp_path)
    text = (tmp_path / "report.md").read_text()
    for name in ("errors.png", "learning_curves.png"):
        assert (tmp_path / name).stat().st_size > 1000
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"] for r in lines if r["kind"] == "method"] == list(config.methods)
    by = {r["method"]: r for r in summary["results"]}
    for r in summary["results"]:
        for split in ("seen", "interpolation", "extrapolation"):
            errors = np.asarray(r["errors"][split])
            assert errors.shape == (config.num_draws, config.num_seeds) and np.isfinite(errors).all()
            assert r[split][0] == pytest.approx(errors.mean())
    assert np.allclose(by["frozen"]["errors"]["seen"], 1.0) and by["frozen"]["trainable"] == 0
    # every seed and draw of RSS keeps its updates inside one rank-r subspace (the algebra in DESIGN.md)
    for layer in by["rss"]["ranks"].values():
        assert max(np.ravel(layer["joint99"])) <= config.rank and max(np.ravel(layer["angle_out"])) < 1.0
    # the rebuilt (unprojected) FiLM network is the trained one
    np.testing.assert_allclose(by["film_branch0"]["rebuilt"]["interpolation"],
                               by["film_branch0"]["errors"]["interpolation"], rtol=1e-3)  # fmt: skip
    assert "Paired against `rss`" in text and "Causal projection test" in text and "joint 99%" in text
    # the report is a pure function of the metrics: re-rendering from metrics.jsonl gives the same tables
    assert report.tables(report.load_summary(tmp_path), config) == report.tables(summary, config)
    assert "seconds" not in text.lower() and (tmp_path / "timing.json").exists()
    # TensorBoard sees the same numbers (tensorboardX event files beside metrics.jsonl)
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    rss = by["rss"]
    assert scalars[f"method/{rss['task']}/rss/seen"] == [(0, pytest.approx(rss["seen"][0]))]


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under ``logdir``, read from their TFRecord framing with tensorboardX's proto."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
