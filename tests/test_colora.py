"""CoLoRA's data format, its model built from rssbl_jax, the scalar gate, and a short training run."""

from __future__ import annotations

import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import rssbl_jax
from configs import colora_vlasov
from experiments import colora, colora_data, colora_model


def _write_set(directory, mus, q, t, axes, seed=0):
    rng = np.random.default_rng(seed)
    fields = {}
    for mu in mus:
        u = rng.normal(size=(q, len(t), *(len(a) for a in axes))).astype(np.float32)
        fields[mu] = u
        colora_data.write_file(directory / f"traj_{mu}.hdf5", u, mu, t, axes)
    return fields


@pytest.mark.parametrize("axes", [(np.linspace(0, 1, 5),), (np.linspace(-1, 1, 4), np.linspace(0, 2, 3))])
def test_loader_layout_and_digests(tmp_path, axes):
    t = np.array([0.0, 0.5, 1.0])
    mus = (0.3, 0.1, 0.2)  # written out of order: the loader sorts by mu
    fields = _write_set(tmp_path, mus, 2, t, axes)
    data = colora_data.load_dir(tmp_path)
    assert data.mus[:, 0].tolist() == [0.1, 0.2, 0.3]
    np.testing.assert_array_equal(data.u[2], fields[0.3])
    assert data.period == tuple(float(a[-1] - a[0]) for a in axes)
    for name, digest in data.sha256.items():
        assert digest == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    x = colora_data.grid(data)
    n = int(np.prod([len(a) for a in axes]))
    assert x.shape == (n, len(axes))
    y, mu_t = colora_data.snapshots(data, [0.3, 0.1])
    assert y.shape == (2 * 3, n, 2) and mu_t.shape == (6, 2)
    # row (trajectory 0.3, time 2), point k: u[q, 2, *index of k], with the first space axis slowest
    k = n - 2
    index = np.unravel_index(k, [len(a) for a in axes])
    np.testing.assert_array_equal(y[2, k], fields[0.3][(slice(None), 2, *index)])
    np.testing.assert_allclose(x[k], [a[i] for a, i in zip(axes, index, strict=True)], rtol=1e-6)
    np.testing.assert_allclose(mu_t[:, 0], [0.3, 0.3, 0.3, 0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(mu_t[:, 1], np.tile(t, 2))


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="COLORA_DATA_DIR"):
        colora_data.load_dir(tmp_path)
    _write_set(tmp_path, (0.1,), 1, np.arange(2.0), (np.arange(3.0),))
    data = colora_data.load_dir(tmp_path)
    with pytest.raises(ValueError, match=r"mu=\[0.7\] matches 0 trajectories"):
        colora_data.snapshots(data, [0.7])
    colora_data.write_file(tmp_path / "other.hdf5", np.zeros((1, 2, 4), np.float32), 0.2, np.arange(2.0),
                           [np.arange(4.0)])  # fmt: skip
    with pytest.raises(ValueError, match=r"u \(1, 2, 3\) or its coordinates differ from .*other.hdf5.s \(\(1, 2, 4"):
        colora_data.load_dir(tmp_path)
    with pytest.raises(ValueError, match=r"u \(1, 2, 3\) does not fit"):
        colora_data.write_file(tmp_path / "bad.hdf5", np.zeros((1, 2, 3)), 0.1, np.arange(2.0), [np.arange(4.0)])


def _colora(layers_adapted=None, x_dim=2, out_dim=1):
    return colora_model.build("colora", n_layers=7, width=25, out_dim=out_dim, rank=3, period=(2.0,) * x_dim,
                              p_mean=(0.3, 2.5), p_std=(0.07, 1.4), adapted_layers=layers_adapted)  # fmt: skip


@pytest.mark.parametrize(("adapted", "layers", "x_dim", "out_dim"),
                         [(None, "PCCCCCCC", 2, 1), (2, "PCCDDDDD", 2, 1), (None, "PCCCCCCC", 1, 2)])  # fmt: skip
def test_parameter_count_is_colora_formula(adapted, layers, x_dim, out_dim):
    model = _colora(adapted, x_dim, out_dim)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 3, x_dim)), jnp.zeros((2, 2))), jax.random.key(0))
    expected = colora_model.colora_count(x_dim, 2, out_dim, layers)
    assert colora_model.count(shapes) == expected
    if (adapted, x_dim) == (None, 2):
        assert expected == 5451  # CoLoRA's README, Vlasov and 2-D Burgers


def _numpy_colora(params, x, mu_t, mean, std, period, n_adapted):
    """CoLoRA's DNN forward (colora/layers.py, networks.py, build.py) in float64 numpy, from our leaves."""
    f64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    swish = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    z = (mu_t - mean) / std
    for name in ("Dense_0", "Dense_1"):
        z = swish(z @ f64["trunk"][name]["kernel"] + f64["trunk"][name]["bias"])
    inr = f64["inr"]
    # CoLoRA's hypernetwork last layer, one column per CoLoRA layer: alpha [n, L]
    w3 = np.concatenate([inr[f"Dense_{i}"]["lora_c"] for i in range(n_adapted)], axis=1)
    b3 = np.concatenate([inr[f"Dense_{i}"]["lora_c0"] for i in range(n_adapted)])
    alpha = z @ w3 + b3
    per = inr["Periodic_0"]
    h = np.mean(per["a"] * np.cos(2 * np.pi / np.asarray(period) * x[..., None, :] + per["c"]) + per["b"], axis=-1)
    h = swish(h)
    for i in range(7):
        layer = inr[f"Dense_{i}"]
        w = layer["kernel"][None]
        if i < n_adapted:  # W + (A * alpha) @ B, no 1/r
            w = w + alpha[:, i, None, None] * (layer["lora_a"] @ layer["lora_b"])[None]
        h = np.einsum("npd,ndk->npk", h, np.broadcast_to(w, (h.shape[0], *w.shape[1:]))) + layer["bias"]
        if i < 6:
            h = swish(h)
    return h


@pytest.mark.parametrize("adapted", [None, 2])
def test_colora_forward_matches_numpy_reference(adapted):
    model = _colora(adapted)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 6, 2)).astype(np.float32)
    mu_t = np.stack([rng.uniform(0.2, 0.4, 3), rng.uniform(0, 5, 3)], axis=1).astype(np.float32)
    params = model.init(jax.random.key(1), x, mu_t)
    # B = 0 at init: give every factor a value so the adapters act
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: jax.random.normal(jax.random.key(len(str(path))), v.shape) * 0.3
        if path[-1].key in ("lora_b", "lora_c0", "bias") else v, params)  # fmt: skip
    got = jax.jit(model.apply)(params, x, mu_t)
    want = _numpy_colora(params, x, mu_t, np.array([0.3, 2.5]), np.array([0.07, 1.4]), (2.0, 2.0), adapted or 7)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("gate", ["linear", "affine"])
def test_scalar_gate_against_float64_reference(gate):
    rng = np.random.default_rng(3)
    d_in, d_out, r, d_p, n, tokens = 5, 4, 3, 2, 3, 7
    config = rssbl_jax.AdapterConfig(rank=r, lora_alpha=6.0, targets="layers_0", gate=gate, gate_offset=0.5,
                                     scalar_gate=True, shift=True, p_mean=(1.0, -1.0), p_std=(2.0, 0.5))  # fmt: skip
    adapted = rssbl_jax.inject(nn.Sequential([nn.Dense(d_out)]), config)
    x = rng.normal(size=(n, tokens, d_in)).astype(np.float32)
    p = rng.normal(size=(n, d_p)).astype(np.float32)
    params = adapted.init(jax.random.key(0), x, p=p)["params"]["layers_0"]
    assert params["lora_c"].shape == (d_p, 1)
    assert ("lora_c0" in params) == (gate == "affine")
    params = {k: jnp.asarray(rng.normal(size=v.shape), v.dtype) for k, v in params.items()}
    f = {k: np.asarray(v, np.float64) for k, v in params.items()}
    params = {"layers_0": params}

    def reference(x, p):  # x [n, tokens, d_in], p [n, d_p]
        ph = (np.asarray(p, np.float64) - [1.0, -1.0]) / [2.0, 0.5]
        g = ph @ f["lora_c"] + (f["lora_c0"] if gate == "affine" else 0.5)  # [n, 1]: one value for every rank
        h = (x @ f["lora_a"]) * g[:, None, :] + (ph @ f["lora_s"])[:, None, :]
        return x @ f["kernel"] + f["bias"] + (6.0 / r) * h @ f["lora_b"], ph

    want, ph = reference(x, p)
    apply = jax.jit(lambda prm, x, p: adapted.apply({"params": prm}, x, p=p))
    np.testing.assert_allclose(np.asarray(apply(params, x, p), np.float64), want, rtol=1e-5, atol=1e-5)
    # a sweep: vmap over the conditions with x shared
    swept = jax.jit(jax.vmap(lambda pi: adapted.apply({"params": params}, x[0], p=pi)))(p)
    np.testing.assert_allclose(np.asarray(swept), reference(np.broadcast_to(x[0], x.shape), p)[0], rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    # gradient of the gate leaf: d sum(y) / dC = p̂ᵀ d sum(y) / dg
    grad = jax.grad(lambda c: apply({"layers_0": params["layers_0"] | {"lora_c": c}}, x, p).sum())(f["lora_c"])
    dg = ((x @ f["lora_a"]) * (6.0 / r) * f["lora_b"].sum(axis=1)[None, None]).sum(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(grad, np.float64), ph.T @ dg[:, None], rtol=1e-4, atol=1e-4)
    # merge at one operating point folds the scalar gate exactly
    merged = rssbl_jax.merge(params, p[2], adapted.config)["layers_0"]
    folded = x[2] @ np.asarray(merged["kernel"], np.float64) + np.asarray(merged["bias"], np.float64)
    np.testing.assert_allclose(folded, want[2], rtol=1e-4, atol=1e-4)


def test_scalar_gate_shape_error():
    config = rssbl_jax.AdapterConfig(rank=3, lora_alpha=3.0, gate="affine", scalar_gate=True)
    layer = config.resolve(None)
    factors = {"lora_a": np.ones((4, 3)), "lora_b": np.ones((3, 2)), "lora_c": np.ones((2, 3)), "lora_c0": np.ones(1)}
    with pytest.raises(ValueError, match=r"lora_c \(2, 1\)"):
        rssbl_jax.gates.check_factors(factors, layer)
    with pytest.raises(ValueError, match="scalar_gate must be True, False or one of"):
        rssbl_jax.AdapterConfig(rank=3, lora_alpha=3.0, scalar_gate="yes")
    assert rssbl_jax.AdapterConfig.from_dict(config.to_dict()) == config


@pytest.mark.slow
def test_training_smoke_loss_decreases(tmp_path):
    data_dir = tmp_path / "data" / "toy"
    data_dir.mkdir(parents=True)
    x0 = np.linspace(0, 1, 9)
    t = np.linspace(0, 1, 4)
    for mu in (0.1, 0.2, 0.3, 0.4):
        u = np.sin(2 * np.pi * (x0[None, None] - mu * t[None, :, None])) * (1 + mu)
        colora_data.write_file(data_dir / f"toy_{mu}.hdf5", np.concatenate([u, u**2]), mu, t, [x0])
    config = colora_vlasov.get_config()
    config.update(dataset="toy", data_dir=str(tmp_path / "data"), workdir=str(tmp_path / "out"), methods=("colora",),
                  train_mus=(0.1, 0.2, 0.4), test_mus=(0.3,), n_layers=2, width=8, steps=60, curve_points=2,
                  snapshots_per_step=4, points_stride=2, curve_eval_points=9, num_seeds=2, learning_rate=1e-2,
                  eval_chunk=4, published_error=1e-3)  # fmt: skip
    summary = colora.train_and_evaluate(config)
    run = summary["methods"][0]
    first, last = run["curve"][0], run["curve"][-1]
    assert np.mean(last["train_loss"]) < np.mean(first["train_loss"]) < 1.5
    assert np.mean(last["test_error_subsample"]) < np.mean(first["test_error_subsample"])
    assert np.asarray(run["per_mu"]).shape == (2, 1)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["data"]["test_mus"] == [0.3]
    assert "| colora |" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "curve.png").stat().st_size > 0
    config.split = "extrapolation"
    assert colora.split_mus(config) == ([0.1, 0.2], [0.4])


def test_point_sampler_strided_subgrid():
    sample = jax.jit(colora.point_sampler((7, 5), 0, 2))
    for seed in range(4):
        rows, cols = np.unravel_index(np.asarray(sample(jax.random.key(seed))), (7, 5))
        assert rows.size == 3 * 2
        assert len(set(rows % 2)) == 1 and len(set(cols % 2)) == 1  # one random offset per axis
        np.testing.assert_array_equal(np.unique(rows), rows[0] + 2 * np.arange(3))
    assert colora.point_sampler((9,), 4, 0)(jax.random.key(0)).shape == (4,)
    np.testing.assert_array_equal(colora.point_sampler((9,), 0, 0)(jax.random.key(0)), np.arange(9))
