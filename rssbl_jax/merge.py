"""Merge adapted layers into plain ``kernel``/``bias`` at one operating point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from jaxtyping import ArrayLike, Float

from rssbl_jax import core
from rssbl_jax.inject import resolve_alpha, unmatched_patterns

_REQUIRED = ("kernel", "lora_a", "lora_b", "lora_c")


def _is_adapted_layer(node: Any) -> bool:
    """A mapping with a ``kernel`` and the adapter factors (``lora_s`` is optional: no shift term)."""
    return isinstance(node, Mapping) and all(name in node for name in _REQUIRED)


def _layer_alpha(
    path: str, lora_alpha: float | Mapping[str, float], alpha_pattern: Mapping[str, float] | None
) -> float:
    if isinstance(lora_alpha, Mapping):
        if path not in lora_alpha:
            raise ValueError(f"lora_alpha has no entry for adapted layer {path!r}; it has {sorted(lora_alpha)}.")
        return float(lora_alpha[path])
    return resolve_alpha(path, lora_alpha, alpha_pattern)


def merge(
    params: Any,
    operating_params: Float[ArrayLike, " d_p"],
    lora_alpha: float | Mapping[str, float],
    *,
    gate_offset: float = 0.0,
    alpha_pattern: Mapping[str, float] | None = None,
    add_bias: bool = False,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> Any:
    r"""Reduce every adapted layer in ``params`` to ``kernel``/``bias`` at one operating point ``p0``.

    .. math::

        W' = W + \tfrac{\alpha_{\text{lora}}}{r}\, A\,\mathrm{diag}(g_0 + C p_0)\,B, \qquad
        b' = b + \tfrac{\alpha_{\text{lora}}}{r}\, (S p_0)\, B

    ``params`` is one layer's params or a whole model's tree (nested mappings); every mapping that holds a
    ``kernel`` and ``lora_a``, ``lora_b``, ``lora_c`` (and ``lora_s`` when the layer has a shift) is
    replaced by ``{"kernel", "bias"}`` (rank ``r`` read from ``lora_c``), everything else is returned
    unchanged, so the result loads into the same architecture built with ``nn.Dense`` — or, for a model
    adapted with :func:`rssbl_jax.inject`, into the unmodified model (Dense, DenseGeneral, Einsum and
    Conv kernels, see :func:`rssbl_jax.core.merge_kernel`). A layer without bias but with a shift ``S p``
    (e.g. ``RSSBilinearLoRADense(use_bias=False)``) needs a bias to hold ``α (S p0) B``; Flax would silently
    ignore an extra ``bias`` leaf in a ``use_bias=False`` layer, so this raises unless ``add_bias=True`` (then
    load the result into the layer built with ``use_bias=True``). A bias-free layer without shift stays
    bias-free. The fold is computed at ``Precision.HIGHEST`` (it runs once), so a merged model matches the
    adapted one to float32 round-off on GPU and TPU as well. ``merge`` is a pure
    function of arrays: ``jax.vmap(lambda p: merge(params, p, alpha))(ps)`` merges a batch of operating
    points.

    Args:
      params: a params tree with adapted layers.
      operating_params: one operating point ``p0`` of shape ``[d_p]``.
      lora_alpha: the layers' ``lora_alpha``, or a mapping from each adapted layer's path (``"a/b"``)
        to its ``lora_alpha``.
      gate_offset: the layers' ``gate_offset`` (0.0 for the seed's gate ``C p``, 1.0 for ``1 + C p``).
      alpha_pattern: ``{regex: lora_alpha}`` overrides by layer path (first full match wins), as given
        to :func:`rssbl_jax.inject`; a pattern that matches no adapted layer raises.
      add_bias: allow bias-free layers with a shift to gain a ``bias``.
      precision: matmul precision of the fold.

    Returns:
      The tree with adapted layers merged.

    Raises:
      ValueError: if no adapted layer is found, ``operating_params`` is not ``[d_p]``, the factors do not fit
        a kernel, an ``alpha_pattern`` matches no adapted layer, or a bias-free layer with a shift is merged
        without ``add_bias=True``.

    >>> import jax, jax.numpy as jnp
    >>> from rssbl_jax import RSSBilinearLoRADense
    >>> x, p0 = jnp.ones((2, 3)), jnp.array([0.5])
    >>> variables = RSSBilinearLoRADense(4, rank=2, lora_alpha=2.0).init(jax.random.key(0), x, p0)
    >>> sorted(merge(variables["params"], p0, lora_alpha=2.0))
    ['bias', 'kernel']
    """
    found = []

    def visit(node: Any, path: str) -> Any:
        if _is_adapted_layer(node):
            found.append(path)
            rank = node["lora_c"].shape[-1]
            scale = _layer_alpha(path, lora_alpha, alpha_pattern) / rank
            lora_s = node.get("lora_s")
            if "bias" not in node and lora_s is not None and not add_bias:
                raise ValueError(
                    f"{path or 'params'} has no bias but a shift S p (lora_s {lora_s.shape}): its merged shift is a "
                    "bias that a use_bias=False layer would silently ignore. Pass add_bias=True and load the result "
                    "into the layer built with use_bias=True, or adapt without shift (inject(..., shift=False))."
                )
            try:
                merged = core.merge_kernel(
                    node["kernel"],
                    node.get("bias"),
                    node["lora_a"],
                    node["lora_b"],
                    node["lora_c"],
                    lora_s,
                    operating_params,
                    scale=scale,
                    gate_offset=gate_offset,
                    precision=precision,
                )
            except ValueError as error:
                raise ValueError(f"{path or 'params'}: {error}") from None
            rest = {k: v for k, v in node.items() if k not in ("kernel", "bias", *core.ADAPTER_NAMES)}
            if "bias" not in node and lora_s is None:
                return {**rest, "kernel": merged.kernel}
            return {**rest, "kernel": merged.kernel, "bias": merged.bias}
        if isinstance(node, Mapping):
            return {k: visit(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        return node

    out = visit(params, "")
    if not found:
        raise ValueError("merge found no adapted layer (a mapping with 'kernel' and lora_a, lora_b, lora_c, lora_s).")
    unmatched = unmatched_patterns(list(alpha_pattern or {}), found)
    if unmatched and not isinstance(lora_alpha, Mapping):
        raise ValueError(f"alpha_pattern {unmatched} matches no adapted layer; the adapted layers are {found}.")
    return out
