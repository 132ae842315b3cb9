"""Adapter-only orbax checkpoints: the ``lora_*`` leaves and their configuration, nothing of the base model.

A checkpoint is one orbax composite directory, written atomically (orbax writes into a temporary
directory and renames it when complete), holding two items:

- ``adapters``: the ``lora_*`` leaves, as a nested dict keyed by their paths in ``params``;
- ``config``: JSON with the format version, ``d_p``, per-layer ``rank`` and ``lora_alpha``, the
  ``gate_offset``, the injection settings (``targets``, patterns, ``shift``) when given, the
  normalisation of ``p`` (``p_mean``, ``p_std``) when given, and every leaf's shape and dtype.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from rssbl_jax import core
from rssbl_jax.inject import resolve_alpha, unmatched_patterns

PyTree = Any
FORMAT = "rssbl_jax.adapters"
VERSION = 1


def _adapter_leaves(params: PyTree) -> dict[str, jax.Array]:
    """``{"layer/path/lora_x": leaf}`` for every adapter leaf of ``params``."""
    return {
        core._path_str(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if core.is_adapter_path(path)
    }


def _nested(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict({tuple(path.split("/")): leaf for path, leaf in flat.items()})


def _as_list(value: Any) -> list[float] | None:
    return None if value is None else np.asarray(value, np.float64).reshape(-1).tolist()


def save_adapters(
    path: str | os.PathLike,
    params: PyTree,
    *,
    lora_alpha: float,
    alpha_pattern: Mapping[str, float] | None = None,
    gate_offset: float = 0.0,
    targets: str | Sequence[str] | None = None,
    rank: int | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    shift: bool | None = None,
    p_mean: Any = None,
    p_std: Any = None,
    force: bool = False,
) -> None:
    """Save only the ``lora_*`` leaves of ``params`` and their configuration to ``path`` (an orbax checkpoint).

    The keyword arguments describe how the adapters were built; ``adapted.adapter_config`` of an
    injected model (linen or NNX) holds exactly ``targets``, ``rank``, ``lora_alpha``, ``rank_pattern``,
    ``alpha_pattern``, ``gate_offset`` and ``shift``, so ``save_adapters(path, params,
    **adapted.adapter_config)`` records everything. Each layer's rank (read from ``lora_c``) and
    ``lora_alpha`` (resolved through ``alpha_pattern``) and ``d_p`` are stored explicitly.

    Args:
      path: the checkpoint directory to create; must not exist unless ``force``.
      params: a params tree holding adapters (linen ``variables["params"]`` or an NNX pure state dict).
      lora_alpha, alpha_pattern, gate_offset: the adapters' scaling and gate offset.
      targets, rank, rank_pattern, shift: the injection settings, stored for the record.
      p_mean, p_std: the normalisation applied to ``p`` before the model (``(p - mean) / std``), if any.
      force: overwrite an existing checkpoint at ``path``.

    Raises:
      ValueError: when ``params`` holds no adapter leaves.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from rssbl_jax import RSSBilinearLoRADense
    >>> layer = RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> path = tempfile.mkdtemp() + "/adapters"
    >>> save_adapters(path, params, lora_alpha=4.0)
    >>> restored = load_adapters(path, params)
    >>> bool(jnp.all(restored["lora_c"] == params["lora_c"])), load_adapter_config(path)["rank"]
    (True, {'': 2})
    """
    leaves = _adapter_leaves(params)
    if not leaves:
        raise ValueError("save_adapters found no lora_* leaves in params.")
    layers = sorted({leaf_path.rpartition("/")[0] for leaf_path in leaves})
    incomplete = [layer for layer in layers if _join(layer, "lora_c") not in leaves]
    if incomplete:
        raise ValueError(f"adapted layers {incomplete} have lora_* leaves but no lora_c; every adapter needs lora_c.")
    unmatched = unmatched_patterns(list(alpha_pattern or {}), layers)
    if unmatched:
        raise ValueError(
            f"alpha_pattern {unmatched} matches none of the adapted layers {layers}, so their lora_alpha cannot be "
            "resolved. Save the params tree whose paths the patterns were written for (for NNX: "
            "nnx.state(adapted.model, ...), not nnx.state(adapted, ...))."
        )
    d_ps = {jnp.shape(leaves[_join(layer, "lora_c")])[0] for layer in layers}
    config = {
        "format": FORMAT,
        "version": VERSION,
        "d_p": int(next(iter(d_ps))) if len(d_ps) == 1 else None,
        "rank": {layer: int(jnp.shape(leaves[_join(layer, "lora_c")])[1]) for layer in layers},
        "lora_alpha": {layer: resolve_alpha(layer, lora_alpha, alpha_pattern) for layer in layers},
        "gate_offset": float(gate_offset),
        "targets": None if targets is None else ([targets] if isinstance(targets, str) else list(targets)),
        "default_rank": None if rank is None else int(rank),
        "default_lora_alpha": float(lora_alpha),
        "rank_pattern": dict(rank_pattern or {}),
        "alpha_pattern": dict(alpha_pattern or {}),
        "shift": shift,
        "p_normalization": None
        if p_mean is None and p_std is None
        else {"mean": _as_list(p_mean), "std": _as_list(p_std)},
        "leaves": {
            name: {"shape": list(jnp.shape(leaf)), "dtype": str(jnp.asarray(leaf).dtype)}
            for name, leaf in leaves.items()
        },
    }
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
    >>> save_adapters(path, params, lora_alpha=4.0, p_mean=[0.0, 1.0], p_std=[1.0, 2.0])
    >>> config = load_adapter_config(path)
    >>> config["d_p"], config["lora_alpha"], config["p_normalization"]
    (2, {'': 4.0}, {'mean': [0.0, 1.0], 'std': [1.0, 2.0]})
    """
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, "config")):
        raise FileNotFoundError(f"no adapter checkpoint at {path!r} (missing its 'config' item).")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        config = checkpointer.restore(path, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    if config.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an rssbl_jax adapter checkpoint (format={config.get('format')!r}).")
    return config


def load_adapters(path: str | os.PathLike, params: PyTree) -> PyTree:
    """Return ``params`` with its ``lora_*`` leaves replaced by the ones saved at ``path``.

    Every adapter leaf of the checkpoint must exist in ``params`` with the same shape, and every adapter
    leaf of ``params`` must be in the checkpoint; base leaves of ``params`` are returned unchanged.
    Loaded leaves take the dtype of ``params``' leaves.

    Raises:
      ValueError: naming the first mismatched path with both shapes (or the missing side).
      FileNotFoundError: when there is no complete checkpoint at ``path``.

    >>> import tempfile, jax, jax.numpy as jnp
    >>> from rssbl_jax import RSSBilinearLoRADense
    >>> layer = RSSBilinearLoRADense(4, rank=2, lora_alpha=4.0)
    >>> trained = layer.init(jax.random.key(0), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> trained = {**trained, "lora_b": jnp.ones((2, 4))}             # as if trained
    >>> path = tempfile.mkdtemp() + "/adapters"
    >>> save_adapters(path, trained, lora_alpha=4.0)
    >>> fresh = layer.init(jax.random.key(1), jnp.ones((1, 3)), jnp.ones(2))["params"]
    >>> restored = load_adapters(path, fresh)
    >>> bool(jnp.all(restored["lora_b"] == 1.0)), bool(jnp.all(restored["kernel"] == fresh["kernel"]))
    (True, True)
    """
    config = load_adapter_config(path)
    saved = {name: tuple(info["shape"]) for name, info in config["leaves"].items()}
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
        name = core._path_str(key_path)
        return flat[name] if name in flat else leaf

    return jax.tree_util.tree_map_with_path(pick, params)
