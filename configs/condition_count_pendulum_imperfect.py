"""Error against the number of training conditions on pendulum_imperfect (methods named before the run).

The base is pretrained at the centre for only 150 steps, so the ideal update is not zero at the nominal condition
(there the offset-0 methods ``rss``, ``film_branch0`` and ``film_layer0`` must put it into their shift). The same
pre-registered methods and comparisons as ``configs/condition_count_pendulum.py``; 3 draws × 3 seeds, one tuning
seed per learning rate (the time budget).

    python -m experiments.condition_count --config configs/condition_count_pendulum_imperfect.py \
        --workdir results/condition_count/pendulum_imperfect
"""

import ml_collections

from configs import condition_count_pendulum


def get_config() -> ml_collections.ConfigDict:
    config = condition_count_pendulum.get_config()
    config.tasks = ("pendulum_imperfect",)
    config.num_draws = 3
    config.num_seeds = 3
    config.tune_seeds = 1
    return config
