"""Merge adapted layers into plain ``kernel``/``bias`` at one operating point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxtyping import ArrayLike, Float

from rssbl_jax import core


def _is_adapted_layer(node: Any) -> bool:
    return isinstance(node, Mapping) and "kernel" in node and all(name in node for name in core.ADAPTER_NAMES)


def merge(
    params: Any, operating_params: Float[ArrayLike, " d_p"], lora_alpha: float, *, gate_offset: float = 0.0
) -> Any:
    r"""Reduce every adapted layer in ``params`` to ``kernel``/``bias`` at one operating point ``p0``.

    .. math::

        W' = W + \tfrac{\alpha_{\text{lora}}}{r}\, A\,\mathrm{diag}(g_0 + C p_0)\,B, \qquad
        b' = b + \tfrac{\alpha_{\text{lora}}}{r}\, (S p_0)\, B

    ``params`` is one layer's params or a whole model's tree (nested mappings); every mapping that holds a
    ``kernel`` and all four ``lora_*`` leaves is replaced by ``{"kernel", "bias"}`` (rank ``r`` read from
    ``lora_a``), everything else is returned unchanged, so the result loads into the same architecture built
    with ``nn.Dense``. A layer built with ``use_bias=False`` gains a bias (its shift ``S p0`` is a constant
    output offset), so it merges into ``nn.Dense(use_bias=True)``. ``merge`` is a pure function of arrays:
    ``jax.vmap(lambda p: merge(params, p, alpha))(ps)`` merges a batch of operating points.

    Args:
      params: a params tree with adapted layers.
      operating_params: one operating point ``p0`` of shape ``[d_p]``.
      lora_alpha: the layers' ``lora_alpha``.
      gate_offset: the layers' ``gate_offset`` (0.0 for the seed's gate ``C p``, 1.0 for ``1 + C p``).

    Returns:
      The tree with adapted layers merged.

    Raises:
      ValueError: if no adapted layer is found, or ``operating_params`` is not ``[d_p]``.

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
            if node["kernel"].ndim != 2:
                raise ValueError(
                    f"merge supports 2-D Dense kernels; {path or 'params'} has kernel.shape={node['kernel'].shape}."
                )
            found.append(path)
            merged = core.merge_dense(
                node["kernel"],
                node.get("bias"),
                node["lora_a"],
                node["lora_b"],
                node["lora_c"],
                node["lora_s"],
                operating_params,
                scale=lora_alpha / node["lora_a"].shape[-1],
                gate_offset=gate_offset,
            )
            rest = {k: v for k, v in node.items() if k not in ("kernel", "bias", *core.ADAPTER_NAMES)}
            return {**rest, "kernel": merged.kernel, "bias": merged.bias}
        if isinstance(node, Mapping):
            return {k: visit(v, f"{path}/{k}" if path else str(k)) for k, v in node.items()}
        return node

    out = visit(params, "")
    if not found:
        raise ValueError("merge found no adapted layer (a mapping with 'kernel' and lora_a, lora_b, lora_c, lora_s).")
    return out
