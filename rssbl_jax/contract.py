r"""The operating-parameter contract: which shapes of ``p`` a layer accepts, and how ``p`` is standardised.

.. math::

    p \in \mathbb{R}^{d_p} \quad\text{or}\quad p \in \mathbb{R}^{\ell_1 \times \dots \times \ell_k \times d_p},\
    (\ell_1, \dots, \ell_k)\ \text{a prefix of}\ x\text{'s leading axes}, \qquad \hat p = (p - \mu) / \sigma

Every front-end and every :class:`~rssbl_jax.methods.AdapterMethod` relies on these two rules, so they sit in a
module importing nothing else of the library, neither the update nor the gates nor the fast paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def lead_axes(x_shape: Sequence[int], p_shape: Sequence[int], d_p: int) -> int:
    """Check an operating-parameter shape against an input shape and return its number of lead axes.

    ``p [*lead, d_p]`` gives one condition per example, broadcast over the other axes (tokens, pixels); sizes must
    match (a lead of size 1 is not broadcast). Returns ``len(lead)``; ``ValueError`` naming ``d_p`` and both shapes.

    >>> lead_axes((4, 16, 32), (4, 3), d_p=3), lead_axes((4, 16, 32), (3,), d_p=3)
    (1, 0)
    """
    x_shape, p_shape = tuple(x_shape), tuple(p_shape)
    if len(p_shape) == 0 or p_shape[-1] != d_p:
        raise ValueError(
            f"operating_params must have last axis d_p={d_p}; got operating_params.shape={p_shape} "
            f"for x.shape={x_shape}."
        )
    lead = p_shape[:-1]
    if len(x_shape) < 1 or len(lead) > len(x_shape) - 1 or x_shape[: len(lead)] != lead:
        raise ValueError(
            f"operating_params of shape {p_shape} (d_p={d_p}) must be [d_p] or [*lead, d_p] with lead a "
            f"prefix of x's leading axes {x_shape[:-1]}; x.shape={x_shape}."
        )
    return len(lead)


def normalize_operating_params(p: jax.Array, layer: Any) -> jax.Array:
    """``(p - p_mean) / p_std`` over the last axis when ``layer`` has a normalisation, else ``p``.

    The one place ``p`` is standardised (:func:`rssbl_jax.gates.gate_and_shift`, so :func:`rssbl_jax.core.fold` too;
    the sweep basis; injection, before any other method's ``update``), so every method sees the same ``p̂``.

    >>> from rssbl_jax.config import LayerConfig
    >>> normalize_operating_params(jnp.array([[14.0]]), LayerConfig(1, 1.0, 1.0, p_mean=(10.0,), p_std=(2.0,))).tolist()
    [[2.0]]
    """
    if layer.p_mean is None:
        return p
    p = jnp.asarray(p)
    shape = (1,) * (p.ndim - 1) + (-1,)
    mean = jnp.asarray(layer.p_mean, p.dtype).reshape(shape)
    return (p - mean) / jnp.asarray(layer.p_std, p.dtype).reshape(shape)
