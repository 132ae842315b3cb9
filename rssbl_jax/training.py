"""A small training loop for adapters: a pure train step, resumable orbax checkpoints, non-finite guards.

The step (:mod:`rssbl_jax.train_step`, re-exported here with :func:`restore_latest`) is pure, so the caller picks
one device, ``jax.jit`` on a mesh (:mod:`rssbl_jax.sharding`), ``jax.pmap`` or several processes. Step ``t``
trains on ``batch_fn(t)`` with key ``fold_in(k, t)``: a run resumed at ``t`` replays exactly what an
uninterrupted one would. Checkpoints (:mod:`rssbl_jax.train_checkpoints`) hold adapters, optimizer state, step
and rng, digests and tree structures: damage sets one aside, a caller's mismatch (``adamw`` after ``adam``) is an
error that moves nothing. A step with NaN/inf is not applied and a non-finite state is never saved
(:class:`NonFiniteError`). Metrics stay on the device and are read every ``log_every`` steps, so the host keeps
dispatching while the device computes. Many runs: :mod:`rssbl_jax.runs`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rssbl_jax.patterns import path_str as _path_str
from rssbl_jax.train_checkpoints import _manager, _meta, _nonfinite, _restore_newest, _saved_tree, _to_host
from rssbl_jax.train_checkpoints import restore_latest as restore_latest
from rssbl_jax.train_step import Batch as Batch
from rssbl_jax.train_step import LossFn as LossFn
from rssbl_jax.train_step import StepFn as StepFn
from rssbl_jax.train_step import TrainState as TrainState
from rssbl_jax.train_step import init_train_state as init_train_state
from rssbl_jax.train_step import make_train_step as make_train_step
from rssbl_jax.train_step import state_partition_specs as state_partition_specs

PyTree = Any


class NonFiniteError(FloatingPointError):
    """Training stopped because the loss, gradients, batch (e.g. ``p``), adapters or optimizer state held NaN/inf.

    Attributes:
      step: the step whose update was not applied, or whose state was refused at save time.
      names: ``"loss"``, ``"grads"``, ``"batch/<path>"``, or, when only the optimizer made NaN/inf (e.g. Adam with
        ``eps=0``), ``"params/<path>"``/``"opt_state/<path>"``.
      last_checkpoint: the step of the last good checkpoint, or ``None``.

    >>> import jax, jax.numpy as jnp, optax
    >>> params, tx = {"lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(2)}, optax.sgd(0.1)
    >>> step_fn = jax.jit(make_train_step(lambda params, batch, rng: jnp.sum(params["lora_b"] * batch), tx))
    >>> batches = lambda step: jnp.full(2, jnp.nan) if step == 2 else jnp.ones(2)   # bad data at step 2
    >>> try:
    ...     train(init_train_state(params, tx, jax.random.key(0)), step_fn, batches, num_steps=5)
    ... except NonFiniteError as error:
    ...     print(error.step, error.names, error.last_checkpoint)
    2 ('batch/(root)', 'grads', 'loss') None
    """

    def __init__(self, message: str, *, step: int, names: tuple[str, ...], last_checkpoint: int | None):
        super().__init__(message)
        self.step, self.names, self.last_checkpoint = step, names, last_checkpoint


def _unreplicate(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x[0], tree)


def _fetch(tree: PyTree) -> PyTree:
    """A tree's host values, every copy started before the first is waited for (one sync)."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and leaf.is_fully_addressable:
            leaf.copy_to_host_async()
    return jax.tree.map(_to_host, tree)


def _host_step(step: jax.Array) -> int:
    steps = np.unique(_fetch(step))
    if steps.size != 1:  # several runs (rssbl_jax.runs) advance together
        raise ValueError(f"the runs of state are at different steps {steps.tolist()}; they train in lockstep.")
    return int(steps[0])


def _values(metrics: dict[str, Any], *, replicated: bool) -> dict[str, Any]:
    """Host values of a step's metrics without the finite checks: a float per scalar, an array per run axis."""
    tree = {k: v for k, v in metrics.items() if k not in ("finite", "applied")}
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(_fetch(tree))[0]:
        value = np.asarray(leaf)[0] if replicated else np.asarray(leaf)
        out[_path_str(path)] = value.item() if value.ndim == 0 else value
    return out


def _first_nonfinite(pending: list[tuple[int, dict[str, Any]]], replicated: bool):
    """``(step, names, runs)`` of the first step in ``pending`` that was not applied, or ``None`` (one sync)."""
    flags = _fetch([m["applied"] if "applied" in m else m["finite"] for _, m in pending])
    for (at, metrics), flag in zip(pending, flags, strict=True):
        if all(np.all(v) for v in jax.tree.leaves(flag)):
            continue
        finite = _fetch(metrics["finite"]) if "applied" in metrics else flag
        finite = {k: np.asarray(v)[0] if replicated else np.asarray(v) for k, v in finite.items()}
        bad = tuple(k for k, v in finite.items() if not np.all(v))
        causes = tuple(k for k in bad if not k.startswith(("params/", "opt_state/")))
        bad = causes or bad or ("applied",)  # NaN params follow from NaN grads; name the optimizer only as the cause
        runs = sorted({int(r) for k in bad if k in finite and finite[k].ndim for r in np.flatnonzero(~finite[k])})
        return at, bad, runs
    return None


def _tags(values: dict[str, Any]) -> dict[str, float]:
    """Writer scalars: ``name`` for a scalar, ``name/<run>`` per run of a per-run value."""
    out = {}
    for name, value in values.items():
        if name != "step":
            flat = np.ravel(value)
            out |= (
                {name: float(flat[0])} if np.ndim(value) == 0 else {f"{name}/{i}": float(v) for i, v in enumerate(flat)}
            )
    return out


def train(
    state: TrainState,
    train_step: StepFn,
    batch_fn: Callable[[int], Batch],
    num_steps: int,
    *,
    checkpoint_dir: str | None = None,
    save_every: int = 100,
    max_to_keep: int | None = 3,
    replicated: bool = False,
    log_every: int = 100,
    hook: Callable[[dict[str, Any]], None] | None = None,
    writer: Any = None,
    eval_fn: Callable[[TrainState], Mapping[str, Any]] | None = None,
    eval_every: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainState:
    """Run ``train_step`` until ``num_steps`` steps are done, saving and resuming orbax checkpoints.

    With ``checkpoint_dir`` it first restores the newest intact checkpoint (:func:`restore_latest`), so re-running
    after a crash ends with the params of an uninterrupted run. Every process makes the same call. Metrics are read
    (one host sync, also of the finite checks since the previous read) every ``log_every`` steps, before each
    checkpoint and at the end; at every ``log_every``-th and the last step ``hook``/``writer`` get
    ``{"step": int, "loss": float, "grad_norm": float, "eval/<name>": float, ...}`` (any other scalars of a custom
    step; arrays over runs for :mod:`rssbl_jax.runs`, written as ``loss/0``, ``loss/1``...).

    Args:
      state: the initial state (:func:`init_train_state`), placed as ``train_step`` expects it.
      train_step: :func:`make_train_step`'s step, jitted (with shardings) or pmapped.
      batch_fn: ``batch_fn(step) -> batch``, deterministic in ``step``; global arrays in several processes
        (:func:`rssbl_jax.sharding.shard_batch`); a leading device axis with ``replicated``.
      num_steps: total number of steps of the run (not steps to add).
      checkpoint_dir: where to save and resume, local or remote (``gs://bucket/run``); ``None`` for none.
      save_every, max_to_keep: checkpoint interval in steps (and one at the end); how many are kept (``None``: all).
      replicated: ``True`` for a ``jax.pmap`` step: ``state`` is given unreplicated; checkpoints hold one copy.
      log_every: interval of the host reads, finite checks and ``hook``/``writer`` calls.
      hook: ``hook(metrics)``, called with the dict above.
      writer: clu's ``write_scalars(step, scalars)`` interface (:class:`rssbl_jax.writers.TensorBoardWriter`);
        flushed at the end, closed by the caller.
      eval_fn, eval_every: ``eval_fn(state) -> {name: scalar}`` (state unreplicated), called every ``eval_every``
        steps (default ``log_every``) and at the last step; needs ``hook`` or ``writer``.
      on_step: deprecated, use ``hook``: ``on_step(step, loss)`` after every step (a host sync per step).

    Returns:
      The final state (unreplicated when ``replicated``).

    Raises:
      NonFiniteError: at the read after a step with NaN/inf (naming it; nothing later is kept or saved), or
        instead of saving a non-finite state.
      ValueError: ``num_steps`` below the step of ``state`` or of the restored checkpoint; an interval below 1;
        ``eval_fn`` with nowhere to report; or from :func:`restore_latest`.
      RuntimeError: from :func:`restore_latest`, when checkpoints exist but none is intact.

    >>> import jax, jax.numpy as jnp, optax
    >>> params, tx = {"lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(3)}, optax.sgd(0.1)
    >>> state = init_train_state(params, tx, jax.random.key(0))
    >>> loss = lambda params, batch, rng: jnp.mean((params["lora_b"] - batch) ** 2)
    >>> logged = []
    >>> final = train(state, jax.jit(make_train_step(loss, tx)), lambda step: jnp.zeros(3), num_steps=50,
    ...               log_every=20, hook=logged.append, eval_fn=lambda s: {"max": jnp.abs(s.trainable["lora_b"]).max()})
    >>> # lora_b = 0.9333^t: at step 20 the step's loss is 0.9333^38, the eval after it 0.9333^20
    >>> int(final.step), [(m["step"], round(m["loss"], 4), round(m["eval/max"], 4)) for m in logged]
    (50, [(20, 0.0727, 0.2516), (40, 0.0046, 0.0633), (50, 0.0012, 0.0318)])
    """
    for name, value in (("save_every", save_every), ("log_every", log_every), ("eval_every", eval_every or 1)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1; got {value}.")
    if eval_every is not None and eval_fn is None:
        raise ValueError(f"eval_every={eval_every} needs an eval_fn to call.")
    if eval_fn is not None and hook is None and writer is None:
        raise ValueError("eval_fn's metrics are reported through hook or writer; pass one of them.")
    eval_every = eval_every or log_every
    if on_step is not None:
        warnings.warn(
            "train(on_step=...) is deprecated: it reads the loss back after every step (a host sync per step). Pass "
            "hook=..., called every log_every steps with a dict of metrics (log_every=1 for every step).",
            DeprecationWarning,
            stacklevel=2,
        )
    manager, last_saved = None, None
    if checkpoint_dir is not None:
        manager = _manager(checkpoint_dir, max_to_keep=max_to_keep)
        try:
            state, last_saved = _restore_newest(manager, state)
        except BaseException:
            manager.close()
            raise
    step = _host_step(state.step)
    if num_steps < step:
        if manager is not None:
            manager.close()
        source = f"the checkpoint restored from {checkpoint_dir}" if last_saved is not None else "the given state"
        raise ValueError(
            f"num_steps={num_steps} is below step {step} of {source}; num_steps is the run's total number of steps "
            "(not steps to add), so this run would train nothing. Pass num_steps >= the step, or start afresh."
        )
    if replicated:
        n = jax.local_device_count()
        state = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), state)

    def stop(at: int, names: tuple[str, ...], what: str) -> None:
        saved = last_saved
        if manager is not None:
            manager.wait_until_finished()
            saved = manager.latest_step()
        where = f"step {saved} in {checkpoint_dir}" if saved is not None else "none"
        raise NonFiniteError(f"{what}. Last good checkpoint: {where}.", step=at, names=names, last_checkpoint=saved)

    def save(current: TrainState, at: int) -> None:
        snapshot = _unreplicate(current) if replicated else current
        bad = tuple(_nonfinite(snapshot))
        if bad:
            stop(at, bad, f"refusing to save the state of step {at}: non-finite values in {', '.join(bad)}")
        saved = ocp.args.StandardSave(_saved_tree(snapshot))
        manager.save(at, args=ocp.args.Composite(state=saved, meta=ocp.args.JsonSave(_meta(snapshot))))

    def check(pending: list[tuple[int, dict[str, Any]]]) -> None:
        found = _first_nonfinite(pending, replicated)
        if found is not None:
            at, bad, runs = found
            in_runs = f" (runs {', '.join(map(str, runs))})" if runs else ""
            stop(at, bad, f"non-finite values in {', '.join(bad)}{in_runs} at step {at}; training stopped before "
                          "applying that step's update")  # fmt: skip

    pending: list[tuple[int, dict[str, Any]]] = []  # (step index, metrics) not yet read on the host
    try:
        while step < num_steps:
            state, metrics = train_step(state, batch_fn(step))
            pending.append((step, metrics))
            step += 1
            last = step == num_steps
            save_due = manager is not None and (step % save_every == 0 or last) and step != last_saved
            eval_due = eval_fn is not None and (step % eval_every == 0 or last)
            log_due = step % log_every == 0 or last or eval_due
            if not (log_due or save_due or on_step is not None):
                continue
            check(pending)  # raises for a step that was not applied: nothing after it is reported or saved
            pending.clear()
            if on_step is not None:
                on_step(step, float(np.ravel(_fetch(metrics["loss"]))[0]))
            if log_due and (hook is not None or writer is not None):
                values = {"step": step, **_values(metrics, replicated=replicated)}
                if eval_due:
                    results = dict(eval_fn(_unreplicate(state) if replicated else state))
                    values |= {f"eval/{k}": v for k, v in _values(results, replicated=False).items()}
                if hook is not None:
                    hook(values)
                if writer is not None:
                    writer.write_scalars(step, _tags(values))
            if save_due:
                save(state, step)
                last_saved = step
    finally:
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
        if writer is not None and hasattr(writer, "flush"):
            writer.flush()
    return _unreplicate(state) if replicated else state
