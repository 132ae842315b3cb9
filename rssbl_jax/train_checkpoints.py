"""Training checkpoints: the saving and restoring half of :func:`rssbl_jax.training.train`.

Each step is one orbax checkpoint (orbax commits it) in an ``etils.epath`` directory, local or remote such as
``gs://``: adapters, optimizer state, step and rng, beside metadata. Orbax reads a flipped bit back without
complaint, so the metadata holds every saved leaf's shape, dtype and SHA-256 (:func:`rssbl_jax.digests.array_sha256`,
as adapter checkpoints), the frozen base's shapes (the base itself is the caller's), and the adapters' and
optimizer state's tree structures: :func:`restore_latest` can then tell damage from a change of architecture or
optimizer. Kept apart from the loop (one concern per module); :mod:`rssbl_jax.training` re-exports it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from rssbl_jax.digests import array_sha256, as_path, json_sha256
from rssbl_jax.patterns import path_str as _path_str

if TYPE_CHECKING:
    from rssbl_jax.train_step import TrainState

PyTree = Any

logger = logging.getLogger("rssbl_jax.training")

_FORMAT = "rssbl_jax.training/1"


def _to_host(x: jax.Array) -> np.ndarray:
    """The global value of an array on this host (gathered across processes when it is not addressable)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _saved_tree(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng}


def _describe(tree: PyTree, *, digest: bool) -> dict[str, dict[str, Any]]:
    """``{path: {"shape", "dtype"[, "sha256"]}}`` for every leaf of ``tree``."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)
        entry: dict[str, Any] = {"shape": list(np.shape(leaf)), "dtype": str(dtype)}
        if digest:
            entry["sha256"] = array_sha256(_to_host(leaf))
        out[_path_str(path)] = entry
    return out


def _skeleton(tree: PyTree) -> str:
    """A short picture of a tree's containers: ``tuple(ScaleByAdamState(*, {...}, {...}), EmptyState())``."""
    if isinstance(tree, dict):
        return "{...}"
    if isinstance(tree, (tuple, list)):
        return f"{type(tree).__name__}({', '.join(_skeleton(x) for x in tree)})"
    return "None" if tree is None else "*"


def _structure(state: TrainState) -> dict[str, dict[str, str]]:
    return {
        name: {"treedef": str(jax.tree.structure(tree)), "skeleton": _skeleton(tree)}
        for name, tree in (("trainable", state.trainable), ("opt_state", state.opt_state))
    }


def _meta(state: TrainState) -> dict[str, Any]:
    meta = {
        "format": _FORMAT,
        "leaves": _describe(_saved_tree(state), digest=True),
        "frozen": _describe(state.frozen, digest=False),
        "structure": _structure(state),
    }
    return {**meta, "sha256": json_sha256(meta)}


def _nonfinite(state: TrainState) -> list[str]:
    """The floating leaves of the adapters and optimizer state that hold NaN or inf (read on the host)."""
    bad = []
    for kind, tree in (("params", state.trainable), ("opt_state", state.opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            value = _to_host(leaf)
            if np.issubdtype(value.dtype, np.inexact) and not np.all(np.isfinite(value)):
                bad.append(f"{kind}/{_path_str(path)}")
    return bad


def _compare(kind: str, saved: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise a ValueError naming the first path whose presence, shape or dtype differs."""
    for path in sorted(set(saved) | set(expected), key=lambda p: (not p.startswith("trainable/"), p)):
        if path not in expected or path not in saved:
            side = "in the checkpoint but not here" if path in saved else "here but not in the checkpoint"
            raise ValueError(f"checkpoint {where} does not fit this model: {kind} '{path}' is {side}.")
        a, b = saved[path], expected[path]
        if list(a["shape"]) != list(b["shape"]) or a["dtype"] != b["dtype"]:
            raise ValueError(
                f"checkpoint {where} does not fit this model: {kind} '{path}' is {a['dtype']}{tuple(a['shape'])} in "
                f"the checkpoint but {b['dtype']}{tuple(b['shape'])} here."
            )


class _Corrupt(Exception):
    pass


def _manager(directory: str | os.PathLike, *, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    """Orbax's manager of ``directory`` (local, or remote such as ``gs://``: orbax commits each step its own way)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep)
    return ocp.CheckpointManager(as_path(directory), options=options, item_names=("state", "meta"))


def _restore_step(manager: ocp.CheckpointManager, step: int, state: TrainState) -> TrainState:
    where = f"{manager.directory}/{step}"
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as error:  # orbax/tensorstore raise many kinds; all mean "cannot read this step"
        raise _Corrupt(f"metadata could not be read: {type(error).__name__}: {str(error)[:300]}") from error
    found = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(found, str) and found.startswith("rssbl_jax.training/") and found != _FORMAT:
        # Unknown (newer) format: refuse, rather than set the step aside and silently resume from an older one.
        raise ValueError(
            f"checkpoint {where} has format {found!r}, not this rssbl_jax's {_FORMAT!r} (written by a newer release?); "
            "upgrade rssbl_jax to resume from it. The checkpoint is kept."
        )
    if found != _FORMAT or not all(isinstance(meta.get(key), dict) for key in ("leaves", "frozen")):
        raise _Corrupt("metadata is not a rssbl_jax training checkpoint's (damaged or written by something else)")
    if "sha256" in meta and meta["sha256"] != json_sha256(meta):  # absent before it was stored
        raise _Corrupt("metadata does not match its SHA-256 digest (the metadata file is damaged)")
    _compare("parameter", meta["leaves"], _describe(_saved_tree(state), digest=False), where)
    _compare("frozen base parameter", meta["frozen"], _describe(state.frozen, digest=False), where)
    saved_structure = meta.get("structure")  # absent in checkpoints written before it was stored
    if isinstance(saved_structure, dict):
        what = {"trainable": "the adapters' tree", "opt_state": "the optimizer state's tree"}
        hint = {"trainable": "was the model changed?", "opt_state": "was the optimizer changed, e.g. adam -> adamw?"}
        for name, now in _structure(state).items():
            then = saved_structure.get(name, {})
            if then.get("treedef") != now["treedef"]:
                raise ValueError(
                    f"checkpoint {where} does not fit this run: {what[name]} has another structure ({hint[name]}). "
                    f"In the checkpoint: {then.get('skeleton')}; here: {now['skeleton']}. The checkpoint is kept."
                )
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saved_tree(state))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    except Exception as error:
        raise _Corrupt(f"arrays could not be read: {type(error).__name__}: {str(error)[:300]}") from error
    got = _describe(restored, digest=True)
    for path, entry in meta["leaves"].items():
        if got[path]["sha256"] != entry["sha256"]:
            raise _Corrupt(f"'{path}' does not match its SHA-256 digest (the data file is damaged)")
    return state._replace(**restored)  # step, trainable, opt_state, rng: the keys of _saved_tree


def restore_latest(checkpoint_dir: str | os.PathLike, state: TrainState) -> tuple[TrainState, int | None]:
    """Restore the newest good checkpoint in ``checkpoint_dir`` into the layout (shardings) of ``state``.

    Newest first; one that cannot be read or fails its SHA-256 digests is skipped with a warning and renamed
    ``<step>.corrupt`` (so it blocks no later save). One of another architecture or optimizer (a leaf of the
    adapters, optimizer state or frozen base missing, added or of another shape or dtype; or the same leaves in
    another tree, e.g. ``adamw`` state for ``adam``'s) is kept and raises. In several processes, every process calls it.

    Args:
      checkpoint_dir: the directory :func:`rssbl_jax.training.train` saves into, local or remote (``gs://bucket/run``).
      state: a :class:`TrainState` of the model being trained, placed on its devices; its frozen half is kept,
        its shapes, dtypes and shardings are the expected ones.

    Returns:
      ``(state, step)``, or ``(state, None)`` when there is no checkpoint (the directory is created if missing).

    Raises:
      ValueError: for a checkpoint of another architecture or optimizer, naming both paths, shapes or trees.
      RuntimeError: when checkpoints exist but none is readable and intact (each step's reason listed).

    >>> import tempfile, jax, jax.numpy as jnp, optax, rssbl_jax
    >>> params = {"kernel": jnp.ones(2), "lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(2)}
    >>> state = rssbl_jax.init_train_state(params, tx := optax.sgd(0.1), jax.random.key(0))
    >>> step_fn = jax.jit(rssbl_jax.make_train_step(lambda params, batch, rng: jnp.sum(params["lora_b"] * batch), tx))
    >>> _ = rssbl_jax.train(state, step_fn, lambda step: jnp.ones(2), 4, checkpoint_dir=(path := tempfile.mkdtemp()))
    >>> restored, step = restore_latest(path, state)   # e.g. in a new process, after a crash
    >>> step, [round(float(v), 3) for v in restored.trainable["lora_b"]]
    (4, [0.6, 0.6])
    """
    manager = _manager(checkpoint_dir)
    try:
        return _restore_newest(manager, state)
    finally:
        manager.close()


def _restore_newest(manager: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, int | None]:
    """:func:`restore_latest` with an open manager (every process makes the same calls in the same order)."""
    checkpoint_dir = manager.directory
    failures = []
    restored, step = None, None
    for candidate in sorted(manager.all_steps(), reverse=True):
        try:
            restored, step = _restore_step(manager, candidate, state), candidate
            break
        except _Corrupt as error:
            logger.warning("skipping checkpoint %s/%d: %s", checkpoint_dir, candidate, error)
            failures.append((candidate, str(error)))
    if failures:
        _quarantine(checkpoint_dir, [s for s, _ in failures])
        manager.reload()
    if restored is None:
        if failures:
            reasons = "; ".join(f"step {s}: {why}" for s, why in failures)
            raise RuntimeError(f"no intact checkpoint in {checkpoint_dir} (renamed to <step>.corrupt): {reasons}")
        return state, None
    if failures:
        logger.warning("resuming %s from step %d, the newest intact checkpoint", checkpoint_dir, step)
    return restored, step


def _quarantine(checkpoint_dir: epath.Path, steps: list[int]) -> None:
    """Rename damaged steps ``<step>.corrupt`` (remotely a copy and a delete; the next restore redoes a half one)."""
    if jax.process_count() > 1:  # every process is done reading before one renames
        multihost_utils.sync_global_devices("rssbl_jax.training.quarantine.start")
    if jax.process_index() == 0:
        for step in steps:
            source = checkpoint_dir / str(step)
            target, n = checkpoint_dir / f"{step}.corrupt", 1
            while target.exists():
                target, n = checkpoint_dir / f"{step}.corrupt{n}", n + 1
            source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("rssbl_jax.training.quarantine.end")
