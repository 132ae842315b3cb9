"""The model, data and layouts shared by the training tests and the worker processes they launch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import rssbl_jax
from rssbl_jax import sharding, training

D_IN, HIDDEN, D_OUT, D_P, RANK, ALPHA = 8, 16, 4, 2, 4, 8.0
BATCH = 16
LR = 3e-2


class AdaptedMLP(nn.Module):
    """Two adapted layers that both see the operating parameters ``p``."""

    dtype: object = None
    rank: int = RANK

    @nn.compact
    def __call__(self, x, p):
        kw = dict(rank=self.rank, lora_alpha=ALPHA, dtype=self.dtype)
        h = nn.tanh(rssbl_jax.RSSBilinearLoRADense(HIDDEN, name="hidden", **kw)(x, p))
        return rssbl_jax.RSSBilinearLoRADense(D_OUT, name="head", **kw)(h, p)


_SCALES = {"kernel": 0.35, "bias": 0.1, "lora_a": 0.35, "lora_b": 0.3, "lora_c": 0.7, "lora_s": 0.1}


def init_params(seed: int = 0, rank: int = RANK) -> dict:
    """Params of AdaptedMLP drawn with numpy from ``seed``: a random frozen base and non-zero adapters.

    Shapes come from ``model.init`` under ``jax.eval_shape``; the values are drawn on the host, so every
    process (and every test) builds bit-identical params without compiling an init program.
    """
    model = AdaptedMLP(rank=rank)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, D_IN)), jnp.ones((1, D_P)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(_SCALES[path[-1].key] * rng.standard_normal(x.shape, dtype=np.float32)), shapes
    )


def global_batch(step: int, seed: int = 0, nan_at: int | None = None) -> dict[str, np.ndarray]:
    """The whole batch of a step: a pure function of ``(seed, step)``, so any process or restart redraws it."""
    rng = np.random.default_rng([seed, step])
    x = rng.standard_normal((BATCH, D_IN), dtype=np.float32)
    p = rng.standard_normal((BATCH, D_P), dtype=np.float32)
    y = np.sin(x[:, :D_OUT] * (1.0 + p[:, :1])) + 0.5 * p[:, 1:2]
    if nan_at is not None and step == nan_at:
        p[3, 1] = np.nan
    return {"x": x, "p": p, "y": y.astype(np.float32)}


def loss_fn(model: AdaptedMLP):
    def loss(params, batch, rng):
        del rng
        out = model.apply({"params": params}, batch["x"], batch["p"])
        return jnp.mean((out.astype(jnp.float32) - batch["y"]) ** 2)

    return loss


def optimizer() -> optax.GradientTransformation:
    return optax.adamw(LR, weight_decay=1e-2)


def base_specs(layout: str):
    """The base model's specs for a layout: data-parallel (replicated) or model-parallel (Megatron-style)."""
    if layout == "data":
        return [(".*/(kernel|bias)", P())]
    if layout == "model":
        return [("hidden/kernel", P(None, "model")), ("head/kernel", P("model", None)), ("head/bias", P())]
    raise ValueError(layout)


def mesh_for(layout: str, devices=None):
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if layout == "data":
        return jax.make_mesh((n,), ("data",), (AxisType.Auto,), devices=devices)
    return jax.make_mesh((n // 4, 4), ("data", "model"), (AxisType.Auto,) * 2, devices=devices)


def sharded_setup(layout: str, devices=None, *, dtype=None, seed: int = 0):
    """(state, jitted step, batch_fn) with params and batch laid out over a mesh by rssbl_jax.sharding."""
    mesh = mesh_for(layout, devices)
    tx = optimizer()
    params = init_params(seed)
    param_specs = sharding.adapter_partition_specs(params, base_specs(layout), mesh=mesh)
    state = training.init_train_state(params, tx, jax.random.key(seed))
    state_shardings = sharding.named_shardings(mesh, training.state_partition_specs(state, tx, param_specs))
    state = jax.device_put(state, state_shardings)
    batch_shardings = sharding.named_shardings(mesh, sharding.batch_spec("data"))
    step = jax.jit(
        training.make_train_step(loss_fn(AdaptedMLP(dtype=dtype)), tx),
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
    )
    rows = sharding.local_batch_slice(mesh, BATCH, "data")

    def batch_fn(i: int, nan_at: int | None = None):
        local = {k: v[rows] for k, v in global_batch(i, seed, nan_at).items()}
        return sharding.shard_batch(local, mesh, sharding.batch_spec("data"))

    return state, step, batch_fn, mesh


def single_device_setup(*, dtype=None, seed: int = 0):
    """(state, jitted step, batch_fn) on the default device: the reference every layout is compared with."""
    tx = optimizer()
    state = training.init_train_state(init_params(seed), tx, jax.random.key(seed))
    step = jax.jit(training.make_train_step(loss_fn(AdaptedMLP(dtype=dtype)), tx))
    return state, step, lambda i, nan_at=None: global_batch(i, seed, nan_at)


def flat_params(state: training.TrainState) -> dict[str, np.ndarray]:
    """The trained adapters (and the untouched base) as host numpy arrays keyed by path."""
    params = rssbl_jax.combine(state.trainable, state.frozen)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not leaf.is_fully_addressable:  # several processes: gather the global value on every host
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        out["/".join(k.key for k in path)] = np.asarray(leaf)
    return out


def differences(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, float, bool]:
    """(max abs diff, max relative diff, bitwise equal) over all leaves."""
    assert a.keys() == b.keys()
    abs_diff = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    rel = max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-30)) for k in a)
    bitwise = all(np.array_equal(a[k].view(np.uint32), b[k].view(np.uint32)) for k in a)
    return abs_diff, rel, bitwise
