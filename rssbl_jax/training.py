r"""A small training loop for adapters: a pure train step, resumable orbax checkpoints, non-finite guards.

The same code runs on one device, under ``jax.jit`` with shardings on a mesh (data-, tensor- or
FSDP-parallel; see :mod:`rssbl_jax.sharding`), under ``jax.pmap`` and in several processes of JAX's
multi-controller runtime (``jax.distributed.initialize``): the step is one pure function, the caller chooses the
transformation. The state and the step live in :mod:`rssbl_jax.train_step` and the checkpoints in
:mod:`rssbl_jax.train_checkpoints`; their public names are importable from here too.

Only the trainable half of the params (:func:`rssbl_jax.partition`) is differentiated and updated:

.. math::

    \theta_{t+1} = \theta_t + \mathrm{tx}\big(\nabla_\theta\, L(\theta_t \cup W, \text{batch}_t, k_t)\big),
    \qquad \text{batch}_t = \text{batch\_fn}(t), \quad k_t = \mathrm{fold\_in}(k, t)

so the data and randomness of step ``t`` are functions of ``t`` alone and a run resumed at step ``t`` replays
exactly what an uninterrupted run would have done. A checkpoint holds the adapters, the optimizer state, the
step (which is also the data position) and the rng key; the frozen base ``W`` is the caller's and is not
stored, only its shapes (checked on restore).

Every checkpoint also stores, per leaf, its shape, dtype and a SHA-256 of its bytes: orbax/tensorstore read a
flipped bit inside an array file back without complaint, so the digest is what keeps a damaged checkpoint
from being restored silently. It also stores the tree structure of the adapters and of the optimizer state, so
a run resumed with another optimizer (``adamw`` after ``adam``: the same leaves in another tree) is told so
instead of the checkpoint being taken for a damaged one. Only damage (a digest mismatch, a file that cannot be
read) sets a checkpoint aside; a caller's mismatch is an error that leaves every checkpoint where it is.

Non-finite state is never saved: a step whose loss, gradients, batch, new adapters or new optimizer state hold
NaN/inf is not applied, and a state holding them is refused at save time (:class:`NonFiniteError`).

Metrics stay on the device: :func:`train` reads them back every ``log_every`` steps (and before each checkpoint),
not after every step, so the host keeps dispatching steps while the device computes. A ``hook`` and a metric
``writer`` (clu's interface; :class:`rssbl_jax.writers.TensorBoardWriter` writes TensorBoard event files) get
the loss, the gradient norm and an optional ``eval_fn``'s results. Many runs at once (seeds, learning rates) are
:mod:`rssbl_jax.runs`.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Training stopped because the loss, gradients, batch (e.g. ``p``), adapters or optimizer state held NaN/inf.

    Attributes:
      step: the step whose loss/gradients/batch/update was not finite (its update was not applied), or the
        step of a state that was about to be saved with non-finite leaves (nothing was saved).
      names: what was not finite: ``"loss"``, ``"grads"``, ``"batch/<path>"``, or, when those were finite but
        the optimizer produced NaN/inf (e.g. Adam with ``eps=0`` on a zero gradient), ``"params/<path>"`` and
        ``"opt_state/<path>"``.
      last_checkpoint: the step of the last good checkpoint, or ``None``.

    >>> import jax, jax.numpy as jnp, optax
    >>> tx = optax.sgd(0.1)
    >>> params = {"lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(2)}
    >>> state = init_train_state(params, tx, jax.random.key(0))
    >>> loss = lambda params, batch, rng: jnp.sum(params["lora_b"] * batch)
    >>> batches = lambda step: jnp.full(2, jnp.nan) if step == 2 else jnp.ones(2)   # bad data at step 2
    >>> try:
    ...     train(state, jax.jit(make_train_step(loss, tx)), batches, num_steps=5)
    ... except NonFiniteError as error:
    ...     print(error.step, error.names, error.last_checkpoint)
    2 ('batch/(root)', 'grads', 'loss') None
    """

    def __init__(self, message: str, *, step: int, names: tuple[str, ...], last_checkpoint: int | None):
        super().__init__(message)
        self.step, self.names, self.last_checkpoint = step, names, last_checkpoint


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


def _replicate(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def _unreplicate(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: x[0], tree)


def _fetch(tree: PyTree) -> PyTree:
    """A tree's values on the host, all copies started before the first is waited for (one sync per call)."""
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
    """Host values of a step's metrics, the finite checks left out: a float per scalar, an array per run axis."""
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
    """Scalars for a metric writer: ``name`` for a scalar, ``name/<run>`` for each run of a per-run value."""
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

    With ``checkpoint_dir`` the run first restores the newest intact checkpoint there
    (:func:`restore_latest`), so re-running the same command after a crash or preemption continues where it
    left off and, the data being ``batch_fn(step)``, ends with the same params as an uninterrupted run.
    Checkpoints (adapters, optimizer state, step, rng; see the module docstring) are written every
    ``save_every`` steps and at the end, keeping the newest ``max_to_keep``. In several processes every
    process runs this same call (orbax coordinates the writes).

    The loop does not wait for the device between steps: each step's metrics stay on the device and are read
    back together every ``log_every`` steps, before each checkpoint and at the end (one host sync each). Then
    the finite checks of every step since the last read are looked at (a step that failed them was not applied,
    and nothing after it is kept or saved), and at every ``log_every``-th step and the last one ``hook`` is
    called and ``writer`` written with that step's metrics::

        {"step": int, "loss": float, "grad_norm": float, "eval/<name>": float, ...}

    where ``loss`` and ``grad_norm`` are the step's own (:func:`make_train_step`; any other scalar metrics a
    custom step returns are passed on too) and the ``eval/`` entries, at every ``eval_every``-th step and the
    last one, are ``eval_fn(state)`` of the state after that step. When the state carries several runs
    (:mod:`rssbl_jax.runs`) each value is an array over the runs, and the writer gets ``loss/0``, ``loss/1``...

    Args:
      state: the initial state (:func:`init_train_state`), placed as ``train_step`` expects it.
      train_step: :func:`make_train_step`'s step, jitted (with shardings) or pmapped.
      batch_fn: ``batch_fn(step) -> batch``, deterministic in ``step`` (e.g. drawn from
        ``fold_in(key, step)``); in several processes it returns global arrays
        (:func:`rssbl_jax.sharding.shard_batch`); with ``replicated`` it has a leading device axis.
      num_steps: total number of steps of the run (not steps to add).
      checkpoint_dir: where to save and resume from, local or remote (``gs://bucket/run``: orbax commits each
        checkpoint there with a commit file); ``None`` for no checkpoints.
      save_every: checkpoint interval in steps.
      max_to_keep: how many checkpoints to keep (``None`` keeps all).
      replicated: ``True`` when ``train_step`` is a ``jax.pmap``: ``state`` is given unreplicated, is
        replicated over the local devices for the steps, and checkpoints hold one copy.
      log_every: interval in steps of the host reads, the finite checks and the ``hook``/``writer`` calls.
      hook: ``hook(metrics)``, called with the dict above.
      writer: a metric writer, any object with clu's ``write_scalars(step, scalars)`` (e.g.
        :class:`rssbl_jax.writers.TensorBoardWriter`, or ``clu.metric_writers.create_default_writer``);
        ``flush()`` is called at the end if it has one, closing it is the caller's.
      eval_fn: ``eval_fn(state) -> {name: scalar}`` (the state unreplicated); needs ``hook`` or ``writer``.
      eval_every: evaluation interval in steps (default ``log_every``).
      on_step: deprecated, use ``hook``: called as ``on_step(step, loss)`` after every step, which makes every
        step wait for the device (a host sync per step).

    Returns:
      The final state (unreplicated when ``replicated``).

    Raises:
      NonFiniteError: when the loss, gradients or batch (``p`` included) held NaN/inf, or the update would make
        adapters or optimizer state non-finite; raised at the next read (up to ``log_every`` steps later),
        naming that step, and nothing of that step or after it is reported or saved: the last good checkpoint
        is kept. Also raised, naming the step and leaves, instead of saving a state that holds NaN/inf.
      ValueError: when ``num_steps`` is below the step of ``state`` or of the restored checkpoint; for an interval
        below 1 or ``eval_fn`` with nowhere to report; and from :func:`restore_latest`.
      RuntimeError: from :func:`restore_latest`.

    >>> import jax, jax.numpy as jnp, optax
    >>> tx = optax.sgd(0.1)
    >>> params = {"lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(3)}
    >>> state = init_train_state(params, tx, jax.random.key(0))
    >>> loss = lambda params, batch, rng: jnp.mean((params["lora_b"] - batch) ** 2)
    >>> logged = []
    >>> final = train(state, jax.jit(make_train_step(loss, tx)), lambda step: jnp.zeros(3), num_steps=50,
    ...               log_every=20, hook=logged.append, eval_fn=lambda s: {"max": jnp.abs(s.trainable["lora_b"]).max()})
    >>> int(final.step), [(m["step"], round(m["loss"], 4), round(m["eval/max"], 4)) for m in logged]
    (50, [(20, 0.0727, 0.2516), (40, 0.0046, 0.0633), (50, 0.0012, 0.0318)])

    Here ``lora_b`` is ``(1 - 0.2/3)^t`` after ``t`` steps: step 20's loss is ``0.9333^38``, its evaluation
    ``0.9333^20``.
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
    n_local = jax.local_device_count()
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
        state = _replicate(state, n_local)

    def save(current: TrainState, at: int) -> None:
        snapshot = _unreplicate(current) if replicated else current
        bad = _nonfinite(snapshot)
        if bad:
            manager.wait_until_finished()
            good = manager.latest_step()
            raise NonFiniteError(
                f"refusing to save the state of step {at}: non-finite values in {', '.join(bad)}. Last good "
                f"checkpoint: {f'step {good} in {checkpoint_dir}' if good is not None else 'none'}.",
                step=at,
                names=tuple(bad),
                last_checkpoint=good,
            )
        manager.save(
            at,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_saved_tree(snapshot)), meta=ocp.args.JsonSave(_meta(snapshot))
            ),
        )

    def check(pending: list[tuple[int, dict[str, Any]]]) -> None:
        found = _first_nonfinite(pending, replicated)
        if found is None:
            return
        at, bad, runs = found
        saved = last_saved
        if manager is not None:
            manager.wait_until_finished()
            saved = manager.latest_step()
        where = f"step {saved} in {checkpoint_dir}" if saved is not None else "none"
        in_runs = f" (runs {', '.join(map(str, runs))})" if runs else ""
        raise NonFiniteError(
            f"non-finite values in {', '.join(bad)}{in_runs} at step {at}; training stopped before applying that "
            f"step's update. Last good checkpoint: {where}.",
            step=at,
            names=bad,
            last_checkpoint=saved,
        )

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
