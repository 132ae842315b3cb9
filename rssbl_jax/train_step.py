r"""The train state and the pure train step that :func:`rssbl_jax.train` and :mod:`rssbl_jax.runs` iterate.

Only the trainable half of the params (:func:`rssbl_jax.partition`) is differentiated and updated:

.. math::

    \theta_{t+1} = \theta_t + \mathrm{tx}\big(\nabla_\theta\, L(\theta_t \cup W, \text{batch}_t, k_t)\big),
    \qquad k_t = \mathrm{fold\_in}(k, t)

A step with NaN/inf in its loss, gradients, batch or new state is not applied (:func:`make_train_step`). It is pure:
the caller picks ``jax.jit`` (with :func:`state_partition_specs`), ``jax.pmap`` or ``jax.vmap`` over runs; the loop
(:mod:`rssbl_jax.training`) and checkpoints (:mod:`rssbl_jax.train_checkpoints`) build on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from rssbl_jax.partition import combine, partition
from rssbl_jax.patterns import path_str as _path_str

PyTree = Any
Batch = Any
LossFn = Callable[[PyTree, Batch, jax.Array], jax.Array]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", dict[str, Any]]]


class TrainState(NamedTuple):
    """Everything a training run carries from step to step.

    Attributes:
      step: int32 scalar, the steps taken; also the data position (step ``t`` trains on ``batch_fn(t)``).
      trainable: the adapter half of the params (``None`` at frozen leaves), see :func:`rssbl_jax.partition`.
      frozen: the base half (``None`` at adapter leaves); never updated nor checkpointed.
      opt_state: the optimizer state of ``trainable``.
      rng: ``uint32`` key data (``jax.random.key_data``); step ``t`` gets ``fold_in(key, t)``.

    >>> TrainState._fields
    ('step', 'trainable', 'frozen', 'opt_state', 'rng')
    """

    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    opt_state: optax.OptState
    rng: jax.Array


def init_train_state(
    params: PyTree,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    *,
    config: Any = None,
    trainable: PyTree | None = None,
) -> TrainState:
    """Split ``params`` into trainable adapters and frozen base and initialise ``tx`` on the adapters only.

    Args:
      params: a whole params tree (base + adapter leaves), e.g. ``variables["params"]``.
      tx: the adapters' optimizer, plain: it sees only the adapters (no :func:`rssbl_jax.freeze_base`).
      rng: a PRNG key (typed or raw) for the loss function's randomness.
      config: the :class:`~rssbl_jax.AdapterConfig` (or adapted model), for :func:`rssbl_jax.trainable_mask`.
      trainable: a bool tree over ``params`` saying which leaves train, overriding ``config``; default:
        :func:`rssbl_jax.trainable_mask`.

    Returns:
      A :class:`TrainState` at step 0 (float32 params give float32 optimizer state, whatever the compute dtype).

    >>> import optax
    >>> params = {"kernel": jnp.ones(2)} | dict.fromkeys(["lora_a", "lora_b", "lora_c"], jnp.ones(1))
    >>> state = init_train_state(params, optax.sgd(0.1), jax.random.key(0))
    >>> int(state.step), state.trainable["kernel"], state.frozen["lora_a"], state.rng.dtype
    (0, None, None, dtype('uint32'))
    """
    trainable, frozen = partition(params, config, mask=trainable)
    if jnp.issubdtype(jnp.asarray(rng).dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return TrainState(jnp.zeros((), jnp.int32), trainable, frozen, tx.init(trainable), jnp.asarray(rng, jnp.uint32))


def _finite_leaves(tree: PyTree) -> dict[str, jax.Array]:
    return {
        _path_str(path): jnp.all(jnp.isfinite(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    }


def make_train_step(
    loss_fn: LossFn, tx: optax.GradientTransformation, *, axis_name: str | None = None, check_finite: bool = True
) -> StepFn:
    r"""A pure train step ``(state, batch) -> (state, metrics)`` that updates only the adapters.

    It differentiates ``loss_fn`` w.r.t. ``state.trainable`` (the frozen half is a constant), applies ``tx`` and
    checks the loss, the gradients, every floating leaf of ``batch`` (``p`` included) and the updated state for
    NaN/inf; if any fails, the state comes back unchanged and ``metrics["finite"]`` says which (:func:`rssbl_jax.train`
    then raises :class:`~rssbl_jax.training.NonFiniteError`). Wrap the step in ``jax.jit`` (with shardings on a mesh,
    where XLA inserts the reductions) or in ``jax.pmap`` with the same ``axis_name``.

    Args:
      loss_fn: ``loss_fn(params, batch, rng) -> scalar`` on the whole params tree. For mixed precision build the
        model with ``dtype=jnp.bfloat16`` and keep float32 params: gradients and optimizer state stay float32.
      tx: the adapters' optimizer, the one given to :func:`init_train_state`.
      axis_name: the ``pmap`` axis over which loss, gradients and checks are combined (the loss is then a mean over
        the global batch), or ``None``.
      check_finite: ``False`` skips the checks (a reduction over every leaf, every step; ``metrics["finite"]`` is
        empty) and always applies the update: for many small runs in one ``jax.lax.scan``, where a diverged run
        simply shows a non-finite loss.

    Returns:
      ``step(state, batch) -> (state, metrics)``, ``metrics = {"loss": f32, "grad_norm": f32 (global L2 norm of
      the adapter gradients), "applied": bool, "finite": {"loss", "grads", "batch/<path>", "params/<path>",
      "opt_state/<path>": bool}}``; loss and gradient norm are those before the update.

    >>> import optax
    >>> tx, params = optax.sgd(0.5), {"w": jnp.zeros(2)} | dict.fromkeys(["lora_a", "lora_b", "lora_c"], jnp.ones(2))
    >>> step = jax.jit(make_train_step(lambda params, batch, rng: jnp.sum((params["lora_b"] - batch) ** 2), tx))
    >>> state, metrics = step(init_train_state(params, tx, jax.random.key(0)), jnp.zeros(2))
    >>> int(state.step), state.trainable["lora_b"].tolist(), float(metrics["loss"])
    (1, [0.0, 0.0], 2.0)
    >>> state, metrics = step(state, jnp.array([0.0, jnp.nan]))   # not applied
    >>> int(state.step), bool(metrics["applied"]), bool(metrics["finite"]["batch/(root)"])
    (1, False, False)
    """

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Any]]:
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if axis_name is not None:  # under pmap each device draws its own randomness (e.g. dropout masks)
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

        loss, grads = jax.value_and_grad(lambda t: loss_fn(combine(t, state.frozen), batch, rng))(state.trainable)
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        grad_norm = optax.tree_utils.tree_norm(grads).astype(jnp.float32)
        if not check_finite:
            state = TrainState(state.step + 1, trainable, state.frozen, opt_state, state.rng)
            return state, {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm, "applied": jnp.array(True),
                           "finite": {}}  # fmt: skip

        finite = {"loss": jnp.isfinite(loss), "grads": jnp.all(jnp.stack([True, *_finite_leaves(grads).values()]))}
        finite |= {f"batch/{name or '(root)'}": ok for name, ok in _finite_leaves(batch).items()}
        # The optimizer can make NaN from finite gradients (e.g. Adam with eps=0 on a zero gradient).
        finite |= {f"params/{name}": ok for name, ok in _finite_leaves(trainable).items()}
        finite |= {f"opt_state/{name}": ok for name, ok in _finite_leaves(opt_state).items()}
        if axis_name is not None:
            finite = {k: jax.lax.pmin(v.astype(jnp.int32), axis_name) > 0 for k, v in finite.items()}
        ok = jnp.all(jnp.stack(list(finite.values())))

        # The frozen base passes through untouched (no select), so a vmap over runs can share one copy of it.
        new, old = (state.step + 1, trainable, opt_state), (state.step, state.trainable, state.opt_state)
        counter, trainable, opt_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        state = TrainState(counter, trainable, state.frozen, opt_state, state.rng)
        return state, {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm, "applied": ok, "finite": finite}

    return step


def state_partition_specs(state: TrainState, tx: optax.GradientTransformation, param_specs: PyTree) -> TrainState:
    """Partition specs for a whole :class:`TrainState`, given the specs of the params.

    The adapters and the optimizer's copies of them (e.g. Adam's moments, via ``optax.tree_map_params``) take the
    params' specs, the frozen base its own; step, rng and optimizer scalars are replicated. Map with
    :func:`rssbl_jax.sharding.named_shardings` for ``jax.jit``.

    Args:
      state: the state (arrays or ``jax.ShapeDtypeStruct``).
      tx: its optimizer.
      param_specs: a ``PartitionSpec`` tree over the whole params (:func:`rssbl_jax.sharding.adapter_partition_specs`).

    Returns:
      A :class:`TrainState` of ``PartitionSpec``.

    >>> import optax
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"kernel": jnp.ones((4, 2)), "lora_a": jnp.ones((4, 1)), "lora_b": jnp.ones(2), "lora_c": jnp.ones(1)}
    >>> specs = {"kernel": P("model", None), "lora_a": P("model", None), "lora_b": P(), "lora_c": P()}
    >>> tx = optax.adam(1e-3)
    >>> specs = state_partition_specs(init_train_state(params, tx, jax.random.key(0)), tx, specs)
    >>> specs.opt_state[0].mu["lora_a"], specs.opt_state[0].count, specs.frozen["kernel"]
    (P('model', None), P(), P('model', None))
    """
    trainable_specs, frozen_specs = partition(param_specs)
    opt_specs = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        state.opt_state,
        trainable_specs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    return TrainState(PartitionSpec(), trainable_specs, frozen_specs, opt_specs, PartitionSpec())
