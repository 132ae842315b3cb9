"""``train_and_evaluate(config, workdir)``: every method on every task, several seeds at once, and a report.

For each task and method: the frozen base is loaded into the method's network, the method's trainable leaves
are fitted with Adam (mini-batches, cosine schedule) for a fixed number of steps, for every seed and every
learning rate of the grid at once (one ``jax.vmap`` over (seed, lr) pairs inside one ``jax.jit``). The learning
rate is chosen per method by validation error at the training conditions (the same tuning budget for every
method); errors are reported for that learning rate as mean and 95% t-interval over seeds.

Errors are relative MSE: the MSE of the method divided by the MSE of the frozen base on the same rows (1.0 = no
better than not adapting). Outputs in ``workdir``: ``metrics.jsonl`` (one JSON object per task × method, and per
conditions-count run), the same numbers and each method's training-loss curve as TensorBoard event files in
``workdir/tensorboard`` (``tensorboard --logdir <workdir>``), ``report.md`` and PNG plots.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.stats
from flax import traverse_util
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

from experiments import report as report_lib
from experiments import transformer
from experiments.methods import count_trainable, make_layer, trainable_mask
from experiments.tasks import Split, Task, make_task


def init_params(task: Task, method: str, config: ml_collections.ConfigDict, key: jax.Array) -> Any:
    """The method's params with the task's frozen base loaded at the base's paths."""
    params = task.build(method, config).init(key, task.train.x[:2], task.train.p[:2])["params"]
    flat = traverse_util.flatten_dict(params)
    base = traverse_util.flatten_dict(task.base_params["params"])
    missing = set(base) - set(flat)
    if missing:
        raise ValueError(f"{method} on {task.name} has no leaves {sorted(missing)} of the base network.")
    return traverse_util.unflatten_dict({**flat, **base})


def _mse_rows(model: Any, params: Any, split: Split) -> jax.Array:
    """Per-row squared error, averaged over all output axes."""
    err = (model.apply({"params": params}, split.x, split.p) - split.y) ** 2
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def make_trainer(task: Task, method: str, config: ml_collections.ConfigDict):
    """The model and a jit-compiled ``(params [R, ...], lrs [R], keys [R], train) -> (params, losses)`` for R runs.

    The data is an argument, not a closed-over constant, so XLA neither embeds nor constant-folds it."""
    model = task.build(method, config)
    train = task.train
    n = train.x.shape[0]
    batch = min(config.batch_size, n)

    def one_run(params, lr, key, train):
        labels = jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask(params, method))
        schedule = optax.cosine_decay_schedule(1.0, config.steps)
        tx = optax.partition(
            {"train": optax.chain(optax.adam(1.0), optax.scale_by_schedule(lambda s: lr * schedule(s))),
             "freeze": optax.set_to_zero()},
            labels,
        )  # fmt: skip

        def step(carry, step_key):
            params, state = carry
            idx = jax.random.choice(step_key, n, (batch,), replace=False)
            rows = Split(train.x[idx], train.p[idx], train.y[idx], train.distance[idx])
            loss, grads = jax.value_and_grad(lambda q: jnp.mean(_mse_rows(model, q, rows)))(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, config.steps))
        return params, losses

    return model, jax.jit(jax.vmap(one_run, in_axes=(0, 0, 0, None)))


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval over the first axis."""
    values = np.asarray(values, np.float64)
    if values.shape[0] < 2:
        return float(values.mean()), float("nan")
    half = scipy.stats.t.ppf(0.975, values.shape[0] - 1) * values.std(ddof=1) / math.sqrt(values.shape[0])
    return float(values.mean()), float(half)


def effective_rank(matrix: np.ndarray, energy: float = 0.99, reference_norm: float = 1.0) -> int:
    """Number of singular values holding ``energy`` of the squared Frobenius norm.

    A matrix whose norm is below ``1e-5 * reference_norm`` (float32 round-off of the reference) has rank 0.
    """
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    total = float((s**2).sum())
    if math.sqrt(total) <= 1e-5 * reference_norm:
        return 0
    return int(np.searchsorted(np.cumsum(s**2) / total, energy) + 1)


def update_ranks(task: Task, method: str, params: Any, config: ml_collections.ConfigDict) -> dict[str, float]:
    """Effective rank of the first layer's update ΔW(p) (its action on x, minus the base kernel) over the sweep.

    Every method's layer is affine in ``x`` at fixed ``p``, so ``ΔW(p) = f(I, p) - f(0, p) - W`` with ``W`` the
    frozen base kernel (full fine-tuning's change of the kernel counts as its update). Reports the
    median rank of a single ΔW(p), and the rank of all ΔW(p) stacked along the output axis (their common
    input-space span) and along the input axis (their output-space span).
    """
    conditions = np.unique(np.asarray(task.sweep.p), axis=0)
    if task.name == "transformer":
        deltas = np.asarray(jax.vmap(lambda p: transformer.first_update(params, p, method, config))(conditions))
        norm = float(np.linalg.norm(transformer.first_base_kernel(task.base_params["params"])))
        return _ranks(deltas, norm)
    first = params["dense_0"]
    base_kernel = task.base_params["params"]["dense_0"]["kernel"]
    d_in = base_kernel.shape[0]
    layer = make_layer(method, first["kernel"].shape[1], config.rank, config.lora_alpha, config.hyper_hidden)
    eye = jnp.eye(d_in)

    def delta(p):
        rows = jnp.broadcast_to(p, (d_in, p.shape[-1]))
        on = layer.apply({"params": first}, eye, rows)
        off = layer.apply({"params": first}, jnp.zeros_like(eye), rows)
        return on - off - base_kernel

    deltas = np.asarray(jax.jit(jax.vmap(delta))(jnp.asarray(conditions)))  # [K, d_in, d_out]
    return _ranks(deltas, float(np.linalg.norm(base_kernel)))


def _ranks(deltas: np.ndarray, norm: float) -> dict[str, float]:
    """Median single-p rank and the ranks of the updates stacked along each axis."""
    return {
        "rank_single": float(np.median([effective_rank(d, reference_norm=norm) for d in deltas])),
        "rank_stacked_in": effective_rank(np.concatenate(list(deltas), axis=1), reference_norm=norm),
        "rank_stacked_out": effective_rank(np.concatenate(list(deltas), axis=0), reference_norm=norm),
    }


def run_method(task: Task, method: str, config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, Any]:
    """Train ``method`` on ``task`` for every seed × learning rate; evaluate at the validation-chosen lr."""
    lrs = np.asarray(config.learning_rates, np.float32)
    seeds = config.num_seeds
    k_init, k_train = jax.random.split(key)
    model, trainer = make_trainer(task, method, config)
    # Seeds vary the adapter initialisation and the mini-batch order; every lr gets the same seeds.
    inits = jax.jit(jax.vmap(lambda k: init_params(task, method, config, k)))(jax.random.split(k_init, seeds))
    pair_params = jax.tree.map(lambda t: jnp.repeat(t, len(lrs), axis=0), inits)
    pair_lrs = jnp.tile(jnp.asarray(lrs), seeds)
    pair_keys = jnp.repeat(jax.random.split(k_train, seeds), len(lrs), axis=0)
    compiled = trainer.lower(pair_params, pair_lrs, pair_keys, task.train).compile()
    start = time.perf_counter()
    trained, losses = jax.block_until_ready(compiled(pair_params, pair_lrs, pair_keys, task.train))
    seconds = time.perf_counter() - start

    base_model = task.build("frozen", config)
    base_params = task.base_params["params"]

    @jax.jit
    def evaluate_all(trained, splits):
        errors = {name: jax.vmap(lambda q, s=s: _mse_rows(model, q, s))(trained) for name, s in splits.items()}
        bases = {name: _mse_rows(base_model, base_params, s) for name, s in splits.items()}
        return errors, bases

    errors, base_rows = jax.tree.map(
        np.asarray, evaluate_all(trained, {**task.splits, "sweep": task.sweep})
    )  # [pairs, rows]

    def relative(split_name: str, rows_mask: np.ndarray | None = None) -> np.ndarray:
        err = errors[split_name]
        base = base_rows[split_name]
        if rows_mask is not None:
            err, base = err[:, rows_mask], base[rows_mask]
        return (err.mean(axis=1) / base.mean()).reshape(seeds, len(lrs))

    validation = relative("validation").mean(axis=0)
    best = (
        int(np.nanargmin(np.where(np.isfinite(validation), validation, np.nan))) if np.isfinite(validation).any() else 0
    )
    chosen = jax.tree.map(lambda t: t.reshape(seeds, len(lrs), *t.shape[1:])[:, best], trained)
    # The mean training loss over seeds at the chosen lr, per step: for TensorBoard only (not in metrics.jsonl).
    loss_curve = np.asarray(losses).reshape(seeds, len(lrs), -1)[:, best].mean(axis=0)

    result: dict[str, Any] = {
        "task": task.name,
        "method": method,
        "trainable": count_trainable(jax.tree.map(lambda t: t[0], inits), method),
        "lr": float(lrs[best]),
        "validation_by_lr": [float(v) for v in validation],
        "train_ms_per_step": 1e3 * seconds / (config.steps * seeds * len(lrs)),
    }
    for split in ("seen", "interpolation", "extrapolation"):
        result[split] = mean_ci(relative(split)[:, best])
    distance = np.asarray(task.splits["extrapolation"].distance)
    edges = np.asarray(config.distance_bins)
    result["extrapolation_by_distance"] = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        rows = (distance > lo) & (distance <= hi)
        if rows.any():
            result["extrapolation_by_distance"].append(
                [float(lo), float(hi), *mean_ci(relative("extrapolation", rows)[:, best])]
            )
    sweep_err = errors["sweep"].reshape(seeds, len(lrs), -1)[:, best]  # [seeds, rows]
    sweep_base = base_rows["sweep"]
    conditions, inverse = np.unique(np.asarray(task.sweep.p), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    result["sweep_name"] = task.p_names[0]
    result["sweep_p"] = [float(c) for c in np.asarray(task.p_physical(jnp.asarray(conditions)))[:, 0]]
    result["sweep_error"] = [float(sweep_err[:, inverse == i].mean()) for i in range(len(conditions))]
    result["sweep_base"] = [float(sweep_base[inverse == i].mean()) for i in range(len(conditions))]
    result["sweep_in_range"] = [bool(abs(c[0]) <= 1.0) for c in conditions]
    first_seed = jax.tree.map(lambda t: t[0], chosen)
    result.update(update_ranks(task, method, first_seed, config))
    result["_loss_curve"] = [float(v) for v in loss_curve]
    return result


def write_scalars(writer: SummaryWriter, row: dict[str, Any], steps: int) -> None:
    """One metrics.jsonl row as TensorBoard scalars: ``<task>/<metric>/<method>``, so methods share a chart."""
    task, method = row["task"], row["method"]
    for step, loss in enumerate(row.get("_loss_curve", [])):
        writer.add_scalar(f"{task}/train_loss/{method}", loss, step)
    for split in ("seen", "interpolation", "extrapolation"):
        if split not in row:
            continue
        if row.get("kind") == "conditions":  # error vs number of training conditions
            writer.add_scalar(f"{task}/{split}_vs_conditions/{method}", row[split][0], row["conditions"])
        else:  # the final relative error (mean over seeds), at the last training step
            writer.add_scalar(f"{task}/{split}/{method}", row[split][0], steps)
    if "train_ms_per_step" in row:
        writer.add_scalar(f"{task}/train_ms_per_step/{method}", row["train_ms_per_step"], steps)


def conditions_sweep(config: ml_collections.ConfigDict, lrs: dict[str, float], key: jax.Array) -> list[dict[str, Any]]:
    """Relative error on held-out conditions as the number of training conditions grows."""
    rows = []
    for grid in config.conditions_grids:
        sub = ml_collections.ConfigDict(config.to_dict())
        sub.train_grid = grid
        task = make_task(config.conditions_task, sub, key)
        for method in config.conditions_methods:
            sub.learning_rates = [lrs.get(method, config.learning_rates[0])]
            result = run_method(task, method, sub, jax.random.fold_in(key, grid))
            rows.append({
                "kind": "conditions", "task": task.name, "method": method, "conditions": grid ** sub.d_p,
                "interpolation": result["interpolation"], "extrapolation": result["extrapolation"],
            })  # fmt: skip
    return rows


def methods_for(task_name: str, config: ml_collections.ConfigDict) -> list[str]:
    """The configured methods a task runs (the transformer task runs the injectable ones)."""
    if task_name == "transformer":
        return [m for m in config.methods if m in config.transformer_methods]
    return list(config.methods)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run every method on every task of ``config``; write metrics, report and plots to ``workdir``."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(config.seed)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    metrics = open(workdir / "metrics.jsonl", "w")
    plan = [(name, methods_for(name, config)) for name in config.tasks]
    with (
        metrics,
        SummaryWriter(str(workdir / "tensorboard")) as board,
        tqdm(total=sum(len(m) for _, m in plan), desc="task x method", disable=not config.progress) as bar,
    ):
        for t, (task_name, task_methods) in enumerate(plan):
            bar.set_postfix_str(f"{task_name}: building data")
            task = make_task(task_name, config, jax.random.fold_in(key, t))
            for m, method in enumerate(task_methods):
                bar.set_postfix_str(f"{task_name}: {method}")
                result = run_method(task, method, config, jax.random.fold_in(key, 1000 * t + m))
                write_scalars(board, result, config.steps)
                result.pop("_loss_curve")
                results.append(result)
                metrics.write(json.dumps({"kind": "method", **result}) + "\n")
                metrics.flush()
                bar.update()
        conditions: list[dict[str, Any]] = []
        if config.conditions_grids:
            lrs = {r["method"]: r["lr"] for r in results if r["task"] == config.conditions_task}
            conditions = conditions_sweep(config, lrs, jax.random.fold_in(key, 99))
            for row in conditions:
                metrics.write(json.dumps(row) + "\n")
                write_scalars(board, row, config.steps)
    summary = {"results": results, "conditions": conditions, "seconds": time.perf_counter() - start}
    report_lib.write(summary, config, workdir)
    return summary
