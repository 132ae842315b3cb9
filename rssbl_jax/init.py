r"""Principal-subspace initialisation (in the spirit of PiSSA / OLoRA) that keeps the model exactly its base.

PiSSA starts LoRA from the kernel's top-``r`` singular directions and subtracts them from the frozen kernel. A
conditioned update ``ΔW(p) = s A diag(g(p)) B`` cannot be cancelled by a fixed residual for every ``p``; instead the
gate starts at zero (kernel convention, ``W (d_in, d_out)``):

.. math::

    W = U \Sigma V^\top, \quad A = U_r \Sigma_r^{1/2}, \quad B = \Sigma_r^{1/2} V_r^\top, \quad C = 0,\ c_0 = 0,\ S = 0

Then ``ΔW(p) = 0`` for every ``p``: the model is exactly its base, its kernel untouched (merging stays exact), yet
training starts (``∂L/∂C ≠ 0`` as ``A``, ``B`` are non-zero) in the kernel's principal directions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from rssbl_jax import gates, tree
from rssbl_jax.config import as_config


def init_principal(params: tree.PyTree, config: Any) -> tree.PyTree:
    """Set every adapted layer's ``A``, ``B`` to its kernel's top singular directions and its gate and shift to 0.

    For nested mappings (linen params, an NNX pure state dict) in the compact layout (Dense, DenseGeneral, Conv,
    Embed, Einsum with input axes first), the kernel read as a ``(prod(in), prod(out))`` matrix; the gate is zeroed
    through the leaves it is linear in (:attr:`rssbl_jax.gates.Gate.linear_leaves`).

    Raises:
      ValueError: another layout, or a gate with a fixed offset (the linear gate with ``gate_offset != 0`` cannot
        start at zero).

    >>> import jax, rssbl_jax
    >>> layer = rssbl_jax.RSSBilinearLoRADense(4, rank=2, lora_alpha=2.0)
    >>> params = init_principal(layer.init(jax.random.key(0), jnp.ones(5), jnp.ones(2))["params"], layer.adapter_config)
    >>> bool(jnp.abs(params["lora_b"]).max() > 0), float(jnp.abs(params["lora_c"]).max())
    (True, 0.0)
    """
    cfg = as_config(config, "init_principal")
    gate = gates.get(cfg.gate)
    if gate.fixed_offset(cfg.resolve(None)) != 0:
        raise ValueError(
            f"init_principal needs a gate that can start at zero; the {cfg.gate} gate with gate_offset="
            f"{cfg.gate_offset} cannot (use gate_offset=0, or gate='affine')."
        )

    def start(path: str, node: Mapping) -> Any:
        kernel_name = tree.base_weight_name(node)
        if kernel_name is None:
            raise ValueError(
                f"{path or 'params'}: init_principal needs a kernel beside the adapter; has {sorted(node)}."
            )
        kernel, a, b = (np.asarray(node[k], np.float64) for k in (kernel_name, "lora_a", "lora_b"))
        rank = a.shape[-1]
        if a.shape[:-1] + b.shape[1:] != kernel.shape:
            raise ValueError(
                f"{path or 'params'}: init_principal needs the compact layout (lora_a (*in, r), lora_b (r, *out) with "
                f"kernel (*in, *out)); got kernel {kernel.shape}, lora_a {a.shape}, lora_b {b.shape}."
            )
        matrix = kernel.reshape(math.prod(a.shape[:-1]), math.prod(b.shape[1:]))
        u, sigma, vt = np.linalg.svd(matrix, full_matrices=False)
        root = np.sqrt(sigma[:rank])
        new_a = (u[:, :rank] * root[None]).reshape(a.shape)
        new_b = (root[:, None] * vt[:rank]).reshape(b.shape)
        out = {k: jnp.asarray(v, jnp.asarray(node[k]).dtype) for k, v in (("lora_a", new_a), ("lora_b", new_b))}
        out |= {k: jnp.zeros_like(jnp.asarray(node[k])) for k in (*gate.linear_leaves, "lora_s") if k in node}
        return {**node, **out}

    result, found = tree.map_adapter_layers(params, start)
    if not found:
        raise ValueError("init_principal found no adapted layer (a kernel with lora_a and lora_b beside it).")
    return result
