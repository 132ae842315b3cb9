"""The fused low-rank add of the Dense fast path: values, gradients, vmap and jit against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rssbl_jax
from rssbl_jax import core, fastpath
from tests import reference


@pytest.mark.parametrize("rank,d_out", [(1, 5), (16, 5), (3, fastpath.FUSED_MAX_B_SIZE // 2)])  # fused, fused, matmul
def test_add_low_rank_value_and_gradient(rank, d_out):
    ks = jax.random.split(jax.random.key(0), 4)
    y, h, b = (jax.random.normal(ks[0], (6, d_out)), jax.random.normal(ks[1], (6, rank)),
               jax.random.normal(ks[2], (rank, d_out)))  # fmt: skip
    fused = "reduce_sum" in str(jax.make_jaxpr(core.add_low_rank)(y, h, b))
    assert fused == (rank * d_out <= fastpath.FUSED_MAX_B_SIZE)
    out = jax.jit(core.add_low_rank)(y, h, b)
    expected = np.asarray(y, np.float64) + np.asarray(h, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(ks[3], (6, d_out))
    grads = jax.grad(lambda y, h, b: jnp.sum(weights * core.add_low_rank(y, h, b)), argnums=(0, 1, 2))(y, h, b)
    w = np.asarray(weights, np.float64)
    np.testing.assert_allclose(grads[0], w, rtol=1e-6)
    # ∂h sums d_out float32 products: the round-off grows like √d_out
    np.testing.assert_allclose(grads[1], w @ np.asarray(b, np.float64).T, rtol=1e-5, atol=1e-5 * np.sqrt(d_out))
    np.testing.assert_allclose(grads[2], np.asarray(h, np.float64).T @ w, rtol=1e-5, atol=1e-5)


def test_rss_dense_fast_path_matches_reference_under_vmap_and_grad():
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


# ------------------------------------------------------------------------------------- sweeps over conditions


def dot_shapes(fn, *args):
    """The (lhs, rhs) shapes of every dot_general in the jaxpr of ``fn(*args)``, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(tuple(v.aval.shape) for v in eqn.invars))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


SWEEP_GATES = [  # (gate, offset, shift, normalised p): coefficients M = 1 + d_p, or 1 + hidden (+ d_p) for mlp
    ("linear", 0.0, True, False),
    ("linear", 0.7, False, True),
    ("affine", 0.5, True, True),
    ("mlp", 0.0, True, False),
    ("mlp", 0.3, False, True),
]


@pytest.mark.parametrize("gate,offset,shift,normalised", SWEEP_GATES)
def test_sweep_is_one_matmul_over_a_condition_basis_and_matches_float64(gate, offset, shift, normalised):
    """vmap over shared p: the K outputs come from one [K, M] @ [M, n·d_out] matmul and equal the float64 layer."""
    k_conditions, d_p, hidden = 12, 3, 5
    mean, std = ((1.0, -2.0, 0.5), (2.0, 0.5, 4.0)) if normalised else (None, None)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 6)), jnp.float32)
    ps = jnp.asarray(np.random.default_rng(1).standard_normal((k_conditions, d_p)) * 2, jnp.float32)
    layer = rssbl_jax.RSSBilinearLoRADense(5, rank=4, lora_alpha=6.0, gate=gate, gate_offset=offset,
                                           gate_hidden=hidden, shift=shift, p_mean=mean, p_std=std)  # fmt: skip
    variables = layer.init(jax.random.key(0), x, ps[0])
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda v: jnp.asarray(0.5 * rng.standard_normal(v.shape), jnp.float32), variables["params"])
    sweep = jax.jit(jax.vmap(lambda p: layer.apply({"params": params}, x, p)))
    ys = sweep(ps)
    assert ys.shape == (k_conditions, 2, 4, 5)
    n_basis = 1 + (hidden + (d_p if shift else 0) if gate == "mlp" else d_p)
    assert ((k_conditions, n_basis), (n_basis, 8 * 5)) in dot_shapes(sweep, ps)
    f = {name: np.asarray(v, np.float64) for name, v in params.items()}
    x2 = np.asarray(x, np.float64).reshape(-1, 6)
    for k in range(k_conditions):
        p_rows = np.broadcast_to(np.asarray(ps[k], np.float64), (8, d_p))
        update = reference.dense_update(x2, p_rows, f, kind=gate, scale=1.5, offset=offset, mean=mean, std=std)
        expected = x2 @ f["kernel"] + f["bias"] + update
        np.testing.assert_allclose(ys[k].reshape(8, 5), expected, rtol=2e-5, atol=2e-5)


def test_sweep_falls_back_when_the_basis_does_not_pay_or_inputs_are_batched():
    """K < M, per-example p, and x batched with p: the vmapped one-condition form, still exact."""
    ks = jax.random.split(jax.random.key(3), 8)
    x = jax.random.normal(ks[0], (3, 6))
    kernel, bias = jax.random.normal(ks[1], (6, 5)), jax.random.normal(ks[2], (5,))
    a, b = jax.random.normal(ks[3], (6, 4)), jax.random.normal(ks[4], (4, 5))
    c, s = jax.random.normal(ks[5], (3, 4)), jax.random.normal(ks[6], (3, 4))

    def f(x, p):
        return rssbl_jax.rss_dense(x, p, kernel, bias, a, b, c, s, scale=0.5, gate_offset=0.2)

    def ref(x, p):
        return reference.rss_dense(x, p, kernel, bias, a, b, c, s, scale=0.5, gate_offset=0.2)

    few = jax.random.normal(ks[7], (3, 3))  # K = 3 < M = 4
    per_example = jax.random.normal(ks[7], (5, 3, 3))  # 5 conditions, one p per row
    xs = jax.random.normal(ks[0], (5, 3, 6))
    cases = [
        (jax.vmap(f, in_axes=(None, 0)), (x, few), lambda k: ref(x, few[k]), 3),
        (jax.vmap(f, in_axes=(None, 0)), (x, per_example), lambda k: ref(x, per_example[k]), 5),
        (jax.vmap(f, in_axes=(0, 0)), (xs, per_example[:, 0]), lambda k: ref(xs[k], per_example[k, 0]), 5),
    ]
    for fn, args, expected, n in cases:
        out = jax.jit(fn)(*args)
        assert not any(lhs[0] == n and len(lhs) == 2 and lhs[1] == 4 for lhs, _ in dot_shapes(fn, *args))
        for k in range(n):
            np.testing.assert_allclose(out[k], expected(k), rtol=1e-5, atol=1e-5)


def test_gradients_of_a_sweep_match_float64_closed_form():
    """grad of Σ_k ½‖y(p_k) - t_k‖² through the swept (basis) forward = Σ_k of the closed-form gradients."""
    ks = jax.random.split(jax.random.key(4), 9)
    x = jax.random.normal(ks[0], (2, 3, 6))
    kernel, bias = jax.random.normal(ks[1], (6, 5)), jax.random.normal(ks[2], (5,))
    factors = {"lora_a": jax.random.normal(ks[3], (6, 4)), "lora_b": jax.random.normal(ks[4], (4, 5)),
               "lora_c": jax.random.normal(ks[5], (3, 4)), "lora_s": jax.random.normal(ks[6], (3, 4))}  # fmt: skip
    ps, targets = jax.random.normal(ks[7], (8, 3)), jax.random.normal(ks[8], (8, 2, 3, 5))

    def loss(f):
        ys = jax.vmap(lambda p: rssbl_jax.rss_dense(x, p, kernel, bias, *f.values(), scale=0.5, gate_offset=0.3))(ps)
        return 0.5 * jnp.sum((ys - targets) ** 2)

    grads = jax.jit(jax.grad(loss))(factors)
    expected = {name: 0.0 for name in factors}
    for k in range(8):
        g = reference.rss_grads(x, ps[k], kernel, bias, *factors.values(), targets[k], scale=0.5, gate_offset=0.3)
        expected = {name: expected[name] + g[name] for name in factors}
    for name in factors:
        np.testing.assert_allclose(grads[name], expected[name], rtol=1e-4, atol=1e-4)


def test_forward_mode_jacobian_and_hessian_through_the_fused_dense_path():
    """jax.jacfwd / jax.hessian w.r.t. p (sensitivities to the operating condition) against the closed form.

    The fused add's derivative rule used to be a ``custom_vjp``, which has no forward mode: these raised TypeError.
    """
    ks = jax.random.split(jax.random.key(5), 7)
    x = jax.random.normal(ks[0], (4, 6))
    kernel, bias = jax.random.normal(ks[1], (6, 5)), jax.random.normal(ks[2], (5,))
    a, b = jax.random.normal(ks[3], (6, 3)), jax.random.normal(ks[4], (3, 5))
    c, s = jax.random.normal(ks[5], (2, 3)), jax.random.normal(ks[6], (2, 3))
    p0 = jnp.array([0.3, -1.2])

    def f(p):
        return rssbl_jax.rss_dense(x, p, kernel, bias, a, b, c, s, scale=0.5, gate_offset=0.1)

    h = np.asarray(x, np.float64) @ np.asarray(a, np.float64)
    c64, s64, b64 = (np.asarray(t, np.float64) for t in (c, s, b))
    # y is affine in p for the linear gate: ∂y/∂p_j = s ((x A) ⊙ C_j + S_j) B
    jac = np.stack([0.5 * (h * c64[j] + s64[j]) @ b64 for j in range(2)], axis=-1)  # [4, 5, 2]
    np.testing.assert_allclose(jax.jit(jax.jacfwd(f))(p0), jac, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jacrev(f)(p0), jac, rtol=1e-4, atol=1e-4)
    hessian = jax.jit(jax.hessian(lambda p: jnp.sum(f(p) ** 2)))(p0)
    np.testing.assert_allclose(hessian, 2 * np.einsum("nej,nek->jk", jac, jac), rtol=1e-4, atol=1e-3)
    tangent = jax.jvp(f, (p0,), (jnp.array([1.0, 2.0]),))[1]
    np.testing.assert_allclose(tangent, jac @ np.array([1.0, 2.0]), rtol=1e-4, atol=1e-4)


def test_gradient_inside_shard_map_over_eight_devices():
    """grad through the fused Dense path inside shard_map (8 forced host devices) equals the one-device grad.

    With the old ``custom_vjp`` the bwd rule's varying-manual-axes type did not match and grad raised ValueError.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    ks = jax.random.split(jax.random.key(6), 8)
    x, p = jax.random.normal(ks[0], (16, 6)), jax.random.normal(ks[7], (16, 2))
    kernel, bias = jax.random.normal(ks[1], (6, 5)), jax.random.normal(ks[2], (5,))
    a, b = jax.random.normal(ks[3], (6, 3)), jax.random.normal(ks[4], (3, 5))
    c, s = jax.random.normal(ks[5], (2, 3)), jax.random.normal(ks[6], (2, 3))

    def f(b, x, p):
        return rssbl_jax.rss_dense(x, p, kernel, bias, a, b, c, s, scale=0.5)

    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.shard_map(
        lambda b, x, p: jax.lax.psum(jnp.sum(f(b, x, p) ** 2), "d"),
        mesh=mesh, in_specs=(P(), P("d"), P("d")), out_specs=P(),
    )  # fmt: skip
    with jax.set_mesh(mesh):
        rows = NamedSharding(mesh, P("d"))
        grad = jax.jit(jax.grad(sharded))(b, jax.device_put(x, rows), jax.device_put(p, rows))
    expected = reference.rss_grads(x, p, kernel, bias, a, b, c, s, np.zeros((16, 5)), scale=0.5)["lora_b"]
    np.testing.assert_allclose(grad, 2 * expected, rtol=1e-4, atol=1e-4)


def test_sweep_keeps_bfloat16():
    layer = rssbl_jax.RSSBilinearLoRADense(8, rank=2, lora_alpha=2.0, dtype=jnp.bfloat16)
    x, ps = jnp.ones((3, 8)), jnp.linspace(-1, 1, 12).reshape(6, 2)
    variables = layer.init(jax.random.key(0), x, ps[0])
    ys = jax.vmap(lambda p: layer.apply(variables, x, p))(ps)
    assert ys.dtype == jnp.bfloat16 and ys.shape == (6, 3, 8)
    for k in range(6):
        one = np.asarray(layer.apply(variables, x, ps[k]), np.float32)
        np.testing.assert_allclose(np.asarray(ys[k], np.float32), one, rtol=2e-2, atol=2e-2)


def test_thresholds_are_arguments_carried_to_the_trace_not_globals(monkeypatch):
    """Changing a threshold argument changes the jaxpr; setting the module globals changes nothing."""
    ks = jax.random.split(jax.random.key(7), 8)
    x = jax.random.normal(ks[0], (2, 4, 6))
    kernel, bias = jax.random.normal(ks[1], (6, 5)), jax.random.normal(ks[2], (5,))
    a, b = jax.random.normal(ks[3], (6, 4)), jax.random.normal(ks[4], (4, 5))
    c, s = jax.random.normal(ks[5], (3, 4)), jax.random.normal(ks[6], (3, 4))
    ps = jax.random.normal(ks[7], (12, 3))

    def layer(thresholds=None):
        extra = {} if thresholds is None else {"thresholds": thresholds}
        return lambda p: core.rss_dense(x, p, kernel, bias, a, b, c, s, scale=0.5, gate_offset=0.2, **extra)

    def fused(fn):  # the update added in the output's elementwise pass: a broadcast-multiply-reduce
        return "reduce_sum" in str(jax.make_jaxpr(fn)(ps[0]))

    def swept(fn):  # the sweep as one [K, M] @ [M, n·d_out] matmul over M = 1 + d_p basis outputs
        return ((12, 4), (4, 8 * 5)) in dot_shapes(jax.vmap(fn), ps)

    expected = [reference.rss_dense(x, ps[k], kernel, bias, a, b, c, s, scale=0.5, gate_offset=0.2) for k in range(12)]
    cases = [
        (None, True, True),
        (fastpath.Thresholds(fused_max_b_size=4 * 5 - 1), False, True),
        (fastpath.Thresholds(sweep_max_basis=3), True, False),
        (fastpath.Thresholds(fused_max_b_size=0, sweep_max_basis=0), False, False),
    ]
    for thresholds, want_fused, want_swept in cases:
        fn = layer(thresholds)
        assert fused(fn) == want_fused and swept(fn) == want_swept, thresholds
        ys = jax.jit(jax.vmap(fn))(ps)
        for k in range(12):
            np.testing.assert_allclose(ys[k], expected[k], rtol=1e-5, atol=1e-5)
    for module in (fastpath, core):  # the globals are documented defaults only, read when nothing is traced
        monkeypatch.setattr(module, "FUSED_MAX_B_SIZE", 0)
        monkeypatch.setattr(module, "SWEEP_MAX_BASIS", 0)
    assert fused(layer()) and swept(layer())
    assert fused(layer(fastpath.Thresholds())) and swept(layer(fastpath.Thresholds()))


def test_every_front_end_carries_its_thresholds():
    """The linen layer's ``thresholds`` field and ``RSS(thresholds=...)`` (linen injection, NNX) reach the trace."""
    from flax import linen as nn
    from flax import nnx

    from rssbl_jax import nnx as rss_nnx

    ks = jax.random.split(jax.random.key(8), 8)
    x = jax.random.normal(ks[0], (2, 4, 6))
    kernel, bias = jax.random.normal(ks[1], (6, 5)), jax.random.normal(ks[2], (5,))
    a, b = jax.random.normal(ks[3], (6, 4)), jax.random.normal(ks[4], (4, 5))
    c, s = jax.random.normal(ks[5], (3, 4)), jax.random.normal(ks[6], (3, 4))
    ps = jax.random.normal(ks[7], (12, 3))
    factors = {"kernel": kernel, "bias": bias, "lora_a": a, "lora_b": b, "lora_c": c, "lora_s": s}
    expected = [reference.rss_dense(x, ps[k], kernel, bias, a, b, c, s, scale=0.5) for k in range(12)]
    off = fastpath.Thresholds(fused_max_b_size=0, sweep_max_basis=0)

    def linen_layer(thresholds):
        layer = rssbl_jax.RSSBilinearLoRADense(5, rank=4, lora_alpha=2.0, thresholds=thresholds)
        return lambda p: layer.apply({"params": factors}, x, p)

    def injected(thresholds):
        adapted = rssbl_jax.inject(nn.Sequential([nn.Dense(5)]), "layers_0", 4, 2.0, method=rssbl_jax.RSS(thresholds))
        return lambda p: adapted.apply({"params": {"layers_0": factors}}, x, p=p)

    def nnx_model(thresholds):
        base = nnx.Sequential(nnx.Linear(6, 5, rngs=nnx.Rngs(0)))
        adapted = rss_nnx.inject(base, "layers/0", 4, 2.0, d_p=3, rngs=nnx.Rngs(1), method=rssbl_jax.RSS(thresholds))
        for name, value in factors.items():
            getattr(adapted.model.layers[0], name)[...] = value
        graphdef, state = nnx.split(adapted)
        return lambda p: nnx.merge(graphdef, state, copy=True)(x, p=p)  # fresh Variables in each trace

    def fused(fn):
        return "reduce_sum" in str(jax.make_jaxpr(fn)(ps[0]))

    def swept(fn):
        return ((12, 4), (4, 8 * 5)) in dot_shapes(jax.vmap(fn), ps)

    checks = {linen_layer: (fused, swept), injected: (fused, swept), nnx_model: (fused, swept)}
    for front_end, paths in checks.items():
        for thresholds, want in ((fastpath.Thresholds(), True), (off, False)):
            fn = front_end(thresholds)
            assert all(path(fn) == want for path in paths), (front_end.__name__, thresholds)
            ys = jax.jit(jax.vmap(fn))(ps)
            for k in range(12):
                np.testing.assert_allclose(ys[k], expected[k], rtol=1e-5, atol=1e-5)
