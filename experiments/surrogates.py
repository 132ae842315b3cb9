"""Neural surrogates pretrained at the nominal condition (plain flax linen; no rssbl_jax inside).

* ``ks_transformer``: an autoregressive surrogate of Kuramoto–Sivashinsky, ``u_t [points] -> u_{t+1}``, as a
  transformer over grid patches (4 blocks, width 128; one token per patch of ``patch`` points, learned
  positions) that predicts the increment ``u_{t+1} − u_t``. Trained on one-step pairs at the nominal ``(L, ψ)``
  with random circular shifts (the equation is translation invariant).
* ``battery_transformer``: a causal transformer over the time samples of a discharge, mapping
  ``(current in C units, discharged fraction)`` up to each time to ``(voltage, temperature rise)`` there.

Both are :class:`Transformer` stacks of :class:`Block`, built from ``nn.Dense`` layers only, with parameter paths
``block_i/attention/{query,key,value,out}`` and ``block_i/mlp_{in,out}``, so adapters can be injected by regex:
:data:`ATTENTION_TARGETS`, :data:`MLP_TARGETS`, :data:`ALL_TARGETS`. The models take no operating parameters:
``p`` only enters through the adapters injected later.

:func:`pretrained` returns ``(model, params)`` from the on-disk cache (keyed by the surrogate config, its data
config and package versions) or pretrains and stores them. :func:`ks_metrics` gives one-step and rollout relative
L2 errors per condition, :func:`battery_metrics` voltage RMSE and relative L2 per condition.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from experiments import battery, cache, pde, physics_data

ATTENTION_TARGETS = r".*/attention/(query|key|value|out)"
MLP_TARGETS = r".*/mlp_(in|out)"
ALL_TARGETS = r".*/(attention/(query|key|value|out)|mlp_(in|out))"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")
SOURCES = (sys.modules[__name__],)  # a base cached by other code (this module) is not reused

# ------------------------------------------------------------------------------------------------ models


class Attention(nn.Module):
    """Multi-head self-attention with separate ``nn.Dense`` query/key/value/out projections."""

    width: int
    heads: int
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        head_dim = self.width // self.heads
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, head_dim)  # noqa: E731
        q = split(nn.Dense(self.width, name="query")(x))
        k = split(nn.Dense(self.width, name="key")(x))
        v = split(nn.Dense(self.width, name="value")(x))
        mask = nn.make_causal_mask(jnp.ones(x.shape[:-1])) if self.causal else None
        h = nn.dot_product_attention(q, k, v, mask=mask)
        return nn.Dense(self.width, name="out")(h.reshape(*x.shape[:-1], self.width))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attention(norm(x))``, then ``x + mlp_out(gelu(mlp_in(norm(x))))``."""

    width: int
    heads: int
    mlp: int
    causal: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.width, self.heads, self.causal, name="attention")(nn.LayerNorm(name="norm_1")(x))
        h = nn.gelu(nn.Dense(self.mlp, name="mlp_in")(nn.LayerNorm(name="norm_2")(x)))
        return x + nn.Dense(self.width, name="mlp_out")(h)


class Transformer(nn.Module):
    """Tokens ``[..., seq, d_in]`` -> ``[..., seq, d_out]``: embed, learned positions, ``depth`` blocks, head."""

    seq: int
    d_out: int
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 256
    causal: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = nn.Dense(self.width, name="embed")(tokens)
        position = self.param("position", nn.initializers.normal(0.02), (self.seq, self.width))
        x = x + position.reshape((1,) * (x.ndim - 2) + position.shape)
        for i in range(self.depth):
            x = Block(self.width, self.heads, self.mlp, self.causal, name=f"block_{i}")(x)
        return nn.Dense(self.d_out, name="head", kernel_init=nn.initializers.zeros)(nn.LayerNorm(name="norm")(x))


class KSSurrogate(nn.Module):
    """``u_t [..., points] -> u_{t+1}``: a patch transformer predicts the scaled increment."""

    points: int = 128
    patch: int = 8
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp: int = 256
    u_scale: float = 1.3
    du_scale: float = 0.3

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        tokens = (u / self.u_scale).reshape(*u.shape[:-1], self.points // self.patch, self.patch)
        net = Transformer(self.points // self.patch, self.patch, self.width, self.depth, self.heads, self.mlp)
        return u + self.du_scale * net(tokens).reshape(u.shape)


class BatterySurrogate(nn.Module):
    """``x [..., samples, 2]`` (current in C units, discharged fraction) -> ``[..., samples, 2]`` (V, ΔT [K])."""

    samples: int = 128
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp: int = 128
    y_offset: tuple[float, float] = (3.7, 10.0)
    y_scale: tuple[float, float] = (0.2, 4.0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        lead = (1,) * (x.ndim - 1)  # explicit broadcasting (tests run with rank promotion raising)
        tokens = (x - jnp.array([1.0, 0.35]).reshape(*lead, 2)) / jnp.array([0.35, 0.2]).reshape(*lead, 2)
        net = Transformer(self.samples, 2, self.width, self.depth, self.heads, self.mlp, causal=True)
        return jnp.array(self.y_offset).reshape(*lead, 2) + jnp.array(self.y_scale).reshape(*lead, 2) * net(tokens)


# ------------------------------------------------------------------------------------------------ configs


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A surrogate's architecture, its data and its optimiser (its hash, with the data's, keys the cache)."""

    name: str
    model: dict
    data: Any
    steps: int = 1500
    batch: int = 64
    learning_rate: float = 1e-3
    warmup: int = 100
    seed: int = 0


SURROGATES: dict[str, PretrainConfig] = {
    "ks_transformer": PretrainConfig(
        "ks_transformer",
        {"points": 128, "patch": 8, "width": 128, "depth": 4, "heads": 4, "mlp": 256},
        pde.KSConfig(),
        steps=1500,
        batch=64,
    ),
    "battery_transformer": PretrainConfig(
        "battery_transformer",
        {"samples": 128, "width": 64, "depth": 2, "heads": 4, "mlp": 128},
        battery.BatteryConfig(),
        steps=1000,
        batch=16,
    ),
}


def build(config: PretrainConfig) -> nn.Module:
    """The (unadapted) linen model of a surrogate config."""
    if config.name.startswith("ks"):
        return KSSurrogate(**config.model)
    return BatterySurrogate(**config.model)


def load_data(config: PretrainConfig, data_dir: str | os.PathLike | None = None, progress: bool = True):
    """The surrogate's dataset (cached), as :func:`experiments.physics_data.ks_data` / ``battery_data`` give it."""
    if isinstance(config.data, pde.KSConfig):
        return physics_data.ks_data(config.data, data_dir, progress)
    return physics_data.battery_data(config.data, data_dir, progress)


# ------------------------------------------------------------------------------------------------ pretraining


def _nominal_examples(config: PretrainConfig, data: dict[str, np.ndarray]):
    """Training inputs, targets and weights at the nominal condition (all of its trajectories)."""
    nominal = physics_data.split(data, "nominal")
    if isinstance(config.data, pde.KSConfig):
        u, v = pde.ks_pairs(nominal["u"])
        return u, v, np.ones(u.shape, np.float32)
    x, y = nominal["x"].reshape(-1, *nominal["x"].shape[-2:]), nominal["y"].reshape(-1, *nominal["y"].shape[-2:])
    w = np.broadcast_to(nominal["valid"].reshape(-1, x.shape[1], 1), y.shape).astype(np.float32)
    return x, y, w


def pretrain(
    config: PretrainConfig, data: dict[str, np.ndarray], log: Callable[[int, float], None] | None = None
) -> dict[str, Any]:
    """Fit the surrogate at the nominal condition (Adam, warmup + cosine decay, MSE on normalised targets).

    KS examples get a random circular shift per draw (the equation is translation invariant).
    """
    model = build(config)
    x, y, w = _nominal_examples(config, data)
    is_ks = isinstance(config.data, pde.KSConfig)
    scale = jnp.float32(model.du_scale) if is_ks else jnp.array(model.y_scale).reshape(1, 1, 2)
    key = jax.random.key(config.seed)
    params = model.init(key, jnp.asarray(x[:1]))["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup, config.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    x, y, w = jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)

    def loss_fn(params, xb, yb, wb):
        residual = (model.apply({"params": params}, xb) - yb) / scale
        return jnp.sum(wb * residual**2) / jnp.maximum(jnp.sum(wb), 1.0)

    @jax.jit
    def step(params, state, key):
        k_idx, k_shift = jax.random.split(key)
        idx = jax.random.randint(k_idx, (config.batch,), 0, x.shape[0])
        xb, yb, wb = x[idx], y[idx], w[idx]
        if is_ks:
            shifts = jax.random.randint(k_shift, (config.batch,), 0, x.shape[-1])
            roll = jax.vmap(jnp.roll)
            xb, yb = roll(xb, shifts), roll(yb, shifts)
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, wb)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    for i in range(config.steps):
        params, state, loss = step(params, state, jax.random.fold_in(key, i + 1))
        if log is not None and (i % 100 == 0 or i == config.steps - 1):
            log(i, float(loss))
    return params


def pretrained(
    name: str | PretrainConfig, data_dir: str | os.PathLike | None = None, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, params)`` of a surrogate pretrained at its nominal condition, from the cache or trained now."""
    config = SURROGATES[name] if isinstance(name, str) else name
    data = load_data(config, data_dir, progress)

    def build_params():
        import tqdm

        with tqdm.tqdm(total=config.steps, desc=f"pretrain {config.name}", disable=not progress) as bar:
            last = [0]

            def log(i, loss):
                bar.update(i + 1 - last[0])
                last[0] = i + 1
                bar.set_postfix(loss=f"{loss:.2e}")

            start = time.perf_counter()
            params = pretrain(config, data, log)
            seconds = time.perf_counter() - start
        return cache.flatten_params(params) | {"__seconds__": np.float64(seconds)}

    flat = cache.cached_arrays(
        f"surrogate-{config.name}", config, build_params, packages=PACKAGES, sources=SOURCES, data_dir=data_dir
    )
    flat = {k: v for k, v in flat.items() if k != "__seconds__"}
    return build(config), jax.tree.map(jnp.asarray, cache.unflatten_params(flat))


def pretrain_seconds(name: str, data_dir: str | os.PathLike | None = None) -> float:
    """The wall time the cached pretraining of ``name`` took when it ran (read from its cache entry)."""
    config = SURROGATES[name]
    path = cache.entry_path(f"surrogate-{config.name}", config, PACKAGES, SOURCES, data_dir)
    with np.load(path) as stored:
        return float(stored["__seconds__"])


# ------------------------------------------------------------------------------------------------ metrics


def _relative_l2(prediction: jax.Array, target: jax.Array, axis) -> jax.Array:
    return jnp.linalg.norm(prediction - target, axis=axis) / jnp.linalg.norm(target, axis=axis)


def ks_metrics(apply: Callable[[jax.Array], jax.Array], u: np.ndarray, horizon: int = 10) -> dict:
    """One-step and rollout relative L2 per condition for trajectories ``u [c, n, frames, points]``.

    ``apply`` maps ``u_t [..., points]`` to ``u_{t+1}`` (for a base model: ``lambda u: model.apply(v, u)``;
    for an adapted one, close over its ``p``). Returns ``one_step [c]`` (mean over trajectories and times of
    ``‖û_{t+1} − u_{t+1}‖ / ‖u_{t+1}‖`` from true ``u_t``), ``persistence [c]`` (the same for ``û = u_t``, a
    reference), ``rollout [c, horizon]`` (mean over trajectories of the relative L2 after ``h`` autoregressive
    steps from frame 0), ``rollout_mean [c]``, and the persistence reference of the rollout,
    ``rollout_persistence [c, horizon]`` (``‖u_0 − u_h‖ / ‖u_h‖``: no change from frame 0) and its mean over
    horizons ``rollout_persistence_mean [c]``. A model worse than persistence has learned nothing usable there.
    """
    u = jnp.asarray(u)
    horizon = min(horizon, u.shape[2] - 1)  # KS is chaotic: past ~10 steps every rollout decorrelates (→ ~1.4)
    one = _relative_l2(jax.jit(apply)(u[:, :, :-1]), u[:, :, 1:], -1).mean(axis=(1, 2))
    persistence = _relative_l2(u[:, :, :-1], u[:, :, 1:], -1).mean(axis=(1, 2))

    def advance(v, _):
        v = apply(v)
        return v, v

    @jax.jit
    def roll(u0):
        _, states = jax.lax.scan(advance, u0, None, length=horizon)
        return jnp.moveaxis(states, 0, -2)  # [c, n, horizon, points]

    rollout = _relative_l2(roll(u[:, :, 0]), u[:, :, 1 : horizon + 1], -1).mean(axis=1)
    still = _relative_l2(u[:, :, :1], u[:, :, 1 : horizon + 1], -1).mean(axis=1)  # u_0 held for every horizon
    return {
        "one_step": np.asarray(one),
        "persistence": np.asarray(persistence),
        "rollout": np.asarray(rollout),
        "rollout_mean": np.asarray(rollout.mean(-1)),
        "rollout_persistence": np.asarray(still),
        "rollout_persistence_mean": np.asarray(still.mean(-1)),
    }


def battery_metrics(
    apply: Callable[[jax.Array], jax.Array], x: np.ndarray, y: np.ndarray, valid: np.ndarray
) -> dict[str, np.ndarray]:
    """Per condition (``x, y [c, n, samples, 2]``, ``valid [c, n, samples]``), over valid samples only:
    ``voltage_rmse_mv [c]``, ``voltage_rel_l2 [c]`` (of the voltage's deviation from its own mean over the
    condition, so a constant 3.6 V does not make every error look small), ``temperature_rmse_k [c]``.
    """
    prediction = np.asarray(jax.jit(apply)(jnp.asarray(x)))
    w = valid.astype(np.float64)
    count = w.sum(axis=(1, 2))
    err = (prediction - y).astype(np.float64)
    v_rmse = np.sqrt((w * err[..., 0] ** 2).sum(axis=(1, 2)) / count)
    v_mean = (w * y[..., 0]).sum(axis=(1, 2)) / count
    v_spread = np.sqrt((w * (y[..., 0] - v_mean[:, None, None]) ** 2).sum(axis=(1, 2)) / count)
    t_rmse = np.sqrt((w * err[..., 1] ** 2).sum(axis=(1, 2)) / count)
    return {"voltage_rmse_mv": 1e3 * v_rmse, "voltage_rel_l2": v_rmse / v_spread, "temperature_rmse_k": t_rmse}


def evaluate(
    name: str, model: nn.Module, params: Any, data: dict[str, np.ndarray], sets=("nominal", "heldout", "extrapolated")
) -> dict[str, dict[str, np.ndarray]]:
    """The frozen surrogate's metrics on each condition set (``{set: metrics}``, with ``conditions`` added)."""
    apply = lambda z: model.apply({"params": params}, z)  # noqa: E731
    out = {}
    for s in sets:
        part = physics_data.split(data, s)
        if name.startswith("ks"):
            metrics = ks_metrics(apply, part["u"])
        else:
            metrics = battery_metrics(apply, part["x"], part["y"], part["valid"])
        out[s] = {"conditions": part["conditions"], **metrics}
    return out
