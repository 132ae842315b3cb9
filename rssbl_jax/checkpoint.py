"""Adapter-only orbax checkpoints: the ``lora_*`` leaves and their configuration, nothing of the base model.

A checkpoint is one orbax composite directory holding two items:

- ``adapters``: the ``lora_*`` leaves, as a nested dict keyed by their paths in ``params``;
- ``config``: JSON with the format version, the :class:`~rssbl_jax.AdapterConfig` (every setting: rank, alpha,
  patterns, gate, shift, ``p`` normalisation, ...), ``d_p``, each layer's resolved ``rank`` and ``lora_alpha``
  (for readers), every leaf's shape, dtype and SHA-256, and a SHA-256 of the config itself.

Integrity: orbax/tensorstore read a flipped bit inside an array file back without complaint, so every load
recomputes each leaf's SHA-256 (and the config's) and raises :class:`CheckpointCorruptError`, naming the
checkpoint and the leaf, on a mismatch or an unreadable file. Nothing is repaired or deleted on load.

Writing ``path`` (say ``dir/adapters``) uses three siblings, all in ``dir``:

- ``.adapters.lock``: an exclusive ``fcntl.flock`` held for the whole write. A second writer to the same
  path fails at once with :class:`CheckpointBusyError` (it never waits, never mixes leaves). The kernel
  releases the lock when its holder exits, even by ``kill -9``, so a lock is never stale: a leftover lock
  file without a live holder is simply taken by the next writer. (``flock`` is per host; on a network file
  system it is only as good as that file system's locks.)
- ``.adapters.new``: the new checkpoint, written completely and read back (digests verified) first;
- then one atomic ``renameat2(RENAME_EXCHANGE)`` swaps it with the old checkpoint, and the old one (now
  at ``.adapters.new``) is deleted. A process killed at any point leaves ``path`` holding either the whole
  old checkpoint or the whole new one. Leftovers of a killed or failed writer (a failed write keeps its
  partial copy, since orbax's threads may still be writing into it) are removed by the next write. On a
  file system without ``RENAME_EXCHANGE`` the swap is two renames through ``.adapters.old``; a kill
  between them leaves the old checkpoint at ``.adapters.old`` (loads say so) and the next write restores it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from rssbl_jax import core, patterns
from rssbl_jax.config import AdapterConfig, as_config, check_patterns_used
from rssbl_jax.partition import adapter_layers

PyTree = Any
FORMAT = "rssbl_jax.adapters"
VERSION = 3  # 2: per-leaf and config SHA-256 digests; 3: the whole AdapterConfig is stored

logger = logging.getLogger(__name__)

# Tests only: called with a stage name ("locked", "arrays", "staged", "verified", "swapped", "done") while a
# checkpoint is written, so a fault-injection test can pause or kill the writer at that point.
_FAULT_HOOK: Callable[[str], None] | None = None


class CheckpointBusyError(RuntimeError):
    """Another writer holds the lock of this adapter checkpoint path; nothing was written.

    >>> issubclass(CheckpointBusyError, RuntimeError)   # raised at once, never after waiting
    True
    """


class CheckpointCorruptError(ValueError):
    """An adapter checkpoint's bytes do not match their SHA-256 digests, or a file of it cannot be read.

    ``tests/test_faults.py`` flips bytes and truncates every file kind of a checkpoint to check this is raised.

    >>> issubclass(CheckpointCorruptError, ValueError)
    True
    """


class LoadedAdapters(NamedTuple):
    """What :func:`load_adapters` returns: the params with the saved adapters, and their stored config.

    >>> LoadedAdapters(params={}, config=AdapterConfig(rank=2, lora_alpha=4.0)).config.scale
    2.0
    """

    params: PyTree
    config: AdapterConfig


def _adapter_leaves(params: PyTree) -> dict[str, jax.Array]:
    """``{"layer/path/lora_x": leaf}`` for every adapter leaf of ``params`` (adapters known by identity)."""
    layers = set(adapter_layers(params))
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = patterns.path_str(key_path)
        layer, _, name = path.rpartition("/")
        if layer in layers and core.is_adapter_leaf_name(name):
            out[path] = leaf
    return out


def _nested(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict({tuple(path.split("/")): leaf for path, leaf in flat.items()})


def save_adapters(path: str | os.PathLike, params: PyTree, config: AdapterConfig | Any, *, force: bool = False) -> None:
    """Save only the adapter leaves of ``params`` and their :class:`~rssbl_jax.AdapterConfig` to ``path``.

    ``config`` is the config the adapters were trained with (or the adapted model / layer carrying it:
    ``save_adapters(path, params, adapted)``); it is stored whole, and :func:`load_adapters` checks it against the
    model it loads into. Each layer's resolved rank and ``lora_alpha`` and ``d_p`` are stored too, for readers.

    Args:
      path: the checkpoint directory to create; must not exist unless ``force``.
      params: a params tree holding adapters (linen ``variables["params"]`` or an NNX pure state dict of
        ``adapted.model``).
      config: the adapters' AdapterConfig.
      force: overwrite an existing checkpoint at ``path``.

    Raises:
      ValueError: when ``params`` holds no adapter layer, a layer's rank differs from the config's, or a pattern of
        the config matches no adapted layer.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from rssbl_jax import RSSBilinearLoRADense
    >>> layer = RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> path = tempfile.mkdtemp() + "/adapters"
    >>> save_adapters(path, params, layer.adapter_config)
    >>> restored, config = load_adapters(path, params, layer.adapter_config)
    >>> bool(jnp.all(restored["lora_c"] == params["lora_c"])), config.lora_alpha
    (True, 4.0)
    """
    cfg = as_config(config, "save_adapters")
    leaves = _adapter_leaves(params)
    if not leaves:
        raise ValueError("save_adapters found no adapter layer (lora_a, lora_b, lora_c) in params.")
    layers = sorted({leaf_path.rpartition("/")[0] for leaf_path in leaves})
    incomplete = [layer for layer in layers if _join(layer, "lora_c") not in leaves]
    if incomplete:
        raise ValueError(
            f"adapter layers {incomplete} have lora_a/lora_b but no lora_c: they are not RSSBilinearLoRA adapters, "
            "whose settings an AdapterConfig describes."
        )
    foreign = [layer for layer in layers if not cfg.adapts(layer)]
    if foreign:
        raise ValueError(
            f"adapter layers {foreign} are not adapted by the config (targets={cfg.targets}); save the params tree "
            "whose paths the config was written for (for NNX: nnx.state(adapted.model, ...), not "
            "nnx.state(adapted, ...))."
        )
    check_patterns_used(cfg, layers)
    for layer in layers:
        have, want = int(jnp.shape(leaves[_join(layer, "lora_a")])[-1]), cfg.resolve(layer).rank
        if have != want:
            raise ValueError(f"adapter {layer!r} has rank {have} but the config resolves rank {want} for it.")
    d_ps = {
        int(jnp.shape(leaves[_join(layer, "lora_gate_w" if cfg.gate == "mlp" else "lora_c")])[-2]) for layer in layers
    }
    config_json = {
        "format": FORMAT,
        "version": VERSION,
        "adapter_config": cfg.to_dict(),
        "d_p": next(iter(d_ps)) if len(d_ps) == 1 else None,
        "rank": {layer: cfg.resolve(layer).rank for layer in layers},
        "lora_alpha": {layer: cfg.resolve(layer).lora_alpha for layer in layers},
        "leaves": {
            name: {"shape": list(jnp.shape(leaf)), "dtype": str(jnp.asarray(leaf).dtype)}
            for name, leaf in leaves.items()
        },
    }
    _write_checkpoint(path, leaves, config_json, force=force)


def _join(layer: str, name: str) -> str:
    return f"{layer}/{name}" if layer else name


# --------------------------------------------------------------------------------------------------
# Storage: digests, an exclusive lock, a staged write and an atomic swap. These take the already-built
# ``leaves`` ({"layer/lora_x": array}) and ``config`` (JSON-able dict) and know nothing of adapters.
# --------------------------------------------------------------------------------------------------


def _fault(stage: str) -> None:
    if _FAULT_HOOK is not None:
        _FAULT_HOOK(stage)


def _sha256(array: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()


def _config_sha256(config: Mapping[str, Any]) -> str:
    body = {k: v for k, v in config.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sibling(path: str, suffix: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{suffix}")


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path``'s lock file, or raise :class:`CheckpointBusyError`.

    The holder unlinks the lock file before releasing it; a writer that opened the old file in between sees
    that its inode is no longer the one at the lock path and tries again, so two writers never both hold it.
    """
    lock_path = _sibling(path, "lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a writer that is just starting"
            os.close(fd)
            raise CheckpointBusyError(
                f"another writer is saving the adapter checkpoint {path!r} ({holder}; lock file {lock_path!r}). "
                "Nothing was written. Retry when it is done, or save to another path."
            ) from None
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)  # the previous holder removed this file after we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux ``renameat2``); ``False`` where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) of {a!r} and {b!r} failed: {os.strerror(code)}")


def _fsync_tree(path: str) -> None:
    """Flush every file and directory under ``path`` (so a swap never exposes unwritten data after a crash)."""
    for root, _, files in os.walk(path):
        for name in [*files, "."]:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _is_adapter_checkpoint(path: str) -> bool:
    try:
        with open(os.path.join(path, "config", "metadata")) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _recover(path: str) -> None:
    """Finish what a killed writer left (the lock is held): put an interrupted two-rename swap back, delete
    partial or superseded copies."""
    old = _sibling(path, "old")
    if not os.path.exists(path) and _is_adapter_checkpoint(old):
        os.rename(old, path)
        logger.warning("restored the adapter checkpoint %s from %s, left by an interrupted overwrite", path, old)
    _remove_leftovers(path, "new", "old")


def _remove_leftovers(path: str, *kinds: str) -> None:
    """Delete ``.<name>.<kind>`` and orbax's temporaries of it (``.<name>.<kind>.orbax-checkpoint-tmp...``)."""
    head, name = os.path.split(path)
    for leftover in os.listdir(head):
        if leftover.startswith(tuple(f".{name}.{kind}" for kind in kinds)):
            shutil.rmtree(os.path.join(head, leftover), ignore_errors=True)


def _write_checkpoint(
    path: str | os.PathLike, leaves: Mapping[str, Any], config: dict[str, Any], *, force: bool
) -> None:
    """Write ``leaves`` and ``config`` (digests added) to ``path``: locked, staged, verified, then swapped in."""
    path = os.path.abspath(path)
    host = {name: np.asarray(leaf) for name, leaf in leaves.items()}
    config = {**config, "leaves": {name: {**config["leaves"][name], "sha256": _sha256(x)} for name, x in host.items()}}
    config["sha256"] = _config_sha256(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _exclusive(path):
        _fault("locked")
        _recover(path)
        if os.path.lexists(path):
            if not force:
                raise ValueError(f"Destination {path} already exists; pass force=True to overwrite it.")
            if not _is_adapter_checkpoint(path):
                raise ValueError(
                    f"refusing to overwrite {path!r}: it is not an rssbl_jax adapter checkpoint (no readable config "
                    "with this format), and force=True only replaces adapter checkpoints. Remove it yourself if it "
                    "is really meant to go."
                )
        staging = _sibling(path, "new")
        try:  # a failure leaves the partial staging copy: orbax's threads may still write into it
            with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
                checkpointer.save(
                    staging,
                    args=ocp.args.Composite(
                        adapters=ocp.args.StandardSave(_nested(host)), config=ocp.args.JsonSave(config)
                    ),
                )
            _fault("staged")
            _read_leaves(staging, _read_config(staging), {n: (x.shape, x.dtype) for n, x in host.items()})
            _fsync_tree(staging)
            _fault("verified")
            if not os.path.exists(path):
                os.rename(staging, path)
            elif _exchange(staging, path):
                _fault("swapped")
            else:
                old = _sibling(path, "old")
                os.rename(path, old)
                _fault("swapped")
                os.rename(staging, path)
                shutil.rmtree(old)
            fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            logger.warning("writing %s failed; its partial copy is left at %s* until the next write", path, staging)
            raise
        _remove_leftovers(path, "new")  # the old checkpoint, swapped out
        _fault("done")


def _where(path: str) -> str:
    old = _sibling(path, "old")
    if os.path.isdir(old):
        return (
            f"; an interrupted overwrite left the previous checkpoint at {old!r} (the next save_adapters to this "
            "path puts it back first)"
        )
    return ""


def _read_config(path: str) -> dict[str, Any]:
    """The config item of the checkpoint at ``path``, its own digest verified (version 2 on)."""
    if not os.path.isdir(os.path.join(path, "config")):
        raise FileNotFoundError(f"no adapter checkpoint at {path!r} (missing its 'config' item){_where(path)}.")
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            config = checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as error:  # orbax raises many kinds for a damaged file; all mean "cannot read it"
        raise CheckpointCorruptError(
            f"the adapter checkpoint {path!r} is damaged: its config cannot be read ({type(error).__name__}: "
            f"{str(error)[:200]})."
        ) from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        format_ = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{path!r} is not an rssbl_jax adapter checkpoint (format={format_!r}).")
    if config.get("version", 1) >= 2:
        if config.get("sha256") != _config_sha256(config):
            raise CheckpointCorruptError(
                f"the adapter checkpoint {path!r} is damaged: its config does not match its SHA-256 digest."
            )
    else:
        logger.warning("%s is a version-1 adapter checkpoint: it has no digests, so its bytes are not verified", path)
    return config


def _read_leaves(
    path: str, config: Mapping[str, Any], wanted: Mapping[str, tuple[tuple[int, ...], Any]]
) -> dict[str, np.ndarray]:
    """The leaves of the checkpoint at ``path`` in their saved dtypes, each checked against its SHA-256.

    ``wanted`` maps each leaf name to the ``(shape, dtype)`` it must have (a checked config says so).
    """
    target = _nested({name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in wanted.items()})
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(target)))
        flat = {
            "/".join(key): np.asarray(leaf) for key, leaf in traverse_util.flatten_dict(restored["adapters"]).items()
        }
    except Exception as error:
        raise CheckpointCorruptError(
            f"the adapter checkpoint {path!r} is damaged: its arrays cannot be read ({type(error).__name__}: "
            f"{str(error)[:200]})."
        ) from error
    for name, (shape, dtype) in wanted.items():
        leaf = flat.get(name)
        if leaf is None or leaf.shape != tuple(shape) or leaf.dtype != np.dtype(dtype):
            raise CheckpointCorruptError(
                f"the adapter checkpoint {path!r} is damaged: leaf {name!r} did not read back."
            )
        digest = config["leaves"][name].get("sha256")
        if digest is not None and _sha256(leaf) != digest:
            raise CheckpointCorruptError(
                f"the adapter checkpoint {path!r} is damaged: leaf {name!r} does not match its SHA-256 digest."
            )
    return flat


def load_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """The configuration stored beside the adapters of the checkpoint at ``path`` (see :func:`save_adapters`).

    Raises:
      FileNotFoundError: when there is no complete checkpoint at ``path``.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from rssbl_jax import RSSBilinearLoRADense
    >>> params = RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0).init(
    ...     jax.random.key(0), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> path = tempfile.mkdtemp() + "/adapters"
    >>> config = AdapterConfig(rank=2, lora_alpha=4.0, p_mean=[0.0, 1.0], p_std=[1.0, 2.0])
    >>> save_adapters(path, params, config)
    >>> stored = load_adapter_config(path)
    >>> stored["d_p"], stored["lora_alpha"], AdapterConfig.from_dict(stored["adapter_config"]) == config
    (2, {'': 4.0}, True)
    """
    config = _read_config(os.path.abspath(path))
    if config.get("version", 1) < 3 or "adapter_config" not in config:
        raise ValueError(
            f"{os.fspath(path)!r} is an adapter checkpoint of format version {config.get('version', 1)}, written "
            f"before the AdapterConfig was stored (version {VERSION}); its settings are incomplete, so rssbl_jax "
            "refuses to guess them. Load its leaves with orbax directly and save them again with "
            "save_adapters(path, params, config)."
        )
    return config


def load_adapters(path: str | os.PathLike, params: PyTree, config: AdapterConfig | Any = None) -> LoadedAdapters:
    """Load the adapters saved at ``path`` into ``params``; return them with their stored ``AdapterConfig``.

    ``config`` is the config of the model the adapters go into (or the adapted model / layer carrying it). When
    given, it must equal the stored config: if any setting differs (``lora_alpha``, ``gate_offset``, a pattern, the
    ``p`` normalisation, ...) this refuses and names each field with both values, because the adapters would
    silently compute something else than they were trained to. Without it, use the returned config for everything
    that follows (``merge``, building the model). Every adapter leaf of the checkpoint must exist in ``params`` with
    the same shape, and every adapter leaf of ``params`` must be in the checkpoint; base leaves are returned
    unchanged. Loaded leaves take the dtype of ``params``' leaves.

    Raises:
      ValueError: when the configs differ, or naming the first mismatched path with both shapes.
      FileNotFoundError: when there is no complete checkpoint at ``path``.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from rssbl_jax import RSSBilinearLoRADense
    >>> layer = RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0)
    >>> trained = layer.init(jax.random.key(0), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> trained = {**trained, "lora_b": jnp.ones((2, 4))}             # as if trained
    >>> path = tempfile.mkdtemp() + "/adapters"
    >>> save_adapters(path, trained, layer)
    >>> fresh = layer.init(jax.random.key(1), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> restored, config = load_adapters(path, fresh, layer)
    >>> bool(jnp.all(restored["lora_b"] == 1.0)), bool(jnp.all(restored["kernel"] == fresh["kernel"]))
    (True, True)
    >>> load_adapters(path, fresh, layer.adapter_config.replace(lora_alpha=16.0))
    Traceback (most recent call last):
    ...
    ValueError: adapter configs differ:
      lora_alpha: 4.0 (checkpoint ...) != 16.0 (the model's config)
    """
    path = os.path.abspath(path)
    stored_json = load_adapter_config(path)
    stored = AdapterConfig.from_dict(stored_json["adapter_config"])
    if config is not None:
        stored.check_same(as_config(config, "load_adapters"), mine=f"checkpoint {path!r}", theirs="the model's config")
    config = stored_json
    saved = {name: tuple(info["shape"]) for name, info in stored_json["leaves"].items()}
    current = _adapter_leaves(params)
    for name, shape in saved.items():
        if name not in current:
            raise ValueError(f"checkpoint adapter {name!r} (shape {shape}) has no counterpart in params.")
        if tuple(jnp.shape(current[name])) != shape:
            raise ValueError(
                f"adapter {name!r} has shape {shape} in the checkpoint but {tuple(jnp.shape(current[name]))} in params."
            )
    for name, leaf in current.items():
        if name not in saved:
            raise ValueError(
                f"params adapter {name!r} (shape {tuple(jnp.shape(leaf))}) is missing from the checkpoint."
            )
    wanted = {name: (shape, jnp.dtype(config["leaves"][name]["dtype"])) for name, shape in saved.items()}
    flat = _read_leaves(os.path.abspath(path), config, wanted)

    def pick(key_path, leaf):
        name = patterns.path_str(key_path)
        return jnp.asarray(flat[name], jnp.asarray(leaf).dtype) if name in flat else leaf

    return LoadedAdapters(jax.tree_util.tree_map_with_path(pick, params), stored)
