"""rssbl_jax.analysis against float64 numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import rssbl_jax
from rssbl_jax import analysis


def np_effective_rank(m, energy):
    s = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)
    share = np.cumsum(s**2) / np.sum(s**2)
    return int(np.argmax(share >= energy - 1e-9) + 1)


@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_effective_rank_matches_numpy(energy):
    rng = np.random.default_rng(0)
    for shape, rank in [((20, 30), 3), ((12, 8), 8), ((40, 10), 1)]:
        u, v = rng.standard_normal((shape[0], rank)), rng.standard_normal((rank, shape[1]))
        m = (u * np.geomspace(1.0, 0.05, rank)) @ v
        got = jax.jit(lambda x, e=energy: analysis.effective_rank(x, e))(jnp.asarray(m, jnp.float32))
        assert int(got) == np_effective_rank(m, energy)
    assert int(analysis.effective_rank(jnp.diag(jnp.array([3.0, 1.0, 0.1])), 0.8)) == 1
    assert int(analysis.effective_rank(jnp.diag(jnp.array([3.0, 1.0, 0.1])), 0.9999)) == 3
    assert int(analysis.effective_rank(jnp.zeros((4, 5)))) == 0
    assert int(analysis.effective_rank(1e-8 * jnp.eye(5), atol=1e-6)) == 0
    assert int(analysis.effective_rank(jnp.eye(7), 1.0)) == 7
    with pytest.raises(ValueError, match="energy"):
        analysis.effective_rank(jnp.eye(2), 0.0)


def test_joint_rank_fixed_versus_moving_subspace():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((10, 3)), rng.standard_normal((3, 12))
    gates = rng.standard_normal((6, 3))
    fixed = np.stack([a @ np.diag(g) @ b for g in gates])  # RSS-like: fixed spaces
    moving = np.stack([a @ b @ np.diag(rng.standard_normal(12)) for _ in gates])  # FiLM-like: output space moves
    joint = jax.vmap(analysis.joint_rank, in_axes=(0, None))(jnp.asarray(np.stack([fixed, moving]), jnp.float32), 0.999)
    side = [np_effective_rank(np.concatenate(list(d), axis=1), 0.999) for d in (fixed, moving)]
    stack = [np_effective_rank(np.concatenate(list(d), axis=0), 0.999) for d in (fixed, moving)]
    assert joint.inputs.tolist() == side == [3, 3]
    assert joint.outputs.tolist() == stack and stack[0] == 3 and stack[1] > 3
    with pytest.raises(ValueError, match="K, d_in, d_out"):
        analysis.joint_rank(jnp.ones((3, 4)))


def test_principal_angles_match_numpy():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((9, 3)), rng.standard_normal((9, 2))
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
    expected = np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1))
    got = jax.jit(analysis.principal_angles)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.all(np.diff(np.asarray(got)) >= 0)
    same = analysis.principal_angles(jnp.asarray(a), jnp.asarray(a @ rng.standard_normal((3, 3))))
    np.testing.assert_allclose(same, 0.0, atol=2e-3)


@pytest.mark.parametrize("gate", ["linear", "affine", "mlp"])
def test_delta_weights_matches_the_formula(gate):
    net = nn.Sequential([nn.Dense(5), jnp.tanh, nn.Dense(3)])
    model = rssbl_jax.inject(net, r"layers_\d", rank=2, lora_alpha=3.0, gate=gate, gate_hidden=4, gate_offset=0.5)
    x, p = jnp.ones((1, 4)), jnp.ones((1, 2))
    params = model.init(jax.random.key(0), x, p=p)["params"]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda v: jnp.asarray(rng.standard_normal(v.shape), jnp.float32), params)
    grid = analysis.condition_grid(-1.0, 1.0, 3, 2)
    deltas = analysis.delta_weights(params, model.config, "layers_2", grid)
    assert deltas.shape == (9, 5, 3)
    q = jax.tree.map(lambda v: np.asarray(v, np.float64), params["layers_2"])
    for k, point in enumerate(np.asarray(grid, np.float64)):
        if gate == "linear":
            g = 0.5 + point @ q["lora_c"]
        elif gate == "affine":
            g = q["lora_c0"] + point @ q["lora_c"]
        else:
            g = q["lora_c0"] + np.tanh(point @ q["lora_gate_w"] + q["lora_gate_b"]) @ q["lora_c"]
        expected = 1.5 * q["lora_a"] @ np.diag(g) @ q["lora_b"]
        np.testing.assert_allclose(deltas[k], expected, rtol=1e-4, atol=1e-4)
    joint = analysis.joint_rank(deltas, 0.999)
    assert int(joint.maximum) <= 2
    with pytest.raises(ValueError, match="no layer"):
        analysis.delta_weights(params, model.config, "nope", grid)


def test_response_curve_and_grid():
    grid = analysis.condition_grid(-1.0, 1.0, 4, 2)
    assert grid.shape == (16, 2) and float(grid[0, 0]) == -1.0 and float(grid[1, 1]) == pytest.approx(-1 / 3)
    out = analysis.response_curve(lambda p: {"sq": jnp.sum(p**2), "p": p}, grid)
    np.testing.assert_allclose(out["sq"], np.sum(np.asarray(grid, np.float64) ** 2, axis=-1), rtol=1e-6)
