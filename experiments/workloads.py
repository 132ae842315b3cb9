r"""Every method adapted into the pretrained transformer surrogates through ``rssbl_jax.inject``.

    python -m experiments.workloads --config configs/workloads.py --workdir results/workloads
    python -m experiments.workloads --config configs/workloads.py --workdir results/workloads \
        --config.workloads=ks --config.parts=main          # one named part of the study

Workloads (data and surrogates from :mod:`experiments.surrogates`, cached):

* ``ks``: the Kuramoto–Sivashinsky patch transformer (4 blocks, width 128), ``p = (L, ψ)`` (exponax);
* ``battery``: the causal battery transformer (2 blocks, width 64), ``p = (T_ambient, C-rate)`` (PyBaMM SPMe).

Protocol, per workload, method and target set (``all``: attention q/k/v/out + MLP; ``attention``; ``mlp``):

1. The surrogate, pretrained at its nominal condition, is loaded into the adapted model (``rssbl_jax.load_base``);
   ``p`` is standardised with the mean and std of the training conditions, outside the model and the same for
   every method (``AdapterConfig(p_mean, p_std)`` reaches RSS's gate only, not the plug-in baselines), so the
   nominal condition is *not* at ``p̂ = 0``.
2. A *data draw* splits the trajectories of every training condition into training and validation trajectories
   (``val_trajectories`` of them, drawn per condition). Runs (draw, seed, lr) are one ``jax.vmap`` inside one
   ``jax.jit`` (frozen base leaves are shared, not copied per run). Seeds change the adapter init and the batch
   order. Adam (global-norm clip 1, cosine decay to 0), normalised MSE on mini-batches, only the method's
   trainable leaves (``experiments.adapters.trainable_mask``; ``full_ft`` trains everything).
3. Learning rate, per draw: stage 1 trains every lr of the grid with seed 0 and keeps the lr with the lowest
   validation loss (picks at the edge of the grid are flagged); stage 2 adds seeds ``1..len(grid)`` at that lr
   (``config.seeds_at_lr`` seeds instead, when set). Reported: the runs at the chosen lr, mean and 95 %
   t-interval over them. (:mod:`experiments.workload_study` runs this per independent draw, with draw-level
   statistics.)
4. Metrics per condition set, with :func:`experiments.surrogates.ks_metrics` / ``battery_metrics``:
   ``train`` (the training conditions, on the draw's validation trajectories), ``heldout`` (interpolation),
   ``extrapolated``, ``nominal``. KS: one-step relative L2 and rollout relative L2 (mean over horizons 1..10) from
   frame 0; battery: voltage RMSE [mV] and temperature-rise RMSE [K].
5. Cost: wall time per training step per run (the vmapped step's time divided by the number of runs) and XLA's
   compiled memory estimate of the vmapped training step (arguments + outputs − aliased + temporaries, from
   ``jax.jit(...).lower(...).compile().memory_analysis()``; on CPU this is the buffer assignment's total, not a
   measured peak).

Outputs in ``workdir``: ``<workload>_<part>.jsonl`` (one record per method × targets) and ``report.md``.

Anchoring the nominal condition (``config.anchor``, default ``"none"``: the protocol above, unchanged):

* ``"centre"``: ``p`` is standardised with mean = the nominal condition (std unchanged), so ``p̂_nominal = 0`` for
  every method (the offset-0 gates ``C p`` and shifts ``S p`` are then exactly silent there);
* ``"replay"``: the nominal condition is one more training condition (the last), with as many trajectories as each
  training condition has, taken from the nominal trajectories the evaluation's ``nominal`` set does *not* use
  (it uses the first ``eval_trajectories``; the replayed ones follow them). ``p`` is standardised as in
  ``"none"`` (the mean and std of the original training conditions), and the ``train`` evaluation set stays the
  original training conditions;
* ``"centre+replay"``: both.

``config.anchors`` (a tuple, e.g. ``configs/workloads_anchor.py``) runs the config once per anchor into
``workdir/<anchor>/`` and writes ``workdir/report.md`` comparing them (:func:`anchor_study`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.stats

import rssbl_jax
from experiments import adapters, physics_data, surrogates

TARGETS = {"all": surrogates.ALL_TARGETS, "attention": surrogates.ATTENTION_TARGETS, "mlp": surrogates.MLP_TARGETS}
SETS = ("train", "heldout", "extrapolated", "nominal")
ANCHORS = ("none", "centre", "replay", "centre+replay")
METRICS = {"ks": ("one_step", "rollout_mean"), "battery": ("voltage_rmse_mv", "temperature_rmse_k")}


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Workload:
    """A pretrained surrogate and its data as training examples and evaluation sets.

    ``x, y, w [c, n, m, ...]``: ``m`` examples of each of ``n`` trajectories at each of ``c`` training conditions
    (KS: one-step pairs; battery: one whole profile, ``m = 1``); ``w`` weights the squared error (the battery's
    valid samples). ``sets[s]`` is the raw condition set ``s`` of :func:`experiments.physics_data.split`.
    """

    name: str
    model: Any
    base: Any
    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    conditions: np.ndarray
    sets: dict[str, dict[str, np.ndarray]]
    scale: np.ndarray
    p_mean: tuple[float, ...]
    p_std: tuple[float, ...]
    pretrain_config: Any
    anchor: str = "none"
    replay: tuple[int, ...] = ()  # the nominal trajectories replayed as a training condition (anchor "replay")

    def standardise(self, conditions: np.ndarray) -> np.ndarray:
        """``p̂ = (p − mean) / std`` with the training conditions' mean and std (float32); anchor ``centre``: the
        nominal condition as the mean."""
        return ((np.asarray(conditions, np.float64) - self.p_mean) / self.p_std).astype(np.float32)


def _surrogate_config(name: str, config: ml_collections.ConfigDict, draw: int = 0) -> surrogates.PretrainConfig:
    """The surrogate's :class:`~experiments.surrogates.PretrainConfig`, with the config's overrides (tests).

    ``draw > 0`` is an independent data draw: the data seed (conditions, trajectories or profiles) and the
    pretraining seed both move by ``draw``, so the draw has its own training and held-out conditions, its own
    trajectories and its own re-pretrained base. Draw 0 is the default data and base.
    """
    base = surrogates.SURROGATES[f"{name}_transformer"]
    over = config.get(name, ml_collections.ConfigDict())
    changes = {}
    data_changes = dict(over.data) if over.get("data") else {}
    if draw:
        data_changes["seed"] = base.data.seed + draw
        changes["seed"] = base.seed + draw
    if data_changes:
        changes["data"] = dataclasses.replace(base.data, **data_changes)
    if over.get("model"):
        changes["model"] = base.model | dict(over.model)
    if over.get("pretrain_steps"):
        changes |= {"steps": int(over.pretrain_steps), "warmup": min(base.warmup, int(over.pretrain_steps) // 5)}
    if over.get("pretrain_lr"):
        changes["learning_rate"] = float(over.pretrain_lr)
    return dataclasses.replace(base, **changes) if changes else base


def eval_trajectories(name: str, sets: dict[str, dict[str, np.ndarray]], config: ml_collections.ConfigDict) -> int:
    """How many trajectories per condition the evaluation uses: the first ``n_eval`` of every set but ``train``
    (the same count as :func:`_eval_inputs` takes)."""
    n_eval = config[name].get("eval_trajectories", 1 << 30)
    return min(n_eval, sets["heldout"]["u" if name == "ks" else "x"].shape[1])


def _replay(name: str, sets: dict[str, dict[str, np.ndarray]], config: ml_collections.ConfigDict):
    """The training set with the nominal condition appended (last), and the nominal trajectories it replays.

    The replayed trajectories are the ones right after the evaluation's (``nominal[:, n_eval : n_eval + n]``,
    ``n`` = trajectories per training condition), so they are disjoint from the evaluated ones. Per-condition
    arrays without a trajectory axis (``conditions``, the battery's time grid ``t``) are appended whole.
    """
    train, nominal = sets["train"], sets["nominal"]
    per_trajectory = ("u",) if name == "ks" else ("x", "y", "valid")
    key = per_trajectory[0]
    n_eval, n = eval_trajectories(name, sets, config), train[key].shape[1]
    if n_eval + n > nominal[key].shape[1]:
        raise ValueError(
            f"anchor 'replay' needs {n_eval} evaluated + {n} replayed nominal trajectories; "
            f"the data has {nominal[key].shape[1]}."
        )
    replay = tuple(range(n_eval, n_eval + n))
    merged = {
        k: np.concatenate([v, nominal[k][:, list(replay)] if k in per_trajectory else nominal[k]], axis=0)
        for k, v in train.items()
    }
    return merged, replay


def load_workload(name: str, config: ml_collections.ConfigDict, data_dir: str | None = None, draw: int = 0) -> Workload:
    """The pretrained surrogate ``name`` (``ks`` or ``battery``) and its data (both cached on disk); ``draw``
    selects an independent data draw with its own re-pretrained base (:func:`_surrogate_config`).

    ``config.anchor`` (default ``"none"``) sets the standardisation's mean to the nominal condition (``centre``)
    and/or appends the nominal condition to the training conditions (``replay``); see the module docstring.
    """
    anchor = config.get("anchor", "none")
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r}; expected one of {ANCHORS}.")
    pretrain_config = _surrogate_config(name, config, draw)
    progress = bool(config.get("progress", False))
    model, base = surrogates.pretrained(pretrain_config, data_dir, progress)
    data = surrogates.load_data(pretrain_config, data_dir, progress)
    sets = {s: physics_data.split(data, s) for s in SETS}
    train, replay = sets["train"], ()
    statistics = train["conditions"].astype(np.float64)  # standardisation: the original training conditions
    if "replay" in anchor:
        train, replay = _replay(name, sets, config)
    mean = statistics.mean(0)
    if "centre" in anchor:
        mean = sets["nominal"]["conditions"][0].astype(np.float64)
    return Workload(
        name,
        model,
        base,
        *examples(name, train),
        sets,
        np.float32(model.du_scale).reshape(1) if name == "ks" else np.asarray(model.y_scale, np.float32),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in statistics.std(0)),
        pretrain_config,
        anchor,
        replay,
    )


def examples(name: str, train: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """A training set's ``x, y, w [c, n, m, ...]`` and ``conditions [c, 2]`` (the layout of :class:`Workload`):
    KS one-step pairs; battery whole profiles (``m = 1``) weighted by their valid samples."""
    if name == "ks":
        u = train["u"]
        x, y = u[:, :, :-1], u[:, :, 1:]
        w = np.ones((1, 1, 1, 1), np.float32)
    else:
        x, y = train["x"][:, :, None], train["y"][:, :, None]
        w = train["valid"][:, :, None, :, None].astype(np.float32)
    return x, y, np.broadcast_to(w, y.shape).astype(np.float32), train["conditions"].astype(np.float32)


def draw_trajectories(n: int, n_val: int, conditions: int, draw: int, seed: int) -> np.ndarray:
    """``[conditions, n]`` permutations of the trajectories: the first ``n_val`` of each row validate."""
    rng = np.random.default_rng([seed, 11, draw])
    return np.stack([rng.permutation(n) for _ in range(conditions)])


# ------------------------------------------------------------------------------------------------ runs


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95 % t-interval over the first axis."""
    values = np.asarray(values, np.float64)
    if values.shape[0] < 2:
        return float(values.mean()), float("nan")
    half = scipy.stats.t.ppf(0.975, values.shape[0] - 1) * values.std(ddof=1) / math.sqrt(values.shape[0])
    return float(values.mean()), float(half)


RANK_SUFFIX = re.compile(r"(.+)_r([1-9][0-9]*)")  # a method at another rank: ``<method>_r<k>``


def adapted_model(work: Workload, method: str, targets: str, config: ml_collections.ConfigDict):
    """The method injected into the surrogate's ``targets`` layers; it is called with the standardised ``p̂``.

    ``p`` is standardised *outside* the model (:meth:`Workload.standardise`), the same for every method:
    ``AdapterConfig(p_mean, p_std)`` is applied by RSS's gate only, so the plug-in baselines of
    :mod:`experiments.adapters` would otherwise see raw physical units (``L ≈ 64``) while RSS sees ``p̂``.

    A suffix ``_r<k>`` runs the method at rank ``k`` with the scale ``α/r`` kept (``rss_r6``: RSS matched on
    parameters to FiLM on the layer at rank 4); ``lora_wide`` is LoRA at ``config.wide_rank``.
    """
    rank, alpha = config.rank, config.lora_alpha
    if method == "lora_wide":  # more rank at the same scale α/r, to match RSS's parameter count
        rank, alpha = config.wide_rank, config.lora_alpha * config.wide_rank / config.rank
    if matched := RANK_SUFFIX.fullmatch(method):  # e.g. rss_r6: rank 6 at the same scale α/r
        method, rank = matched[1], int(matched[2])
        alpha = config.lora_alpha * rank / config.rank
    name = f"hypernet{config.hyper_hidden}" if method == "hypernet" else method
    name = f"hypernet{config.hyper_hidden}_nou" if method == "hypernet_nou" else name
    return name, adapters.inject(work.model, name, TARGETS[targets], rank, alpha)


def _descend(lr: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """``u ↦ -(lr · schedule(count)) u``: a descent step of size ``lr`` times the schedule, counted per update."""

    def update(updates, state, params=None):
        del params
        factor = lr * schedule(state.count)
        return jax.tree.map(lambda u: -(factor * u), updates), optax.ScaleByScheduleState(state.count + 1)

    return optax.GradientTransformation(lambda params: optax.ScaleByScheduleState(jnp.zeros([], jnp.int32)), update)


def _loss(adapted, params, x, y, w, p, scale):
    """Weighted MSE of the normalised error (the pretraining loss), of the whole params tree."""
    prediction = adapted.apply({"params": params}, x, p=p)
    lead = (1,) * (y.ndim - 1)
    residual = (prediction - y) / scale.reshape(*lead, -1)
    return jnp.sum(w * residual**2) / jnp.maximum(jnp.sum(w), 1.0)


def run_method(
    work: Workload,
    method: str,
    targets: str,
    config: ml_collections.ConfigDict,
    seed: int = 0,
    draw_lrs: list[float] | None = None,
    counts: list[int] | None = None,
) -> dict[str, Any]:
    """Train one method's runs (vmapped), select the learning rate per draw, evaluate; one JSON record.

    Two stages: (1) every learning rate of the grid with seed 0 on every draw (with one draw and
    ``config.extend_edges``, a pick at an edge of the grid adds a point beyond it, up to that many times); (2) per
    draw, seeds ``1..config.seeds_at_lr`` (default ``len(grid)``: then both stages have the same number of runs and
    one compiled step) at the lr that draw chose on its validation trajectories. Reported: the runs at the chosen
    lr. ``config.val_points`` records every run's validation loss at that many evenly spaced steps.
    ``draw_lrs`` (one lr per draw, e.g. the all-layer run's choice for the per-layer ablation) skips stage 1 and
    trains ``draws × seeds`` runs.

    ``counts`` (with ``draw_lrs``, one entry each) turns the draws into a condition-count sweep: "draw" ``d``
    trains on the first ``counts[d]`` training conditions, every one with the same trajectory split, and validates
    on the first ``min(counts)`` conditions (which every count has), so the runs of all counts share one compiled
    step.
    """
    if counts and (draw_lrs is None or len(draw_lrs) != len(counts)):
        raise ValueError(f"counts={counts} needs draw_lrs with one learning rate per count; got {draw_lrs}.")
    start = time.perf_counter()
    name, adapted = adapted_model(work, method, targets, config)
    c, n, m = work.x.shape[:3]
    draws, n_val = len(counts) if counts else config.draws, config.val_trajectories
    lrs = list(config.full_ft_learning_rates if method == "full_ft" else config.learning_rates)
    if counts:
        orders = [draw_trajectories(n, n_val, c, 0, seed)] * draws
    else:
        orders = [draw_trajectories(n, n_val, c, d, seed) for d in range(draws)]
    used = list(counts) if counts else [c] * draws
    flat = lambda cond, traj, k: (cond * n + traj) * m + k  # noqa: E731
    cond_idx, k_idx = np.arange(c)[:, None, None], np.arange(m)[None, None, :]
    rows = [flat(cond_idx[:u], o[:u, n_val:, None], k_idx).ravel() for o, u in zip(orders, used, strict=True)]
    n_rows = np.array([len(r) for r in rows], np.int32)  # a batch samples the first n_rows[d] rows of draw d
    # padding (never drawn: a batch samples below n_rows) points at the last row, of the last condition
    train_idx = np.stack([np.pad(r, (0, n_rows.max() - len(r)), constant_values=c * n * m - 1) for r in rows])
    val_k, first = k_idx[..., :: config[work.name].get("val_stride", 1)], min(used)
    val_idx = np.stack([flat(cond_idx[:first], o[:first, :n_val, None], val_k).ravel() for o in orders])
    data = {
        "x": jnp.asarray(work.x.reshape(c * n * m, *work.x.shape[3:])),
        "y": jnp.asarray(work.y.reshape(c * n * m, *work.y.shape[3:])),
        "w": jnp.asarray(work.w.reshape(c * n * m, *work.w.shape[3:])),
        "p": jnp.asarray(np.repeat(work.standardise(work.conditions), n * m, axis=0)),
    }
    scale = jnp.asarray(work.scale)
    root = jax.random.key(seed)

    def init(key):
        variables = adapted.init(key, data["x"][:1], p=data["p"][:1])
        return rssbl_jax.load_base(variables, work.base)["params"]

    shapes = jax.eval_shape(init, root)
    mask = adapters.trainable_mask(shapes, name)

    steps, batch = config[work.name].steps, config[work.name].batch
    schedule = optax.cosine_decay_schedule(1.0, steps)

    def optimizer(lr):  # Adam on globally clipped gradients; the step is -(lr · cosine(count)) times its update
        return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(), _descend(lr, schedule))

    @jax.jit
    def init_runs(keys):  # one compile: per-run adapters and optimizer state, the frozen base once (every run's)
        return rssbl_jax.init_runs(jax.vmap(init)(keys), optimizer(1.0), keys, trainable=mask)

    def run_keys(runs):
        return jnp.stack([jax.random.fold_in(jax.random.fold_in(root, d), s) for d, s, _ in runs])

    record: dict[str, Any] = {
        "workload": work.name,
        "method": method,
        "adapter": name,
        "targets": targets,
        "trainable": sum(
            math.prod(v.shape) for v, t in zip(jax.tree.leaves(shapes), jax.tree.leaves(mask), strict=True) if t
        ),
        "steps": steps if method != "frozen" else 0,
        "batch": batch,
    }
    if work.anchor != "none":
        record |= {"anchor": work.anchor, "replay_trajectories": list(work.replay)}
    if method == "frozen":
        reported = [(d, 0, 0.0) for d in range(draws)]
        frozen = init_runs(run_keys(reported)).frozen
        record |= {"runs": reported, "lr": None, "edge": False, "step_ms_per_run": 0.0, "memory_mb": None}
        record["metrics"] = evaluate(work, adapted, None, frozen, [orders[d] for d, _, _ in reported], config)
        record["seconds"] = time.perf_counter() - start
        return record

    def one_step(run, inputs):
        """One run's step: the library's train step (:func:`rssbl_jax.make_train_step`, no finite checks) at the
        run's learning rate; its ``rng`` (the run key folded with the step) draws the batch from the run's rows."""
        lr, (rows_of_run, n_rows), data = inputs

        def loss_fn(params, data, rng):
            rows = rows_of_run[jax.random.randint(rng, (batch,), 0, n_rows)]
            return _loss(adapted, params, *(data[f][rows] for f in ("x", "y", "w", "p")), scale)

        return rssbl_jax.make_train_step(loss_fn, optimizer(lr), check_finite=False)(run, data)

    # the runs' steps at once (the frozen base shared); the state is donated, so the base comes back with it
    step_fn = jax.jit(rssbl_jax.vmap_train_step(one_step, batch_axis=(0, 0, None)), donate_argnums=0)

    @jax.jit
    def validate(trainable, idx, frozen, data):  # sequential over runs: low memory
        def one(args):
            t, i = args
            params = rssbl_jax.combine(t, frozen)
            return _loss(adapted, params, data["x"][i], data["y"][i], data["w"][i], data["p"][i], scale)

        return jax.lax.map(one, (trainable, idx))

    timings = {"init_s": 0.0, "compile_s": 0.0, "steps_s": 0.0, "val_s": 0.0}
    compiled: dict[int, Any] = {}
    run_steps = [0]
    # The validation loss of every run at ``val_points`` evenly spaced steps (the convergence record).
    points = int(config.get("val_points", 0))
    at_steps = sorted({max(1, round(steps * (j + 1) / points)) for j in range(points)}) if points else []
    val_curve: dict[str, list] = {"steps": at_steps, "loss": [], "runs": []} if points else {}

    def train(runs):
        """Train ``runs`` [(draw, seed, lr)] at once: trained leaves, per-step losses [steps, R], val losses [R]."""
        t = time.perf_counter()
        state = jax.block_until_ready(init_runs(run_keys(runs)))
        timings["init_s"] += time.perf_counter() - t
        draw = np.array([d for d, _, _ in runs])
        idx = (jnp.asarray(train_idx[draw]), jnp.asarray(n_rows[draw]))
        args = (jnp.asarray([lr for _, _, lr in runs], jnp.float32), idx, data)
        if len(runs) not in compiled:
            t = time.perf_counter()
            compiled[len(runs)] = step_fn.lower(state, args).compile()
            timings["compile_s"] += time.perf_counter() - t
            memory = compiled[len(runs)].memory_analysis()
            if memory is not None:
                total = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                record["memory_mb"] = (total + memory.temp_size_in_bytes) / 2**20
                record["memory_runs"] = len(runs)
        losses, curve = [], []
        val_rows = jnp.asarray(val_idx[draw])
        t = time.perf_counter()
        for i in range(steps):
            state, metrics = compiled[len(runs)](state, args)
            losses.append(metrics["loss"])
            if i + 1 in at_steps:  # timed apart: steps_s stays the training steps' time
                jax.block_until_ready(state)
                v = time.perf_counter()
                curve.append(jax.block_until_ready(validate(state.trainable, val_rows, state.frozen, data)))
                timings["curve_s"] = timings.get("curve_s", 0.0) + time.perf_counter() - v
                t += time.perf_counter() - v
        jax.block_until_ready(state)
        timings["steps_s"] += time.perf_counter() - t
        if points:
            val_curve["loss"] += np.asarray(jnp.stack(curve)).T.astype(np.float64).tolist()
            val_curve["runs"] += [list(r) for r in runs]
        run_steps[0] += steps * len(runs)
        t = time.perf_counter()
        val = np.asarray(validate(state.trainable, jnp.asarray(val_idx[draw]), state.frozen, data))
        timings["val_s"] += time.perf_counter() - t
        return state.trainable, state.frozen, np.asarray(jnp.stack(losses)), val

    if draw_lrs is None:
        stage1 = [(d, 0, lr) for d in range(draws) for lr in lrs]
        trained1, frozen, losses1, val1 = train(stage1)
        # An edge pick extends the grid by one more point beyond that edge (the grid's ratio), up to
        # ``extend_edges`` times; the added runs are stage 1 runs like the others (seed 0).
        for _ in range(int(config.get("extend_edges", 0)) if draws == 1 else 0):
            best = lrs[int(np.nanargmin(val1))]
            if best not in (lrs[0], lrs[-1]):
                break
            ratio = lrs[1] / lrs[0]
            lr = lrs[0] / ratio if best == lrs[0] else lrs[-1] * ratio
            trained, _, losses, val = train([(0, 0, lr)])
            at = 0 if best == lrs[0] else len(lrs)
            lrs.insert(at, lr)
            stage1.insert(at, (0, 0, lr))
            join = lambda a, b, at=at: jnp.concatenate([a[:at], b, a[at:]])  # noqa: E731
            trained1 = jax.tree.map(join, trained1, trained)
            losses1 = np.concatenate([losses1[:, :at], losses, losses1[:, at:]], axis=1)
            val1 = np.concatenate([val1[:at], val, val1[at:]])
        chosen = [lrs[int(np.nanargmin([val1[d * len(lrs) + k] for k in range(len(lrs))]))] for d in range(draws)]
        record["val_loss_by_lr"] = {
            f"{lr:g}": [float(val1[d * len(lrs) + k]) for d in range(draws)] for k, lr in enumerate(lrs)
        }
        extra = int(config.get("seeds_at_lr", len(lrs)))  # seeds 1..extra at the chosen lr
        stage2 = [(d, s, chosen[d]) for d in range(draws) for s in range(1, extra + 1)]
        keep = [d * len(lrs) + lrs.index(chosen[d]) for d in range(draws)]
    else:
        chosen, stage2, keep = (
            list(draw_lrs),
            [(d, s, draw_lrs[d]) for d in range(draws) for s in range(config.seeds)],
            [],
        )
    trained2, frozen, losses2, _ = train(stage2) if stage2 else (None, frozen, np.zeros((steps, 0)), None)
    if keep and not stage2:
        trainable = jax.tree.map(lambda a: a[np.array(keep)], trained1)
        losses, reported = losses1[:, keep], [stage1[k] for k in keep]
    elif keep:
        trainable = jax.tree.map(lambda a, b: jnp.concatenate([a[np.array(keep)], b]), trained1, trained2)
        losses = np.concatenate([losses1[:, keep], losses2], axis=1)
        reported = [stage1[k] for k in keep] + stage2
    else:
        trainable, losses, reported = trained2, losses2, stage2
    record["runs"] = reported
    record["lr"] = chosen
    record["lr_from"] = "grid" if draw_lrs is None else "all-layer run"
    record["lr_grid"] = lrs
    record["edge"] = bool(len(lrs) > 1 and any(lr in (lrs[0], lrs[-1]) for lr in chosen))
    if val_curve:
        record["val_curve"] = {"steps": val_curve["steps"], "by_run": val_curve["loss"], "runs": val_curve["runs"]}
    record["loss_curve"] = [float(np.mean(w)) for w in np.array_split(losses.mean(axis=1), 10)]
    record |= timings
    record["step_ms_per_run"] = 1e3 * timings["steps_s"] / run_steps[0]
    record["train_s"] = time.perf_counter() - start
    eval_start = time.perf_counter()
    record["metrics"] = evaluate(work, adapted, trainable, frozen, [orders[d] for d, _, _ in reported], config)
    record["eval_s"] = time.perf_counter() - eval_start
    record["seconds"] = time.perf_counter() - start
    return record


def _eval_inputs(work: Workload, orders: list[np.ndarray], n_val: int, horizon: int, n_eval: int):
    """Per selected run, every condition set stacked along the condition axis (equal trajectories per condition).

    ``train`` uses the run's validation trajectories, tiled to the held-out sets' count (the mean is unchanged);
    it is the workload's ``sets["train"]`` (a replayed nominal condition, the orders' last row, is not in it; a
    condition-count sweep puts its first conditions there).
    """
    n_eval = min(n_eval, work.sets["heldout"]["u" if work.name == "ks" else "x"].shape[1])
    if n_eval % n_val:
        raise ValueError(f"val_trajectories ({n_val}) must divide the held-out trajectories per condition ({n_eval}).")
    keys = ("u",) if work.name == "ks" else ("x", "y", "valid")
    runs = []
    for order in orders:
        parts = {k: [] for k in keys}
        for s in SETS:
            part = work.sets[s]
            for k in keys:
                a = part[k]
                if s == "train":
                    val = order[: a.shape[0], :n_val]
                    a = np.take_along_axis(a, val.reshape(-1, n_val, *(1,) * (a.ndim - 2)), axis=1)
                    a = np.concatenate([a] * (n_eval // n_val), axis=1)
                else:
                    a = a[:, :n_eval]
                if k == "u":
                    a = a[:, :, : horizon + 1]
                parts[k].append(a)
        runs.append({k: np.concatenate(v, axis=0) for k, v in parts.items()})
    sizes = {s: work.sets[s]["conditions"].shape[0] for s in SETS}
    conditions = np.concatenate([work.sets[s]["conditions"] for s in SETS]).astype(np.float32)
    return {k: np.concatenate([r[k] for r in runs], axis=0) for k in keys}, conditions, sizes


def evaluate(work: Workload, adapted, trainable, frozen, orders, config) -> dict[str, Any]:
    """Metrics ``{set: {metric: [runs, conditions]}}`` of the selected runs (trained leaves stacked on axis 0)."""
    n_eval = config[work.name].get("eval_trajectories", 1 << 30)
    arrays, conditions, sizes = _eval_inputs(work, orders, config.val_trajectories, config.horizon, n_eval)
    runs = len(orders)
    per_run = conditions.shape[0]
    p = jnp.asarray(np.concatenate([work.standardise(conditions)] * runs, axis=0))
    if trainable is None or not jax.tree.leaves(trainable):  # the frozen base

        def apply(z):
            return work.model.apply({"params": work.base}, z)

    else:

        def apply(z):
            z_runs = z.reshape(runs, per_run, *z.shape[1:])
            out = jax.vmap(
                lambda t, zz, pp: adapted.apply({"params": rssbl_jax.combine(t, frozen)}, zz, p=pp),
                in_axes=(0, 0, 0),
            )(trainable, z_runs, p.reshape(runs, per_run, -1))
            return out.reshape(z.shape[0], *out.shape[2:])

    if work.name == "ks":
        metrics = surrogates.ks_metrics(apply, arrays["u"], config.horizon)
        keep = ("one_step", "rollout_mean", "rollout", "persistence", "rollout_persistence_mean")
    else:
        metrics = surrogates.battery_metrics(apply, arrays["x"], arrays["y"], arrays["valid"])
        keep = ("voltage_rmse_mv", "voltage_rel_l2", "temperature_rmse_k")
    out: dict[str, Any] = {}
    offset = 0
    for s in SETS:
        out[s] = {
            k: np.asarray(metrics[k])
            .reshape(runs, per_run, *np.shape(metrics[k])[1:])[:, offset : offset + sizes[s]]
            .astype(np.float64)
            .tolist()
            for k in keep
        }
        out[s]["conditions"] = conditions[offset : offset + sizes[s]].tolist()
        offset += sizes[s]
    return out


# ------------------------------------------------------------------------------------------------ study


def jobs(config: ml_collections.ConfigDict) -> list[tuple[str, str, str, str]]:
    """``(workload, part, method, targets)`` for the config's workloads and named parts."""
    out = []
    for workload in config.workloads:
        skip = set(config[workload].get("skip_methods", ()))
        skip_ablation = set(config[workload].get("skip_ablation", ()))
        for part in config.parts:
            for method, targets in config.part_jobs[part]:
                if method not in skip and not (targets != "all" and method in skip_ablation):
                    out.append((workload, part, method, targets))
    return out


def read_records(workdir: str | pathlib.Path) -> dict[str, list[dict]]:
    """Every record in ``workdir/<workload>_<part>.jsonl``, by workload (parts in file-name order)."""
    records: dict[str, list[dict]] = {}
    for path in sorted(pathlib.Path(workdir).glob("*_*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            records.setdefault(record["workload"], []).append(record)
    return records


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None) -> dict:
    """Run every job of the config into ``workdir/<workload>_<part>.jsonl`` (each part's file is rewritten), then
    write ``workdir/report.md`` from every record there (so parts run separately end up in one report).

    The per-layer ablation (targets other than ``all``) reuses, per draw, the learning rate its method chose on
    all layers (``ablation_lr_from_all``, default True; from this run or from ``<workload>_main.jsonl``).
    """
    workdir_path = pathlib.Path(workdir)
    workdir_path.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    loaded: dict[str, Workload] = {}
    done: list[dict] = []
    started: set[str] = set()
    for workload, part, method, targets in jobs(config):
        if workload not in loaded:
            loaded[workload] = load_workload(workload, config, data_dir)
        path = workdir_path / f"{workload}_{part}.jsonl"
        if path.name not in started:
            path.write_text("")
            started.add(path.name)
        draw_lrs = None
        if targets != "all" and config.get("ablation_lr_from_all", True):
            known = done + read_records(workdir_path).get(workload, [])
            reference = [
                r for r in known if r["workload"] == workload and r["method"] == method and r["targets"] == "all"
            ]
            if not reference:
                raise ValueError(f"the ablation of {method} on {workload} needs its all-layer run first (part main).")
            draw_lrs = reference[0]["lr"]
        record = run_method(loaded[workload], method, targets, config, seed=config.seed, draw_lrs=draw_lrs)
        record["part"] = part
        done.append(record)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if config.get("progress", False):
            print(f"{workload} {method} [{targets}] {record['seconds']:.1f} s", flush=True)
    seconds = time.perf_counter() - start
    (workdir_path / "report.md").write_text(report(read_records(workdir_path), seconds))
    return {"records": done, "seconds": seconds}


# ------------------------------------------------------------------------------------------------ report


def summarise(record: dict, set_name: str, metric: str) -> tuple[float, float]:
    """Mean and 95 % interval over runs of the per-run mean over the set's conditions."""
    values = np.asarray(record["metrics"][set_name][metric], np.float64)
    return mean_ci(values.reshape(values.shape[0], values.shape[1], -1).mean(axis=(1, 2)))


def _cell(mean: float, half: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if np.isfinite(half) else f"{mean:.{digits}f}"


def table(records: list[dict], sets: tuple[str, ...] = ("train", "heldout", "extrapolated", "nominal")) -> str:
    """A markdown table: one row per record, one column per (set, metric)."""
    workload = records[0]["workload"]
    metrics = METRICS[workload]
    digits = {"one_step": 4, "rollout_mean": 3, "voltage_rmse_mv": 1, "temperature_rmse_k": 3}
    short = {"one_step": "1-step", "rollout_mean": "rollout", "voltage_rmse_mv": "V mV", "temperature_rmse_k": "T K"}
    head = ["method", "layers", "trainable", "lr", "ms/step/run", "MB (XLA)"]
    head += [f"{s} {short[k]}" for s in sets for k in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        lr = "—" if r["lr"] is None else ",".join(f"{v:g}" for v in r["lr"]) + (" (edge)" if r["edge"] else "")
        memory = "—" if r.get("memory_mb") is None else f"{r['memory_mb']:.0f}"
        row = [r["method"], r["targets"], str(r["trainable"]), lr, f"{r['step_ms_per_run']:.1f}", memory]
        row += [_cell(*summarise(r, s, k), digits[k]) for s in sets for k in metrics]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pareto(records: list[dict], set_name: str = "heldout") -> str:
    """Error against trainable parameters over every (method, layers) record: the Pareto-optimal ones marked."""
    metric = METRICS[records[0]["workload"]][0]
    points = sorted(
        ((r["trainable"], summarise(r, set_name, metric)[0], f"{r['method']} [{r['targets']}]") for r in records),
        key=lambda t: (t[0], t[1]),
    )
    lines = [f"| trainable | {set_name} {metric} | method [layers] | Pareto |", "|---|---|---|---|"]
    best = math.inf
    for count, error, label in points:
        front = error < best
        best = min(best, error)
        lines.append(f"| {count} | {error:.4g} | {label} | {'★' if front else ''} |")
    return "\n".join(lines)


def references(records: dict[str, list[dict]]) -> str:
    """The frozen base's absolute errors on every condition set, beside the persistence reference (KS).

    KS (autoregressive): one-step and rollout relative L2 of the frozen base and of persistence (``û_{t+1} = u_t``;
    for the rollout ``û_h = u_0``), mean over the set's conditions; a base above persistence off nominal is worse
    than predicting no change. The battery (a sequence model, no autoregressive reference): the base's voltage
    RMSE [mV] and temperature-rise RMSE [K]. Records written before the rollout reference existed show "–"."""
    out = []
    for workload, recs in records.items():
        frozen = next((r for r in recs if r["method"] == "frozen" and r["targets"] == "all"), None)
        if frozen is None:
            continue
        m = frozen["metrics"]

        def mean(s, k, m=m):
            return f"{np.mean(m[s][k]):.3f}" if k in m[s] else "–"

        if workload == "ks":
            lines = ["| set | base 1-step | persistence 1-step | base rollout | persistence rollout |",
                     "|---|---:|---:|---:|---:|"]  # fmt: skip
            for s in SETS:
                cells = [mean(s, "one_step"), mean(s, "persistence"), mean(s, "rollout_mean"),
                         mean(s, "rollout_persistence_mean")]  # fmt: skip
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
        else:
            lines = ["| set | base voltage RMSE [mV] | base temperature-rise RMSE [K] |", "|---|---:|---:|"]
            for s in SETS:
                lines.append(f"| {s} | {np.mean(m[s]['voltage_rmse_mv']):.1f} | "
                             f"{np.mean(m[s]['temperature_rmse_k']):.3f} |")  # fmt: skip
        out.append(
            f"### {workload}: the frozen base and the trivial reference (absolute)\n\n" + "\n".join(lines) + "\n"
        )
    return "\n".join(out)


def write_references(workdir: str | pathlib.Path) -> pathlib.Path:
    """``workdir/references.md`` from the committed records (:func:`references`), without training anything."""
    path = pathlib.Path(workdir) / "references.md"
    path.write_text("# The frozen base against the trivial references\n\n" + references(read_records(workdir)))
    return path


def report(records: dict[str, list[dict]], seconds: float) -> str:
    """``report.md``: per workload, the all-layer table and the per-layer ablation."""
    out = [f"# Workloads (this invocation: {seconds:.0f} s)\n"]
    for workload, recs in records.items():
        main = [r for r in recs if r["targets"] == "all"]
        ablated = {r["method"] for r in recs if r["targets"] != "all"}
        ablation = sorted(
            (r for r in recs if r["method"] in ablated), key=lambda r: (r["method"], list(TARGETS).index(r["targets"]))
        )
        out.append(f"## {workload}: all layers\n\n{table(main)}\n" if main else "")
        out.append(f"## {workload}: per-layer ablation\n\n{table(ablation)}\n" if ablation else "")
        curves = [
            f"- {r['method']} [{r['targets']}]: " + " ".join(f"{v:.3g}" for v in r["loss_curve"])
            for r in recs
            if "loss_curve" in r
        ]
        out.append(f"### {workload}: error against trainable parameters (held-out conditions)\n\n{pareto(recs)}\n")
        out.append(references({workload: recs}))
        title = f"### {workload}: training loss over 10 windows of steps (reported runs)"
        out.append(title + "\n\n" + "\n".join(curves) + "\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ anchoring


def anchor_dir(anchor: str) -> str:
    """The sub-directory of an anchor's records (``centre+replay`` -> ``centre_replay``)."""
    return anchor.replace("+", "_")


def anchor_study(config: ml_collections.ConfigDict, workdir: str, data_dir: str | None = None) -> dict:
    """Every job of the config once per anchor of ``config.anchors``, into ``workdir/<anchor>/`` (records and
    that anchor's ``report.md``, by :func:`train_and_evaluate`); then ``workdir/report.md`` compares every anchor
    with records in ``workdir`` (those of earlier runs included)."""
    start = time.perf_counter()
    seconds = {}
    for anchor in config.anchors:
        sub = ml_collections.ConfigDict(config.to_dict())
        sub.anchor = anchor
        seconds[anchor] = train_and_evaluate(sub, str(pathlib.Path(workdir, anchor_dir(anchor))), data_dir)["seconds"]
        if config.get("progress", False):
            print(f"anchor {anchor}: {seconds[anchor]:.0f} s", flush=True)
    total = time.perf_counter() - start
    # the comparison covers every anchor with records in workdir, so a run of a subset (or of one more part) keeps it
    records = {a: read_records(pathlib.Path(workdir, anchor_dir(a))) for a in ANCHORS}
    records = {a: recs for a, recs in records.items() if recs}
    pathlib.Path(workdir, "report.md").write_text(anchor_report(records, total, seconds))
    return {"seconds": total, "anchor_seconds": seconds}


def nominal_gap(record: dict, frozen: dict) -> float:
    """Max abs difference of a record's nominal metrics (every run, every metric) from the frozen base's run 0."""
    gaps = [
        np.max(np.abs(np.asarray(record["metrics"]["nominal"][k]) - np.asarray(frozen["metrics"]["nominal"][k][0])))
        for k in METRICS[record["workload"]]
    ]
    return float(max(gaps))


def anchor_report(records: dict[str, dict[str, list[dict]]], seconds: float, anchor_seconds: dict) -> str:
    """``report.md`` of :func:`anchor_study`: per workload, one table per anchor (all layers), one table of every
    (method, anchor) pair, and the nominal gap to the frozen base per record."""
    timing = ", ".join(f"{a} {t:.0f} s" for a, t in anchor_seconds.items())
    out = [f"# Anchoring the nominal condition (this invocation: {seconds:.0f} s; {timing})\n"]
    workloads_seen = sorted({w for by_workload in records.values() for w in by_workload})
    for workload in workloads_seen:
        by_anchor = {a: [r for r in recs.get(workload, []) if r["targets"] == "all"] for a, recs in records.items()}
        for anchor, recs in by_anchor.items():
            if recs:
                out.append(f"## {workload}, anchor `{anchor}`: all layers\n\n{table(recs)}\n")
        methods = list(dict.fromkeys(r["method"] for recs in by_anchor.values() for r in recs))
        rows = [
            dict(r, method=f"{r['method']} [{anchor}]")
            for method in methods
            for anchor, recs in by_anchor.items()
            for r in recs
            if r["method"] == method
        ]
        out.append(f"## {workload}: every method under every anchor\n\n{table(rows)}\n")
        lines = ["| method | anchor | max abs nominal gap to frozen (every run, every metric) |", "|---|---|---|"]
        for anchor, recs in by_anchor.items():
            frozen = [r for r in recs if r["method"] == "frozen"]
            for r in recs:
                if frozen and r["method"] != "frozen":
                    lines.append(f"| {r['method']} | {anchor} | {nominal_gap(r, frozen[0]):.3g} |")
        out.append(f"### {workload}: nominal metrics against the frozen base\n\n" + "\n".join(lines) + "\n")
    return "\n".join(out)


def command_line(study, config_file: str, workdir: str, argv: list[str] | None) -> None:  # pragma: no cover
    """``--config`` (default ``config_file``) and ``--workdir`` flags; runs ``study(config, workdir) -> seconds``,
    then prints the workdir's ``report.md`` and the total time (the entry point of this module and of
    :mod:`experiments.workload_study`)."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", config_file, "A config with get_config().")
    workdir_flag = flags.DEFINE_string("workdir", workdir, "Where records and report.md are written.")

    def go(argv):
        del argv
        seconds = study(config_flag.value, workdir_flag.value)
        print(pathlib.Path(workdir_flag.value, "report.md").read_text())
        print(f"total: {seconds:.0f} s")

    app.run(go, argv)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - command line
    def study(config, workdir):
        return (anchor_study if config.get("anchors") else train_and_evaluate)(config, workdir)["seconds"]

    command_line(study, "configs/workloads.py", "results/workloads", argv)


if __name__ == "__main__":  # pragma: no cover
    main()
