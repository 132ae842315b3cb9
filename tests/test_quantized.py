"""Conditional QLoRA: qwix-quantised frozen base, full-precision RSS adapters (linen inject, NNX, merge, training)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import rssbl_jax
from rssbl_jax import nnx as rss_nnx
from rssbl_jax import quantize
from tests import reference

pytest.importorskip("qwix")

D_IN, D_HID, D_OUT, RANK, D_P = 32, 48, 16, 4, 3
CONFIG = rssbl_jax.AdapterConfig(rank=RANK, lora_alpha=8.0, targets=["up", "down"])


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D_OUT, name="down")(nn.relu(nn.Dense(D_HID, name="up")(x)))


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D_IN, D_HID, rngs=rngs)
        self.down = nnx.Linear(D_HID, D_OUT, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def _inputs():
    x = jax.random.normal(jax.random.key(1), (5, D_IN))
    p = jax.random.normal(jax.random.key(2), (5, D_P))
    return x, p


def _nonzero_adapters(params, key=3):
    """Random B (and everything else) so the update is not zero."""
    leaves = {}
    for i, layer in enumerate(("up", "down")):
        k = jax.random.fold_in(jax.random.key(key), i)
        node = dict(params[layer])
        for j, name in enumerate(("lora_a", "lora_b", "lora_c", "lora_s")):
            node[name] = 0.3 * jax.random.normal(jax.random.fold_in(k, j), node[name].shape)
        leaves[layer] = node
    return {**params, **leaves}


def _reference(params, x, p):
    """float64 numpy: two adapted dense layers on the dequantised kernels."""
    deq = quantize.dequantize(params)
    h = np.asarray(x, np.float64)
    for layer in ("up", "down"):
        q = {k: np.asarray(v, np.float64) for k, v in deq[layer].items()}
        h = reference.rss_dense(h, p, q["kernel"], q["bias"], q["lora_a"], q["lora_b"], q["lora_c"], q["lora_s"],
                                scale=CONFIG.scale)  # fmt: skip
        if layer == "up":
            h = np.maximum(h, 0.0)
    return h


@pytest.mark.parametrize("qtype, bits", [("int8", 8), ("int4", 4), ("nf4", 4)])
def test_linen_quantised_base_full_precision_adapters(qtype, bits):
    x, p = _inputs()
    adapted = rssbl_jax.inject(quantize.quantize_base(Net(), qtype), CONFIG)
    params = adapted.init(jax.random.key(0), x, p=p)["params"]
    kernels = quantize.quantized_kernels(params)
    assert sorted(kernels) == ["down/kernel", "up/kernel"]
    for q in kernels.values():
        assert jnp.iinfo(q.qvalue.dtype).bits == bits
    for layer in ("up", "down"):
        for name in ("lora_a", "lora_b", "lora_c", "lora_s"):
            assert params[layer][name].dtype == jnp.float32, (layer, name)
    params = _nonzero_adapters(params)
    y = jax.jit(lambda q, x, p: adapted.apply({"params": q}, x, p=p))(params, x, p)
    np.testing.assert_allclose(np.asarray(y, np.float64), _reference(params, x, p), rtol=2e-5, atol=2e-5)
    # the base really is quantised: the float kernels it came from give another output
    float_params = jax.eval_shape(lambda: rssbl_jax.inject(Net(), CONFIG).init(jax.random.key(0), x, p=p))
    assert jax.tree.structure(quantize.dequantize(params)) == jax.tree.structure(float_params["params"])


def test_linen_grads_wrt_adapters_match_dequantised_float_model():
    x, p = _inputs()
    adapted = rssbl_jax.inject(quantize.quantize_base(Net(), "int4"), CONFIG)
    params = _nonzero_adapters(adapted.init(jax.random.key(0), x, p=p)["params"])
    trainable, frozen = rssbl_jax.partition(params, CONFIG)
    float_model = rssbl_jax.inject(Net(), CONFIG)
    float_trainable, deq_frozen = rssbl_jax.partition(quantize.dequantize(params), CONFIG)

    def loss(model, t, f):
        return jnp.mean(model.apply({"params": rssbl_jax.combine(t, f)}, x, p=p) ** 2)

    g_q = jax.jit(jax.grad(lambda t: loss(adapted, t, frozen)))(trainable)
    g_f = jax.jit(jax.grad(lambda t: loss(float_model, t, deq_frozen)))(float_trainable)
    for a, b in zip(jax.tree.leaves(g_q), jax.tree.leaves(g_f), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_q))


def test_vmap_over_conditions_on_quantised_base():
    x, _ = _inputs()
    ps = jax.random.normal(jax.random.key(4), (6, D_P))  # 6 ≥ 1 + d_p: the first layer sweeps through its basis
    adapted = rssbl_jax.inject(quantize.quantize_base(Net(), "int8"), CONFIG)
    params = _nonzero_adapters(adapted.init(jax.random.key(0), x, p=ps[0])["params"])
    ys = jax.vmap(lambda p: adapted.apply({"params": params}, x, p=p))(ps)
    for k in range(6):
        np.testing.assert_allclose(np.asarray(ys[k], np.float64), _reference(params, x, ps[k]), rtol=2e-5, atol=2e-5)


def test_a_qwix_without_the_interception_switch_is_refused(monkeypatch):
    """Without qwix's switch the adapters would be quantised silently; the adapted call must refuse instead."""
    import sys
    import types

    x, p = _inputs()
    adapted = rssbl_jax.inject(quantize.quantize_base(Net(), "int8"), CONFIG)
    variables = adapted.init(jax.random.key(0), x, p=p)
    monkeypatch.setitem(sys.modules, "qwix._src.interception", types.ModuleType("qwix._src.interception"))
    with pytest.raises(RuntimeError, match="disable_interceptions.*lora_a/lora_b would be quantised"):
        adapted.apply(variables, x, p=p)


def test_train_step_updates_adapters_only():
    x, p = _inputs()
    adapted = rssbl_jax.inject(quantize.quantize_base(Net(), "nf4"), CONFIG)
    params = _nonzero_adapters(adapted.init(jax.random.key(0), x, p=p)["params"])
    tx = optax.adam(1e-2)
    state = rssbl_jax.init_train_state(params, tx, jax.random.key(0), config=CONFIG)

    def loss_fn(q, batch, rng):
        del rng
        return jnp.mean((adapted.apply({"params": q}, batch["x"], p=batch["p"]) - 1.0) ** 2)

    step = jax.jit(rssbl_jax.make_train_step(loss_fn, tx))
    new, metrics = step(state, {"x": x, "p": p})
    new, metrics2 = step(new, {"x": x, "p": p})
    assert float(metrics2["loss"]) < float(metrics["loss"])
    for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(new.frozen), strict=True):
        assert a.dtype == b.dtype and bool(jnp.all(a == b))
    assert quantize.quantized_kernels(new.frozen)["up/kernel"].qvalue.dtype == jnp.uint4


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_onto_quantised_base(requantize):
    x, p = _inputs()
    p0 = p[0]
    adapted = rssbl_jax.inject(quantize.quantize_base(Net(), "int8"), CONFIG)
    params = _nonzero_adapters(adapted.init(jax.random.key(0), x, p=p)["params"])
    merged = quantize.merge(params, p0, CONFIG, requantize=requantize)
    assert "lora_a" not in merged["up"]
    expected = _reference(params, x, p0)
    if requantize:
        kernels = quantize.quantized_kernels(merged)
        assert kernels["up/kernel"].qvalue.dtype == jnp.int8
        y = quantize.quantize_base(Net(), "int8").apply({"params": merged}, x)
        # re-rounding the merged kernel: at most half a step per weight (per output channel), bounded through |h|
        h = np.abs(np.asarray(x, np.float64))
        step_up = np.asarray(kernels["up/kernel"].scale, np.float64)
        bound_up = 0.5 * h.sum(-1, keepdims=True) * step_up
        err = np.abs(np.asarray(y, np.float64) - expected)
        assert err.max() > 0  # it does re-round
        assert err.max() < 10 * bound_up.max()  # a loose propagated bound; BENCHMARKS.md measures it
    else:
        y = Net().apply({"params": merged}, x)
        assert merged["up"]["kernel"].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.filterwarnings(r"ignore:'.value' access is now deprecated")  # qwix's find_param
@pytest.mark.filterwarnings(r"ignore:The 'm.iter_modules\(\)' method is deprecated")  # inside qwix 0.x
@pytest.mark.parametrize("order", ["inject_then_quantize", "quantize_then_inject"])
def test_nnx_quantised_base(order):
    x, p = _inputs()
    model = NnxNet(nnx.Rngs(0))
    if order == "inject_then_quantize":
        adapted = rss_nnx.inject(model, CONFIG, d_p=D_P, rngs=nnx.Rngs(1))
        adapted = quantize.quantize_base(adapted, "int8", x, p=p)
        net = adapted.model
    else:
        adapted = rss_nnx.inject(quantize.quantize_base(model, "int8", x), CONFIG, d_p=D_P, rngs=nnx.Rngs(1))
        net = adapted.model
    for layer in (net.up, net.down):
        assert isinstance(layer.lora_a, rss_nnx.RSSBilinearLoRAParam) and layer.lora_a[...].dtype == jnp.float32
        assert quantize.quantized_kernels({"k": layer.kernel})["k"].qvalue.dtype == jnp.int8
        for j, name in enumerate(("lora_a", "lora_b", "lora_c", "lora_s")):
            var = getattr(layer, name)
            var[...] = 0.3 * jax.random.normal(jax.random.key(10 + j), var[...].shape)
    y = nnx.jit(lambda m, x, p: m(x, p=p))(adapted, x, p)
    params = {
        name: {
            "kernel": getattr(net, name).kernel, "bias": getattr(net, name).bias[...],
            **{k: getattr(getattr(net, name), k)[...] for k in ("lora_a", "lora_b", "lora_c", "lora_s")},
        }
        for name in ("up", "down")
    }  # fmt: skip
    np.testing.assert_allclose(np.asarray(y, np.float64), _reference(params, x, p), rtol=2e-5, atol=2e-5)


@pytest.mark.filterwarnings(r"ignore:'.value' access is now deprecated")  # qwix's find_param
@pytest.mark.filterwarnings(r"ignore:The 'm.iter_modules\(\)' method is deprecated")  # inside qwix 0.x
@pytest.mark.parametrize("order", ["inject_then_quantize", "quantize_then_inject"])
def test_nnx_quantised_base_on_a_mesh_adapters_follow_the_kernels(order):
    """Under an 8-device mesh the adapters inherit the (quantised) kernel's partitioning in either order."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"), (AxisType.Explicit,) * 2)
    x, p = _inputs()
    with jax.set_mesh(mesh):

        class Sharded(nnx.Module):
            def __init__(self, rngs):
                init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
                self.up = nnx.Linear(D_IN, D_HID, kernel_init=init, rngs=rngs)

            def __call__(self, x):
                return self.up(x)

        config = rssbl_jax.AdapterConfig(rank=RANK, lora_alpha=8.0, targets=["up"])
        if order == "inject_then_quantize":
            adapted = rss_nnx.inject(Sharded(nnx.Rngs(0)), config, d_p=D_P, rngs=nnx.Rngs(1))
            adapted = quantize.quantize_base(adapted, "int8", x, p=p)
        else:
            adapted = rss_nnx.inject(quantize.quantize_base(Sharded(nnx.Rngs(0)), "int8", x), config, d_p=D_P,
                                     rngs=nnx.Rngs(1))  # fmt: skip
        layer = adapted.model.up
        assert layer.lora_a[...].sharding.spec == P("data", None)
        assert layer.lora_b[...].sharding.spec == P(None, "model")
        assert layer.lora_b[...].addressable_shards[0].data.shape == (RANK, D_HID // 4)
        for j, name in enumerate(("lora_a", "lora_b", "lora_c", "lora_s")):
            var = getattr(layer, name)
            var[...] = 0.3 * jax.random.normal(jax.random.key(10 + j), var[...].shape, out_sharding=var[...].sharding)
        y = nnx.jit(lambda m, x, p: m(x, p=p))(adapted, x, p)
    deq = quantize.dequantize({"kernel": layer.kernel})["kernel"]
    q = {k: np.asarray(getattr(layer, k)[...], np.float64) for k in ("lora_a", "lora_b", "lora_c", "lora_s")}
    expected = reference.rss_dense(x, p, deq, layer.bias[...], q["lora_a"], q["lora_b"], q["lora_c"], q["lora_s"],
                                   scale=config.scale)  # fmt: skip
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=2e-5, atol=2e-5)


def test_base_bytes_int8_half_of_bf16_and_4bit_a_quarter():
    x, p = _inputs()
    sizes = {}
    for qtype in ("int8", "int4", "nf4"):
        adapted = rssbl_jax.inject(quantize.quantize_base(Net(), qtype), CONFIG)
        params = jax.eval_shape(lambda a=adapted: a.init(jax.random.key(0), x, p=p))["params"]
        sizes[qtype] = sum(q.qvalue.size * jnp.iinfo(q.qvalue.dtype).bits // 8
                           for q in quantize.quantized_kernels(params).values())  # fmt: skip
    bf16 = 2 * (D_IN * D_HID + D_HID * D_OUT)
    assert sizes["int8"] == bf16 // 2 and sizes["int4"] == sizes["nf4"] == bf16 // 4


@pytest.mark.slow
def test_quantized_benchmark_smoke():
    from benchmarks import quantized

    text = quantized.main(["--smoke"])
    assert "| int8 |" in text and "qwix LoRA, quantised base" in text and "`requantize=True`" in text


def test_quantised_kernels_keep_their_partitioning_and_adapters_inherit_it():
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    from tests.test_sharding_metadata import RULES, Block

    adapted = rssbl_jax.inject(quantize.quantize_base(Block(), "int8"), "up|down", rank=2, lora_alpha=2.0)
    x, p = jax.random.normal(jax.random.key(0), (4, 8)), jnp.ones((4, 3))
    abstract = jax.eval_shape(adapted.init, jax.random.key(0), x, p=p)
    specs = nn.get_partition_spec(abstract)["params"]
    assert specs["up"]["lora_a"] == P("embed", None) and specs["up"]["lora_b"] == P(None, "mlp")
    assert specs["down"]["lora_a"] == P("mlp", None) and specs["down"]["lora_b"] == P(None, "embed")
    assert quantize.quantized_kernels(specs)["up/kernel"].qvalue == P("embed", "mlp")
    mesh = jax.make_mesh((2, 4), ("data", "model"), (AxisType.Auto,) * 2)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    variables = nn.meta.unbox(jax.jit(adapted.init, out_shardings=shardings)(jax.random.key(0), x, p=p))
    qvalue = quantize.quantized_kernels(variables["params"])["up/kernel"].qvalue
    assert qvalue.dtype == jnp.int8 and qvalue.sharding.spec == P("data", "model")
    assert variables["params"]["up"]["lora_b"].sharding.spec == P(None, "model")
    y = jax.jit(adapted.apply)(variables, x, p=p)
    expected = Block().apply({"params": quantize.dequantize(variables["params"])}, x)  # B = 0 at init
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
