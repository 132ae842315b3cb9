"""Which leaves train: adapters known by identity, plus ``modules_to_save``; partition, combine, freeze, count.

An *adapter layer* is what :mod:`rssbl_jax.tree` says: a mapping that holds both ``lora_a`` and ``lora_b`` (every
LoRA-family adapter does; RSSBilinearLoRA adds ``lora_c``); its ``lora_*`` leaves are the adapter. A leaf merely
*named* ``lora_a`` in a module that is not an adapter layer (a user's own parameter) stays frozen. With an
:class:`~rssbl_jax.AdapterConfig`, every adapter layer must also be one the config adapts (else an error names it),
and base leaves whose path fully matches ``config.modules_to_save`` train too.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rssbl_jax import patterns
from rssbl_jax.config import AdapterConfig, as_config
from rssbl_jax.tree import adapter_layers, adapter_leaf_paths, leaves

PyTree = Any


def _is_none(x: Any) -> bool:
    return x is None


def trainable_mask(params: PyTree, config: Any = None) -> PyTree:
    """A tree of bools: ``True`` at the leaves that train (adapters by identity, plus ``modules_to_save``).

    Args:
      params: any params tree (linen ``variables["params"]``, an NNX pure state dict).
      config: optional :class:`~rssbl_jax.AdapterConfig` (or a model carrying one).

    Raises:
      ValueError: when, with a config, an adapter layer is one the config does not adapt, or a
        ``modules_to_save`` pattern matches no leaf.

    >>> import numpy as np
    >>> tree = {"dense": {"kernel": 0.0, "lora_a": 0.0, "lora_b": 0.0, "lora_c": 0.0}, "mine": {"lora_a": 0.0}}
    >>> trainable_mask(tree)
    {'dense': {'kernel': False, 'lora_a': True, 'lora_b': True, 'lora_c': True}, 'mine': {'lora_a': False}}
    """
    cfg: AdapterConfig | None = None if config is None else as_config(config, "trainable_mask")
    layers = set(adapter_layers(params))
    if cfg is not None:
        foreign = sorted(layer for layer in layers if not cfg.adapts(layer))
        if foreign:
            raise ValueError(
                f"adapter layers {foreign} are not adapted by the config (targets={cfg.targets}, exclude="
                f"{cfg.exclude}); pass the params tree whose paths the config was written for (for NNX: "
                "nnx.state(adapted.model, ...), not nnx.state(adapted, ...))."
            )
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
    """Split any params tree into ``(trainable, frozen)``, deciding by :func:`trainable_mask` (or by ``mask``, a tree
    of bools with ``params``' structure, e.g. an ablation that freezes some adapter factors).

    Both trees keep the full structure with ``None`` where the other one holds the leaf, so ``jax.grad`` can
    differentiate with respect to ``trainable`` alone and :func:`combine` restores the tree.

    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2)),
    ...                     "lora_c": jnp.ones((1, 1))}}
    >>> trainable, frozen = partition(params)
    >>> trainable["dense"]["kernel"] is None, frozen["dense"]["lora_a"] is None
    (True, True)
    >>> jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), combine(trainable, frozen), params))
    True
    """
    mask = trainable_mask(params, config) if mask is None else mask
    trainable = jax.tree.map(lambda x, m: x if m else None, params, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, params, mask)
    return trainable, frozen


def combine(*trees: PyTree) -> PyTree:
    """Inverse of :func:`partition`: at each leaf take the first tree's value that is not ``None``.

    >>> import numpy as np
    >>> trainable, frozen = {"kernel": None, "lora_a": np.ones(1)}, {"kernel": np.zeros(1), "lora_a": None}
    >>> combine(trainable, frozen)
    {'kernel': array([0.]), 'lora_a': array([1.])}
    """
    if not trees:
        raise ValueError("combine needs at least one tree.")

    def first(*leaves: Any) -> Any:
        return next((leaf for leaf in leaves if leaf is not None), None)

    return jax.tree.map(first, *trees, is_leaf=_is_none)


def adapter_labels(params: PyTree, config: Any = None) -> PyTree:
    """The labels :func:`freeze_base` uses: ``"adapter"`` where :func:`trainable_mask` is true, else ``"frozen"``."""
    return jax.tree.map(lambda m: "adapter" if m else "frozen", trainable_mask(params, config))


def freeze_base(
    tx: optax.GradientTransformation, config: Any = None, *, clip_global_norm: float | None = None
) -> optax.GradientTransformation:
    r"""Wrap ``tx`` so it updates only the trainable leaves (:func:`trainable_mask`) and leaves every other unchanged.

    Built on ``optax.partition``: trainable leaves go through ``tx``; all other leaves through
    ``optax.set_to_zero()``, which keeps no state, so the optimizer state holds nothing for the frozen base.
    ``optax.apply_updates`` then adds exact zeros to frozen leaves, which leaves them bit-identical (the one
    exception IEEE allows is ``-0.0 + 0.0 = +0.0``).

    **Order matters for anything that looks at the whole gradient tree**, such as ``optax.clip_by_global_norm``.
    Pass ``clip_global_norm=c`` (or put the clip inside: ``freeze_base(optax.chain(optax.clip_by_global_norm(c),
    tx))``): the norm is then that of the trainable gradients alone,

    .. math::

        g_A \leftarrow g_A \cdot \min\Big(1, \frac{c}{\lVert g_A \rVert}\Big).

    Outside (``optax.chain(optax.clip_by_global_norm(c), freeze_base(tx))``) it would also count the frozen
    base's gradients, which are usually far larger, and shrink every adapter step by that factor (300× in the case
    that found it) although those gradients are then thrown away.

    Args:
      tx: the trainable leaves' optimizer.
      config: optional :class:`~rssbl_jax.AdapterConfig` (or a model carrying one), for :func:`trainable_mask`.
      clip_global_norm: if given, clip the trainable gradients to this global norm before ``tx``.

    >>> import jax, jax.numpy as jnp, optax
    >>> params = {"kernel": jnp.ones(2), "lora_a": jnp.ones(2), "lora_b": jnp.ones(2), "lora_c": jnp.ones(2)}
    >>> tx = freeze_base(optax.sgd(0.5))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> new["kernel"].tolist(), new["lora_b"].tolist()
    ([1.0, 1.0], [0.5, 0.5])

    The frozen gradients do not shrink the clipped adapter step (they would with the clip outside):

    >>> grads = {"kernel": jnp.full(2, 300.0), "lora_a": jnp.zeros(2), "lora_b": jnp.array([3.0, 4.0]),
    ...          "lora_c": jnp.zeros(2)}                                          # |g_A| = 5
    >>> tx = freeze_base(optax.sgd(1.0), clip_global_norm=1.0)
    >>> tx.update(grads, tx.init(params), params)[0]["lora_b"].tolist()
    [-0.6000000238418579, -0.800000011920929]
    >>> outside = optax.chain(optax.clip_by_global_norm(1.0), freeze_base(optax.sgd(1.0)))
    >>> [round(v, 5) for v in outside.update(grads, outside.init(params), params)[0]["lora_b"].tolist()]
    [-0.00707, -0.00943]
    """
    if clip_global_norm is not None:
        if not clip_global_norm > 0:
            raise ValueError(f"clip_global_norm must be a positive number; got {clip_global_norm}.")
        tx = optax.chain(optax.clip_by_global_norm(clip_global_norm), tx)
    return optax.partition({"adapter": tx, "frozen": optax.set_to_zero()}, lambda p: adapter_labels(p, config))


class ParameterCount(NamedTuple):
    """Base (frozen) and trainable parameter counts, per layer and in total.

    ``per_layer`` maps a layer path (``"Dense_0"``, ``"block/attn/query"``) to ``(base, trainable)``.
    ``str()`` renders a table.

    >>> count = ParameterCount(per_layer={"dense": (15, 18)}, base=15, trainable=18)
    >>> count.total, round(count.trainable_fraction, 3)
    (33, 0.545)
    >>> print(count)
    layer          base     trainable
    dense            15            18
    total            15            18
    trainable fraction: 54.5455% of 33
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
        lines = [f"{'layer':<{width}}  {'base':>12}  {'trainable':>12}"]
        for name, (base, trainable) in self.per_layer.items():
            lines.append(f"{name:<{width}}  {base:>12,}  {trainable:>12,}")
        lines.append(f"{'total':<{width}}  {self.base:>12,}  {self.trainable:>12,}")
        lines.append(f"trainable fraction: {self.trainable_fraction:.4%} of {self.total:,}")
        return "\n".join(lines)


def count_parameters(params: PyTree, config: Any = None) -> ParameterCount:
    r"""Count frozen base and trainable parameters (:func:`trainable_mask`), per layer and in total.

    For a Dense layer with the linear gate this gives

    .. math::

        \underbrace{d_{in} d_{out} + d_{out}}_{\text{base}}, \qquad
        \underbrace{r (d_{in} + d_{out})}_{\text{LoRA}} + \underbrace{2 r d_p}_{C,\ S}\ \text{trainable.}

    >>> import numpy as np
    >>> tree = {"dense": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3),
    ...                   "lora_a": np.zeros((4, 2)), "lora_b": np.zeros((2, 3)),
    ...                   "lora_c": np.zeros((1, 2)), "lora_s": np.zeros((1, 2))}}
    >>> count_parameters(tree).per_layer
    {'dense': (15, 18)}
    """
    mask = jax.tree_util.tree_leaves(trainable_mask(params, config))
    per_layer: dict[str, list[int]] = {}
    for (layer, _, leaf), trains in zip(leaves(params), mask, strict=True):
        counts = per_layer.setdefault(layer or "(root)", [0, 0])
        counts[1 if trains else 0] += int(math.prod(jnp.shape(leaf)))
    table = {k: (v[0], v[1]) for k, v in per_layer.items()}
    return ParameterCount(
        per_layer=table,
        base=sum(v[0] for v in table.values()),
        trainable=sum(v[1] for v in table.values()),
    )
