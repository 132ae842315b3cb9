"""What an adapter layer is, and the one walker over params trees that finds them.

An *adapter layer* is a mapping in a params tree holding both ``lora_a`` and ``lora_b`` (every LoRA-family adapter
does; RSSBilinearLoRA adds ``lora_c``, a plug-in :class:`~rssbl_jax.methods.AdapterMethod` may add its own leaves);
its ``lora_*`` leaves are the adapter, the rest (``kernel`` or ``embedding``, ``bias``) its base; a leaf merely
*named* ``lora_a`` elsewhere stays a base leaf. Partitioning, merging, principal initialisation, checkpoints,
sharding and quantisation all take their one answer to "is this an adapter layer?" from here, without importing
linen or the update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from rssbl_jax import patterns

PyTree = Any

ADAPTER_NAMES = ("lora_a", "lora_b", "lora_c", "lora_s", "lora_c0", "lora_gate_w", "lora_gate_b")
"""RSS adapter leaf names with the built-in gates (``lora_s``, ``lora_c0``, ``lora_gate_*`` optional); a registered
:class:`~rssbl_jax.gates.Gate` or plug-in method may add other ``lora_*`` leaves (:func:`is_adapter_leaf_name`)."""

REQUIRED_LEAVES = ("lora_a", "lora_b")
"""The leaves whose presence (not ``None``) makes a mapping an adapter layer."""

BASE_WEIGHT_NAMES = ("kernel", "embedding")
"""The names of the base weight an adapter folds into, in order of preference."""


def is_adapter_leaf_name(name: Any) -> bool:
    """Whether a leaf name inside an adapter layer names an adapter leaf (``lora_*``)."""
    return isinstance(name, str) and name.startswith("lora_")


def is_adapter_layer(node: Any) -> bool:
    """Whether a params node is an adapter layer: a mapping holding ``lora_a`` and ``lora_b`` (not ``None``).

    >>> is_adapter_layer({"kernel": 0, "lora_a": 0, "lora_b": 0}), is_adapter_layer({"lora_a": 0})
    (True, False)
    """
    return isinstance(node, Mapping) and all(node.get(name) is not None for name in REQUIRED_LEAVES)


def base_weight_name(node: Mapping) -> str | None:
    """The name of the base weight in an adapter layer (``"kernel"`` or ``"embedding"``), or ``None``."""
    return next((name for name in BASE_WEIGHT_NAMES if name in node), None)


def map_adapter_layers(params: PyTree, fn: Callable[[str, Mapping], Any]) -> tuple[PyTree, list[str]]:
    """Replace every adapter layer by ``fn(path, layer)``; returns the new tree and the layers' paths, in order.

    Descends mappings (rebuilt as ``dict``), lists and tuples, not adapter layers; paths are keys and indices joined
    by ``/`` (the root is ``""``), as :func:`rssbl_jax.patterns.path_str` writes them. Other nodes are kept as is.

    >>> map_adapter_layers([{"lora_a": 1, "lora_b": 2, "kernel": 3}], lambda path, node: node["kernel"])
    ([3], ['0'])
    """
    found: list[str] = []

    def visit(node: Any, path: str) -> Any:
        if is_adapter_layer(node):
            found.append(path)
            return fn(path, node)
        join = (lambda key: f"{path}/{key}") if path else str
        if isinstance(node, Mapping):
            return {key: visit(value, join(key)) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            items = [visit(value, join(index)) for index, value in enumerate(node)]
            if isinstance(node, list):
                return items
            return type(node)(*items) if hasattr(node, "_fields") else tuple(items)
        return node

    return visit(params, ""), found


def adapter_layers(params: PyTree) -> list[str]:
    """Paths of the adapter layers in ``params`` (:func:`is_adapter_layer`), in tree order.

    >>> adapter_layers({"block": {"dense": {"kernel": 0, "lora_a": 0, "lora_b": 0}}, "mine": {"lora_a": 0}})
    ['block/dense']
    """
    return map_adapter_layers(params, lambda path, node: node)[1]


def leaves(params: PyTree) -> list[tuple[str, str, Any]]:
    """``(layer path, leaf name, leaf)`` for every leaf of ``params`` (``jax.tree_util`` order).

    >>> leaves({"dense": {"kernel": 1}})
    [('dense', 'kernel', 1)]
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [(*patterns.path_str(key_path).rpartition("/")[::2], leaf) for key_path, leaf in flat]


def adapter_leaf_paths(params: PyTree) -> set[str]:
    """The ``/``-joined paths of every adapter leaf: the ``lora_*`` leaves of adapter layers.

    >>> sorted(adapter_leaf_paths({"d": {"kernel": 0, "lora_a": 0, "lora_b": 0}, "mine": {"lora_a": 0}}))
    ['d/lora_a', 'd/lora_b']
    """
    layers = set(adapter_layers(params))
    return {
        f"{layer}/{name}" if layer else name
        for layer, name, _ in leaves(params)
        if layer in layers and is_adapter_leaf_name(name)
    }


def axes_from_kernel(
    name: str, shape: Sequence[int], kernel_axes: Sequence[Any], kernel_shape: Sequence[int]
) -> tuple[Any, ...]:
    """The per-axis partitioning of an adapter leaf, from its kernel's: ``A`` keeps the input axes, ``B`` the output.

    The one sharding rule for adapters, whatever the axis names are (mesh axes, linen logical names, NNX sharding
    metadata): ``lora_a (*in, r)`` takes the kernel's leading axes, ``lora_b (r, *out)`` and a ``bias (*out)`` its
    trailing ones, where the sizes agree (else, e.g. an Einsum factor's axis of size 1, ``None``); the rank axis and
    every other leaf (``C``, ``S``, the gate's) are replicated (``None``).

    >>> [axes_from_kernel(n, s, ("in", "out"), (8, 16)) for n, s in [("lora_a", (8, 4)), ("lora_b", (4, 16))]]
    [('in', None), (None, 'out')]
    """
    shape, kernel_shape = tuple(shape), tuple(kernel_shape)
    kernel_axes = (*kernel_axes, *(None,) * (len(kernel_shape) - len(kernel_axes)))
    if name == "lora_a":  # (*in, r): leading axes follow the kernel's leading axes
        lead = [axis if n == k else None for n, axis, k in zip(shape[:-1], kernel_axes, kernel_shape, strict=False)]
        return (*lead, *(None,) * (len(shape) - len(lead)))
    if name in ("lora_b", "bias"):  # (r, *out) / (*out): trailing axes follow the kernel's trailing axes
        n_out = len(shape) - 1 if name == "lora_b" else len(shape)
        offset = len(kernel_shape) - n_out
        trail = [
            kernel_axes[offset + i] if n_out <= len(kernel_shape) and kernel_shape[offset + i] == size else None
            for i, size in enumerate(shape[len(shape) - n_out :])
        ]
        return (*(None,) * (len(shape) - n_out), *trail)
    return (None,) * len(shape)
