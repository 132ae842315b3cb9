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
