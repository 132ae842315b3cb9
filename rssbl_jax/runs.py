r"""Many training runs at once: the train step ``jax.vmap``-ed over a leading run axis, compiled once.

Runs ``i = 1..R`` (seeds, learning rates, data draws) take their steps together,

.. math::

    \theta^{(i)}_{t+1} = \theta^{(i)}_t + \mathrm{tx}\big(\nabla_\theta\, L(\theta^{(i)}_t \cup W,
    \text{batch}^{(i)}_t, k^{(i)}_t);\ \eta^{(i)}\big),

each as :func:`rssbl_jax.make_train_step` would take it alone (up to float rounding), in one program.
:func:`stack_runs` stacks the runs' own :class:`~rssbl_jax.TrainState` (own key and adapter initialisation);
:func:`init_runs` builds the stack in one traced call from params already stacked (``jax.vmap(model.init)(keys)``),
for runs that start and train inside ``jax.jit`` (a ``jax.lax.scan`` over :func:`vmap_train_step`). A
learning rate ``η⁽ⁱ⁾`` (or any numeric hyperparameter) differs per run under ``optax.inject_hyperparams``: it then
lives in the stacked optimizer state, where the one compiled step reads each run's own. The frozen base ``W`` is
one copy for all runs unless ``share_frozen=False`` (a base per data draw). :func:`train_many` runs
:func:`rssbl_jax.train` on the stack: checkpoints, non-finite checks (naming the failed runs) and hooks (a value
per run) work as for one run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rssbl_jax.patterns import path_str
from rssbl_jax.training import Batch, StepFn, TrainState, init_train_state, train


def _axes(share_frozen: bool) -> TrainState:
    return TrainState(step=0, trainable=0, frozen=None if share_frozen else 0, opt_state=0, rng=0)


def stack_runs(states: Sequence[TrainState], *, share_frozen: bool = True) -> TrainState:
    """Stack runs' states on a new leading axis (the run axis) for :func:`vmap_train_step`.

    Args:
      states: one :class:`~rssbl_jax.TrainState` per run, all at one step, with the same adapter and optimizer trees.
      share_frozen: keep one unstacked copy of the frozen base (equal in every run); ``False`` stacks a base per run.

    Raises:
      ValueError: for no runs, runs whose trees differ, or a shared base that differs (naming run and leaf).

    >>> import jax, jax.numpy as jnp, optax, rssbl_jax
    >>> params = {"kernel": jnp.ones(2), "lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(2)}
    >>> sgd = optax.inject_hyperparams(optax.sgd)
    >>> states = [rssbl_jax.init_train_state(params, sgd(learning_rate=lr), jax.random.key(0)) for lr in (.1, .2, .3)]
    >>> runs = stack_runs(states)
    >>> runs.trainable["lora_b"].shape, runs.frozen["kernel"].shape, runs.opt_state.hyperparams["learning_rate"]
    ((3, 2), (2,), Array([0.1, 0.2, 0.3], dtype=float32))
    """
    if not states:
        raise ValueError("stack_runs needs at least one run's state; got none.")
    first = states[0]
    for i, state in enumerate(states[1:], 1):
        for name in ("trainable", "opt_state", "frozen"):
            if jax.tree.structure(getattr(state, name)) != jax.tree.structure(getattr(first, name)):
                raise ValueError(
                    f"run {i}'s {name} has another tree than run 0's: {jax.tree.structure(getattr(state, name))} vs "
                    f"{jax.tree.structure(getattr(first, name))}. Every run needs the same model and optimizer."
                )
    if share_frozen:
        _check_shared(first.frozen, [state.frozen for state in states])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return stacked._replace(frozen=first.frozen) if share_frozen else stacked


def init_runs(params: Any, tx: Any, rngs: jax.Array, *, trainable: Any = None, share_frozen: bool = True) -> TrainState:
    """The stacked state of ``R`` runs from stacked ``params`` (a leading run axis on every leaf), traceable.

    Run ``i`` is :func:`rssbl_jax.init_train_state` of ``params[i]`` with key ``rngs[i]``, as :func:`stack_runs`
    of those states would be, without leaving the device: call it under ``jax.jit`` (with the stacked init in the same
    function, XLA never builds the ``R`` copies of a shared base).

    Args:
      params: the whole params tree of every run, leaves ``[R, ...]``.
      tx: the runs' optimizer; per-run hyperparameters can live in its state (``optax.inject_hyperparams``) or in the
        step's batch (see :func:`vmap_train_step`).
      rngs: ``[R]`` keys, typed or raw.
      trainable: a bool tree over one run's params, as in :func:`rssbl_jax.init_train_state`.
      share_frozen: keep run 0's frozen leaves only; the caller vouches that every run's base is the same (a loaded
        base; checked when ``params`` is concrete). ``False`` keeps a base per run (e.g. one per data draw).

    >>> import jax, jax.numpy as jnp, optax
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> layer = lambda k: {"kernel": jnp.ones(2), "lora_a": jnp.ones(1), "lora_b": jax.random.normal(k, (2,))}
    >>> params = jax.vmap(layer)(keys)   # each run's own adapters, one base
    >>> runs = init_runs(params, optax.adam(1e-2), keys)
    >>> runs.trainable["lora_b"].shape, runs.frozen["kernel"].shape, runs.step.shape
    ((3, 2), (2,), (3,))
    """
    states = jax.vmap(lambda p, k: init_train_state(p, tx, k, trainable=trainable))(params, rngs)
    if not share_frozen:
        return states
    frozen = jax.tree.map(lambda a: a[0], states.frozen)
    if not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(states.frozen)):
        _check_shared(frozen, [jax.tree.map(lambda a, i=i: a[i], states.frozen) for i in range(len(rngs))])
    return states._replace(frozen=frozen)


def _check_shared(first: Any, others: Sequence[Any]) -> None:
    paths = jax.tree_util.tree_flatten_with_path(first)[0]
    for i, tree in enumerate(others):
        for (path, a), b in zip(paths, jax.tree.leaves(tree), strict=True):
            if a is not b and not (np.shape(a) == np.shape(b) and np.array_equal(a, b)):
                raise ValueError(
                    f"run {i}'s frozen '{path_str(path)}' differs from run 0's; runs that share_frozen share one "
                    "base. Pass share_frozen=False to stack a base per run."
                )


def unstack_runs(state: TrainState, *, share_frozen: bool = True) -> list[TrainState]:
    """The runs of a stacked ``state``, one :class:`~rssbl_jax.TrainState` each (the inverse of :func:`stack_runs`).

    Args:
      state: a state with a leading run axis.
      share_frozen: whether its frozen base is one copy (as given to :func:`stack_runs`).

    >>> import jax, jax.numpy as jnp, optax, rssbl_jax
    >>> params = {"kernel": jnp.ones(2), "lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(2)}
    >>> states = [rssbl_jax.init_train_state(params, optax.sgd(0.1), jax.random.key(seed)) for seed in range(4)]
    >>> runs = unstack_runs(stack_runs(states))
    >>> len(runs), runs[2].trainable["lora_b"].shape, bool((runs[2].rng == states[2].rng).all())
    (4, (2,), True)
    """
    axes = list(zip(state, _axes(share_frozen), strict=True))
    return [
        TrainState(*(x if axis is None else jax.tree.map(lambda a, i=i: a[i], x) for x, axis in axes))
        for i in range(int(np.shape(state.step)[0]))
    ]


def vmap_train_step(train_step: StepFn, *, batch_axis: Any = 0, share_frozen: bool = True) -> StepFn:
    """A train step over a stack of runs: ``jax.vmap`` of ``train_step`` over the leading run axis.

    Args:
      train_step: :func:`rssbl_jax.make_train_step`'s step, not jitted (it leaves the frozen base as it is), or any
        ``(state, batch) -> (state, metrics)`` built on it (e.g. one that reads its run's learning rate from the batch
        and builds its optimizer with it).
      batch_axis: ``0`` when ``batch[i]`` is run ``i``'s own batch, ``None`` when all runs share one batch, or a tree
        prefix of the batch with ``0``/``None`` per part (``jax.vmap``'s ``in_axes``): ``({"lr": 0}, None)``.
      share_frozen: whether the state's frozen base is one copy (see :func:`stack_runs`).

    Returns:
      ``step(runs, batch) -> (runs, metrics)``, every metric with a leading run axis; wrap it in ``jax.jit``.

    >>> import jax, jax.numpy as jnp, optax, rssbl_jax
    >>> params = {"lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(2)}
    >>> sgd = optax.inject_hyperparams(optax.sgd)
    >>> runs = [rssbl_jax.init_train_state(params, sgd(learning_rate=lr), jax.random.key(0)) for lr in (0.1, 0.5)]
    >>> loss = lambda params, batch, rng: jnp.sum((params["lora_b"] - batch) ** 2)
    >>> step = jax.jit(vmap_train_step(rssbl_jax.make_train_step(loss, sgd(learning_rate=0.1)), batch_axis=None))
    >>> runs, metrics = step(stack_runs(runs), jnp.zeros(2))
    >>> [round(float(b), 4) for b in runs.trainable["lora_b"][:, 0]], metrics["loss"].tolist()   # b - 2 lr b
    ([0.8, 0.0], [2.0, 2.0])
    """
    axes = _axes(share_frozen)
    return jax.vmap(train_step, in_axes=(axes, batch_axis), out_axes=(axes, 0))


def train_many(
    states: Sequence[TrainState],
    train_step: StepFn,
    batch_fn: Callable[[int], Batch],
    num_steps: int,
    *,
    batch_axis: int | None = 0,
    share_frozen: bool = True,
    **train_kwargs: Any,
) -> list[TrainState]:
    """Train several runs at once (one compiled, vmapped step) with :func:`rssbl_jax.train`.

    The same as ``train(s, jax.jit(train_step), ...)`` for each run ``s`` (up to float rounding).

    Args:
      states: one :class:`~rssbl_jax.TrainState` per run (see :func:`stack_runs`).
      train_step: :func:`rssbl_jax.make_train_step`'s step, not jitted, with any run's optimizer (see the module).
      batch_fn: ``batch_fn(step) -> batch``: run ``i`` trains on ``batch_fn(step)[i]`` when ``batch_axis=0``.
      num_steps: total number of steps of every run.
      batch_axis, share_frozen: as in :func:`vmap_train_step`.
      **train_kwargs: passed to :func:`rssbl_jax.train`; hook values are arrays over the runs, ``eval_fn`` gets
        the stacked state.

    Returns:
      The final state of each run, in order.

    >>> import jax, jax.numpy as jnp, optax, rssbl_jax
    >>> params = {"lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(3)}
    >>> adam, lrs = optax.inject_hyperparams(optax.adam), (0.003, 0.03)
    >>> states = [rssbl_jax.init_train_state(params, adam(learning_rate=lr), jax.random.key(0)) for lr in lrs]
    >>> loss = lambda params, batch, rng: jnp.mean((params["lora_b"] - batch) ** 2)
    >>> finals = train_many(states, rssbl_jax.make_train_step(loss, adam(learning_rate=lrs[0])),
    ...                     lambda step: jnp.zeros(3), 100, batch_axis=None)
    >>> [round(float(f.trainable["lora_b"][0]), 2) for f in finals]   # Adam moves by about lr per step
    [0.72, 0.01]
    """
    if train_kwargs.get("replicated"):
        raise ValueError("train_many compiles one vmapped step with jax.jit; replicated (pmap) is not supported.")
    step = jax.jit(vmap_train_step(train_step, batch_axis=batch_axis, share_frozen=share_frozen))
    final = train(stack_runs(states, share_frozen=share_frozen), step, batch_fn, num_steps, **train_kwargs)
    return unstack_runs(final, share_frozen=share_frozen)
