"""Cached physics data for the real workloads, with a progress bar while it is generated.

    python -m experiments.physics_data [--data_dir DIR] [--pretrain]

generates (or loads) every dataset, and with ``--pretrain`` also the pretrained surrogates of
:mod:`experiments.surrogates`, printing the time each took. Entries are keyed by a hash of their full config and
the versions of the packages that made them (:mod:`experiments.cache`), so a rerun only reads files.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.stats
import tqdm

from experiments import battery, cache, pde

BATTERY_PACKAGES = ("pybamm", "pybammsolvers", "casadi", "numpy")
KS_PACKAGES = ("exponax", "jax", "jaxlib", "equinox", "numpy")


def battery_data(
    config: battery.BatteryConfig | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The battery arrays of :func:`experiments.battery.battery_dataset`, from the cache when present."""
    config = config or battery.BatteryConfig()

    def build():
        with tqdm.tqdm(total=battery.num_simulations(config), desc="PyBaMM SPMe", disable=not progress) as bar:
            return battery.battery_dataset(config, bar.update)

    return cache.cached_arrays("battery", config, build, packages=BATTERY_PACKAGES, sources=(battery,),
                               data_dir=data_dir)  # fmt: skip


def ks_data(
    config: pde.KSConfig | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The Kuramoto–Sivashinsky arrays of :func:`experiments.pde.ks_dataset`, from the cache when present."""
    config = config or pde.KSConfig()

    def build():
        with tqdm.tqdm(total=pde.num_conditions(config), desc="exponax KS", disable=not progress) as bar:
            return pde.ks_dataset(config, bar.update)

    return cache.cached_arrays("ks", config, build, packages=KS_PACKAGES, sources=(pde,), data_dir=data_dir)


def sobol_conditions(box: tuple[tuple[float, float], ...], n: int, seed: int) -> np.ndarray:
    """``[n, d]`` conditions in ``box``: the first ``n`` points of a scrambled Sobol sequence (``seed``), so the
    first ``k`` of them are nested, balanced for every power of two ``k`` and well spread for the others."""
    lows, highs = np.array([b[0] for b in box]), np.array([b[1] for b in box])
    sobol = scipy.stats.qmc.Sobol(d=len(box), scramble=True, seed=np.random.default_rng([seed, 5]))
    return lows + (highs - lows) * sobol.random_base2(max(n - 1, 0).bit_length())[:n]  # a power of 2, cut


def condition_set(
    config: pde.KSConfig | battery.BatteryConfig,
    name: str,
    conditions: np.ndarray,
    data_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Data at extra ``conditions`` with ``config``'s simulator and per-condition count (cached), in the layout of
    :func:`split`: ``conditions`` and ``u`` (KS) or ``x, y, valid, t`` (battery). ``name`` keys the random
    initial fields or load profiles, apart from those of the config's own sets."""
    conditions = np.asarray(conditions, np.float64)
    key = {"data": config, "name": name, "conditions": conditions}
    ks = isinstance(config, pde.KSConfig)
    n = config.trajectories if ks else config.profiles

    def build():
        with tqdm.tqdm(total=len(conditions) * (1 if ks else n), desc=name, disable=not progress) as bar:
            if ks:
                return {"u": pde.ks_condition_set(config, name, conditions, n, bar.update)}
            return battery.battery_condition_set(config, pde.name_key(name), conditions, n, bar.update)

    arrays = cache.cached_arrays(f"{'ks' if ks else 'battery'}-set", key, build,
                                 packages=KS_PACKAGES if ks else BATTERY_PACKAGES, sources=(pde if ks else battery,),
                                 data_dir=data_dir)  # fmt: skip
    return {"conditions": conditions.astype(np.float32), **arrays}


def split(data: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    """The arrays of one condition set (``nominal``, ``train``, ``heldout``, ``extrapolated``) without the prefix."""
    prefix = f"{name}/"
    return {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--pretrain", action="store_true", help="also pretrain (or load) the nominal surrogates")
    args = parser.parse_args(argv)
    timings = {}
    start = time.perf_counter()
    ks = ks_data(data_dir=args.data_dir)
    timings["ks data"] = time.perf_counter() - start
    start = time.perf_counter()
    cells = battery_data(data_dir=args.data_dir)
    timings["battery data"] = time.perf_counter() - start
    if args.pretrain:
        from experiments import surrogates

        for name in surrogates.SURROGATES:
            start = time.perf_counter()
            model, params = surrogates.pretrained(name, data_dir=args.data_dir)
            timings[f"pretrain {name}"] = time.perf_counter() - start
            metrics = surrogates.evaluate(name, model, params, ks if name.startswith("ks") else cells)
            for split_name, values in metrics.items():
                summary = {
                    k: np.round(v.mean(axis=0), 4) for k, v in values.items() if k not in ("conditions", "rollout")
                }
                if "rollout" in values:
                    summary["rollout@1,5,10"] = np.round(values["rollout"].mean(axis=0)[[0, 4, 9]], 3)
                print(f"{name} {split_name} (mean over conditions): {summary}")
    for name, seconds in timings.items():
        print(f"{name}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
