"""A tiny workloads config for tests and smoke runs (seconds): a 1-block width-16 surrogate on little data.

python -m experiments.workloads --config configs/workloads_tiny.py --workdir /tmp/workloads_tiny
"""

import ml_collections

from configs import workloads


def get_config() -> ml_collections.ConfigDict:
    config = workloads.get_config()
    config.progress = False
    config.workloads = ("ks",)
    config.parts = ("main",)
    config.part_jobs = {"main": [("frozen", "all"), ("lora", "all"), ("rss", "all")], "ablation": [("rss", "mlp")]}
    config.draws = 2
    config.seeds = 2
    config.learning_rates = (3e-3, 1e-2)
    config.val_trajectories = 1
    config.horizon = 3
    tiny_ks = {
        "burn_in": 20.0,
        "frames": 5,
        "train_conditions": 2,
        "heldout_conditions": 2,
        "extrapolated": ((112.0, 1.0),),
        "nominal_trajectories": 3,
        "trajectories": 2,
    }
    config.ks = ml_collections.ConfigDict(
        {"steps": 10, "batch": 4, "data": tiny_ks, "pretrain_steps": 150, "pretrain_lr": 3e-3,
         "model": {"width": 16, "depth": 1, "heads": 2, "mlp": 32}}
    )  # fmt: skip
    tiny_battery = {
        "samples": 16,
        "segments": 4,
        "train_conditions": 2,
        "heldout_conditions": 1,
        "extrapolated": ((-10.0, 1.4),),
        "nominal_profiles": 2,
        "profiles": 2,
    }
    config.battery = ml_collections.ConfigDict(
        {"steps": 10, "batch": 2, "data": tiny_battery, "pretrain_steps": 20,
         "model": {"samples": 16, "width": 16, "depth": 1, "heads": 2, "mlp": 32}}
    )  # fmt: skip
    return config
