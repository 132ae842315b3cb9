"""Experiments: data generators against known solutions, each method's forward against its formula, the pipeline."""

import json
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from experiments import methods, pde, tasks, train

# ------------------------------------------------------------------------------------------------ generators


@pytest.mark.parametrize("nu,a", [(0.1, 1.2), (0.2, 1.1), (0.05, 1.5)])
def test_burgers_matches_cole_hopf(nu, a):
    x = pde.grid(64)
    u = pde.burgers(pde.cole_hopf(x, 0.0, nu, a), nu, jnp.zeros(64), 1.0, 200)
    exact = np.asarray(pde.cole_hopf(x, 1.0, nu, a), np.float64)
    assert np.abs(exact).max() > 0.05  # not a trivially small solution
    np.testing.assert_allclose(u, exact, atol=2e-5 * np.abs(exact).max() + 1e-6)


def test_burgers_conserves_mean_with_zero_mean_forcing():
    x = pde.grid(64)
    u0 = pde.random_initial_conditions(jax.random.key(0), 4, 64) + 0.3
    u = jax.vmap(lambda u: pde.burgers(u, 0.05, 0.4 * jnp.sin(x), 1.0, 100))(u0)
    np.testing.assert_allclose(u.mean(axis=-1), u0.mean(axis=-1), atol=1e-5)
    assert float(jnp.abs(u - u0).max()) > 0.1  # and the field did evolve


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


def test_planted_teachers_have_the_stated_rank_structure():
    config = tiny.get_config()
    config.d_in, config.hidden, config.teacher_rank = 12, 20, 3
    p_grid = jax.random.normal(jax.random.key(1), (10, config.d_p))
    for moving, stacked_more in ((False, False), (True, True)):
        teacher = tasks.planted_teacher(config, jax.random.key(0), moving)
        deltas = np.asarray(jax.vmap(tasks.planted_update, in_axes=(None, 0))(teacher, p_grid), np.float64)
        assert max(np.linalg.matrix_rank(d, tol=1e-5) for d in deltas) == 3
        stacked = np.linalg.matrix_rank(np.concatenate(list(deltas), axis=1), tol=1e-4)
        assert (stacked > 3) == stacked_more, stacked
        # at p = 0 the teacher is its nominal network
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


# ------------------------------------------------------------------------------------------------ methods


def _np(tree):
    return jax.tree.map(lambda t: np.asarray(t, np.float64), tree)


def reference_forward(method, q, x, p, rank, alpha, d_out):
    """Each method's formula in float64 numpy (kernel convention, per-example p)."""
    x, p = np.asarray(x, np.float64), np.asarray(p, np.float64)
    base = x @ q["kernel"] + q["bias"]
    scale = alpha / rank
    if method == "frozen":
        return base
    if method == "full_ft":
        return base + p @ q["cond_v"]
    if method in ("lora", "lora_wide"):
        return base + scale * x @ q["lora_a"] @ q["lora_b"]
    if method == "lora_concat":
        return base + scale * np.concatenate([x, p], -1) @ q["lora_a"] @ q["lora_b"]
    if method in ("film_branch", "film_layer"):
        gamma, beta = p @ q["film_gamma"], p @ q["film_beta"]
        branch = scale * x @ q["lora_a"] @ q["lora_b"]
        if method == "film_branch":
            return base + (1 + gamma) * branch + beta
        return (1 + gamma) * (base + branch) + beta
    if method == "hypernet":
        out = []
        for xi, pi in zip(x, p, strict=True):
            z = np.tanh(pi @ q["hyper_p"])
            a = q["lora_a"] + (z @ q["hyper_a"]).reshape(q["lora_a"].shape)
            b = q["lora_b"] + (z @ q["hyper_b"]).reshape(q["lora_b"].shape)
            out.append(scale * xi @ a @ b)
        return base + np.stack(out)
    offset = 1.0 if method in ("rss_one_plus", "rss_shift_only") else 0.0
    c = np.zeros_like(q["lora_c"]) if method == "rss_shift_only" else q["lora_c"]
    s = np.zeros_like(q["lora_s"]) if method == "rss_gate_only" else q["lora_s"]
    return base + scale * (((x @ q["lora_a"]) * (offset + p @ c) + p @ s) @ q["lora_b"])


@pytest.mark.parametrize("method", methods.METHODS)
def test_each_method_matches_its_formula(method):
    d_in, d_out, d_p, rank, alpha = 6, 5, 3, 2, 3.0
    layer = methods.make_layer(method, d_out, rank, alpha, hyper_hidden=2)
    x = jax.random.normal(jax.random.key(0), (7, d_in))
    p = jax.random.normal(jax.random.key(1), (7, d_p))
    params = layer.init(jax.random.key(2), x, p)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree.unflatten(treedef, [jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)])
    mask = methods.trainable_mask(params, method)
    # ablations keep their frozen factor at its (zero) initial value during training
    if method == "rss_gate_only":
        params = {**params, "lora_s": jnp.zeros_like(params["lora_s"])}
    if method == "rss_shift_only":
        params = {**params, "lora_c": jnp.zeros_like(params["lora_c"])}
    y = layer.apply({"params": params}, x, p)
    expected = reference_forward(method, _np(params), x, p, rank, alpha, d_out)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    trained = {k for k, v in mask.items() if v}
    expected_trained = {
        "frozen": set(),
        "full_ft": set(params),
        "rss_gate_only": {"lora_a", "lora_b", "lora_c"},
        "rss_shift_only": {"lora_a", "lora_b", "lora_s"},
    }.get(method, {k for k in params if k not in ("kernel", "bias")})
    assert trained == expected_trained


def test_default_init_of_every_method_equals_the_base():
    x = jax.random.normal(jax.random.key(0), (4, 6))
    p = jax.random.normal(jax.random.key(1), (4, 2))
    for method in methods.METHODS:
        layer = methods.make_layer(method, 5, 2, 4.0)
        params = layer.init(jax.random.key(2), x, p)["params"]
        base = np.asarray(x) @ np.asarray(params["kernel"]) + np.asarray(params["bias"])
        np.testing.assert_allclose(layer.apply({"params": params}, x, p), base, rtol=1e-5, atol=1e-5, err_msg=method)


def test_wide_lora_matches_rss_budget():
    for d_in, d_out, d_p, rank in [(8, 64, 2, 4), (64, 64, 2, 4), (64, 16, 8, 8)]:
        r_wide = methods.wide_rank(rank, d_in, d_out, d_p)
        rss = rank * (d_in + d_out) + 2 * rank * d_p
        assert rss <= r_wide * (d_in + d_out) < rss + d_in + d_out


def test_effective_rank():
    rng = np.random.default_rng(0)
    low = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 30))
    assert train.effective_rank(low) == 3
    assert train.effective_rank(np.zeros((5, 5))) == 0
    assert train.effective_rank(np.eye(7)) == 7


# ------------------------------------------------------------------------------------------------ pipeline


def test_tiny_pipeline_end_to_end(tmp_path):
    config = tiny.get_config()
    config.tasks = ["planted_shared"]
    config.methods = ["frozen", "lora", "rss"]
    summary = train.train_and_evaluate(config, tmp_path)
    report = (tmp_path / "report.md").read_text()
    for name in ("error_vs_p_planted_shared.png", "effective_rank.png", "error_vs_conditions.png"):
        assert (tmp_path / name).stat().st_size > 1000
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"] for r in lines if r["kind"] == "method"] == ["frozen", "lora", "rss"]
    for r in summary["results"]:
        for split in ("seen", "interpolation", "extrapolation"):
            assert all(math.isfinite(v) for v in r[split]), r
            assert f"{r[split][0]:.3g}" in report
        assert all(math.isfinite(v) for v in r["sweep_error"])
    frozen = summary["results"][0]
    assert frozen["seen"][0] == pytest.approx(1.0) and frozen["trainable"] == 0 and frozen["rank_single"] == 0
    rss = summary["results"][2]
    assert rss["rank_stacked_in"] <= config.rank and rss["rank_stacked_out"] <= config.rank
    # TensorBoard sees the same numbers, and each method's training-loss curve; metrics.jsonl stays compact.
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["planted_shared/seen/rss"] == [(config.steps, pytest.approx(rss["seen"][0]))]
    assert len(scalars["planted_shared/train_loss/rss"]) == config.steps
    assert "_loss_curve" not in lines[0]


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


def test_transformer_task_injects_into_the_unmodified_model():
    from experiments import transformer

    config = tiny.get_config()
    config.steps = 10
    task = tasks.make_task("transformer", config, jax.random.key(0))
    x, p = task.train.x[:3], task.train.p[:3]
    base = task.build("frozen", config)
    y_base = base.apply(task.base_params, x, p)
    for method in transformer.INJECTABLE[1:]:
        params = train.init_params(task, method, config, jax.random.key(1))
        # the base loads at the unmodified model's paths; B = 0 at init reproduces it exactly
        np.testing.assert_array_equal(task.build(method, config).apply({"params": params}, x, p), y_base)
        mask = methods.trainable_mask(params, method)
        query = mask["block_0"]["attention"]["query"]
        assert not query["kernel"] and query["lora_a"] and query["lora_b"]
        assert query["lora_c"] == (method in ("rss", "rss_one_plus", "rss_gate_only"))
    # ΔW(p) of injected LoRA is alpha/r * A B for every p (gate 1 + C p with C = 0)
    params = train.init_params(task, "lora", config, jax.random.key(2))
    q = params["block_0"]["attention"]["query"]
    q["lora_b"] = jax.random.normal(jax.random.key(3), q["lora_b"].shape)
    a, b = np.asarray(q["lora_a"], np.float64), np.asarray(q["lora_b"], np.float64).reshape(config.rank, -1)
    for point in (jnp.zeros(2), jnp.array([1.5, -2.0])):
        delta = transformer.first_update(params, point, "lora", config)
        np.testing.assert_allclose(delta, config.lora_alpha / config.rank * a @ b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not injectable"):
        task.build("film_branch", config)
    result = train.run_method(task, "rss", config, jax.random.key(4))
    assert all(math.isfinite(v) for v in result["interpolation"]) and result["rank_stacked_in"] <= config.rank


@pytest.mark.parametrize("name", ["pendulum", "burgers"])
def test_physical_tasks_pretrain_a_base_at_the_nominal_condition(name):
    config = tiny.get_config()
    config.pretrain_steps = 300
    task = tasks.make_task(name, config, jax.random.key(0))
    assert task.train.p.shape == (task.train.x.shape[0], 2) and float(jnp.abs(task.train.p).max()) == 1.0
    rows = np.all(np.abs(np.asarray(task.sweep.p)) < 1e-6, axis=-1)  # the sweep passes through p = 0
    assert rows.sum() == config.sweep_points
    x, p, y = (np.asarray(a)[rows] for a in (task.sweep.x, task.sweep.p, task.sweep.y))
    pred = np.asarray(task.build("frozen", config).apply(task.base_params, x, p))
    # the frozen base (16 wide, 300 steps on 64 samples here) fits the system at p = 0 better than the mean
    assert np.mean((pred - y) ** 2) < 0.5 * np.mean((y - y.mean(axis=0)) ** 2)
