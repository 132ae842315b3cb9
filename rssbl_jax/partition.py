"""Which leaves train: adapters known by identity, plus ``modules_to_save``; partition, combine, freeze, count.

Adapter layers and leaves are those :mod:`rssbl_jax.tree` defines (a user's leaf merely named ``lora_a`` stays frozen);
with an :class:`~rssbl_jax.AdapterConfig`, base leaves fully matching ``config.modules_to_save`` train too.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rssbl_jax import patterns
from rssbl_jax.config import AdapterConfig, as_config, check_adapted
from rssbl_jax.tree import PyTree, adapter_layers, adapter_leaf_paths, leaves


def trainable_mask(params: PyTree, config: Any = None) -> PyTree:
    """A tree of bools: ``True`` at the leaves that train (adapters by identity, plus ``modules_to_save``).

    Args:
      params: any params tree (linen ``variables["params"]``, an NNX pure state dict).
      config: optional :class:`~rssbl_jax.AdapterConfig` (or a model carrying one).

    Raises:
      ValueError: with a config, for an adapter layer it does not adapt or a ``modules_to_save`` matching no leaf.

    >>> trainable_mask({"dense": {"kernel": 0.0, "lora_a": 0.0, "lora_b": 0.0, "lora_c": 0.0}, "mine": {"lora_a": 0.0}})
    {'dense': {'kernel': False, 'lora_a': True, 'lora_b': True, 'lora_c': True}, 'mine': {'lora_a': False}}
    """
    cfg: AdapterConfig | None = None if config is None else as_config(config, "trainable_mask")
    layers = set(adapter_layers(params))
    if cfg is not None:
        check_adapted(cfg, layers, "pass")
        paths = [f"{layer}/{name}" if layer else name for layer, name, _ in leaves(params)]
        unmatched = patterns.unmatched(cfg.modules_to_save, paths)
        if unmatched:
            raise ValueError(f"modules_to_save {unmatched} matches no leaf; leaf paths: {paths}.")
    extra = cfg.modules_to_save if cfg is not None else ()
    adapter_paths = adapter_leaf_paths(params)

    def trains(key_path, _):
        path = patterns.path_str(key_path)
        return path in adapter_paths or patterns.matches(extra, path)

    return jax.tree_util.tree_map_with_path(trains, params)


def partition(params: PyTree, config: Any = None, *, mask: PyTree | None = None) -> tuple[PyTree, PyTree]:
    """Split any params tree into ``(trainable, frozen)`` by :func:`trainable_mask` or by ``mask``.

    Both keep the full structure (``None`` where the other holds the leaf): ``jax.grad`` can take ``trainable`` alone,
    :func:`combine` restores the tree. ``mask``: bools in ``params``' structure (e.g. to freeze some adapter factors).

    >>> trainable, frozen = partition({"dense": {k: jnp.ones(1) for k in ("kernel", "lora_a", "lora_b", "lora_c")}})
    >>> trainable["dense"]["kernel"] is None, frozen["dense"]["lora_a"] is None
    (True, True)
    """
    mask = trainable_mask(params, config) if mask is None else mask
    trainable = jax.tree.map(lambda x, m: x if m else None, params, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, params, mask)
    return trainable, frozen


def combine(*trees: PyTree) -> PyTree:
    """Inverse of :func:`partition`: at each leaf take the first tree's value that is not ``None``.

    >>> import numpy as np
    >>> combine({"kernel": None, "lora_a": np.ones(1)}, {"kernel": np.zeros(1), "lora_a": None})
    {'kernel': array([0.]), 'lora_a': array([1.])}
    """
    if not trees:
        raise ValueError("combine needs at least one tree.")
    return jax.tree.map(lambda *xs: next((x for x in xs if x is not None), None), *trees, is_leaf=lambda x: x is None)


def adapter_labels(params: PyTree, config: Any = None) -> PyTree:
    """The labels :func:`freeze_base` uses: ``"adapter"`` where :func:`trainable_mask` is true, else ``"frozen"``."""
    return jax.tree.map(lambda m: "adapter" if m else "frozen", trainable_mask(params, config))


def freeze_base(
    tx: optax.GradientTransformation, config: Any = None, *, clip_global_norm: float | None = None
) -> optax.GradientTransformation:
    r"""Wrap ``tx`` so it updates only the trainable leaves (:func:`trainable_mask`) and leaves every other unchanged.

    Built on ``optax.partition``: trainable leaves go through ``tx``, the others through the stateless
    ``optax.set_to_zero()``, so frozen leaves stay bit-identical (exact zero updates; ``-0.0`` becomes ``+0.0``).

    **Order matters for whole-tree transforms**: ``optax.chain(optax.clip_by_global_norm(c), freeze_base(tx))`` would
    count the frozen base's usually far larger gradients and shrink every adapter step by that factor (300× in the
    case that found it); use ``clip_global_norm=c`` or ``freeze_base(optax.chain(optax.clip_by_global_norm(c), tx))``.

    Args:
      tx: the trainable leaves' optimizer.
      config: as for :func:`trainable_mask`.
      clip_global_norm: :math:`c`: before ``tx``, :math:`g_A \leftarrow g_A \min(1, c / \lVert g_A \rVert)`, the
        trainable gradients' global norm alone.

    >>> import optax
    >>> params = {k: jnp.ones(2) for k in ("kernel", "lora_a", "lora_b", "lora_c")}  # trainable gradient norm 5:
    >>> grads = {k: jnp.zeros(2) for k in params} | {"kernel": jnp.full(2, 300.0), "lora_b": jnp.array([3.0, 4.0])}
    >>> tx = freeze_base(optax.sgd(1.0), clip_global_norm=1.0)
    >>> new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    >>> new["kernel"].tolist(), [round(v, 4) for v in new["lora_b"].tolist()]   # base kept; adapter step of norm 1
    ([1.0, 1.0], [0.4, 0.2])
    """
    if clip_global_norm is not None:
        if not clip_global_norm > 0:
            raise ValueError(f"clip_global_norm must be a positive number; got {clip_global_norm}.")
        tx = optax.chain(optax.clip_by_global_norm(clip_global_norm), tx)
    return optax.partition({"adapter": tx, "frozen": optax.set_to_zero()}, lambda p: adapter_labels(p, config))


class ParameterCount(NamedTuple):
    """Base (frozen) and trainable parameter counts, per layer (``{path: (base, trainable)}``) and in total.

    >>> count = ParameterCount(per_layer={"dense": (15, 18)}, base=15, trainable=18)
    >>> count.total, round(count.trainable_fraction, 3), str(count).splitlines()[-1]
    (33, 0.545, 'trainable fraction: 54.5455% of 33')
    """

    per_layer: dict[str, tuple[int, int]]
    base: int
    trainable: int

    @property
    def total(self) -> int:
        return self.base + self.trainable

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len("layer"), *(len(k) for k in self.per_layer)])
        rows = [*self.per_layer.items(), ("total", (self.base, self.trainable))]
        lines = [f"{'layer':<{width}}  {'base':>12}  {'trainable':>12}"]
        lines += [f"{name:<{width}}  {base:>12,}  {trainable:>12,}" for name, (base, trainable) in rows]
        lines.append(f"trainable fraction: {self.trainable_fraction:.4%} of {self.total:,}")
        return "\n".join(lines)


def count_parameters(params: PyTree, config: Any = None) -> ParameterCount:
    r"""Count frozen base and trainable parameters (:func:`trainable_mask`), per layer and in total.

    A Dense layer with the linear gate has :math:`d_{in} d_{out} + d_{out}` base and :math:`r (d_{in} + d_{out}) +
    2 r d_p` trainable parameters (LoRA, then ``C`` and ``S``).

    >>> shape = {"kernel": (4, 3), "bias": (3,), "lora_a": (4, 2), "lora_b": (2, 3), "lora_c": (1, 2), "lora_s": (1, 2)}
    >>> count_parameters({"dense": {k: jnp.zeros(s) for k, s in shape.items()}}).per_layer
    {'dense': (15, 18)}
    """
    mask = jax.tree_util.tree_leaves(trainable_mask(params, config))
    per_layer: dict[str, list[int]] = {}
    for (layer, _, leaf), trains in zip(leaves(params), mask, strict=True):
        per_layer.setdefault(layer or "(root)", [0, 0])[1 if trains else 0] += int(math.prod(jnp.shape(leaf)))
    table = {k: (v[0], v[1]) for k, v in per_layer.items()}
    return ParameterCount(table, sum(v[0] for v in table.values()), sum(v[1] for v in table.values()))
