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

    return cache.cached_arrays("battery", config, build, packages=BATTERY_PACKAGES, data_dir=data_dir)


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

    return cache.cached_arrays("ks", config, build, packages=KS_PACKAGES, data_dir=data_dir)


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
