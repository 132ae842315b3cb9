r"""What an adapter learned, as numbers: effective and joint ranks of ΔW(p), principal angles, responses over p.

RSSBilinearLoRA's update ``ΔW(p) = s A diag(g(p)) B`` (:func:`delta_weights`) keeps its column and row spaces for
every ``p``, so stacked over any set of conditions it still has rank ``≤ r``; output-space FiLM or a hypernetwork
can move its subspaces with ``p``. These functions measure that on a grid of conditions, for any model:

>>> import rssbl_jax
>>> layer = rssbl_jax.RSSBilinearLoRADense(6, rank=2, lora_alpha=2.0)
>>> params = layer.init(jax.random.key(0), jnp.ones((1, 5)), jnp.ones(2))["params"]
>>> params |= {k: jax.random.normal(jax.random.key(i), params[k].shape) for i, k in ((1, "lora_b"), (2, "lora_c"))}
>>> deltas = delta_weights(params, layer.adapter_config, "", condition_grid(-1.0, 1.0, 5, 2))
>>> deltas.shape, int(joint_rank(deltas, 0.999).maximum)
((25, 5, 6), 2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from rssbl_jax.merge import merge


def effective_rank(matrix: Float[ArrayLike, "m n"], energy: float = 0.99, *, atol: float = 0.0) -> Int[Array, ""]:
    r"""The number of singular values (an int scalar in ``[0, min(m, n)]``) that hold ``energy`` of ``‖M‖²_F``.

    :math:`\operatorname{rank}_e(M) = \min\{k : \sum_{i \le k} \sigma_i^2 \ge e \sum_i \sigma_i^2\}`. Works under
    ``jit`` and ``vmap``.

    Args:
      matrix: ``[m, n]``.
      energy: :math:`e`, the fraction of ``‖M‖²_F`` to hold, in ``(0, 1]``.
      atol: a Frobenius norm up to this gives rank 0 (to call float32 round-off zero, e.g. ``1e-5 * ‖W‖`` for an
        update of a base kernel ``W``).

    >>> int(effective_rank(jnp.diag(jnp.array([3.0, 1.0, 0.1])), 0.8))
    1
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1]; got {energy}.")
    s = jnp.linalg.svd(jnp.asarray(matrix), compute_uv=False)
    power = s**2
    total = jnp.sum(power)
    cumulative = jnp.cumsum(power) / jnp.where(total > 0, total, 1.0)
    # the first k whose cumulative share reaches `energy` (a tiny slack absorbs round-off at energy = 1)
    rank = jnp.sum(cumulative < energy * (1.0 - 1e-6)) + 1
    return jnp.where(jnp.sqrt(total) <= atol, 0, jnp.minimum(rank, s.shape[0]))


class JointRank(NamedTuple):
    """Effective ranks of updates stacked over conditions: their common input span and output span.

    >>> int(JointRank(jnp.array(2), jnp.array(3)).maximum)
    3
    """

    inputs: Int[Array, ""]  # rank of [ΔW(p_1) ... ΔW(p_K)] side by side: the input-space (row-of-x) directions used
    outputs: Int[Array, ""]  # rank of the updates stacked on top of each other: the output directions used

    @property
    def maximum(self) -> Int[Array, ""]:
        """The smallest r such that one r-dim input space and one r-dim output space hold every update."""
        return jnp.maximum(self.inputs, self.outputs)


def joint_rank(deltas: Float[ArrayLike, "K d_in d_out"], energy: float = 0.99, *, atol: float = 0.0) -> JointRank:
    r"""Effective ranks of the updates ``ΔW(p_k)`` (kernel convention ``[d_in, d_out]``) over ``K`` conditions.

    :math:`r_\text{in} = \operatorname{rank}_e[\Delta W(p_1) \cdots \Delta W(p_K)]` (side by side) and
    :math:`r_\text{out} = \operatorname{rank}_e[\Delta W(p_1); \cdots; \Delta W(p_K)]` (stacked). RSSBilinearLoRA
    has ``r_in, r_out ≤ r`` over any conditions; output-space FiLM on the LoRA branch has ``r_in ≤ r`` but ``r_out``
    up to ``min(d_out, r K)``.

    Args:
      deltas: ``[K, d_in, d_out]``.
      energy, atol: as in :func:`effective_rank` (``atol`` applies to each joined matrix).

    >>> joint = joint_rank(jnp.stack([jnp.ones((4, 3)), 2 * jnp.ones((4, 3))]))
    >>> int(joint.inputs), int(joint.outputs)
    (1, 1)
    """
    deltas = jnp.asarray(deltas)
    if deltas.ndim != 3:
        raise ValueError(f"deltas must be [K, d_in, d_out]; got shape {deltas.shape}.")
    k, d_in, d_out = deltas.shape
    side_by_side = jnp.moveaxis(deltas, 0, 1).reshape(d_in, k * d_out)
    stacked = deltas.reshape(k * d_in, d_out)
    return JointRank(effective_rank(side_by_side, energy, atol=atol), effective_rank(stacked, energy, atol=atol))


def principal_angles(a: Float[ArrayLike, "n k1"], b: Float[ArrayLike, "n k2"]) -> Float[Array, " k"]:
    r"""Principal angles (radians, ascending) between the column spaces of ``a`` and ``b``, ``k = min(k1, k2)``.

    :math:`\cos\theta_i = \sigma_i(Q_a^\top Q_b)` with :math:`a = Q_a R_a,\ b = Q_b R_b`: 0 is a shared direction,
    π/2 an orthogonal one. Columns must be linearly independent (an update's top singular vectors, not the update).

    >>> [round(float(t), 4) for t in principal_angles(jnp.eye(3)[:, :2], jnp.eye(3)[:, 1:])]
    [0.0, 1.5708]
    """
    qa, qb = (jnp.linalg.qr(jnp.asarray(m))[0] for m in (a, b))
    cosines = jnp.linalg.svd(qa.T @ qb, compute_uv=False)
    return jnp.arccos(jnp.clip(cosines, -1.0, 1.0))  # singular values descend, so angles ascend


def _at(tree: Any, path: str) -> Any:
    node = tree
    for key in filter(None, path.split("/")):
        if key not in node:
            raise ValueError(f"no layer {path!r} in params (at {key!r}; keys: {sorted(node)}).")
        node = node[key]
    return node


def delta_weights(
    params: Any, config: Any, layer_path: str, operating_params: Float[ArrayLike, "K d_p"]
) -> Float[Array, "K d_in d_out"]:
    r"""``ΔW(p_k) = W'(p_k) - W``, ``[K, *kernel.shape]``, of one adapted layer at ``K`` operating points.

    That is :math:`s\, A\,\mathrm{diag}(g(\hat p))\,B`, computed with ``jax.vmap`` over :func:`rssbl_jax.merge`, so
    gate and ``p`` normalisation come from ``config`` as in training.

    Args:
      params: a model's params tree (or one layer's params, with ``layer_path=""``).
      config: an :class:`~rssbl_jax.AdapterConfig`, or an adapted model or layer carrying one.
      layer_path: the layer's path in ``params``, as :mod:`rssbl_jax.patterns` writes paths.
      operating_params: ``[K, d_p]``.

    >>> import jax, jax.numpy as jnp, rssbl_jax
    >>> layer = rssbl_jax.RSSBilinearLoRADense(3, rank=1, lora_alpha=1.0)
    >>> params = layer.init(jax.random.key(0), jnp.ones((1, 2)), jnp.ones(1))["params"]
    >>> delta_weights(params, layer.adapter_config, "", jnp.array([[0.0], [1.0]])).shape   # B = 0 at init: zeros
    (2, 2, 3)
    """
    base = _at(params, layer_path)
    if "kernel" not in base:
        raise ValueError(f"{layer_path or 'params'} has no kernel (keys: {sorted(base)}).")
    kernels = jax.vmap(lambda p: _at(merge(params, p, config), layer_path)["kernel"])(jnp.asarray(operating_params))
    return kernels - base["kernel"][None]


def response_curve(fn: Callable[[Any], Any], grid: Any) -> Any:
    """``fn`` at every point of ``grid`` (a leading axis of conditions, or a pytree of them), with ``jax.vmap``.

    >>> response_curve(lambda p: jnp.sum(p**2), condition_grid(-1.0, 1.0, 3, 1)).tolist()
    [1.0, 0.0, 1.0]
    """
    return jax.vmap(fn)(grid)


def condition_grid(low: float, high: float, num: int, d_p: int) -> Float[Array, "K d_p"]:
    """A regular grid of ``num**d_p`` conditions on ``[low, high]^d_p`` (first axis slowest), ``[num**d_p, d_p]``.

    >>> condition_grid(0.0, 1.0, 2, 2).tolist()
    [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    """
    axis = jnp.linspace(low, high, num)
    return jnp.stack(jnp.meshgrid(*([axis] * d_p), indexing="ij"), -1).reshape(-1, d_p)


def plot_response(
    grid: ArrayLike,
    values: ArrayLike,
    *,
    axis: int = 0,
    ax: Any = None,
    labels: Sequence[str] | None = None,
    train_range: tuple[float, float] | None = None,
) -> Any:
    """Plot a response over a sweep of one operating parameter: ``values [K, ...]`` against ``grid[:, axis]``.

    One line per output channel (trailing axes of ``values``, flattened); ``train_range`` shades the training range
    so extrapolation is visible. Needs matplotlib (``pip install 'rssbl_jax[plot]'``). Returns the axes.

    >>> grid = condition_grid(-2.0, 2.0, 5, 1)
    >>> ax = plot_response(grid, response_curve(lambda p: jnp.stack([p[0], p[0] ** 2]), grid), train_range=(-1, 1))
    >>> len(ax.lines)
    2
    """
    import matplotlib.pyplot as plt  # optional dependency, needed only to plot

    grid, values = np.asarray(grid), np.asarray(values)
    if grid.ndim != 2 or values.shape[0] != grid.shape[0]:
        raise ValueError(f"grid must be [K, d_p] and values [K, ...]; got grid {grid.shape}, values {values.shape}.")
    ax = plt.figure(figsize=(5, 3)).gca() if ax is None else ax
    lines = values.reshape(values.shape[0], -1)
    for i in range(lines.shape[1]):
        ax.plot(grid[:, axis], lines[:, i], label=None if labels is None else labels[i])
    if train_range is not None:
        ax.axvspan(*train_range, color="0.9", zorder=0)
    ax.set_xlabel(f"p[{axis}]")
    if labels is not None:
        ax.legend()
    return ax
