"""Adapter-only orbax checkpoints: the ``lora_*`` leaves and their configuration, nothing of the base model.

A checkpoint is one orbax composite directory, written atomically (orbax writes into a temporary
directory and renames it when complete), holding two items:

- ``adapters``: the ``lora_*`` leaves, as a nested dict keyed by their paths in ``params``;
- ``config``: JSON with the format version, the :class:`~rssbl_jax.AdapterConfig` (every setting: rank, alpha,
  patterns, gate, shift, ``p`` normalisation, ...), ``d_p``, each layer's resolved ``rank`` and ``lora_alpha``
  (for readers), and every leaf's shape and dtype.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import traverse_util

from rssbl_jax import core, patterns
from rssbl_jax.config import AdapterConfig, as_config, check_patterns_used
from rssbl_jax.partition import adapter_layers

PyTree = Any
FORMAT = "rssbl_jax.adapters"
VERSION = 2


class LoadedAdapters(NamedTuple):
    """What :func:`load_adapters` returns: the params with the saved adapters, and their stored config."""

    params: PyTree
    config: AdapterConfig


def _adapter_leaves(params: PyTree) -> dict[str, jax.Array]:
    """``{"layer/path/lora_x": leaf}`` for every adapter leaf of ``params`` (adapters known by identity)."""
    layers = set(adapter_layers(params))
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = patterns.path_str(key_path)
        layer, _, name = path.rpartition("/")
        if layer in layers and name in core.ADAPTER_NAMES:
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
    config = config_json
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            os.path.abspath(path),
            args=ocp.args.Composite(adapters=ocp.args.StandardSave(_nested(leaves)), config=ocp.args.JsonSave(config)),
            force=force,
        )


def _join(layer: str, name: str) -> str:
    return f"{layer}/{name}" if layer else name


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
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "config")):
        raise FileNotFoundError(f"no adapter checkpoint at {path!r} (missing its 'config' item).")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        config = checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if config.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an rssbl_jax adapter checkpoint (format={config.get('format')!r}).")
    if config.get("version") != VERSION or "adapter_config" not in config:
        raise ValueError(
            f"{path!r} is an adapter checkpoint of format version {config.get('version')}, written before the "
            f"AdapterConfig was stored (version {VERSION}); its settings are incomplete, so rssbl_jax refuses to "
            "guess them. Load its leaves with orbax directly and save them again with save_adapters(path, params, "
            "config)."
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
    stored_json = load_adapter_config(path)
    stored = AdapterConfig.from_dict(stored_json["adapter_config"])
    if config is not None:
        stored.check_same(
            as_config(config, "load_adapters"), mine=f"checkpoint {os.fspath(path)!r}", theirs="the model's config"
        )
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
    target = _nested(
        {name: jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.asarray(leaf).dtype) for name, leaf in current.items()}
    )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            os.path.abspath(path), args=ocp.args.Composite(adapters=ocp.args.StandardRestore(target))
        )["adapters"]
    flat = {"/".join(key): leaf for key, leaf in traverse_util.flatten_dict(restored).items()}

    def pick(key_path, leaf):
        name = patterns.path_str(key_path)
        return flat[name] if name in flat else leaf

    return LoadedAdapters(jax.tree_util.tree_map_with_path(pick, params), stored)
