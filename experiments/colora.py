r"""CoLoRA's parameterised-PDE results on CoLoRA's data, with a model built from rssbl_jax, and the comparison.

``train_and_evaluate(config, workdir)`` trains every method of ``config.methods`` (:mod:`experiments.colora_model`)
on the trajectories of ``config.train_mus``, ``config.num_seeds`` seeds at once (one ``jax.vmap``), and reports the
test mean relative L2 error of CoLoRA's notebooks,

.. math::

    e = \frac{1}{|M_{test}|} \sum_{\mu \in M_{test}} \frac{\lVert u_\mu - \hat u_\mu \rVert_2}{\lVert u_\mu \rVert_2}

(norms over every quantity, time and grid point of the trajectory), per held-out ``μ`` too, with a 95% interval over
seeds (the data and split are CoLoRA's, fixed: seeds vary the initialisation and the batches). The loss is CoLoRA's,
the mean over snapshots of the relative L2 error over the points, on ``snapshots_per_step`` snapshots and
``points_per_step`` random grid points per step (0: every point, as CoLoRA). Adam with cosine decay to 0 (CoLoRA's
``adam_opt``). ``split="extrapolation"`` trains without the largest training ``μ`` and tests on it.

Command line (writes ``report.md``, ``report.json`` and ``curve.png`` into ``config.workdir``)::

    python -m experiments.colora --config configs/colora_vlasov.py
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import rssbl_jax
from experiments import colora_data, colora_model, stats


def split_mus(config: ml_collections.ConfigDict) -> tuple[list[float], list[float]]:
    """``(train, test)`` physics parameters: CoLoRA's split, or the extrapolation split (largest ``μ`` held out)."""
    train, test = [float(m) for m in config.train_mus], [float(m) for m in config.test_mus]
    if config.split == "paper":
        return train, test
    if config.split == "extrapolation":
        largest = max(train + test)
        return [m for m in train if m != largest], [largest]
    raise ValueError(f"config.split must be 'paper' or 'extrapolation'; got {config.split!r}.")


def data_dir(config: ml_collections.ConfigDict) -> pathlib.Path:
    """``config.data_dir`` (or ``$COLORA_DATA_DIR``) joined with ``config.dataset``."""
    root = config.data_dir or os.environ.get("COLORA_DATA_DIR", "")
    if not root:
        raise ValueError("set config.data_dir or $COLORA_DATA_DIR to the directory holding CoLoRA's data folders.")
    return pathlib.Path(root) / config.dataset


def relative_errors(model: colora_model.Model, params: Any, x: jax.Array, y: jax.Array, mu_t: jax.Array,
                    n_traj: int, chunk: int) -> jax.Array:  # fmt: skip
    """Per-trajectory relative L2 errors ``[n_traj]`` of one seed's ``params`` on rows ``y [(n_traj T), N, Q]``."""
    n = y.shape[0]
    pad = -n % chunk
    ys = jnp.concatenate([y, jnp.zeros((pad, *y.shape[1:]), y.dtype)]).reshape(-1, chunk, *y.shape[1:])
    ps = jnp.concatenate([mu_t, jnp.repeat(mu_t[-1:], pad, 0)]).reshape(-1, chunk, mu_t.shape[-1])

    def sq(args):
        yc, pc = args
        pred = model.apply(params, jnp.broadcast_to(x, (chunk, *x.shape)), pc)
        return jnp.sum((yc - pred) ** 2, axis=(1, 2)), jnp.sum(yc**2, axis=(1, 2))

    num, den = jax.lax.map(sq, (ys, ps))
    num, den = num.reshape(-1)[:n].reshape(n_traj, -1), den.reshape(-1)[:n].reshape(n_traj, -1)
    return jnp.sqrt(num.sum(1) / den.sum(1))


def point_sampler(grid_shape: tuple[int, ...], per_step: int, stride: int):
    """``key -> indices`` of the grid points one step trains on.

    ``stride > 0``: the sub-grid of every ``stride``-th point along each axis, at a random offset per step (it
    covers a localised field as the full grid does); else ``per_step`` points at random (0: every point, CoLoRA's).
    """
    n_pts = int(np.prod(grid_shape))
    if stride > 0:
        sizes = [n // stride for n in grid_shape]

        def strided(key):
            offsets = jax.random.randint(key, (len(grid_shape),), 0, stride)
            axes = [offsets[i] + stride * jnp.arange(sizes[i]) for i in range(len(grid_shape))]
            mesh = jnp.meshgrid(*axes, indexing="ij")
            return jnp.ravel_multi_index(tuple(m.reshape(-1) for m in mesh), grid_shape, mode="clip")

        return strided
    if per_step:
        return lambda key: jax.random.choice(key, n_pts, (per_step,), replace=False)
    return lambda key: jnp.arange(n_pts)


def train_method(method: str, config: ml_collections.ConfigDict, arrays: dict[str, Any], log=print) -> dict[str, Any]:
    """Train ``method`` for ``config.num_seeds`` seeds at once; its errors, curve, count and wall times."""
    y_tr, mt_tr, y_te, mt_te, x = (arrays[k] for k in ("y_train", "mu_t_train", "y_test", "mu_t_test", "x"))
    n_test = arrays["n_test"]
    model = colora_model.build(
        method, n_layers=config.n_layers, width=config.width, out_dim=y_tr.shape[-1], rank=config.rank,
        period=arrays["period"], p_mean=arrays["p_mean"], p_std=arrays["p_std"],
        adapted_layers=config.adapted_layers, trunk_width=config.trunk_width, hypernet_rank=config.hypernet_rank,
    )  # fmt: skip
    seeds = jax.random.split(jax.random.key(config.seed), config.num_seeds)
    init_keys, train_keys = jax.vmap(jax.random.split, out_axes=1)(seeds)
    params = jax.jit(jax.vmap(lambda k: model.init(k, x[None, :4], mt_tr[:1])))(init_keys)
    n_params = colora_model.count(jax.tree.map(lambda v: v[0], params))
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps, alpha=0.0)
    optimizer = optax.adam(schedule)
    everything = jax.tree.map(lambda _: True, jax.tree.map(lambda v: v[0], params))  # CoLoRA trains W, A, B too
    states = rssbl_jax.init_runs(params, optimizer, seeds, trainable=everything)
    n_snap, n_pts = y_tr.shape[0], x.shape[0]
    s_batch = min(config.snapshots_per_step, n_snap)
    points = point_sampler(arrays["grid_shape"], config.points_per_step, config.points_stride)
    p_batch = points(jax.random.key(0)).shape[0]

    def loss_fn(p, key):
        k1, k2 = jax.random.split(key)
        rows = jax.random.choice(k1, n_snap, (s_batch,), replace=False)
        pts = points(k2)
        target = y_tr[rows][:, pts]
        pred = model.apply(p, jnp.broadcast_to(x[pts], (s_batch, p_batch, x.shape[1])), mt_tr[rows])
        return jnp.mean(jnp.linalg.norm(target - pred, axis=(1, 2)) / jnp.linalg.norm(target, axis=(1, 2)))

    # the library's step (no per-step checks) vmapped over the runs, each step's batch drawn from the key it is given
    train_step = rssbl_jax.make_train_step(lambda p, key, rng: loss_fn(p, key), optimizer, check_finite=False)
    step = rssbl_jax.vmap_train_step(train_step)

    every = max(1, config.steps // config.curve_points)

    @jax.jit
    def chunk(states, keys):  # keys [seeds, every]
        states, metrics = jax.lax.scan(step, states, keys.swapaxes(0, 1))
        return states, metrics["loss"].T.mean(axis=1)

    rng = np.random.default_rng(config.seed)
    sub = jnp.asarray(np.sort(rng.choice(n_pts, min(config.curve_eval_points, n_pts), replace=False)))
    full_eval = jax.jit(jax.vmap(lambda p: relative_errors(model, p, x, y_te, mt_te, n_test, config.eval_chunk)))
    curve_eval = full_eval  # every point: one compiled evaluation serves both
    if config.curve_eval_points < n_pts:
        curve_eval = jax.jit(jax.vmap(lambda p: relative_errors(model, p, x[sub], y_te[:, sub], mt_te, n_test,
                                                                config.eval_chunk)))  # fmt: skip
    curve, done, train_seconds, compile_seconds = [], 0, 0.0, 0.0
    all_keys = jax.vmap(lambda k: jax.random.split(k, config.steps))(train_keys)
    while done < config.steps:
        n = min(every, config.steps - done)
        start = time.perf_counter()
        states, losses = chunk(states, all_keys[:, done : done + n])
        params = rssbl_jax.combine(states.trainable, states.frozen)
        losses = np.asarray(losses)
        elapsed = time.perf_counter() - start
        if done == 0:  # the first chunk compiles; time a second copy of its steps' cost from the rest
            compile_seconds = elapsed
        else:
            train_seconds += elapsed
        done += n
        test = np.asarray(curve_eval(params)).mean(axis=1)
        curve.append({"step": done, "train_loss": losses.tolist(), "test_error_subsample": test.tolist()})
        log(f"{method:18s} step {done:6d}  train {np.mean(losses):.3e}  test(sub) {np.mean(test):.3e}")
    timed_steps = config.steps - min(every, config.steps)
    per_mu = np.asarray(full_eval(params))  # [seeds, n_test]
    return {
        "method": method,
        "parameters": n_params,
        "per_mu": per_mu.tolist(),
        "errors": per_mu.mean(axis=1).tolist(),
        "curve": curve,
        "seconds_per_step": (train_seconds / timed_steps) if timed_steps else compile_seconds / config.steps,
        "first_chunk_seconds": compile_seconds,
        "train_seconds": train_seconds + compile_seconds,
    }


def prepare(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The data, split and normalisation of ``config`` as device arrays (plus the files' SHA-256)."""
    data = colora_data.load_dir(data_dir(config))
    train_mus, test_mus = split_mus(config)
    y_tr, mt_tr = colora_data.snapshots(data, train_mus)
    y_te, mt_te = colora_data.snapshots(data, test_mus)
    return {
        "y_train": jnp.asarray(y_tr), "mu_t_train": jnp.asarray(mt_tr), "y_test": jnp.asarray(y_te),
        "mu_t_test": jnp.asarray(mt_te), "x": jnp.asarray(colora_data.grid(data)), "n_test": len(test_mus),
        "grid_shape": tuple(len(a) for a in data.axes),
        "p_mean": mt_tr.mean(axis=0).tolist(), "p_std": mt_tr.std(axis=0).tolist(), "period": data.period,
        "train_mus": train_mus, "test_mus": test_mus, "sha256": data.sha256, "shape": list(data.u.shape),
    }  # fmt: skip


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict[str, Any]:
    """Train every method of ``config``, write ``report.json``, ``report.md`` and ``curve.png`` into ``workdir``."""
    from experiments import colora_report

    workdir = pathlib.Path(workdir or config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    arrays = prepare(config)
    log_file = open(workdir / "train.log", "a")  # noqa: SIM115 (closed below)

    def log(line):
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    given = (config.methods,) if isinstance(config.methods, str) else config.methods
    methods = [m for item in given for m in item.split(",")]  # --config.methods=colora,rss_linear
    results = [train_method(m, config, arrays, log) for m in methods]
    log_file.close()
    summary = {
        "config": config.to_dict(),
        "data": {k: arrays[k] for k in ("train_mus", "test_mus", "sha256", "shape", "p_mean", "p_std", "period")},
        "methods": results,
        "seconds": time.perf_counter() - start,
        "device": jax.devices()[0].device_kind,
    }
    (workdir / "report.json").write_text(json.dumps(summary, indent=1, default=float))
    colora_report.write(summary, workdir)
    return summary


def interval(errors: list[float]) -> stats.Interval:
    """Geometric mean over seeds with its 95% t-interval (initialisations are the units; the data draw is fixed)."""
    return stats.log_interval(np.asarray(errors, np.float64)[:, None])


def main(argv: list[str]) -> None:
    del argv
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value or None)
    print(f"report: {_WORKDIR.value or _CONFIG.value.workdir}/report.md ({summary['seconds']:.0f} s)")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", "configs/colora_vlasov.py", "A config with get_config().")
    _WORKDIR = flags.DEFINE_string("workdir", "", "Where the report goes (default: config.workdir).")
    app.run(main)
