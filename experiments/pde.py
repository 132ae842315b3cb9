"""PDE data from exponax (Fourier pseudo-spectral ETDRK steppers in JAX): forced Burgers and Kuramoto–Sivashinsky.

Forced viscous Burgers on ``[0, 2π)`` (the ``burgers`` MLP task of :mod:`experiments.tasks`)::

    u_t + u u_x = ν u_xx + f(x)

is exponax's ``Burgers`` stepper with the forcing added to its convection nonlinearity (ETDRK4, 2/3 dealiasing);
the unforced case is checked in the tests against the Cole–Hopf solution
``u = 2ν e^{-νt} sin x / (a + e^{-νt} cos x)``.

Kuramoto–Sivashinsky (conservative form, exponax's ``KuramotoSivashinskyConservative``) on ``[0, L)``::

    u_t + ½ (u²)_x + u_xx + ψ u_xxxx = 0

with operating parameters ``p = (L, ψ)``: the domain length and the hyper-viscosity. Linearised about ``u = 0``,
mode ``k = 2πm/L`` grows as ``exp((k² − ψ k⁴) t)`` (the tests check the solver against this). The grid has a
fixed number of points, so a surrogate over grid values sees a different map at every ``(L, ψ)``.
:func:`ks_dataset` draws trajectories on the chaotic attractor (after a burn-in from random initial conditions)
for the nominal, training, held-out (inside the range) and extrapolated (outside) conditions.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import exponax
import jax
import jax.numpy as jnp
import numpy as np


def _exponax_broadcasting():
    """exponax relies on numpy rank promotion internally; allow it while its code is traced (only there)."""
    return jax.numpy_rank_promotion("allow")


# ------------------------------------------------------------------------------------------------ Burgers


def grid(points: int) -> jax.Array:
    """The periodic grid ``x_j = 2π j / points``."""
    return 2.0 * jnp.pi * jnp.arange(points) / points


class _ForcedConvection(exponax.nonlin_fun.ConvectionNonlinearFun):
    """exponax's convection nonlinearity ``-u u_x`` plus a constant forcing ``f(x)`` (given in Fourier space)."""

    forcing_hat: jax.Array

    def __init__(self, forcing_hat: jax.Array, *args: Any, **kwargs: Any):
        self.forcing_hat = forcing_hat
        super().__init__(*args, **kwargs)

    def __call__(self, u_hat: jax.Array) -> jax.Array:
        return super().__call__(u_hat) + self.forcing_hat


class _ForcedBurgers(exponax.stepper.Burgers):
    """exponax's 1-D Burgers stepper with a time-independent forcing term."""

    forcing_hat: jax.Array

    def __init__(self, forcing: jax.Array, *args: Any, **kwargs: Any):
        self.forcing_hat = exponax.fft(forcing[None, :], num_spatial_dims=1)
        super().__init__(*args, **kwargs)

    def _build_nonlinear_fun(self, derivative_operator: jax.Array) -> _ForcedConvection:
        return _ForcedConvection(
            self.forcing_hat,
            self.num_spatial_dims,
            self.num_points,
            derivative_operator=derivative_operator,
            dealiasing_fraction=self.dealiasing_fraction,
            scale=self.convection_scale,
            single_channel=self.single_channel,
            conservative=self.conservative,
        )


def burgers(u0: jax.Array, nu: jax.Array, forcing: jax.Array, time: float, steps: int) -> jax.Array:
    """Solve forced Burgers on ``[0, 2π)`` to ``time`` in ``steps`` ETDRK4 steps from ``u0 [points]``.

    ``nu`` may be traced (vmap over viscosities works); ``forcing`` is ``f(x)`` on the grid.

    >>> import numpy as np
    >>> x = grid(64)
    >>> u = burgers(np.sin(x), 0.1, np.zeros(64), 0.5, 50)
    >>> bool(np.abs(u).max() < 1.0)   # dissipates
    True
    """
    u0 = jnp.asarray(u0)
    points = u0.shape[-1]
    with _exponax_broadcasting():
        stepper = _ForcedBurgers(
            jnp.asarray(forcing, u0.dtype),
            1,
            2.0 * jnp.pi,
            points,
            time / steps,
            diffusivity=nu,
            order=4,
        )
        u, _ = jax.lax.scan(lambda u, _: (stepper(u), None), u0[None, :], None, length=steps)
    return u[0]


def cole_hopf(x: jax.Array, t: float, nu: float, a: float = 2.0) -> jax.Array:
    """An exact solution of unforced viscous Burgers: ``u = -2ν ∂x log φ`` with ``φ = a + e^{-νt} cos x``."""
    decay = jnp.exp(-nu * t)
    return 2.0 * nu * decay * jnp.sin(x) / (a + decay * jnp.cos(x))


def random_initial_conditions(key: jax.Array, n: int, points: int, modes: int = 3) -> jax.Array:
    """``n`` smooth periodic fields ``Σ_m (a_m cos mx + b_m sin mx) / m`` with ``a, b ~ N(0, 0.5²)``."""
    x = grid(points)
    m = jnp.arange(1, modes + 1)
    coeffs = 0.5 * jax.random.normal(key, (n, 2, modes)) / m[None, None, :]
    return coeffs[:, 0] @ jnp.cos(m[:, None] * x[None, :]) + coeffs[:, 1] @ jnp.sin(m[:, None] * x[None, :])


# ------------------------------------------------------------------------------------------------ Kuramoto–Sivashinsky

KS_PARAMS = ("domain_length", "hyperviscosity")


def ks_stepper(domain_length: jax.Array, hyperviscosity: jax.Array, points: int, dt: float, substeps: int) -> Callable:
    """One surrogate step ``u [1, points] -> u`` of KS at ``(L, ψ)``: ``substeps`` ETDRK2 steps of ``dt / substeps``.

    Both parameters may be traced, so one compiled function serves every condition.
    """
    with _exponax_broadcasting():
        fine = exponax.stepper.KuramotoSivashinskyConservative(
            1, domain_length, points, dt / substeps, fourth_order_scale=hyperviscosity, order=2
        )

    def step(u: jax.Array) -> jax.Array:
        with _exponax_broadcasting():
            return jax.lax.fori_loop(0, substeps, lambda _, v: fine(v), u)

    return step


@dataclasses.dataclass(frozen=True)
class KSConfig:
    """Everything that determines the KS data (its hash keys the cache).

    Conditions are ``(L, ψ)`` pairs. The nominal condition sits off the centre of the training box on purpose
    (standardised, it is not ``p = 0``). Held-out conditions are drawn inside the box, extrapolated ones lie
    outside it (longer domains, smaller hyper-viscosity, both: graded by distance).
    """

    points: int = 128
    dt: float = 1.0  # time between saved frames (one surrogate step)
    substeps: int = 10
    burn_in: float = 100.0  # time units discarded to reach the attractor
    frames: int = 41  # saved states per trajectory (frames - 1 one-step pairs)
    nominal: tuple[float, float] = (64.0, 1.0)
    box: tuple[tuple[float, float], tuple[float, float]] = ((48.0, 96.0), (0.8, 1.4))
    train_conditions: int = 16
    heldout_conditions: int = 8
    extrapolated: tuple[tuple[float, float], ...] = (
        (112.0, 1.0),
        (128.0, 1.0),
        (64.0, 0.65),
        (64.0, 0.5),
        (112.0, 0.65),
    )
    nominal_trajectories: int = 48
    trajectories: int = 8  # per non-nominal condition
    ic_cutoff: int = 5  # random initial conditions: Fourier modes 1..ic_cutoff
    seed: int = 0


def ks_conditions(config: KSConfig) -> dict[str, np.ndarray]:
    """Condition sets ``{name: [n, 2]}`` (``nominal``, ``train``, ``heldout``, ``extrapolated``) in physical units."""
    rng = np.random.default_rng([config.seed, 1])
    (l_lo, l_hi), (v_lo, v_hi) = config.box
    lows, highs = np.array([l_lo, v_lo]), np.array([l_hi, v_hi])
    train = lows + (highs - lows) * _stratified(rng, config.train_conditions)
    heldout = lows + (highs - lows) * _stratified(rng, config.heldout_conditions)
    return {
        "nominal": np.array([config.nominal], np.float64),
        "train": train,
        "heldout": heldout,
        "extrapolated": np.array(config.extrapolated, np.float64),
    }


def _stratified(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` Latin-hypercube points in the unit square (spread over the box, reproducible)."""
    cols = [(rng.permutation(n) + rng.uniform(size=n)) / n for _ in range(2)]
    return np.stack(cols, axis=1)


def ks_trajectories(key: jax.Array, condition: jax.Array, n: int, config: KSConfig) -> jax.Array:
    """``n`` trajectories ``[n, frames, points]`` at one ``(L, ψ)``, each after a burn-in from a random field."""
    step = ks_stepper(condition[0], condition[1], config.points, config.dt, config.substeps)
    ic = exponax.ic.RandomTruncatedFourierSeries(1, cutoff=config.ic_cutoff)
    with _exponax_broadcasting():
        u0 = jax.vmap(lambda k: ic(config.points, key=k))(jax.random.split(key, n))  # [n, 1, points]
    burn = int(round(config.burn_in / config.dt))

    def one(u):
        u = jax.lax.fori_loop(0, burn, lambda _, v: step(v), u)
        _, frames = jax.lax.scan(lambda v, _: (step(v), v), u, None, length=config.frames)
        return frames[:, 0, :]

    return jax.vmap(one)(u0)


def ks_dataset(config: KSConfig = KSConfig(), progress: Callable[[int], None] | None = None) -> dict[str, np.ndarray]:
    """Generate the KS data (uncached; :func:`experiments.physics_data.ks_data` caches it).

    Returns ``{"<set>/conditions": [c, 2], "<set>/u": [c, n, frames, points]}`` for each condition set
    (``nominal`` has ``nominal_trajectories`` per condition, the others ``trajectories``), float32.
    ``progress(k)`` is called after each condition.
    """
    out: dict[str, np.ndarray] = {}
    for name, conds in ks_conditions(config).items():
        n = config.nominal_trajectories if name == "nominal" else config.trajectories
        out[f"{name}/conditions"] = conds.astype(np.float32)
        out[f"{name}/u"] = ks_condition_set(config, name, conds, n, progress)
    return out


def ks_condition_set(
    config: KSConfig, name: str, conditions: np.ndarray, n: int, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """``[c, n, frames, points]`` float32: ``n`` trajectories at each ``(L, ψ)`` of ``conditions``, with random
    initial fields keyed by ``config.seed``, the set's ``name`` and the condition's index (a new name gives new
    trajectories; :func:`ks_dataset` uses the set names of :func:`ks_conditions`)."""
    key = jax.random.fold_in(jax.random.key(config.seed), name_key(name))
    trajectories = []
    for i, c in enumerate(conditions):
        trajectories.append(
            np.asarray(_ks_generate(jax.random.fold_in(key, i), jnp.asarray(c, jnp.float32), n, config))
        )
        if progress is not None:
            progress(1)
    return np.stack(trajectories).astype(np.float32)


_ks_generate = jax.jit(ks_trajectories, static_argnums=(2, 3))


def name_key(name: str) -> int:
    """A stable small integer for a string (Python's ``hash`` is salted per process)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def ks_pairs(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-step pairs ``(u_t, u_{t+1})`` flattened over conditions, trajectories and time: ``[m, points]`` each."""
    points = u.shape[-1]
    return u[..., :-1, :].reshape(-1, points), u[..., 1:, :].reshape(-1, points)


def num_conditions(config: KSConfig) -> int:
    """How many conditions :func:`ks_dataset` solves (for a progress bar's total)."""
    return 1 + config.train_conditions + config.heldout_conditions + len(config.extrapolated)
