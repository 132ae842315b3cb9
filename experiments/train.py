"""``train_and_evaluate(config, workdir)``: every method injected into the same frozen MLP, over data draws × seeds.

Protocol (the same for every method):

1. **Tuning.** On data draw 0, ``tune_seeds`` seeds × every learning rate of ``learning_rates`` are trained at once
   (one ``jax.jit`` of a ``jax.vmap``); the learning rate with the lowest geometric-mean validation error (fresh
   inputs at the training conditions, never a reported split) is chosen. A choice at either end of the grid is
   flagged in the report.
2. **Evaluation.** ``num_draws`` independent data draws (teacher or pretrained base, held-out conditions, all
   inputs) × ``num_seeds`` seeds (adapter initialisation, batch order) are trained at the chosen learning rate, one
   ``vmap`` over draws of a ``vmap`` over seeds. Errors are relative MSE (the method's MSE over the frozen base's
   on the same rows). Intervals run over the draws (:mod:`experiments.stats`).
3. **What was learned.** For every adapted layer, draw and seed: ``ΔW(p)`` over a 2-D grid of ``p``, its joint
   effective rank at 90% and 99% energy (:mod:`rssbl_jax.analysis`), principal angles between its subspaces at the
   four corners of the range, and for the ``projection_methods`` the causal test: every layer's ``ΔW(p)`` projected
   onto its own top-``r`` joint subspace, the network evaluated again.

Every method is an injectable adapter (:mod:`experiments.adapters`) on every ``nn.Dense`` of the unmodified
:class:`experiments.tasks.PlainMLP`. Outputs in ``workdir``: ``metrics.jsonl``, ``report.md`` (deterministic on
CPU), ``timing.json`` (wall times, not deterministic) and PNG plots.
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
from flax import linen as nn
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

import rssbl_jax
from experiments import adapters, stats
from experiments import report as report_lib
from experiments.tasks import PlainMLP, Split, Task, make_draws
from rssbl_jax import analysis

TARGETS = r"dense_\d+"
SPLITS = ("seen", "interpolation", "extrapolation")


# ------------------------------------------------------------------------------------------------ models


def _shapes_count(model: Any, task: Task, method: str) -> int:
    """Trainable parameters of ``method`` in ``model`` (from shapes only)."""
    x, p = task.train.x[0, :2], task.train.p[0, :2]
    shapes = jax.eval_shape(lambda k: model.init(k, x, p=p)["params"], jax.random.key(0))
    mask = adapters.trainable_mask(shapes, method)
    leaves = zip(jax.tree.leaves(shapes), jax.tree.leaves(mask), strict=True)
    return int(sum(math.prod(v.shape) for v, m in leaves if m))


def wide_rank(task: Task, config: ml_collections.ConfigDict) -> int:
    """The smallest LoRA rank whose trainable parameters reach RSS's (``lora_wide``: LoRA matched on parameters)."""
    base = PlainMLP(task.widths, task.activation)
    rss = _shapes_count(adapters.inject(base, "rss", TARGETS, config.rank, config.lora_alpha), task, "rss")
    rank = config.rank
    while _shapes_count(adapters.inject(base, "lora", TARGETS, rank, config.lora_alpha), task, "lora") < rss:
        rank += 1
    return rank


def adapted_model(task: Task, method: str, config: ml_collections.ConfigDict, rank: int | None = None):
    """``method`` injected into every Dense layer of the task's unmodified MLP."""
    if rank is None:
        rank = wide_rank(task, config) if method == "lora_wide" else config.rank
    return adapters.inject(PlainMLP(task.widths, task.activation), method, TARGETS, rank, config.lora_alpha)


def init_params(model: Any, base_params: Any, x: jax.Array, p: jax.Array, key: jax.Array) -> Any:
    """The adapted model's params with one draw's frozen base loaded (``rssbl_jax.load_base``)."""
    variables = model.init(key, x[:2], p=p[:2])
    return rssbl_jax.load_base(variables, {"params": base_params})["params"]


def _mse_rows(model: Any, params: Any, split: Split) -> jax.Array:
    err = (model.apply({"params": params}, split.x, p=split.p) - split.y) ** 2
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def _base_rows(widths: tuple[int, ...], base_params: Any, split: Split, activation: str = "tanh") -> jax.Array:
    pred = PlainMLP(widths, activation).apply({"params": base_params}, split.x)
    return jnp.mean((pred - split.y) ** 2, axis=tuple(range(1, pred.ndim)))


# ------------------------------------------------------------------------------------------------ training


def _at_draw(tree: Any, index: jax.Array) -> Any:
    return jax.tree.map(lambda a: a[index], tree)


class Runner:
    """One method on one stacked task, compiled once: ``R`` runs, each with its own draw, lr, key and init.

    Tuning (draw 0, ``tune_seeds`` × lrs) and evaluation (draws × seeds at one lr) call the same compiled functions
    when they have the same number of runs (the runner pads to ``runs``)."""

    def __init__(self, stacked: Task, method: str, config: ml_collections.ConfigDict, rank: int | None, runs: int):
        self.model = model = adapted_model(stacked, method, config, rank)
        self.method, self.config, self.runs, self.stacked = method, config, runs, stacked
        n_rows = stacked.train.x.shape[1]
        batch = min(config.batch_size, n_rows)
        steps = config.steps
        # batches without replacement: "choice" (jax.random.choice, the committed reports') or "top_k" (the indices
        # of the batch largest of n uniforms: the same uniform random subset, far cheaper for thousands of rows)
        sampler = config.get("batch_sampler", "choice")
        if sampler not in ("choice", "top_k"):
            raise ValueError(f"batch_sampler must be 'choice' or 'top_k', got {sampler!r}.")

        def one_init(draw, key):
            base = _at_draw(stacked.base_params, draw)
            return init_params(model, base, stacked.train.x[0], stacked.train.p[0], key)

        def one_run(params, lr, key, draw, train_all):
            """One run: the library's train step (:func:`rssbl_jax.make_train_step`, without its finite checks: a
            diverged run shows as a non-finite loss and loses the lr choice) scanned over ``steps`` batches.

            The runs are a ``jax.vmap`` of whole scans. A ``jax.lax.scan`` over :func:`rssbl_jax.vmap_train_step`
            from :func:`rssbl_jax.init_runs` trains the same runs only up to float rounding (1e-8 to 1e-6 relative
            on ``configs/tiny.py``), which would move the last digits of the committed records; the workload harness
            uses those helpers and reproduces its records bit for bit."""
            train = _at_draw(train_all, draw)
            schedule = optax.cosine_decay_schedule(1.0, steps)
            tx = optax.chain(optax.adam(1.0), optax.scale_by_schedule(lambda s: lr * schedule(s)))
            train_step = rssbl_jax.make_train_step(
                lambda q, rows, rng: jnp.mean(_mse_rows(model, q, rows)), tx, check_finite=False
            )
            state = rssbl_jax.init_train_state(params, tx, key, trainable=adapters.trainable_mask(params, method))

            def step(state, step_key):
                if sampler == "top_k":  # the same law (a uniform subset), O(n) instead of a sort per step
                    idx = jax.lax.top_k(jax.random.uniform(step_key, (n_rows,)), batch)[1]
                else:
                    idx = jax.random.choice(step_key, n_rows, (batch,), replace=False)
                state, metrics = train_step(state, Split(train.x[idx], train.p[idx], train.y[idx], train.distance[idx]))
                return state, metrics["loss"]

            state, losses = jax.lax.scan(step, state, jax.random.split(key, steps))
            return rssbl_jax.combine(state.trainable, state.frozen), losses

        def one_eval(params, draw, splits_all):
            splits = _at_draw(splits_all, draw)
            return {s: _mse_rows(model, params, sp) for s, sp in splits.items()}

        self._init = jax.jit(jax.vmap(one_init))
        self._train = jax.jit(jax.vmap(one_run, in_axes=(0, 0, 0, 0, None)))
        self._eval = jax.jit(jax.vmap(one_eval, in_axes=(0, 0, None)))
        base_fn = jax.vmap(
            lambda b, sp: {s: _base_rows(stacked.widths, b, v, stacked.activation) for s, v in sp.items()}
        )
        self.base_rows = jax.tree.map(lambda a: np.asarray(a, np.float64), base_fn(stacked.base_params, stacked.splits))

    def fit(self, draws_idx: np.ndarray, lrs: np.ndarray, seed_idx: np.ndarray, key: jax.Array) -> dict[str, Any]:
        """Train runs ``i`` = (draw ``draws_idx[i]``, lr ``lrs[i]``, seed ``seed_idx[i]``); per-run errors.

        Seed ``s`` means the same initialisation and batch order on every draw and lr. Returns ``trained``
        (``[n, ...]``), ``rel`` ``{split: [n]}``, ``rows`` ``{split: [n, rows]}``, ``losses [n, steps]``, seconds."""
        n = len(draws_idx)
        if n > self.runs:
            raise ValueError(f"{n} runs > the runner's {self.runs}.")
        pad = lambda a: np.concatenate([a, np.repeat(a[:1], self.runs - n, axis=0)])  # noqa: E731
        draws_p, lrs_p, seeds_p = pad(np.asarray(draws_idx)), pad(np.asarray(lrs, np.float32)), pad(seed_idx)
        k_init, k_train = jax.random.split(key)
        init_keys = jax.random.split(k_init, int(seeds_p.max()) + 1)[seeds_p]
        train_keys = jax.random.split(k_train, int(seeds_p.max()) + 1)[seeds_p]
        draws_j = jnp.asarray(draws_p, jnp.int32)
        params = self._init(draws_j, init_keys)
        start = time.perf_counter()
        if self.method == "frozen":
            trained, losses = params, jnp.zeros((self.runs, self.config.steps))
        else:
            trained, losses = jax.block_until_ready(
                self._train(params, jnp.asarray(lrs_p), train_keys, draws_j, self.stacked.train)
            )
        seconds = time.perf_counter() - start
        rows = jax.tree.map(lambda a: np.asarray(a, np.float64)[:n], self._eval(trained, draws_j, self.stacked.splits))
        rel = {s: r.mean(-1) / self.base_rows[s][draws_idx].mean(-1) for s, r in rows.items()}
        return {
            "trained": jax.tree.map(lambda t: t[:n], trained),
            "rel": rel,
            "rows": rows,
            "losses": np.asarray(losses)[:n],
            "seconds": seconds,
        }


def choose_lr(validation: np.ndarray) -> int:
    """Index of the learning rate with the lowest geometric-mean validation error (non-finite runs lose)."""
    logs = np.where(np.isfinite(validation) & (validation > 0), np.log(np.maximum(validation, 1e-30)), np.inf)
    return int(np.argmin(logs.mean(axis=0)))


# ------------------------------------------------------------------------------------------------ ΔW(p)


class _OneDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="dense")(x)


def layer_affine(method: str, layer_params: Any, config: ml_collections.ConfigDict, rank: int):
    """``(W_eff(p), b_eff(p))`` of one adapted layer: every method's layer is affine in ``x`` at fixed ``p``.

    ``W_eff(p) = f(I, p) - f(0, p)``, ``b_eff(p) = f(0, p)``, with ``f`` the layer injected alone."""
    d_in, d_out = layer_params["kernel"].shape
    layer = adapters.inject(_OneDense(d_out), method, "dense", rank, config.lora_alpha)
    eye = jnp.eye(d_in)

    def at(p):
        rows = jnp.broadcast_to(p, (d_in, p.shape[-1]))
        on = layer.apply({"params": {"dense": layer_params}}, eye, p=rows)
        off = layer.apply({"params": {"dense": layer_params}}, jnp.zeros_like(eye), p=rows)
        return on - off, off[0]

    return at


def layer_names(params: Any) -> list[str]:
    return sorted((k for k in params if k.startswith("dense_")), key=lambda k: int(k.split("_")[1]))


def _grid(config: ml_collections.ConfigDict, d_p: int) -> jax.Array:
    grid = analysis.condition_grid(-1.0, 1.0, config.rank_grid, 2)
    return jnp.concatenate([grid, jnp.zeros((grid.shape[0], d_p - 2))], axis=-1)


def rank_analysis(stacked: Task, method: str, trained: Any, config: ml_collections.ConfigDict, rank: int):
    """Joint effective ranks (90%, 99%) of ΔW(p) over a 2-D grid, per layer × draw × seed; principal angles.

    Returns ``{layer: {"joint90", "joint99", "single99", "angle_in", "angle_out": [D, S]}}``. Ranks are
    :attr:`rssbl_jax.analysis.JointRank.maximum` (``single99``: the median over the grid of each ΔW(p)'s own rank).
    Angles (degrees): at each of the range's four corners, the largest principal angle between the corner's own
    top-k singular subspace (``k = min(r, its rank at 99%)``) and the layer's joint top-r subspace over the grid,
    averaged over the corners: 0 when every ΔW(p) lives in one fixed rank-r subspace (RSS by construction),
    up to 90 when the subspace moves with p."""
    d_p = stacked.train.p.shape[-1]
    grid = _grid(config, d_p)
    corners = jnp.concatenate([jnp.array([[-1.0, -1], [-1, 1], [1, -1], [1, 1]]), jnp.zeros((4, d_p - 2))], axis=-1)
    out = {}
    for name in layer_names(stacked.base_params):

        def deltas(params, base, points, name=name):
            at = layer_affine(method, params[name], config, rank)
            return jax.vmap(lambda p: at(p)[0])(points) - base[name]["kernel"][None]

        def ranks(params, base, name=name):
            d = deltas(params, base, grid)
            k, d_in, d_out = d.shape
            norm = jnp.linalg.norm(base[name]["kernel"]) * jnp.sqrt(k)
            j90 = analysis.joint_rank(d, 0.9, atol=1e-5 * norm).maximum
            j99 = analysis.joint_rank(d, 0.99, atol=1e-5 * norm).maximum
            tol = 1e-5 * norm
            single = jax.vmap(lambda m: analysis.effective_rank(m, 0.99, atol=tol))(d)  # noqa: B023
            u = jnp.linalg.svd(jnp.moveaxis(d, 0, 1).reshape(d_in, k * d_out), full_matrices=False)[0][:, :rank]
            v = jnp.linalg.svd(d.reshape(k * d_in, d_out), full_matrices=False)[2][:rank].T
            return j90, j99, jnp.median(single), deltas(params, base, corners), u, v

        per_seed = jax.vmap(ranks, in_axes=(0, None))
        j90, j99, single, corner, u, v = jax.jit(jax.vmap(per_seed))(trained, stacked.base_params)
        j99, corner, u, v = np.asarray(j99), np.asarray(corner, np.float64), np.asarray(u), np.asarray(v)
        angles_in, angles_out = np.zeros(j99.shape), np.zeros(j99.shape)
        norm = float(np.linalg.norm(np.asarray(stacked.base_params[name]["kernel"])))
        for idx in np.ndindex(j99.shape):
            ins, outs = [], []
            for m in corner[idx]:
                left, sv, right = np.linalg.svd(m)
                if np.sqrt((sv**2).sum()) <= 1e-5 * norm:
                    continue
                k = int(min(rank, np.searchsorted(np.cumsum(sv**2) / (sv**2).sum(), 0.99 * (1 - 1e-6)) + 1))
                ins.append(_largest_angle(left[:, :k], u[idx]))
                outs.append(_largest_angle(right[:k].T, v[idx]))
            angles_in[idx] = np.mean(ins) if ins else 0.0
            angles_out[idx] = np.mean(outs) if outs else 0.0
        out[name] = {"joint90": np.asarray(j90), "joint99": j99, "single99": np.asarray(single),
                     "angle_in": angles_in, "angle_out": angles_out}  # fmt: skip
    return out


def _largest_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal angle (degrees) between span(a) and span(b); for k(a) <= k(b) it is 0 iff span(a) ⊂ span(b)."""
    return float(np.degrees(np.asarray(analysis.principal_angles(jnp.asarray(a), jnp.asarray(b)))[-1]))


def projected_errors(stacked: Task, method: str, trained: Any, config: ml_collections.ConfigDict,
                     rank: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """Relative errors ``{split: [D, S]}`` of the network rebuilt layer by layer from ``W + ΔW(p)`` and ``b(p)``,
    as trained (a check: equals the model's error) and projected.

    Projected: every layer's ``ΔW(p)`` is replaced by ``U Uᵀ ΔW(p) V Vᵀ``, with ``U`` (``V``) the top-r input
    (output) singular vectors of the layer's updates stacked over the 2-D grid: the causal test of whether the
    directions outside one fixed rank-r subspace help."""
    d_p = stacked.train.p.shape[-1]
    grid = _grid(config, d_p)
    names = layer_names(stacked.base_params)
    n = stacked.per_condition

    def forward(params, base, split):
        conds = split.p[::n]  # [C, d_p]
        h = h_proj = split.x.reshape(conds.shape[0], n, -1)
        for i, name in enumerate(names):
            at = layer_affine(method, params[name], config, rank)
            kernels, biases = jax.vmap(at)(conds)
            delta = kernels - base[name]["kernel"][None]
            d = jax.vmap(lambda p, at=at: at(p)[0])(grid) - base[name]["kernel"][None]
            k, d_in, d_out = d.shape
            u = jnp.linalg.svd(jnp.moveaxis(d, 0, 1).reshape(d_in, k * d_out), full_matrices=False)[0][:, :rank]
            v = jnp.linalg.svd(d.reshape(k * d_in, d_out), full_matrices=False)[2][:rank].T
            projected = jnp.einsum("ia,ja,cjk->cik", u, u, delta)
            projected = jnp.einsum("cik,kb,lb->cil", projected, v, v)
            w = base[name]["kernel"][None]
            h = jnp.einsum("cni,cio->cno", h, w + delta) + biases[:, None]
            h_proj = jnp.einsum("cni,cio->cno", h_proj, w + projected) + biases[:, None]
            if i < len(names) - 1:
                h, h_proj = jnp.tanh(h), jnp.tanh(h_proj)
        return jnp.mean((h.reshape(split.y.shape) - split.y) ** 2), jnp.mean(
            (h_proj.reshape(split.y.shape) - split.y) ** 2
        )

    run = jax.jit(jax.vmap(jax.vmap(forward, in_axes=(0, None, None))))
    base_fn = jax.jit(jax.vmap(lambda b, sp: _base_rows(stacked.widths, b, sp, stacked.activation)))
    rebuilt, projected = {}, {}
    for s in ("interpolation", "extrapolation"):
        full, proj = (np.asarray(a, np.float64) for a in run(trained, stacked.base_params, stacked.splits[s]))
        base = np.asarray(base_fn(stacked.base_params, stacked.splits[s]), np.float64).mean(-1)[:, None]
        rebuilt[s], projected[s] = full / base, proj / base
    return rebuilt, projected


# ------------------------------------------------------------------------------------------------ one method


def _curve(losses: np.ndarray, points: int) -> list[float]:
    """Training loss averaged over draws and seeds, in ``points`` equal windows of steps."""
    mean = np.asarray(losses, np.float64).mean(axis=(0, 1))
    return [float(v) for v in mean[: len(mean) // points * points].reshape(points, -1).mean(-1)]


def run_method(stacked: Task, method: str, config: ml_collections.ConfigDict, key: jax.Array,
               rank: int | None = None, analyse: bool = True) -> dict[str, Any]:  # fmt: skip
    """Tune on draw 0, evaluate on every draw × seed at the chosen lr, and (``analyse``) measure ΔW(p)."""
    lrs = np.asarray(config.learning_rates, np.float64)
    num_draws, seeds = stacked.train.x.shape[0], config.num_seeds
    tuning = method != "frozen" and len(lrs) > 1
    runs = max(num_draws * seeds, config.tune_seeds * len(lrs) if tuning else 0)
    runner = Runner(stacked, method, config, rank, runs)
    k_tune, k_eval = jax.random.split(key)
    if tuning:
        grid_seeds, grid_lrs = np.meshgrid(np.arange(config.tune_seeds), np.arange(len(lrs)), indexing="ij")
        tune = runner.fit(np.zeros(grid_lrs.size, int), lrs[grid_lrs.ravel()], grid_seeds.ravel(), k_tune)
        validation = tune["rel"]["validation"].reshape(config.tune_seeds, len(lrs))
        best = choose_lr(validation)
        validation = np.exp(np.log(np.maximum(validation, 1e-30)).mean(axis=0))
    else:
        best, validation = 0, np.ones(len(lrs))
    d_idx, s_idx = (a.ravel() for a in np.meshgrid(np.arange(num_draws), np.arange(seeds), indexing="ij"))
    final = runner.fit(d_idx, np.full(d_idx.size, lrs[best]), s_idx, k_eval)
    rel = {s: v.reshape(num_draws, seeds) for s, v in final["rel"].items()}
    losses = final["losses"].reshape(num_draws, seeds, -1)
    trained = jax.tree.map(lambda t: t.reshape(num_draws, seeds, *t.shape[1:]), final["trained"])
    window = max(1, config.steps // 10)
    late = np.asarray(losses, np.float64)[:, :, -window:].mean()
    earlier = np.asarray(losses, np.float64)[:, :, -3 * window : -2 * window].mean()
    result: dict[str, Any] = {
        "task": stacked.name,
        "method": method,
        "rank": runner.model.config.rank,
        "trainable": _shapes_count(runner.model, stacked, method),
        "lr": float(lrs[best]),
        "lr_edge": bool(tuning and best in (0, len(lrs) - 1)),
        "validation_by_lr": [float(v) for v in validation],
        "flatness": float(late / earlier) if earlier > 0 else 1.0,  # last 10% of steps / the 10% two windows before
        "curve": _curve(losses, config.curve_points),
        "errors": {s: rel[s].tolist() for s in SPLITS},
        "train_ms_per_step": 1e3 * final["seconds"] / (config.steps * num_draws * seeds),
    }
    for s in SPLITS:  # (mean, half-width) of the draw-level interval: what the notebook and old readers expect
        result[s] = stats.draw_interval(rel[s])
    distance = np.asarray(stacked.splits["extrapolation"].distance)  # [D, n]
    edges = np.asarray(config.distance_bins)
    rows = final["rows"]["extrapolation"].reshape(num_draws, seeds, -1)
    base = runner.base_rows["extrapolation"]
    result["extrapolation_by_distance"] = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (distance > lo) & (distance <= hi)  # [D, n]
        if not mask.any(axis=1).all():
            continue
        by = np.stack([rows[d][:, mask[d]].mean(-1) / base[d][mask[d]].mean() for d in range(num_draws)])
        result["extrapolation_by_distance"].append([float(lo), float(hi), by.tolist()])
    if analyse and config.analyse and method != "frozen":
        r = runner.model.config.rank
        ranks = rank_analysis(stacked, method, trained, config, r)
        result["ranks"] = {layer: {k: v.tolist() for k, v in x.items()} for layer, x in ranks.items()}
        if method in config.projection_methods:
            both = projected_errors(stacked, method, trained, config, r)
            result["rebuilt"] = {s: v.tolist() for s, v in both[0].items()}
            result["projected"] = {s: v.tolist() for s, v in both[1].items()}
    return result


# ------------------------------------------------------------------------------------------------ the study


def _variant(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
    sub = ml_collections.ConfigDict(config.to_dict())
    for k, v in changes.items():
        setattr(sub, k, v)
    return sub


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Run the parts of the study that ``config`` names; write metrics, report and plots to ``workdir``.

    Parts: ``tasks`` × ``methods`` (tables, ranks, projection test, learning curves); ``pareto_tasks`` ×
    ``pareto_points`` (error vs trainable parameters); ``nuisance_dims_sweep`` (d_p with nuisance dimensions)."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(config.seed)
    start = time.perf_counter()
    timing: dict[str, float] = {}
    results: list[dict[str, Any]] = []
    pareto: list[dict[str, Any]] = []
    nuisance: list[dict[str, Any]] = []
    plan = [(t, m) for t in config.tasks for m in config.methods]
    plan += [(t, m) for t in config.pareto_tasks for m in config.pareto_points]
    plan += [(f"{config.nuisance_task}+{d}", m) for d in config.nuisance_dims_sweep for m in config.nuisance_methods]
    with (
        open(workdir / "metrics.jsonl", "w") as metrics,
        SummaryWriter(str(workdir / "tensorboard")) as board,
        tqdm(total=len(plan), desc="task x method", disable=not config.progress) as bar,
    ):

        def record(kind, row, bucket):
            bucket.append(row)
            metrics.write(json.dumps({"kind": kind, **row}) + "\n")
            metrics.flush()
            write_scalars(board, kind, row)
            bar.update()

        tasks: dict[str, Task] = {}

        def task_of(name, cfg, tag):
            if tag not in tasks:
                bar.set_postfix_str(f"{tag}: building data")
                t0 = time.perf_counter()
                tasks[tag] = make_draws(name, cfg, jax.random.fold_in(key, zlib_hash(name)))
                timing[f"data {tag}"] = time.perf_counter() - t0
            return tasks[tag]

        for task_name in config.tasks:
            stacked = task_of(task_name, config, task_name)
            for method in config.methods:
                bar.set_postfix_str(f"{task_name}: {method}")
                t0 = time.perf_counter()
                row = run_method(stacked, method, config, jax.random.fold_in(key, zlib_hash(task_name + method)))
                timing[f"{task_name} {method}"] = time.perf_counter() - t0
                record("method", row, results)
        for task_name in config.pareto_tasks:
            stacked = task_of(task_name, config, task_name)
            for point in config.pareto_points:
                method, rank = point.split("@") if "@" in point else (point, config.rank)
                bar.set_postfix_str(f"pareto {task_name}: {point}")
                t0 = time.perf_counter()
                row = run_method(stacked, method, config, jax.random.fold_in(key, zlib_hash(task_name + point)),
                                 rank=int(rank), analyse=False)  # fmt: skip
                timing[f"pareto {task_name} {point}"] = time.perf_counter() - t0
                record("pareto", {**row, "point": point}, pareto)
        for dims in config.nuisance_dims_sweep:
            sub = _variant(config, nuisance_dims=dims)
            stacked = task_of(config.nuisance_task, sub, f"{config.nuisance_task}+{dims}")
            for method in config.nuisance_methods:
                bar.set_postfix_str(f"nuisance {dims}: {method}")
                t0 = time.perf_counter()
                row = run_method(stacked, method, sub, jax.random.fold_in(key, zlib_hash(f"{dims}{method}")),
                                 analyse=False)  # fmt: skip
                timing[f"nuisance {dims} {method}"] = time.perf_counter() - t0
                record("nuisance", {**row, "nuisance_dims": dims}, nuisance)
    seconds = time.perf_counter() - start
    summary = {"results": results, "pareto": pareto, "nuisance": nuisance, "seconds": seconds}
    cpu = time.process_time()  # CPU seconds of this process (all threads): wall time depends on who else shares
    (workdir / "timing.json").write_text(
        json.dumps({"total_seconds": seconds, "process_cpu_seconds": cpu, **timing}, indent=1) + "\n"
    )
    report_lib.write(summary, config, workdir)
    return summary


def zlib_hash(text: str) -> int:
    """A stable (run-to-run) integer for a name, for ``jax.random.fold_in``."""
    import zlib

    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def write_scalars(writer: SummaryWriter, kind: str, row: dict[str, Any]) -> None:
    """Every number of a metrics row as a TensorBoard scalar (``tensorboard --logdir <workdir>``).

    Tags are ``<kind>/<task>/<method or point>/<field path>``; a list of numbers (a learning curve) becomes a
    curve over its index, a ``[mean, ...]`` interval (2 or 3 numbers) its mean."""
    name = f"{kind}/{row.get('task', '')}/{row.get('point', row.get('method', ''))}"

    def walk(tag: str, value: Any) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int | float) and math.isfinite(value):
            writer.add_scalar(tag, float(value), 0)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{tag}/{key}", item)
        elif isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
            if len(value) <= 3 and "curve" not in tag:  # (mean, ...) interval
                walk(tag, value[0])
            else:
                for step, item in enumerate(value):
                    if math.isfinite(item):
                        writer.add_scalar(tag, float(item), step)

    for key, value in row.items():
        if key not in ("task", "method", "point"):
            walk(f"{name}/{key}", value)
