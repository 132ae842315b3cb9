"""The fused low-rank add of the Dense fast path: values, gradients, vmap and jit against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rssbl_jax
from rssbl_jax import core
from tests import reference


@pytest.mark.parametrize("rank", [1, 16, core.FUSED_MAX_RANK + 1])
def test_add_low_rank_value_and_gradient(rank):
    ks = jax.random.split(jax.random.key(0), 4)
    y, h, b = (jax.random.normal(ks[0], (6, 5)), jax.random.normal(ks[1], (6, rank)),
               jax.random.normal(ks[2], (rank, 5)))  # fmt: skip
    out = jax.jit(core.add_low_rank)(y, h, b)
    expected = np.asarray(y, np.float64) + np.asarray(h, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(ks[3], (6, 5))
    grads = jax.grad(lambda y, h, b: jnp.sum(weights * core.add_low_rank(y, h, b)), argnums=(0, 1, 2))(y, h, b)
    w = np.asarray(weights, np.float64)
    np.testing.assert_allclose(grads[0], w, rtol=1e-6)
    np.testing.assert_allclose(grads[1], w @ np.asarray(b, np.float64).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads[2], np.asarray(h, np.float64).T @ w, rtol=1e-5, atol=1e-5)


def test_adapted_dense_fast_path_matches_reference_under_vmap_and_grad():
    ks = jax.random.split(jax.random.key(1), 8)
    x = jax.random.normal(ks[0], (3, 4, 8))
    ps = jax.random.normal(ks[1], (5, 3, 2))  # 5 conditions, one p per example
    kernel, bias = jax.random.normal(ks[2], (8, 6)), jax.random.normal(ks[3], (6,))
    a, b = jax.random.normal(ks[4], (8, 4)), jax.random.normal(ks[5], (4, 6))
    c, s = jax.random.normal(ks[6], (2, 4)), jax.random.normal(ks[7], (2, 4))
    f = lambda p, a, b: rssbl_jax.rss_dense(x, p, kernel, bias, a, b, c, s, scale=0.5)  # noqa: E731
    ys = jax.jit(jax.vmap(f, in_axes=(0, None, None)))(ps, a, b)
    for k in range(5):
        expected = reference.rss_dense(x, ps[k], kernel, bias, a, b, c, s, scale=0.5)
        np.testing.assert_allclose(ys[k], expected, rtol=1e-5, atol=1e-5)
    g_fast = jax.grad(lambda a, b: jnp.sum(f(ps[0], a, b) ** 2), argnums=(0, 1))(a, b)

    def unfused(a, b):
        delta = rssbl_jax.rss_update(x, ps[0], a, b, c, s, scale=0.5)
        return jnp.sum((x @ kernel + bias[None, None] + delta) ** 2)

    g_ref = jax.grad(unfused, argnums=(0, 1))(a, b)
    for got, want in zip(g_fast, g_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_the_output_dtype():
    x = jnp.ones((2, 8), jnp.bfloat16)
    out = core.add_low_rank(x, jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 8), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(out == 4))


@pytest.mark.slow
def test_fast_paths_benchmark_smoke():
    from benchmarks import fast_paths

    text = fast_paths.main(["--smoke", "--repeats", "1", "--rounds", "2"])
    assert "| forward rss / Dense |" in text and "sweep K=8: vmap / separate" in text
