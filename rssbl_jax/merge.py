"""Merge adapted layers into plain weights at one operating point, with the settings their config carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jaxtyping import ArrayLike, Float

from rssbl_jax import core
from rssbl_jax.config import AdapterConfig, as_config, check_patterns_used


def _kernel_name(node: Mapping) -> str | None:
    if not all(name in node for name in ("lora_a", "lora_b", "lora_c")):
        return None
    return next((name for name in ("kernel", "embedding") if name in node), None)


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
    model's tree (nested mappings, linen params or an NNX pure state dict); every mapping holding ``lora_a``,
    ``lora_b``, ``lora_c`` and a ``kernel`` (or an ``embedding``) is replaced by its base leaves with the update
    folded in (:func:`rssbl_jax.core.fold`); everything else is returned unchanged, so the result loads into the
    unmodified architecture. Adapters stacked by ``nn.scan`` fold slice by slice.

    A layer without bias but with a shift ``S p`` needs a bias to hold ``s (S p̂0) B``; Flax would silently ignore an
    extra ``bias`` leaf in a ``use_bias=False`` layer, so this raises unless ``add_bias=True``. The fold runs at
    ``Precision.HIGHEST`` (once), so a merged model matches the adapted one to float32 round-off on GPU and TPU.
    ``merge`` is a pure function of arrays: ``jax.vmap(lambda q: merge(params, q, config))(ps)`` merges a batch of
    operating points.

    Raises:
      TypeError: when ``config`` carries no AdapterConfig (e.g. a bare ``lora_alpha``, the pre-0.2 API).
      ValueError: if no adapted layer is found, a layer's factors do not fit its resolved rank (a forgotten
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
    found: list[str] = []

    def visit(node: Any, path: str) -> Any:
        kernel_name = _kernel_name(node) if isinstance(node, Mapping) else None
        if kernel_name is not None:
            found.append(path)
            where = path or "params"
            if not cfg.adapts(path):
                raise ValueError(
                    f"{where} is an adapted layer that the config does not adapt (targets={cfg.targets}, exclude="
                    f"{cfg.exclude}); merge the params tree whose paths the config was written for."
                )
            layer = cfg.resolve(path)
            factors = {name: node[name] for name in core.ADAPTER_NAMES if name in node}
            lora_s = factors.get("lora_s")
            if "bias" not in node and lora_s is not None and not add_bias:
                raise ValueError(
                    f"{where} has no bias but a shift S p (lora_s {lora_s.shape}): its merged shift is a "
                    "bias that a use_bias=False layer would silently ignore. Pass add_bias=True and load the result "
                    "into the layer built with use_bias=True, or adapt without shift (shift=False)."
                )
            try:
                merged = core.fold(
                    node[kernel_name], node.get("bias"), factors, operating_params, layer, precision=precision
                )
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            rest = {k: v for k, v in node.items() if k not in (kernel_name, "bias", *core.ADAPTER_NAMES)}
            if "bias" not in node and lora_s is None:
                return {**rest, kernel_name: merged.kernel}
            return {**rest, kernel_name: merged.kernel, "bias": merged.bias}
        if isinstance(node, Mapping):
            return {k: visit(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        return node

    out = visit(params, "")
    if not found:
        raise ValueError("merge found no adapted layer (a mapping with a kernel and lora_a, lora_b, lora_c).")
    check_patterns_used(cfg, found)
    return out
