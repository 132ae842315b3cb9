"""Split params into trainable adapters and frozen base; an optax transformation that freezes the base."""

from __future__ import annotations

from typing import Any

import jax
import optax

from rssbl_jax.core import is_adapter_path

PyTree = Any


def _is_none(x: Any) -> bool:
    return x is None


def partition(params: PyTree) -> tuple[PyTree, PyTree]:
    """Split any params tree into ``(trainable, frozen)`` by leaf name.

    Leaves named ``lora_a``, ``lora_b``, ``lora_c`` or ``lora_s`` go to ``trainable``; every other leaf goes to
    ``frozen``. Both trees keep the full structure with ``None`` where the other one holds the leaf, so
    ``jax.grad`` can differentiate with respect to ``trainable`` alone and :func:`combine` restores the tree.

    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "lora_a": jnp.ones((2, 1))}}
    >>> trainable, frozen = partition(params)
    >>> trainable["dense"]["kernel"] is None, frozen["dense"]["lora_a"] is None
    (True, True)
    >>> jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), combine(trainable, frozen), params))
    True
    """
    trainable = jax.tree_util.tree_map_with_path(lambda path, x: x if is_adapter_path(path) else None, params)
    frozen = jax.tree_util.tree_map_with_path(lambda path, x: None if is_adapter_path(path) else x, params)
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


def adapter_labels(params: PyTree) -> PyTree:
    """The label tree used by :func:`freeze_base`: ``"adapter"`` for ``lora_*`` leaves, ``"frozen"`` otherwise."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "adapter" if is_adapter_path(path) else "frozen", params)


def freeze_base(
    tx: optax.GradientTransformation, *, clip_global_norm: float | None = None
) -> optax.GradientTransformation:
    r"""Wrap ``tx`` so it updates only the ``lora_*`` leaves and leaves every other leaf unchanged.

        Built on ``optax.partition``: adapter leaves go through ``tx``; all other leaves through
        ``optax.set_to_zero()``, which keeps no state, so the optimizer state holds nothing for the frozen base.
        ``optax.apply_updates`` then adds exact zeros to frozen leaves, which leaves them bit-identical (the one
        exception IEEE allows is ``-0.0 + 0.0 = +0.0``). Inside one ``jax.jit``, XLA drops the unused
        base gradients; to avoid computing them at all, differentiate w.r.t. the ``trainable`` half of
        :func:`partition`.

        **Order matters for anything that looks at the whole gradient tree**, such as ``optax.clip_by_global_norm``.
        Put it inside (``freeze_base(optax.chain(optax.clip_by_global_norm(c), tx))``) or pass
        ``clip_global_norm=c``: the norm is then that of the adapters' gradients alone,

        .. math::

            g_A \leftarrow g_A \cdot \min\Big(1, rac{c}{\lVert g_A
    Vert}\Big).

        Outside (``optax.chain(optax.clip_by_global_norm(c), freeze_base(tx))``) it would also count the frozen
        base's gradients, which are usually far larger, and shrink every adapter step by that factor (300x in the
        case that found it) although those gradients are then thrown away.

        Args:
          tx: the adapters' optimizer.
          clip_global_norm: if given, clip the adapters' gradients to this global norm before ``tx`` (the safe
            order, computed over adapter gradients only).

        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"kernel": jnp.ones(2), "lora_b": jnp.ones(2)}
        >>> tx = freeze_base(optax.sgd(0.5))
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"kernel": jnp.ones(2), "lora_b": jnp.ones(2)}, state, params)
        >>> new = optax.apply_updates(params, updates)
        >>> new["kernel"].tolist(), new["lora_b"].tolist()
        ([1.0, 1.0], [0.5, 0.5])

        The frozen gradients do not shrink the clipped adapter step (they would with the clip outside):

        >>> grads = {"kernel": jnp.full(2, 300.0), "lora_b": jnp.array([3.0, 4.0])}    # |g_A| = 5
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
    return optax.partition({"adapter": tx, "frozen": optax.set_to_zero()}, adapter_labels)
