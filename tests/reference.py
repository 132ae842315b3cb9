"""Independent float64 numpy references, written per row without the library's reshapes."""

from __future__ import annotations

import numpy as np


def per_row_p(x_shape, p):
    """Broadcast p to one row per element of x's leading axes: returns [prod(x_shape[:-1]), d_p]."""
    p = np.asarray(p, np.float64)
    lead = p.shape[:-1]
    rows = []
    for index in np.ndindex(*x_shape[:-1]):
        rows.append(p[index[: len(lead)]])
    return np.stack(rows) if rows else np.zeros((0, p.shape[-1]))


def rss_dense(x, p, kernel, bias, a, b, c, s, *, scale, gate_offset=0.0):
    """y = x W + bias + scale * ((x A) * (gate_offset + p C) + p S) B, row by row in float64."""
    x = np.asarray(x, np.float64)
    x2 = x.reshape(-1, x.shape[-1])
    p2 = per_row_p(x.shape, p)
    kernel, a, b, c, s = (np.asarray(t, np.float64) for t in (kernel, a, b, c, s))
    out = np.empty((x2.shape[0], kernel.shape[1]))
    for i in range(x2.shape[0]):
        gate = gate_offset + p2[i] @ c
        z = (x2[i] @ a) * gate + p2[i] @ s
        out[i] = x2[i] @ kernel + scale * (z @ b)
        if bias is not None:
            out[i] += np.asarray(bias, np.float64)
    return out.reshape(*x.shape[:-1], kernel.shape[1])


def rss_grads(x, p, kernel, bias, a, b, c, s, target, *, scale, gate_offset=0.0):
    """Closed-form gradients of L = 0.5 * sum((y - target)^2) w.r.t. a, b, c, s, in float64."""
    x = np.asarray(x, np.float64)
    x2 = x.reshape(-1, x.shape[-1])
    p2 = per_row_p(x.shape, p)
    a, b, c, s = (np.asarray(t, np.float64) for t in (a, b, c, s))
    y = rss_dense(x, p, kernel, bias, a, b, c, s, scale=scale, gate_offset=gate_offset)
    g_y = (y - np.asarray(target, np.float64)).reshape(-1, b.shape[1])  # dL/dy per row
    h = x2 @ a
    gate = gate_offset + p2 @ c
    z = h * gate + p2 @ s
    g_z = scale * g_y @ b.T
    return {
        "lora_a": x2.T @ (g_z * gate),
        "lora_b": scale * z.T @ g_y,
        "lora_c": p2.T @ (g_z * h),
        "lora_s": p2.T @ g_z,
    }


def gate(p, factors, *, kind, offset=0.0, mean=None, std=None):
    """The gate family and shift, per row of p [n, d_p], in float64: returns (g [n, r], shift [n, r] or None)."""
    p = np.asarray(p, np.float64)
    if mean is not None:
        p = (p - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    f = {k: np.asarray(v, np.float64) for k, v in factors.items() if v is not None}
    if kind == "mlp":
        g = f["lora_c0"] + np.tanh(p @ f["lora_gate_w"] + f.get("lora_gate_b", 0.0)) @ f["lora_c"]
    elif kind == "affine":
        g = f["lora_c0"] + p @ f["lora_c"]
    else:
        g = offset + p @ f["lora_c"]
    return g, (p @ f["lora_s"] if "lora_s" in f else None)


def dense_update(x, p, factors, *, kind, scale, offset=0.0, mean=None, std=None):
    """scale * ((x A) * g(p) + S p) B for x [n, d_in] and p [n, d_p] (one row each), float64."""
    x = np.asarray(x, np.float64)
    g, shift = gate(p, factors, kind=kind, offset=offset, mean=mean, std=std)
    z = (x @ np.asarray(factors["lora_a"], np.float64)) * g
    if shift is not None:
        z = z + shift
    return scale * z @ np.asarray(factors["lora_b"], np.float64)
