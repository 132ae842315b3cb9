"""Merge adapted layers into plain weights at one operating point, with the settings their config carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jaxtyping import ArrayLike, Float

from rssbl_jax import core, tree
from rssbl_jax.config import AdapterConfig, as_config, check_adapted, check_patterns_used


def merge(
    params: Any,
    operating_params: Float[ArrayLike, " d_p"],
    config: AdapterConfig | Any,
    *,
    add_bias: bool = False,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> Any:
    r"""Reduce every adapted layer in ``params`` to plain ``kernel``/``bias`` at one operating point ``p0``.

    .. math::

        W' = W + s\, A\,\mathrm{diag}\big(g(\hat p_0)\big)\,B, \qquad b' = b + s\, (S \hat p_0)\, B

    Rank, scale, gate and ``p`` normalisation come from the config the model trained with, so nothing is restated and
    nothing can silently differ. Every adapter layer (:func:`rssbl_jax.tree.is_adapter_layer`) becomes its base
    leaves, the update folded into ``kernel`` (or ``embedding``) by :func:`rssbl_jax.core.fold`, per slice for
    ``nn.scan``-stacked adapters; the rest is unchanged, so the result loads into the unmodified architecture. Pure in
    arrays: ``jax.vmap(lambda q: merge(params, q, config))(ps)`` merges a batch of points.

    Args:
      params: one layer's params or a whole tree (linen params, an NNX pure state dict).
      operating_params: ``p0 [d_p]``.
      config: an :class:`~rssbl_jax.AdapterConfig`, or the adapted model or layer that carries one.
      add_bias: give a bias-free layer with a shift a ``bias`` for ``s (S p̂0) B`` (without it this raises: Flax
        silently ignores a ``bias`` leaf in a ``use_bias=False`` layer).
      precision: of the fold; ``HIGHEST`` (run once) matches the adapted model to float32 round-off on GPU and TPU.

    Raises:
      TypeError: ``config`` carries no AdapterConfig (e.g. a bare ``lora_alpha``, the pre-0.2 API).
      ValueError: no adapted layer; an adapter layer without a kernel or its gate's leaves (another method's, which
        has no fold); factors that do not fit the resolved rank (a forgotten ``rank_pattern``); a path the config
        does not adapt; ``operating_params`` not ``[d_p]``; an unused pattern; a shift without bias or ``add_bias``.

    >>> import jax, jax.numpy as jnp, rssbl_jax
    >>> layer, p0 = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=2.0), jnp.array([0.5])
    >>> params = layer.init(jax.random.key(0), jnp.ones((2, 3)), p0)["params"]
    >>> sorted(merge(params, p0, layer.adapter_config))
    ['bias', 'kernel']
    """
    cfg = as_config(config, "merge")

    def fold_layer(path: str, node: Mapping) -> dict:
        where = path or "params"
        kernel_name = tree.base_weight_name(node)
        if kernel_name is None:
            raise ValueError(
                f"{where} is an adapter layer without a kernel or embedding to merge into; has {sorted(node)}."
            )
        check_adapted(cfg, [path], "merge")
        factors = {name: value for name, value in node.items() if tree.is_adapter_leaf_name(name)}
        hint = "Pass add_bias=True and load the result into the layer built with use_bias=True, or adapt without shift"
        merged = fold_at(
            where, node[kernel_name], node.get("bias"), factors, operating_params, cfg.resolve(path),
            precision=precision, hint=None if add_bias else hint + " (shift=False).",
        )  # fmt: skip
        rest = {k: v for k, v in node.items() if k not in (kernel_name, "bias", *factors)}
        if "bias" not in node and factors.get("lora_s") is None:
            return {**rest, kernel_name: merged.kernel}
        return {**rest, kernel_name: merged.kernel, "bias": merged.bias}

    out, found = tree.map_adapter_layers(params, fold_layer)
    if not found:
        raise ValueError("merge found no adapted layer (a mapping holding lora_a and lora_b beside its kernel).")
    check_patterns_used(cfg, found)
    return out


def fold_at(
    where: str, kernel: Any, bias: Any, factors: Mapping, operating_params: Any, layer: Any, *,
    precision: Any, hint: str | None,
) -> core.MergedDense:  # fmt: skip
    """:func:`rssbl_jax.core.fold` for the layer at ``where``, its errors prefixed with ``where``.

    A shift ``S p0`` folds into a bias, so a layer without one refuses it with ``hint`` (how to keep it) unless
    ``hint`` is None (the caller adds the bias).
    """
    if bias is None and factors.get("lora_s") is not None and hint is not None:
        raise ValueError(
            f"{where} has no bias but a shift S p (lora_s {factors['lora_s'].shape}): its merged shift is a bias "
            f"that a layer without one would silently ignore. {hint}"
        )
    try:
        return core.fold(kernel, bias, factors, operating_params, layer, precision=precision)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
