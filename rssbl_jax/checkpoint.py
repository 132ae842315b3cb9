"""Adapter-only orbax checkpoints on any ``etils.epath`` path: the ``lora_*`` leaves and their configuration.

A checkpoint is one orbax composite directory: ``adapters``, the ``lora_*`` leaves nested by their ``params``
paths; ``config``, JSON with the format version, the whole :class:`~rssbl_jax.AdapterConfig`, ``d_p``, each
layer's resolved ``rank`` and ``lora_alpha``, every leaf's shape, dtype and SHA-256, and its own SHA-256.
Orbax/tensorstore read a flipped bit back without complaint, so every load recomputes every digest (whatever
version is claimed) and raises :class:`CheckpointCorruptError`, naming checkpoint and leaf, on a mismatch or an
unreadable file. A newer format version is refused; nothing is repaired on load.

Crash safety (at length in docs/guides/checkpoints.md): on local disk, :mod:`rssbl_jax.localdisk` locks (a second
writer gets :class:`CheckpointBusyError`), stages, verifies, fsyncs and swaps, so a kill leaves the whole old or
the whole new checkpoint (off Linux, between two renames, the old one sits at ``.<name>.old``: loads say so, the next
write puts it back). On ``gs://`` (other remote schemes are unsupported: orbax writes a commit file only there)
orbax writes in place and commits last (``commit_success.txt``); loads refuse an uncommitted checkpoint, the next
save replaces it, with or without ``force``. ``force=True`` deletes the old one first there, so a crashed overwrite
leaves no committed checkpoint, never a mix that loads; two writers at once give one of them or a checkpoint whose
digests refuse it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx, traverse_util

from rssbl_jax import gates, localdisk, patterns, tree
from rssbl_jax.config import AdapterConfig, as_config, check_adapted, check_patterns_used
from rssbl_jax.digests import array_sha256, as_path, is_local, json_sha256
from rssbl_jax.localdisk import CheckpointBusyError as CheckpointBusyError

PyTree = Any
FORMAT = "rssbl_jax.adapters"
VERSION = 3  # 2: per-leaf and config SHA-256 digests; 3: the whole AdapterConfig is stored
_COMMITTED = "commit_success.txt"  # orbax's commit marker on remote paths, written last
_STARTED = "_CHECKPOINT_METADATA"  # the first file orbax writes into a checkpoint directory

logger = logging.getLogger(__name__)


class CheckpointCorruptError(ValueError):
    """An adapter checkpoint's bytes do not match their SHA-256 digests, or a file of it cannot be read.

    >>> issubclass(CheckpointCorruptError, ValueError)
    True
    """


class LoadedAdapters(NamedTuple):
    """What :func:`load_adapters` returns: the params (or NNX model) with the saved adapters, and their config.

    >>> from rssbl_jax import AdapterConfig
    >>> LoadedAdapters(params={}, config=AdapterConfig(rank=2, lora_alpha=4.0)).config.scale
    2.0
    """

    params: PyTree
    config: AdapterConfig


def _adapter_leaves(params: PyTree) -> dict[str, jax.Array]:
    """``{"layer/path/lora_x": leaf}`` for every adapter leaf (:mod:`rssbl_jax.tree`) of ``params``.

    An NNX model's leaves are those of its ``nnx.Param`` state (so ``operating_params`` are not included).
    """
    if isinstance(params, nnx.Module):
        params = nnx.state(_nnx_root(params), nnx.Param).to_pure_dict()
    paths = tree.adapter_leaf_paths(params)
    named = ((f"{layer}/{name}" if layer else name, leaf) for layer, name, leaf in tree.leaves(params))
    return {path: leaf for path, leaf in named if path in paths}


def _nested(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict({tuple(path.split("/")): leaf for path, leaf in flat.items()})


def _nnx_root(model: nnx.Module) -> nnx.Module:
    """The module whose state paths the config's patterns match: an adapted model's ``model``, else itself."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nnx.Module) else model


def save_adapters(
    path: str | os.PathLike, params: PyTree, config: AdapterConfig | Any = None, *, force: bool = False
) -> None:
    """Save only the adapter leaves of ``params`` and their whole :class:`~rssbl_jax.AdapterConfig` to ``path``.

    Args:
      path: the checkpoint directory, local or remote (``gs://bucket/run/adapters``); must not exist unless ``force``.
      params: a params tree holding adapters (linen ``variables["params"]``, a pure state dict of ``adapted.model``),
        or an NNX model holding adapters (``save_adapters(path, adapted)``).
      config: the AdapterConfig trained with, or the adapted model / layer carrying it; default: ``params``' own.
      force: overwrite an existing adapter checkpoint at ``path`` (what is atomic where: the module docstring).

    Raises:
      ValueError: when ``params`` holds no adapter layer, a layer's rank differs from the config's, or a pattern of
        the config matches no adapted layer.

    >>> import tempfile, jax, jax.numpy as jnp, rssbl_jax
    >>> layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> save_adapters(path := tempfile.mkdtemp() + "/adapters", params, layer.adapter_config)
    >>> restored, config = load_adapters(path, params, layer.adapter_config)
    >>> bool(jnp.all(restored["lora_c"] == params["lora_c"])), config.lora_alpha
    (True, 4.0)
    """
    _write(*_prepare(path, params, config), force=force)


def _prepare(
    path: str | os.PathLike, params: PyTree, config: AdapterConfig | Any
) -> tuple[epath.Path, dict[str, np.ndarray], dict[str, Any]]:
    """What :func:`save_adapters` writes: the path, the adapter leaves on the host, and the config with digests."""
    cfg = as_config(params if config is None else config, "save_adapters")
    leaves = _adapter_leaves(params)
    if not leaves:
        raise ValueError("save_adapters found no adapter layer (lora_a, lora_b, lora_c) in params.")
    by_layer: dict[str, dict[str, jax.Array]] = {}
    for leaf_path, leaf in leaves.items():
        layer, _, name = leaf_path.rpartition("/")
        by_layer.setdefault(layer, {})[name] = leaf
    layers = sorted(by_layer)
    for layer in layers:  # every leaf the configured gate needs (registered gates included), else not ours
        try:
            gates.require_leaves(by_layer[layer], cfg.resolve(layer))
        except ValueError as error:
            raise ValueError(
                f"adapter layer {layer!r} is not an RSSBilinearLoRA adapter that this AdapterConfig describes: {error}"
            ) from None
    check_adapted(cfg, layers, "save")
    check_patterns_used(cfg, layers)
    for layer in layers:
        have, want = int(jnp.shape(by_layer[layer]["lora_a"])[-1]), cfg.resolve(layer).rank
        if have != want:
            raise ValueError(f"adapter {layer!r} has rank {have} but the config resolves rank {want} for it.")
    d_ps = {
        gates.d_p_from_shapes({name: jnp.shape(leaf) for name, leaf in by_layer[layer].items()}, cfg.resolve(layer))
        for layer in layers
    }
    host = {name: np.asarray(leaf) for name, leaf in leaves.items()}
    config_json = {
        "format": FORMAT,
        "version": VERSION,
        "adapter_config": cfg.to_dict(),
        "d_p": next(iter(d_ps)) if len(d_ps) == 1 else None,
        "rank": {layer: cfg.resolve(layer).rank for layer in layers},
        "lora_alpha": {layer: cfg.resolve(layer).lora_alpha for layer in layers},
        "leaves": {
            name: {"shape": list(x.shape), "dtype": str(x.dtype), "sha256": array_sha256(x)} for name, x in host.items()
        },
    }
    config_json["sha256"] = json_sha256(config_json)
    return as_path(path), host, config_json


def _write(
    path: epath.Path,
    leaves: Mapping[str, np.ndarray],
    config: dict[str, Any],
    *,
    force: bool,
    on_stage: Callable[[str], object] | None = None,
) -> None:
    """Write a prepared checkpoint locally or remotely; ``on_stage(name)`` marks each stage."""
    on_stage = on_stage or (lambda stage: None)
    if is_local(path):  # locked, staged, verified, then swapped in
        localdisk.replace_directory(
            str(path),
            lambda staging: _orbax_save(staging, leaves, config),
            verify=lambda staging: _verify(staging, leaves),
            is_ours=_is_adapter_checkpoint,
            check_existing=lambda existing: _check_replaceable(existing, force),
            on_stage=on_stage,
        )
        return
    if path.exists():  # remote: orbax's own commit; an uncommitted leftover of a failed write is replaced
        if _uncommitted(path):
            logger.warning("replacing %s: an interrupted write left it uncommitted", path)
        else:
            _check_replaceable(path, force)
        path.rmtree()
    _orbax_save(path, leaves, config)
    _verify(path, leaves)
    on_stage("done")


def _orbax_save(path: str | epath.Path, leaves: Mapping[str, np.ndarray], config: dict[str, Any]) -> None:
    """Write one checkpoint with orbax (its own commit: a rename on local disk, a commit object on ``gs://``)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            args=ocp.args.Composite(adapters=ocp.args.StandardSave(_nested(leaves)), config=ocp.args.JsonSave(config)),
        )


def _verify(path: str | epath.Path, leaves: Mapping[str, np.ndarray]) -> None:
    """Read a just-written checkpoint back, every digest checked."""
    _read_leaves(path, _read_config(path), {n: (x.shape, x.dtype) for n, x in leaves.items()})


def _uncommitted(path: epath.Path) -> bool:
    return (path / _STARTED).exists() and not (path / _COMMITTED).exists()


def _is_adapter_checkpoint(path: str | epath.Path) -> bool:
    try:
        return json.loads((epath.Path(path) / "config" / "metadata").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_replaceable(path: str | epath.Path, force: bool) -> None:
    if not force:
        raise ValueError(f"Destination {path} already exists; pass force=True to overwrite it.")
    if not _is_adapter_checkpoint(path):
        raise ValueError(
            f"refusing to overwrite {os.fspath(path)!r}: it is not an rssbl_jax adapter checkpoint (no readable "
            "config with this format), and force=True only replaces adapter checkpoints. Remove it yourself if it "
            "is really meant to go."
        )


def _where(path: epath.Path) -> str:
    """Where an interrupted write left a checkpoint, for the error that finds none."""
    if not is_local(path) and _uncommitted(path):
        return "; an interrupted write left an uncommitted copy there (the next save_adapters replaces it)"
    old = localdisk.sibling(str(path), "old")
    if is_local(path) and os.path.isdir(old):
        return (
            f"; an interrupted overwrite left the previous checkpoint at {old!r} (the next save_adapters to this "
            "path puts it back first)"
        )
    return ""


def _read_config(path: str | epath.Path) -> dict[str, Any]:
    """The config item of the checkpoint at ``path``, its own digest verified, its version checked."""
    path = epath.Path(path)
    if not (path / "config").is_dir() or not (is_local(path) or (path / _COMMITTED).exists()):
        raise FileNotFoundError(
            f"no adapter checkpoint at {os.fspath(path)!r} (no committed 'config' item){_where(path)}."
        )
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            config = checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as error:  # orbax raises many kinds for a damaged file; all mean "cannot read it"
        raise _damaged(path, f"its config cannot be read ({type(error).__name__}: {str(error)[:200]})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        format_ = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{os.fspath(path)!r} is not an rssbl_jax adapter checkpoint (format={format_!r}).")
    version = config.get("version", 1)
    if not isinstance(version, int):
        raise ValueError(f"{os.fspath(path)!r} has format version {version!r}, not a number: not written by rssbl_jax.")
    if version > VERSION:  # first: a newer format may digest differently; refused either way
        raise ValueError(
            f"the adapter checkpoint {os.fspath(path)!r} has format version {version}, newer than this rssbl_jax's "
            f"(version {VERSION}); upgrade rssbl_jax to load it."
        )
    # Checked whenever present, whatever older version is claimed: the digest covers the version field.
    if ("sha256" in config or config.get("version", 1) >= 2) and config.get("sha256") != json_sha256(config):
        raise _damaged(path, "its config does not match its SHA-256 digest")
    if version < 3 or "adapter_config" not in config:
        raise ValueError(
            f"{os.fspath(path)!r} is an adapter checkpoint of format version {version}, written before the "
            f"AdapterConfig was stored (version {VERSION}); its settings are incomplete, so rssbl_jax refuses to "
            "guess them. Load its leaves with orbax directly and save them again with "
            "save_adapters(path, params, config)."
        )
    return config


def _read_leaves(
    path: str | epath.Path, config: Mapping[str, Any], wanted: Mapping[str, tuple[tuple[int, ...], Any]]
) -> dict[str, np.ndarray]:
    """The leaves at ``path`` (``wanted``: name -> saved ``(shape, dtype)``), each checked against its SHA-256."""
    target = _nested({name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in wanted.items()})
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            restored = checkpointer.restore(path, args=ocp.args.Composite(adapters=ocp.args.StandardRestore(target)))
        flat = {
            "/".join(key): np.asarray(leaf) for key, leaf in traverse_util.flatten_dict(restored["adapters"]).items()
        }
    except Exception as error:
        raise _damaged(path, f"its arrays cannot be read ({type(error).__name__}: {str(error)[:200]})") from error
    for name, (shape, dtype) in wanted.items():
        leaf = flat.get(name)
        if leaf is None or leaf.shape != tuple(shape) or leaf.dtype != np.dtype(dtype):
            raise _damaged(path, f"leaf {name!r} did not read back")
        if array_sha256(leaf) != config["leaves"][name].get("sha256"):
            raise _damaged(path, f"leaf {name!r} does not match its SHA-256 digest")
    return flat


def _damaged(path: str | epath.Path, what: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"the adapter checkpoint {os.fspath(path)!r} is damaged: {what}.")


def load_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The :class:`~rssbl_jax.AdapterConfig` stored beside the adapters of the checkpoint at ``path``.

    Raises:
      FileNotFoundError: when there is no complete (committed) checkpoint at ``path``; after an interrupted
        overwrite it names the previous checkpoint, left at ``.<name>.old``.
      CheckpointCorruptError: when the stored config cannot be read or does not match its SHA-256 digest.
      ValueError: when the format version is newer than this library's, or older than the whole config's.

    >>> import tempfile, rssbl_jax
    >>> params = {"lora_a": jnp.ones((3, 2)), "lora_c": jnp.ones((2, 2)), "lora_b": jnp.ones((2, 4))}
    >>> config = rssbl_jax.AdapterConfig(rank=2, lora_alpha=4.0, p_mean=[0.0, 1.0], p_std=[1.0, 2.0])
    >>> save_adapters(path := tempfile.mkdtemp() + "/adapters", params, config)
    >>> load_adapter_config(path) == config
    True
    """
    return AdapterConfig.from_dict(_read_config(as_path(path))["adapter_config"])


def load_adapters(path: str | os.PathLike, params: PyTree, config: AdapterConfig | Any = None) -> LoadedAdapters:
    """Load the adapters saved at ``path`` into ``params``; return them with their stored ``AdapterConfig``.

    A given ``config`` must equal the stored one (else the adapters would silently compute something else); without
    one, use the returned config. Adapter leaves must match one to one, shapes included; loaded leaves take
    ``params``' dtypes, base leaves are returned unchanged.

    Args:
      path: the checkpoint directory.
      params: a params tree, or an NNX model (adapted, or holding adapters): then a copy of it is returned.
      config: the model's AdapterConfig, or the adapted model / layer carrying it; default: an NNX model's own.

    Raises:
      ValueError: naming each differing config field with both values, or the first mismatched path and shapes.
      FileNotFoundError, CheckpointCorruptError: as :func:`load_adapter_config`, or for a leaf that does not match
        its SHA-256 digest or cannot be read.

    >>> import tempfile, jax, jax.numpy as jnp, rssbl_jax
    >>> layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0)
    >>> fresh = layer.init(jax.random.key(1), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> save_adapters(path := tempfile.mkdtemp() + "/adapters", {**fresh, "lora_b": jnp.ones((2, 4))}, layer)
    >>> restored, config = load_adapters(path, fresh, layer)
    >>> bool(jnp.all(restored["lora_b"] == 1.0)), bool(jnp.all(restored["kernel"] == fresh["kernel"]))
    (True, True)
    """
    path = as_path(path)
    stored_json = _read_config(path)
    stored = AdapterConfig.from_dict(stored_json["adapter_config"])
    model = params if isinstance(params, nnx.Module) else None
    if config is None and model is not None:
        with contextlib.suppress(TypeError):  # a plain module holding adapters carries no config
            config = as_config(model, "load_adapters")
    if config is not None:
        stored.check_same(
            as_config(config, "load_adapters"), mine=f"checkpoint {os.fspath(path)!r}", theirs="the model's config"
        )
    saved = {name: tuple(info["shape"]) for name, info in stored_json["leaves"].items()}
    current = _adapter_leaves(params)
    for name, shape in saved.items():
        if name not in current:
            raise ValueError(f"checkpoint adapter {name!r} (shape {shape}) has no counterpart in params.")
        if (have := tuple(jnp.shape(current[name]))) != shape:
            raise ValueError(f"adapter {name!r} has shape {shape} in the checkpoint but {have} in params.")
    for name, leaf in current.items():
        if name not in saved:
            raise ValueError(
                f"params adapter {name!r} (shape {tuple(jnp.shape(leaf))}) is missing from the checkpoint."
            )
    wanted = {name: (shape, jnp.dtype(stored_json["leaves"][name]["dtype"])) for name, shape in saved.items()}
    flat = _read_leaves(path, stored_json, wanted)

    def pick(key_path, leaf):
        name = patterns.path_str(key_path)
        return jnp.asarray(flat[name], jnp.asarray(leaf).dtype) if name in flat else leaf

    if model is None:
        return LoadedAdapters(jax.tree_util.tree_map_with_path(pick, params), stored)
    copy = nnx.clone(model)  # new Variables over the same arrays: the argument is left unchanged
    root = _nnx_root(copy)
    state = nnx.state(root, nnx.Param)
    state.replace_by_pure_dict(jax.tree_util.tree_map_with_path(pick, state.to_pure_dict()))
    nnx.update(root, state)
    return LoadedAdapters(copy, stored)
