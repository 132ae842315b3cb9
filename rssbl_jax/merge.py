"""Merge adapted layers into plain weights at one operating point, with the settings their config carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jaxtyping import ArrayLike, Float

from rssbl_jax import core, tree
from rssbl_jax.config import AdapterConfig, as_config, check_patterns_used


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

    with each layer's rank, scale, gate and ``p`` normalisation taken from ``config`` (an
    :class:`~rssbl_jax.AdapterConfig`, or the adapted model / layer that carries one), the same config the model
    trained with: nothing is restated, so nothing can silently differ. ``params`` is one layer's params or a whole
    model's tree (nested mappings, linen params or an NNX pure state dict); every adapter layer
    (:func:`rssbl_jax.tree.is_adapter_layer`) is replaced by its base leaves, its ``kernel`` (or ``embedding``) with
    the update folded in (:func:`rssbl_jax.core.fold`); everything else is returned unchanged, so the result loads
    into the unmodified architecture. Adapters stacked by ``nn.scan`` fold slice by slice.

    A layer without bias but with a shift ``S p`` needs a bias to hold ``s (S p̂0) B``; Flax would silently ignore an
    extra ``bias`` leaf in a ``use_bias=False`` layer, so this raises unless ``add_bias=True``. The fold runs at
    ``Precision.HIGHEST`` (once), so a merged model matches the adapted one to float32 round-off on GPU and TPU.
    ``merge`` is a pure function of arrays: ``jax.vmap(lambda q: merge(params, q, config))(ps)`` merges a batch of
    operating points.

    Raises:
      TypeError: when ``config`` carries no AdapterConfig (e.g. a bare ``lora_alpha``, the pre-0.2 API).
      ValueError: if no adapted layer is found, an adapter layer has no kernel or its gate's leaves (an adapter of
        another method, which has no fold), a layer's factors do not fit its resolved rank (a forgotten
        ``rank_pattern``), the config does not adapt a layer's path, ``operating_params`` is not ``[d_p]``, a
        pattern matches no adapted layer, or a bias-free layer with a shift is merged without ``add_bias=True``.

    >>> import jax, jax.numpy as jnp
    >>> from rssbl_jax import RSSBilinearLoRADense
    >>> layer = RSSBilinearLoRADense(4, rank=2, lora_alpha=2.0)
    >>> x, p0 = jnp.ones((2, 3)), jnp.array([0.5])
    >>> variables = layer.init(jax.random.key(0), x, p0)
    >>> sorted(merge(variables["params"], p0, layer.adapter_config))
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
        if not cfg.adapts(path):
            raise ValueError(
                f"{where} is an adapted layer that the config does not adapt (targets={cfg.targets}, exclude="
                f"{cfg.exclude}); merge the params tree whose paths the config was written for."
            )
        factors = {name: value for name, value in node.items() if tree.is_adapter_leaf_name(name)}
        lora_s = factors.get("lora_s")
        if "bias" not in node and lora_s is not None and not add_bias:
            raise ValueError(
                f"{where} has no bias but a shift S p (lora_s {lora_s.shape}): its merged shift is a "
                "bias that a use_bias=False layer would silently ignore. Pass add_bias=True and load the result "
                "into the layer built with use_bias=True, or adapt without shift (shift=False)."
            )
        try:
            merged = core.fold(
                node[kernel_name], node.get("bias"), factors, operating_params, cfg.resolve(path), precision=precision
            )
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        rest = {k: v for k, v in node.items() if k not in (kernel_name, "bias", *factors)}
        if "bias" not in node and lora_s is None:
            return {**rest, kernel_name: merged.kernel}
        return {**rest, kernel_name: merged.kernel, "bias": merged.bias}

    out, found = tree.map_adapter_layers(params, fold_layer)
    if not found:
        raise ValueError("merge found no adapted layer (a mapping holding lora_a and lora_b beside its kernel).")
    check_patterns_used(cfg, found)
    return out
