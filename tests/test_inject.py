"""Injection into unmodified linen models: a transformer and a conv net, against float64 references.

The models below are ordinary Flax code that the tests adapt without editing.

The numpy references are written per layer from the formulas (LayerNorm, softmax attention, tanh-GELU,
convolution by explicit windows), with the RSSBilinearLoRA update added to the adapted layers:
``y = f(x) + (alpha/r) * ((A x) * (g0 + p C) + p S) B``, p broadcast over every non-batch axis.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import rssbl_jax
from rssbl_jax.inject import adaptable_paths, inject, load_base

VOCAB, D_MODEL, N_HEADS, D_MLP, N_BLOCKS = 11, 16, 2, 32, 2


class Block(nn.Module):
    """Pre-LN self-attention + MLP block."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=N_HEADS, name="attention")(h)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.Dense(D_MLP, name="mlp_in")(h)
        return x + nn.Dense(D_MODEL, name="mlp_out")(nn.gelu(h))


class Transformer(nn.Module):
    """Embedding, two blocks, a bias-free per-head Einsum whose kernel axes interleave, an Einsum head."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, D_MODEL, name="embed")(tokens)
        for i in range(N_BLOCKS):
            x = Block(name=f"block_{i}")(x)
        heads = nn.Einsum((2, D_MODEL, D_MODEL // 2), "btd,ndh->btnh", use_bias=False, name="heads")(x)
        x = x + heads.reshape(x.shape)
        x = nn.LayerNorm(name="ln_f")(x)
        return nn.Einsum((D_MODEL, VOCAB), "btd,dv->btv", name="head")(x)


class ConvNet(nn.Module):
    """Two convolutions (SAME, then VALID with stride 2) and a Dense head on pooled features."""

    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="conv1")(images))
        x = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), padding="VALID", name="conv2")(x))
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


# --------------------------------------------------------------------------------------------------
# float64 references
# --------------------------------------------------------------------------------------------------


def f64(tree):
    """Every leaf of a nested dict as a float64 numpy array."""
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def modulated(h, p, layer, g0):
    """(A x) * (g0 + p C) + p S for rank-space h [batch, ..., r]; p [d_p] or [batch, d_p]."""
    p = np.asarray(p, np.float64)
    if p.ndim == 2:
        p = p.reshape(p.shape[:1] + (1,) * (h.ndim - 2) + p.shape[1:])
    out = h * (g0 + p @ layer["lora_c"])
    if "lora_s" in layer:
        out = out + p @ layer["lora_s"]
    return out


class Adapters:
    """Which layers are adapted, with their alpha, for the reference forward passes."""

    def __init__(self, alphas, p, g0=0.0):
        self.alphas, self.p, self.g0 = alphas, p, g0

    def scale(self, path, layer):
        return self.alphas[path] / layer["lora_c"].shape[-1] if path in self.alphas and "lora_a" in layer else None


def dense(x, layer, path, ad):
    y = x @ layer["kernel"] + layer.get("bias", 0.0)
    if (s := ad.scale(path, layer)) is not None:
        y = y + s * modulated(x @ layer["lora_a"], ad.p, layer, ad.g0) @ layer["lora_b"]
    return y


def dense_general(x, layer, path, ad, spec_w, spec_a, spec_b, spec_y):
    """Einsum-written general dense: y = einsum(spec_w) + bias, update through A (spec_a) and B (spec_b)."""
    y = np.einsum(spec_w, x, layer["kernel"]) + layer.get("bias", 0.0)
    if (s := ad.scale(path, layer)) is not None:
        h = np.einsum(spec_a, x, layer["lora_a"])
        y = y + s * np.einsum(spec_b, modulated(h, ad.p, layer, ad.g0), layer["lora_b"])
    return y


def layer_norm(x, layer):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * layer["scale"] + layer["bias"]


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def transformer_ref(params, tokens, ad):
    params = f64(params)
    x = params["embed"]["embedding"][np.asarray(tokens)]
    for i in range(N_BLOCKS):
        blk, pre = params[f"block_{i}"], f"block_{i}/"
        h = layer_norm(x, blk["ln1"])
        att = blk["attention"]
        q, k, v = (
            dense_general(h, att[n], pre + "attention/" + n, ad, "btd,dnk->btnk", "btd,dr->btr", "btr,rnk->btnk", "")
            for n in ("query", "key", "value")
        )
        logits = np.einsum("btnk,bsnk->bnts", q / math.sqrt(q.shape[-1]), k)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnk->btnk", weights, v)
        x = x + dense_general(
            o, att["out"], pre + "attention/out", ad, "btnk,nkd->btd", "btnk,nkr->btr", "btr,rd->btd", ""
        )
        h = layer_norm(x, blk["ln2"])
        h = gelu(dense(h, blk["mlp_in"], pre + "mlp_in", ad))
        x = x + dense(h, blk["mlp_out"], pre + "mlp_out", ad)
    heads = params["heads"]
    a = heads.get("lora_a")
    if a is not None:  # aligned layout: A (1, d, 1, r), B (r, n, 1, h)
        heads = dict(heads, lora_a=a[0, :, 0, :], lora_b=heads["lora_b"][:, :, 0, :])
    y = dense_general(x, heads, "heads", ad, "btd,ndh->btnh", "btd,dr->btr", "btr,rnh->btnh", "")
    x = layer_norm(x + y.reshape(x.shape), params["ln_f"])
    return dense_general(x, params["head"], "head", ad, "btd,dv->btv", "btd,dr->btr", "btr,rv->btv", "")


def conv2d(x, kernel, stride, padding):
    """NHWC convolution by explicit windows; padding 'SAME' (stride 1) or 'VALID'."""
    kh, kw = kernel.shape[:2]
    if padding == "SAME":
        x = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0)))
    n, height, width, _ = x.shape
    oh, ow = (height - kh) // stride + 1, (width - kw) // stride + 1
    out = np.zeros((n, oh, ow, kernel.shape[-1]))
    for i in range(oh):
        for j in range(ow):
            window = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,hwco->no", window, kernel)
    return out


def conv_layer(x, layer, path, ad, stride, padding):
    y = conv2d(x, layer["kernel"], stride, padding) + layer["bias"]
    if (s := ad.scale(path, layer)) is not None:
        h = conv2d(x, layer["lora_a"], stride, padding)
        y = y + s * modulated(h, ad.p, layer, ad.g0) @ layer["lora_b"]
    return y


def convnet_ref(params, images, ad):
    params = f64(params)
    x = np.maximum(conv_layer(np.asarray(images, np.float64), params["conv1"], "conv1", ad, 1, "SAME"), 0)
    x = np.maximum(conv_layer(x, params["conv2"], "conv2", ad, 2, "VALID"), 0)
    return dense(x.mean(axis=(1, 2)), params["head"], "head", ad)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

TARGETS = r".*/attention/(query|value|out)|.*/mlp_in|heads|head"
RANK_PATTERN = {r".*/mlp_in": 3}
ALPHA_PATTERN = {r".*/value": 2.0}
D_P = 3


def random_params(abstract, seed, lora_scale=0.3, zero_b=False):
    """numpy-random values for an abstract params tree, without compiling: base ~ N(0, 1/fan_in), lora_* ~ N(0, s²)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "lora_b" and zero_b:
            return jnp.zeros(leaf.shape, leaf.dtype)
        scale = lora_scale if name.startswith("lora_") else (1.0 if leaf.ndim < 2 else 1 / math.sqrt(leaf.shape[-2]))
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def layer_paths(params):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return sorted({"/".join(k.key for k in path[:-1]) for path, _ in flat if path[-1].key == "lora_a"})


def shapes(params, adapters=False):
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in flat
        if adapters or not path[-1].key.startswith("lora_")
    }


TARGETS = r".*/attention/(query|value|out)|.*/mlp_in|heads|head"
RANK_PATTERN = {r".*/mlp_in": 3}
ALPHA_PATTERN = {r".*/value": 2.0}
D_P = 3


class Setup:
    """The transformer, adapted, with random weights made without compiling an init."""

    def __init__(self):
        self.model = Transformer()
        self.adapted = inject(
            self.model, TARGETS, rank=2, lora_alpha=4.0, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN
        )
        self.tokens = jax.random.randint(jax.random.key(0), (3, 5), 0, VOCAB)
        self.p = jnp.asarray(np.random.default_rng(1).standard_normal((3, D_P)), jnp.float32)
        self.abstract = jax.eval_shape(self.adapted.init, jax.random.key(2), self.tokens, p=self.p)["params"]
        self.params = random_params(self.abstract, 3)
        self.apply = jax.jit(self.adapted.apply)
        self.apply_model = jax.jit(self.model.apply)

    def alphas(self):
        return {path: 2.0 if re.fullmatch(r".*/value", path) else 4.0 for path in layer_paths(self.params)}


@pytest.fixture(scope="module")
def transformer():
    return Setup()


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


def test_param_tree_is_the_model_tree_plus_adapters(transformer):
    t = transformer
    assert shapes(t.abstract) == shapes(jax.eval_shape(t.model.init, jax.random.key(0), t.tokens)["params"])
    assert layer_paths(t.abstract) == [
        *(
            f"block_{i}/{name}"
            for i in range(N_BLOCKS)
            for name in ("attention/out", "attention/query", "attention/value", "mlp_in")
        ),
        "head",
        "heads",
    ]
    lora = shapes(t.abstract, adapters=True)
    assert lora["block_0/attention/query/lora_a"] == (D_MODEL, 2)  # DenseGeneral kernel (d, heads, head_dim)
    assert lora["block_0/attention/query/lora_b"] == (2, N_HEADS, D_MODEL // N_HEADS)
    assert lora["block_0/attention/out/lora_a"] == (N_HEADS, D_MODEL // N_HEADS, 2)
    assert lora["block_1/mlp_in/lora_a"] == (D_MODEL, 3)  # rank_pattern
    assert lora["heads/lora_a"] == (1, D_MODEL, 1, 2)  # Einsum kernel (n, d, h): aligned layout
    assert lora["heads/lora_b"] == (2, 2, 1, D_MODEL // 2)
    assert "heads/lora_s" not in lora and "head/lora_s" in lora  # bias-free target: no shift by default
    assert lora["head/lora_c"] == (D_P, 2)


def test_b_zero_and_pretrained_weights_equal_unmodified_model_exactly(transformer):
    t = transformer
    variables = {"params": random_params(t.abstract, 3, zero_b=True)}
    pretrained = {"params": random_params(jax.eval_shape(t.model.init, jax.random.key(0), t.tokens)["params"], 4)}
    variables = load_base(variables, pretrained["params"])
    np.testing.assert_array_equal(t.apply(variables, t.tokens, p=t.p), t.apply_model(pretrained, t.tokens))


@pytest.mark.parametrize("shared_p", [False, True])
def test_transformer_matches_float64_reference(transformer, shared_p):
    t = transformer
    p = t.p[1] if shared_p else t.p
    y = t.apply({"params": t.params}, t.tokens, p=p)
    expected = transformer_ref(t.params, t.tokens, Adapters(t.alphas(), p))
    assert y.shape == expected.shape == (3, 5, VOCAB)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    base = transformer_ref(t.params, t.tokens, Adapters({}, p))
    assert np.abs(expected - base).max() > 0.1  # the adapters matter


def test_gate_offset_shift_everywhere_and_init_of_options():
    model = Transformer()
    adapted = inject(model, r"heads|.*/mlp_out", rank=2, lora_alpha=3.0, gate_offset=1.0, shift=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 4), 0, VOCAB)
    p = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2)), jnp.float32)
    abstract = jax.eval_shape(adapted.init, jax.random.key(2), tokens, p=p)["params"]
    assert "lora_s" in abstract["heads"]
    params = random_params(abstract, 5)
    alphas = dict.fromkeys(layer_paths(params), 3.0)
    expected = transformer_ref(params, tokens, Adapters(alphas, p, g0=1.0))
    np.testing.assert_allclose(jax.jit(adapted.apply)({"params": params}, tokens, p=p), expected, rtol=1e-4, atol=1e-4)
    # gate_offset=1 starts as plain LoRA (C = 0); shift=False drops S; initialisers as in the layer.
    dense = inject(nn.Dense(4), "", rank=2, lora_alpha=1.0, gate_offset=1.0, shift=False)
    params = dense.init(jax.random.key(0), jnp.ones((1, 3)), p=jnp.ones(2))["params"]
    assert sorted(params) == ["bias", "kernel", "lora_a", "lora_b", "lora_c"]
    np.testing.assert_array_equal(params["lora_c"], 0.0)
    assert np.abs(params["lora_a"]).min() > 0
    params = inject(nn.Dense(4), "", rank=2, lora_alpha=1.0).init(jax.random.key(0), jnp.ones((1, 3)), p=jnp.ones(2))[
        "params"
    ]
    assert np.abs(params["lora_c"]).min() > 0 and np.all(params["lora_s"] == 0)


def test_conv_net_matches_float64_reference_and_merges():
    model = ConvNet()
    adapted = inject(model, r"conv\d|head", rank=3, lora_alpha=6.0)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 7, 3)), jnp.float32)
    p = jnp.asarray(np.random.default_rng(1).standard_normal((2, D_P)), jnp.float32)
    abstract = jax.eval_shape(adapted.init, jax.random.key(2), images, p=p)["params"]
    assert abstract["conv1"]["lora_a"].shape == (3, 3, 3, 3) and abstract["conv1"]["lora_b"].shape == (3, 6)
    params = random_params(abstract, 6)
    apply, apply_model = jax.jit(adapted.apply), jax.jit(model.apply)
    alphas = dict.fromkeys(("conv1", "conv2", "head"), 6.0)
    expected = convnet_ref(params, images, Adapters(alphas, p))
    np.testing.assert_allclose(
        apply({"params": params}, images, p=p), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )

    merged = jax.jit(rssbl_jax.merge, static_argnums=2)(params, p[1], adapted.config)
    assert shapes(merged) == shapes(jax.eval_shape(model.init, jax.random.key(0), images)["params"])
    expected = convnet_ref(params, images, Adapters(alphas, p[1]))
    np.testing.assert_allclose(
        apply_model({"params": merged}, images), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
    )

    no_b = jax.tree_util.tree_map_with_path(lambda path, x: x * 0 if path[-1].key == "lora_b" else x, params)
    np.testing.assert_array_equal(apply({"params": no_b}, images, p=p), apply_model({"params": no_b}, images))


def test_sweep_over_conditions_of_the_conv_net_matches_float64_reference():
    """jax.vmap over K shared conditions of an injected conv net: the first Conv sweeps through its condition basis
    (one [K, 1 + d_p] @ [1 + d_p, |y|] matmul, the images being shared), the later layers per condition."""
    from tests.test_fast_paths import dot_shapes

    model = ConvNet()
    adapted = inject(model, r"conv\d|head", rank=3, lora_alpha=6.0, gate_offset=0.5)
    images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 7, 3)), jnp.float32)
    ps = jnp.asarray(np.random.default_rng(1).standard_normal((6, D_P)), jnp.float32)
    params = random_params(jax.eval_shape(adapted.init, jax.random.key(2), images, p=ps[0])["params"], 7)
    sweep = jax.jit(jax.vmap(lambda p: adapted.apply({"params": params}, images, p=p)))
    ys = sweep(ps)
    assert ((6, 1 + D_P), (1 + D_P, 2 * 7 * 7 * 6)) in dot_shapes(sweep, ps)
    alphas = dict.fromkeys(("conv1", "conv2", "head"), 6.0)
    for k in range(6):
        expected = convnet_ref(params, images, Adapters(alphas, ps[k], g0=0.5))
        np.testing.assert_allclose(ys[k], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_merge_reproduces_adapted_model_and_vmaps_over_operating_points(transformer):
    t = transformer
    points = t.p  # three operating points [3, d_p]
    merged = jax.jit(jax.vmap(lambda p0: rssbl_jax.merge(t.params, p0, t.adapted)))(points)
    base = {path: s for path, s in shapes(t.params).items()}
    assert {path: s[1:] for path, s in shapes(merged).items()} == base
    dtypes = jax.tree.map(lambda leaf: leaf.dtype, merged)
    assert all(d == jnp.float32 for d in jax.tree.leaves(dtypes))
    ys = jax.jit(jax.vmap(lambda m: t.model.apply({"params": m}, t.tokens)))(merged)
    for k in range(3):
        expected = transformer_ref(t.params, t.tokens, Adapters(t.alphas(), points[k]))
        np.testing.assert_allclose(ys[k], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_only_adapters_train(transformer):
    t = transformer
    params = random_params(t.abstract, 7, lora_scale=0.1)
    target = jnp.asarray(np.random.default_rng(8).standard_normal((3, 5, VOCAB)), jnp.float32)

    def loss(params):
        return jnp.mean((t.adapted.apply({"params": params}, t.tokens, p=t.p) - target) ** 2)

    tx = rssbl_jax.freeze_base(optax.adam(1e-2))

    @jax.jit
    def step(params, state):
        value, g = jax.value_and_grad(loss)(params)
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, value, g

    new, state, losses = params, tx.init(params), []
    for _ in range(4):
        new, state, value, grads = step(new, state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    lora_grads = [g for path, g in jax.tree_util.tree_flatten_with_path(grads)[0] if path[-1].key.startswith("lora_")]
    assert len(lora_grads) == 4 * 10 - 1 and all(np.abs(g).max() > 0 for g in lora_grads)  # heads has no lora_s
    for (path, before), after in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new), strict=True
    ):
        if path[-1].key.startswith("lora_"):
            assert np.abs(after - before).max() > 0
        else:
            np.testing.assert_array_equal(after, before)


def test_bad_target_lists_adaptable_paths():
    model = ConvNet()
    images = jnp.ones((1, 5, 5, 3))
    with pytest.raises(
        ValueError, match=r"(?s)'attention' matches no adaptable layer.*conv1  \(Conv\).*head  \(Dense\)"
    ):
        jax.eval_shape(
            inject(model, ["conv1", "attention"], rank=2, lora_alpha=1.0).init, jax.random.key(0), images, p=jnp.ones(2)
        )
    with pytest.raises(ValueError, match=r"rank_pattern \['conv2'\] matches no adapted layer"):
        adapted = inject(model, "conv1", rank=2, lora_alpha=1.0, rank_pattern={"conv2": 4})
        jax.eval_shape(adapted.init, jax.random.key(0), images, p=jnp.ones(2))
    with pytest.raises(ValueError, match=r"targets has an invalid regex 'conv\('"):
        inject(model, "conv(", rank=2, lora_alpha=1.0)
    assert adaptable_paths(model, images) == {"conv1": "Conv", "conv2": "Conv", "head": "Dense"}


def test_bad_operating_params_and_base_weights_raise():
    model = ConvNet()
    adapted = inject(model, "head", rank=2, lora_alpha=1.0)
    images = jnp.ones((2, 5, 5, 3))
    variables = jax.eval_shape(adapted.init, jax.random.key(0), images, p=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"d_p=3"):
        jax.eval_shape(adapted.apply, variables, images, p=jnp.ones(4))
    with pytest.raises(ValueError, match=r"prefix"):
        jax.eval_shape(adapted.apply, variables, images, p=jnp.ones((5, 3)))
    pretrained = jax.eval_shape(model.init, jax.random.key(1), jnp.ones((1, 6, 6, 4)))["params"]  # 4 input channels
    with pytest.raises(ValueError, match=r"'params/conv1/kernel' has shape \(3, 3, 4, 6\).*\(3, 3, 3, 6\)"):
        load_base(variables, pretrained)
    pretrained = jax.eval_shape(model.init, jax.random.key(1), images)["params"]
    del pretrained["head"]["bias"]
    with pytest.raises(ValueError, match=r"pretrained weights have no leaf 'params/head/bias' \(shape \(3,\)"):
        load_base(variables, pretrained)
    extra = dict(jax.eval_shape(model.init, jax.random.key(1), images)["params"], extra={"kernel": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"pretrained leaf 'params/extra/kernel' \(shape \(2,\)\) does not exist"):
        load_base(variables, extra)


def test_lifted_transforms_keep_paths_and_stack_adapters():
    """Targets inside nn.remat and nn.scan: adapters sit beside the (stacked) kernels; the math still holds."""

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.tanh(nn.Dense(6, name="fc")(x)), None

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.remat(nn.Dense)(6, name="stem")(x)
            scan = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]

    model = Net()
    adapted = inject(model, r"stem|layers/fc", rank=2, lora_alpha=2.0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4)), jnp.float32)
    p = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3)), jnp.float32)
    abstract = jax.eval_shape(adapted.init, jax.random.key(0), x, p=p)["params"]
    assert abstract["layers"]["fc"]["lora_a"].shape == (3, 6, 2) and abstract["stem"]["lora_b"].shape == (2, 6)
    params = f64(random_params(abstract, 2))
    expected = np.asarray(x, np.float64)
    ad = Adapters({"stem": 2.0}, p)
    expected = dense(expected, params["stem"], "stem", ad)
    for i in range(3):
        layer = {k: v[i] for k, v in params["layers"]["fc"].items()}
        expected = np.tanh(dense(expected, layer, "fc", Adapters({"fc": 2.0}, p)))
    params32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    np.testing.assert_allclose(jax.jit(adapted.apply)({"params": params32}, x, p=p), expected, rtol=1e-4, atol=1e-5)

    # a sweep over shared conditions through nn.remat and nn.scan: the remat'd stem sweeps through its condition
    # basis (x shared), the scanned layers then see batched activations; every condition equals the reference
    ps = jnp.asarray(np.random.default_rng(3).standard_normal((5, 3)), jnp.float32)
    sweep = jax.jit(jax.vmap(lambda q: adapted.apply({"params": params32}, x, p=q)))(ps)
    for k in range(5):
        expected = dense(np.asarray(x, np.float64), params["stem"], "stem", Adapters({"stem": 2.0}, ps[k]))
        for i in range(3):
            layer = {name: v[i] for name, v in params["layers"]["fc"].items()}
            expected = np.tanh(dense(expected, layer, "fc", Adapters({"fc": 2.0}, ps[k])))
        np.testing.assert_allclose(sweep[k], expected, rtol=1e-4, atol=1e-5)


class Wrapper(nn.Module):
    """A model whose own submodules are named ``model`` and ``base`` (as in many checkpoints' trees)."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="base")(nn.tanh(nn.Dense(5, name="model")(x)))


class Outer(nn.Module):
    """A larger linen module holding the adapted model as a field, calling it twice (shared weights)."""

    inner: nn.Module

    @nn.compact
    def __call__(self, x, p):
        h = self.inner(nn.Dense(4, name="stem")(x), p=p)
        return self.inner(jnp.tile(h, (1, 2)), p=p)


def test_adapted_model_is_a_linen_module_that_nests_and_tabulates():
    model = Wrapper()
    adapted = inject(model, "model|base", rank=2, lora_alpha=3.0)
    assert isinstance(adapted, nn.Module) and adapted.model is model and adapted.config.targets == ("model|base",)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    p = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2)), jnp.float32)
    abstract = jax.eval_shape(adapted.init, jax.random.key(0), x, p=p)["params"]
    # the wrapped model's params stay at the top level (no prefix), whatever its submodules are called
    assert shapes(abstract) == shapes(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    assert sorted(abstract) == ["base", "model"] and "lora_c" in abstract["model"] and "lora_c" in abstract["base"]
    params = f64(random_params(abstract, 5))
    params32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)

    def reference(h, q):
        ad = Adapters({"model": 3.0, "base": 3.0}, q)
        return dense(
            np.tanh(dense(np.asarray(h, np.float64), params["model"], "model", ad)), params["base"], "base", ad
        )

    standalone = jax.jit(adapted.apply)({"params": params32}, x, p=p)
    np.testing.assert_allclose(standalone, reference(x, p), rtol=1e-5, atol=1e-5)

    # nested: init under jit puts the adapted params under the field's name, with the wrapped model's paths
    outer = Outer(adapted)
    x8 = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8)), jnp.float32)
    nested = jax.jit(outer.init)(jax.random.key(1), x8, p)["params"]
    assert sorted(nested) == ["inner", "stem"] and shapes(nested["inner"]) == shapes(abstract)
    nested = {"stem": nested["stem"], "inner": params32}  # the standalone model's params, placed under "inner"
    y = jax.jit(outer.apply)({"params": nested}, x8, p)
    stem = np.asarray(x8, np.float64) @ np.asarray(nested["stem"]["kernel"], np.float64) + np.asarray(
        nested["stem"]["bias"], np.float64
    )
    h = np.asarray(adapted.apply({"params": params32}, jnp.asarray(stem, jnp.float32), p=p))
    np.testing.assert_allclose(y, adapted.apply({"params": params32}, jnp.tile(h, (1, 2)), p=p), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, reference(np.tile(reference(stem, p), (1, 2)), p), rtol=1e-4, atol=1e-5)
    # gradients reach the adapters through the outer module
    grads = jax.jit(jax.grad(lambda q: jnp.sum(outer.apply({"params": q}, x8, p) ** 2)))(nested)
    assert np.abs(grads["inner"]["model"]["lora_b"]).max() > 0
    # a bad target is still reported with the wrapped model's own paths when nested
    with pytest.raises(ValueError, match=r"(?s)'head' matches no adaptable layer.*model  \(Dense\)"):
        jax.eval_shape(Outer(inject(model, "head", rank=2, lora_alpha=1.0)).init, jax.random.key(0), x8, p)

    # built in setup, it sits under its attribute's name and computes the same
    class Built(nn.Module):
        def setup(self):
            self.body = inject(Wrapper(), "model|base", rank=2, lora_alpha=3.0)

        def __call__(self, x, p):
            return self.body(x, p=p)

    assert shapes(jax.eval_shape(Built().init, jax.random.key(0), x, p)["params"]["body"]) == shapes(abstract)
    y = jax.jit(Built().apply)({"params": {"body": params32}}, x, p)
    np.testing.assert_allclose(y, standalone, rtol=1e-6, atol=1e-6)

    # the summary table lists the adapter leaves, through the module's own tabulate and nn.tabulate
    table = adapted.tabulate(jax.random.key(0), x, p=p)
    assert "lora_c" in table and "lora_b" in table
    assert "lora_a" in nn.tabulate(outer, jax.random.key(0), compute_flops=True)(x8, p)


def test_method_of_the_wrapped_model_runs_adapted():
    class TwoWays(nn.Module):
        def setup(self):
            self.hidden = nn.Dense(3)

        def __call__(self, x):
            return self.hidden(x)

        def doubled(self, x):
            return 2.0 * self.hidden(x)

    adapted = inject(TwoWays(), "hidden", rank=1, lora_alpha=1.0)
    x, p = jnp.ones((2, 4)), jnp.array([1.0, -2.0])
    params = f64(random_params(jax.eval_shape(adapted.init, jax.random.key(0), x, p=p)["params"], 6))
    variables = {"params": jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)}
    expected = dense(np.asarray(x, np.float64), params["hidden"], "hidden", Adapters({"hidden": 1.0}, p))
    for method in ("doubled", TwoWays.doubled, lambda m, v: m.doubled(v)):
        np.testing.assert_allclose(adapted.apply(variables, x, p=p, method=method), 2 * expected, rtol=1e-5, atol=1e-6)
    for method in (None, "__call__", adapted.__call__):  # the adapted model's own call
        np.testing.assert_allclose(adapted.apply(variables, x, p=p, method=method), expected, rtol=1e-5, atol=1e-6)
