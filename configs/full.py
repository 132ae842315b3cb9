"""The full study behind RESULTS.md: every method on all five tasks, 5 seeds (run time: RESULTS.md, Run times).

The same settings as configs/default.py (the main job) on three more tasks, and FiLM in the conditions sweep.

Launch (from the repository root):

    python -m experiments.run --config configs/full.py --workdir runs/full
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.tasks = ["planted_shared", "planted_moving", "pendulum", "burgers", "transformer"]
    config.conditions_methods = ["lora_concat", "film_branch", "hypernet", "rss"]
    return config
