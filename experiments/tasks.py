"""Tasks: a frozen network of nominal conditions, and data of the same system under other operating conditions.

Every task returns a :class:`Task`: how to build each method's network and the frozen base params, a
training set at a grid of conditions (per-example ``p``, standardised so the training range is [-1, 1]^d_p),
and evaluation splits:
``seen`` (fresh inputs at the training conditions), ``interpolation`` (held-out conditions inside the range),
``extrapolation`` (conditions outside it, each row tagged with its distance from the range), plus a ``sweep``
along the first operating parameter for plots.

* ``planted_shared``: the frozen base is a random teacher; the system's first layer is ``W1 + U diag(G p) V``
  plus a shift, a conditional update with a fixed rank-k subspace (the structure RSSBilinearLoRA assumes).
* ``planted_moving``: the same, but the update's column and row spaces rotate with ``p`` (rank k for each ``p``,
  while the span over all ``p`` is larger): a case where RSSBilinearLoRA's fixed subspace should not suffice.
* ``pendulum``: a damped nonlinear pendulum ``θ'' + 2ζω θ' + ω² sin θ = 0`` integrated with diffrax; the network
  maps the initial state ``(θ0, θ'0)`` to ``θ`` at 16 times; operating parameters ``(ζ, ω)``.
* ``transformer``: a small linen transformer whose query and value projections carry a planted conditional
  update; methods are injected into the unmodified model with ``rssbl_jax.inject`` (:mod:`experiments.transformer`).
* ``burgers``: viscous Burgers' equation with forcing, ``u_t + u u_x = ν u_xx + f sin x`` on a periodic grid of 64
  points, solved by :mod:`experiments.pde`; the network maps ``u(·, 0)`` to ``u(·, T)``; parameters ``(log ν, f)``.

Physical tasks pretrain their base network at the nominal condition (the centre of the range) and freeze it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import pde, transformer
from experiments.methods import MLP


class Split(NamedTuple):
    """Inputs, standardised conditions, targets, and each row's distance from the training range."""

    x: jax.Array
    p: jax.Array
    y: jax.Array
    distance: jax.Array


class Task(NamedTuple):
    name: str
    build: Any  # (method, config) -> a model with init(key, x, p) and apply(variables, x, p)
    base_params: Any
    train: Split
    splits: dict[str, Split]  # validation (lr selection), seen, interpolation, extrapolation
    sweep: Split  # conditions along the first parameter, the others at their nominal value
    p_names: tuple[str, ...]
    p_physical: Any  # maps standardised p [.., d_p] -> physical values, for plot labels


def condition_sets(d_p: int, grid: int, n_test: int, key: jax.Array) -> dict[str, jax.Array]:
    """Training grid on [-1, 1]^d_p, held-out conditions inside it, extrapolation at sup-distance 0.1-1 outside."""
    axis = jnp.linspace(-1.0, 1.0, grid)
    train = jnp.stack(jnp.meshgrid(*([axis] * d_p), indexing="ij"), -1).reshape(-1, d_p)
    k1, k2, k3 = jax.random.split(key, 3)
    inside = jax.random.uniform(k1, (n_test, d_p), minval=-0.95, maxval=0.95)
    # extrapolation: a random point on the cube's surface pushed out to sup-norm 1.1 ... 2.0
    direction = jax.random.uniform(k2, (n_test, d_p), minval=-1.0, maxval=1.0)
    direction = direction / jnp.max(jnp.abs(direction), axis=-1, keepdims=True)
    outside = direction * jax.random.uniform(k3, (n_test, 1), minval=1.1, maxval=2.0)
    return {"train": train, "interpolation": inside, "extrapolation": outside}


def distance_from_range(p: jax.Array) -> jax.Array:
    """Sup-norm distance of standardised conditions from the training cube [-1, 1]^d_p (0 inside)."""
    return jnp.maximum(jnp.max(jnp.abs(p), axis=-1) - 1.0, 0.0)


def _split(system, conds: jax.Array, n: int, key: jax.Array, sample_x) -> Split:
    x = sample_x(key, conds.shape[0] * n)
    p = jnp.repeat(conds, n, axis=0)
    return Split(x, p, system(x, p), distance_from_range(p))


def _sweep_conditions(d_p: int, points: int = 41) -> jax.Array:
    line = jnp.linspace(-2.0, 2.0, points)
    return jnp.concatenate([line[:, None], jnp.zeros((points, d_p - 1))], axis=-1)


def mlp_builder(widths: tuple[int, ...]):
    """The MLP of :mod:`experiments.methods` with the given widths, for any method."""
    return lambda method, config: MLP(widths, method, config.rank, config.lora_alpha, config.hyper_hidden)


def _build(name, config, d_p, system, sample_x, build, base_params, p_names, p_physical, key) -> Task:
    system = jax.jit(system)
    sample_x = jax.jit(sample_x, static_argnums=1)
    k_cond, k_train, k_eval, k_sweep = jax.random.split(key, 4)
    conds = condition_sets(d_p, config.train_grid, config.n_test_conditions, k_cond)
    n = config.points_per_condition
    train = _split(system, conds["train"], n, k_train, sample_x)
    keys = jax.random.split(k_eval, 4)
    splits = {
        "validation": _split(system, conds["train"], n, keys[3], sample_x),  # for choosing the learning rate
        "seen": _split(system, conds["train"], n, keys[0], sample_x),
        "interpolation": _split(system, conds["interpolation"], n, keys[1], sample_x),
        "extrapolation": _split(system, conds["extrapolation"], n, keys[2], sample_x),
    }
    sweep = _split(system, _sweep_conditions(d_p), config.sweep_points, k_sweep, sample_x)
    return Task(name, build, base_params, train, splits, sweep, p_names, p_physical)


# --------------------------------------------------------------------------------------------- planted teachers


def planted_teacher(config: ml_collections.ConfigDict, key: jax.Array, moving: bool) -> dict[str, jax.Array]:
    """A random two-layer teacher whose first layer gets a rank-k conditional update (fixed or moving subspace)."""
    k = jax.random.split(key, 10)
    d_in, hidden, d_out, d_p, rank = config.d_in, config.hidden, config.d_out, config.d_p, config.teacher_rank
    w1 = jax.random.normal(k[0], (d_in, hidden)) / np.sqrt(d_in)
    gain = config.teacher_strength * jnp.linalg.norm(w1) / np.sqrt(rank)
    basis_in = jnp.linalg.qr(jax.random.normal(k[1], (d_in, 2 * rank)))[0]
    basis_out = jnp.linalg.qr(jax.random.normal(k[2], (hidden, 2 * rank)))[0]
    return {
        "w1": w1,
        "b1": 0.1 * jax.random.normal(k[3], (hidden,)),
        "u0": basis_in[:, :rank],
        "u1": basis_in[:, rank:],
        "v0": basis_out[:, :rank].T * gain,
        "v1": basis_out[:, rank:].T * gain,
        "g": jax.random.normal(k[4], (d_p, rank)) / np.sqrt(d_p),
        "h": 0.3 * jax.random.normal(k[5], (d_p, rank)) / np.sqrt(d_p),
        "angle": (jax.random.normal(k[6], (d_p, rank)) / np.sqrt(d_p)) if moving else jnp.zeros((d_p, rank)),
        "w2": jax.random.normal(k[7], (hidden, d_out)) / np.sqrt(hidden),
        "b2": 0.1 * jax.random.normal(k[8], (d_out,)),
    }


def planted_update(teacher: dict[str, jax.Array], p: jax.Array) -> jax.Array:
    """ΔW1(p) in kernel convention (d_in, hidden): Σ_k g_k(p) u_k(p) v_k(p)^T, rotating by angle(p) if moving."""
    theta = p @ teacher["angle"]  # [rank]
    u = teacher["u0"] * jnp.cos(theta)[None, :] + teacher["u1"] * jnp.sin(theta)[None, :]
    v = teacher["v0"] * jnp.cos(theta)[:, None] + teacher["v1"] * jnp.sin(theta)[:, None]
    return (u * (p @ teacher["g"])[None, :]) @ v


def planted_apply(teacher: dict[str, jax.Array], x: jax.Array, p: jax.Array) -> jax.Array:
    """The conditioned teacher on per-example conditions ``p [n, d_p]``."""
    delta = jax.vmap(planted_update, in_axes=(None, 0))(teacher, p)  # [n, d_in, hidden]
    shift = (p @ teacher["h"]) @ teacher["v0"]
    h = x @ teacher["w1"] + teacher["b1"][None, :] + jnp.einsum("ni,nih->nh", x, delta) + shift
    return jnp.tanh(h) @ teacher["w2"] + teacher["b2"][None, :]


def planted(config: ml_collections.ConfigDict, key: jax.Array, moving: bool) -> Task:
    k_teacher, k_rest = jax.random.split(key)
    teacher = planted_teacher(config, k_teacher, moving)
    base_params = {
        "dense_0": {"kernel": teacher["w1"], "bias": teacher["b1"]},
        "dense_1": {"kernel": teacher["w2"], "bias": teacher["b2"]},
    }

    def sample_x(k, n):
        return jax.random.normal(k, (n, config.d_in))

    task = _build(
        "planted_moving" if moving else "planted_shared",
        config,
        config.d_p,
        lambda x, p: planted_apply(teacher, x, p),
        sample_x,
        mlp_builder((config.hidden, config.d_out)),
        base_params,
        tuple(f"p{i}" for i in range(config.d_p)),
        lambda p: p,
        k_rest,
    )
    return task._replace(base_params={"params": base_params, "teacher": teacher})


# --------------------------------------------------------------------------------------------- physical systems


def pendulum_trajectory(theta0: jax.Array, omega0: jax.Array, zeta: jax.Array, omega: jax.Array, times: jax.Array):
    """``(θ(t), θ'(t))`` of ``θ'' + 2ζω θ' + ω² sin θ = 0`` at ``times``, integrated with diffrax (Tsit5)."""

    def field(t, state, args):
        del t
        theta, velocity = state
        zeta, omega = args
        return (velocity, -2.0 * zeta * omega * velocity - omega**2 * jnp.sin(theta))

    solution = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        diffrax.Tsit5(),
        t0=0.0,
        t1=times[-1],
        dt0=0.01,
        y0=(theta0, omega0),
        args=(zeta, omega),
        saveat=diffrax.SaveAt(ts=times),
        stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-9),
        max_steps=100_000,
    )
    return solution.ys


PENDULUM_RANGE = {"zeta": (0.05, 0.35), "omega": (0.8, 1.2)}


def _to_physical(p: jax.Array, ranges: dict[str, tuple[float, float]]) -> jax.Array:
    """Map standardised p in [-1, 1]^d_p linearly onto the physical ``ranges`` (in order)."""
    shape = (1,) * (p.ndim - 1) + (len(ranges),)
    lows = jnp.array([lo for lo, _ in ranges.values()]).reshape(shape)
    highs = jnp.array([hi for _, hi in ranges.values()]).reshape(shape)
    return lows + (p + 1.0) / 2.0 * (highs - lows)


def pendulum_physical(p: jax.Array) -> jax.Array:
    """Standardised p in [-1, 1]^2 -> (ζ, ω)."""
    return _to_physical(p, PENDULUM_RANGE)


def pretrain(widths, x, y, d_p, config, key) -> Any:
    """Fit the frozen base (a plain MLP) at the nominal condition; returns its params."""
    model = MLP(widths, "frozen")
    p0 = jnp.zeros((x.shape[0], d_p))
    params = model.init(key, x, p0)["params"]
    tx = optax.adam(optax.cosine_decay_schedule(config.pretrain_lr, config.pretrain_steps))

    def step(carry, _):
        params, state = carry
        loss, grads = jax.value_and_grad(lambda q: jnp.mean((model.apply({"params": q}, x, p0) - y) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), _ = jax.jit(lambda q: jax.lax.scan(step, (q, tx.init(q)), None, length=config.pretrain_steps))(params)
    return params


def _physical_task(name, config, system, sample_x, d_out, p_names, p_physical, key) -> Task:
    """Pretrain the base MLP on the system at the nominal condition (p = 0), freeze it, and build the task."""
    k_pre, k_x, k_rest = jax.random.split(key, 3)
    x0 = sample_x(k_x, config.pretrain_points)
    y0 = jax.jit(system)(x0, jnp.zeros((x0.shape[0], 2)))
    widths = (config.pde_hidden, config.pde_hidden, d_out)
    base = pretrain(widths, x0, y0, 2, config, k_pre)
    builder = mlp_builder(widths)
    return _build(name, config, 2, system, sample_x, builder, {"params": base}, p_names, p_physical, k_rest)


def pendulum(config: ml_collections.ConfigDict, key: jax.Array) -> Task:
    times = jnp.linspace(0.0, 2.0 * np.pi, 17)[1:]

    def system(x, p):
        phys = pendulum_physical(p)
        trajectory = jax.vmap(pendulum_trajectory, in_axes=(0, 0, 0, 0, None))
        return trajectory(x[:, 0], x[:, 1], phys[:, 0], phys[:, 1], times)[0]

    def sample_x(k, n):
        return jax.random.uniform(k, (n, 2), minval=-1.0, maxval=1.0) * jnp.array([[2.0, 1.0]])

    return _physical_task("pendulum", config, system, sample_x, times.shape[0], ("ζ", "ω"), pendulum_physical, key)


BURGERS_RANGE = {"log10_nu": (-1.6, -0.8), "forcing": (-0.5, 0.5)}


def burgers_physical(p: jax.Array) -> jax.Array:
    """Standardised p in [-1, 1]^2 -> (log10 ν, f)."""
    return _to_physical(p, BURGERS_RANGE)


def burgers(config: ml_collections.ConfigDict, key: jax.Array) -> Task:
    grid = pde.grid(config.burgers_points)

    def system(u0, p):
        phys = burgers_physical(p)
        solve = lambda u, nu, f: pde.burgers(u, 10.0**nu, f * jnp.sin(grid), config.burgers_time, config.burgers_steps)  # noqa: E731
        return jax.vmap(solve)(u0, phys[:, 0], phys[:, 1])

    def sample_x(k, n):
        return pde.random_initial_conditions(k, n, config.burgers_points, modes=3)

    names = ("log10 ν", "f")
    return _physical_task("burgers", config, system, sample_x, config.burgers_points, names, burgers_physical, key)


def transformer_task(config: ml_collections.ConfigDict, key: jax.Array) -> Task:
    """A small transformer whose query/value projections carry a planted conditional update (see
    :mod:`experiments.transformer`); methods are injected into the unmodified model."""
    k_system, k_rest = jax.random.split(key)
    base, (teacher, planted_vars) = transformer.planted_system(config, k_system)

    def system(x, p):
        return teacher.apply(planted_vars, x, p=p)

    def sample_x(k, n):
        return jax.random.normal(k, (n, config.tf_seq, config.tf_d_model))

    def build(method, config):
        return transformer.InjectedModel(transformer.model(config), method, config.rank, config.lora_alpha)

    names = tuple(f"p{i}" for i in range(config.d_p))
    return _build("transformer", config, config.d_p, system, sample_x, build, base, names, lambda p: p, k_rest)


def make_task(name: str, config: ml_collections.ConfigDict, key: jax.Array) -> Task:
    """Build a task by name."""
    if name == "planted_shared":
        return planted(config, key, moving=False)
    if name == "planted_moving":
        return planted(config, key, moving=True)
    if name == "pendulum":
        return pendulum(config, key)
    if name == "burgers":
        return burgers(config, key)
    if name == "transformer":
        return transformer_task(config, key)
    raise ValueError(
        f"unknown task {name!r}; expected planted_shared, planted_moving, pendulum, burgers or transformer."
    )
