"""The full study, part 1 of 3: 14 methods on three tasks, 3 draws × 5 seeds, with ΔW(p) ranks and the projection test.

Parts (each its own command, each under 60 minutes on 2 CPU cores; RESULTS.md states the time each took):

    python -m experiments.run --config configs/full.py --workdir runs/full
    python -m experiments.run --config configs/full_pareto.py --workdir runs/full_pareto
    python -m experiments.run --config configs/full_nuisance.py --workdir runs/full_nuisance
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.tasks = ("planted_shared", "pendulum_corner", "pendulum_imperfect")
    config.methods = ("frozen", "lora", "lora_wide", "lora_concat", "full_ft", "film_branch0", "film_branch1",
                      "film_layer0", "film_layer1", "hypernet8", "rss", "rss_one_plus", "rss_affine",
                      "rss_mlp")  # fmt: skip
    config.analyse = True
    config.references = ("rss", "rss_affine", "rss_one_plus")  # + like-with-like for the offset-1 baselines
    return config
