"""Battery data from PyBaMM: SPMe with a lumped thermal model and the ``Chen2020`` LG M50 parameter set.

Each trajectory is a dynamic discharge: a drive-cycle-like piecewise-constant current profile (``segments``
random pulse levels, normalised to mean 1, times the C-rate ``c``), run for the time it takes to deliver
``depth_of_discharge`` of the nominal capacity at the mean current, from a fully charged cell at the ambient
temperature. (PyBaMM's US06/WLTC drive-cycle files are downloaded on demand, which these machines cannot do, so
the profile is synthetic; its pulse levels are seeded and part of the cache key.) Operating conditions
``p = (T_ambient [°C], C-rate)``.

Surrogate arrays, per trajectory, at ``samples`` times (midpoints of ``samples`` equal intervals, never on a
pulse edge):

* ``x [.., samples, 2]``: the applied current in C units (``I / I_1C``, signed, discharge positive) and the
  discharged charge as a fraction of nominal capacity (both known to a battery-management system);
* ``y [.., samples, 2]``: terminal voltage [V] and the cell's temperature rise over ambient [K];
* ``valid [.., samples]``: False after a voltage cut-off ended the simulation early (``x``/``y`` repeat their
  last valid value there). Inside the default ranges every sample is valid.

The LG M50 is an energy cell rated for 1.5C continuous discharge; with this model, pulses above roughly 3C end
at the 2.5 V cut-off within minutes, so the C-rate range stays near the rating. Chen2020 has little temperature
dependence apart from the thermal model, so most of the temperature effect is through the heating.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

import jax
import numpy as np

os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")  # no network on these machines, no prompt
_X64 = jax.config.jax_enable_x64
import pybamm  # noqa: E402

# Importing pybamm turns on jax_enable_x64 for the whole process (for its JAX solver, which we do not use: the
# IDAKLU solver is casadi/SUNDIALS). Restore the caller's setting so float32 JAX code elsewhere stays float32.
jax.config.update("jax_enable_x64", _X64)

KELVIN = 273.15
BATTERY_PARAMS = ("ambient_celsius", "c_rate")


@dataclasses.dataclass(frozen=True)
class BatteryConfig:
    """Everything that determines the battery data (its hash keys the cache).

    The nominal condition (25 °C, 1C) is off the centre of the training box (standardised it is not p = 0).
    Extrapolated conditions are colder and/or at higher C-rates than the box.
    """

    model: str = "SPMe"
    parameter_set: str = "Chen2020"
    thermal: str = "lumped"
    samples: int = 128
    segments: int = 16
    depth_of_discharge: float = 0.7
    pulse_range: tuple[float, float] = (0.4, 1.6)
    nominal: tuple[float, float] = (25.0, 1.0)
    box: tuple[tuple[float, float], tuple[float, float]] = ((10.0, 40.0), (0.5, 1.25))
    train_conditions: int = 16
    heldout_conditions: int = 8
    extrapolated: tuple[tuple[float, float], ...] = ((0.0, 1.0), (-10.0, 1.0), (25.0, 1.4), (0.0, 1.4))
    nominal_profiles: int = 64
    profiles: int = 12  # per non-nominal condition
    seed: int = 0


def battery_conditions(config: BatteryConfig) -> dict[str, np.ndarray]:
    """Condition sets ``{name: [n, 2]}`` of ``(T_ambient [°C], C-rate)``."""
    rng = np.random.default_rng([config.seed, 2])
    lows, highs = np.array([b[0] for b in config.box]), np.array([b[1] for b in config.box])

    def stratified(n):
        cols = [(rng.permutation(n) + rng.uniform(size=n)) / n for _ in range(2)]
        return lows + (highs - lows) * np.stack(cols, axis=1)

    return {
        "nominal": np.array([config.nominal], np.float64),
        "train": stratified(config.train_conditions),
        "heldout": stratified(config.heldout_conditions),
        "extrapolated": np.array(config.extrapolated, np.float64),
    }


@functools.lru_cache(maxsize=4)
def simulation(model: str = "SPMe", parameter_set: str = "Chen2020", thermal: str = "lumped", segments: int = 16):
    """A PyBaMM simulation whose current profile, C-rate and temperatures are input parameters (built once).

    Inputs: ``C-rate``, ``t_end [s]``, ``a0..a{segments-1}`` (pulse levels in units of the C-rate),
    ``Ambient temperature [K]`` and ``Initial temperature [K]``. The current is
    ``C-rate · Q_nom · Σ_k a_k 1[k ≤ segments·t/t_end < k+1]`` with steep sigmoid edges.
    """
    models = {"SPM": pybamm.lithium_ion.SPM, "SPMe": pybamm.lithium_ion.SPMe, "DFN": pybamm.lithium_ion.DFN}
    battery_model = models[model](options={"thermal": thermal})
    values = pybamm.ParameterValues(parameter_set)
    capacity = values["Nominal cell capacity [A.h]"]
    c_rate, t_end = pybamm.InputParameter("C-rate"), pybamm.InputParameter("t_end")
    levels = [pybamm.InputParameter(f"a{k}") for k in range(segments)]

    def current(t):
        phase = t / t_end * segments
        profile = sum(
            a * (pybamm.sigmoid(k, phase, 50) - pybamm.sigmoid(k + 1, phase, 50)) for k, a in enumerate(levels)
        )
        return c_rate * capacity * profile

    values.update(
        {"Current function [A]": current, "Ambient temperature [K]": "[input]", "Initial temperature [K]": "[input]"}
    )
    return pybamm.Simulation(battery_model, parameter_values=values, solver=pybamm.IDAKLUSolver()), values


def pulse_levels(rng: np.random.Generator, config: BatteryConfig) -> np.ndarray:
    """One profile's ``segments`` pulse levels, uniform in ``pulse_range`` and normalised to mean 1."""
    levels = rng.uniform(*config.pulse_range, size=config.segments)
    return levels / levels.mean()


def simulate(ambient_celsius: float, c_rate: float, levels: np.ndarray, config: BatteryConfig) -> dict[str, np.ndarray]:
    """One dynamic discharge: ``{"x": [samples, 2], "y": [samples, 2], "valid": [samples], "t": [samples]}``."""
    sim, values = simulation(config.model, config.parameter_set, config.thermal, config.segments)
    capacity = values["Nominal cell capacity [A.h]"]
    t_end = config.depth_of_discharge * 3600.0 / c_rate
    times = (np.arange(config.samples) + 0.5) / config.samples * t_end
    ambient = ambient_celsius + KELVIN
    inputs = {"C-rate": c_rate, "t_end": t_end, "Ambient temperature [K]": ambient, "Initial temperature [K]": ambient}
    inputs.update({f"a{k}": float(a) for k, a in enumerate(levels)})
    solution = sim.solve([0.0, t_end], t_interp=np.concatenate([[0.0], times, [t_end]]), inputs=inputs)
    valid = times <= solution.t[-1]
    t = np.where(valid, times, times[valid][-1] if valid.any() else 0.0)
    current = solution["Current [A]"](t) / capacity
    discharged = solution["Discharge capacity [A.h]"](t) / capacity
    voltage = solution["Voltage [V]"](t)
    rise = solution["X-averaged cell temperature [K]"](t) - ambient
    return {
        "x": np.stack([current, discharged], -1).astype(np.float32),
        "y": np.stack([voltage, rise], -1).astype(np.float32),
        "valid": valid,
        "t": times.astype(np.float32),
    }


def constant_current_discharge(ambient_celsius: float, c_rate: float, config: BatteryConfig = BatteryConfig()):
    """Discharge at constant current from full to the lower cut-off: ``(delivered A·h, voltage [V] samples)``."""
    sim, values = simulation(config.model, config.parameter_set, config.thermal, config.segments)
    t_end = 1.5 * 3600.0 / c_rate
    inputs = {"C-rate": c_rate, "t_end": t_end, "Ambient temperature [K]": ambient_celsius + KELVIN}
    inputs["Initial temperature [K]"] = inputs["Ambient temperature [K]"]
    inputs.update({f"a{k}": 1.0 for k in range(config.segments)})
    solution = sim.solve([0.0, t_end], t_interp=np.linspace(0.0, t_end, 400), inputs=inputs)
    cutoff = values["Lower voltage cut-off [V]"]
    if not str(solution.termination).startswith("event"):
        raise RuntimeError(f"{c_rate}C at {ambient_celsius} °C did not reach the {cutoff} V cut-off in {t_end} s")
    return float(solution["Discharge capacity [A.h]"].entries[-1]), np.asarray(solution["Voltage [V]"].entries)


def battery_dataset(
    config: BatteryConfig = BatteryConfig(), progress: Callable[[int], None] | None = None
) -> dict[str, np.ndarray]:
    """Generate the battery data (uncached; :func:`experiments.physics_data.battery_data` caches it).

    Returns, for each condition set ``s`` of :func:`battery_conditions` (``c`` conditions, ``n`` profiles each):
    ``s/conditions [c, 2]``, ``s/x [c, n, samples, 2]``, ``s/y [c, n, samples, 2]``, ``s/valid [c, n, samples]``,
    ``s/t [c, samples]`` (seconds). ``progress(1)`` is called after each simulation.
    """
    out: dict[str, np.ndarray] = {}
    for set_index, (name, conditions) in enumerate(battery_conditions(config).items()):
        n = config.nominal_profiles if name == "nominal" else config.profiles
        out[f"{name}/conditions"] = conditions.astype(np.float32)
        for k, v in battery_condition_set(config, set_index, conditions, n, progress).items():
            out[f"{name}/{k}"] = v
    return out


def battery_condition_set(
    config: BatteryConfig,
    set_index: int,
    conditions: np.ndarray,
    n: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """``n`` profiles at each ``(T_ambient, C-rate)`` of ``conditions``: ``{x, y, valid [c, n, ...], t [c, samples]}``.

    The pulse levels are drawn from ``config.seed``, ``set_index`` and the condition's index (:func:`battery_dataset`
    numbers the sets of :func:`battery_conditions` 0..3; another index gives other profiles)."""
    rows = []
    for i, (ambient, c_rate) in enumerate(conditions):
        rng = np.random.default_rng([config.seed, 3, set_index, i])
        runs = []
        for _ in range(n):
            runs.append(simulate(float(ambient), float(c_rate), pulse_levels(rng, config), config))
            if progress is not None:
                progress(1)
        rows.append({k: np.stack([r[k] for r in runs]) for k in ("x", "y", "valid")} | {"t": runs[0]["t"]})
    return {k: np.stack([row[k] for row in rows]) for k in ("x", "y", "valid", "t")}


def num_simulations(config: BatteryConfig) -> int:
    """How many PyBaMM solves :func:`battery_dataset` runs (for a progress bar's total)."""
    others = config.train_conditions + config.heldout_conditions + len(config.extrapolated)
    return config.nominal_profiles + others * config.profiles
