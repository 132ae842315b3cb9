"""A tiny configuration of the whole pipeline, for tests and smoke runs (seconds).

python -m experiments.run --config configs/tiny.py --workdir runs/tiny
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.progress = False
    config.tasks = ["planted_shared", "burgers"]
    config.methods = ["frozen", "lora", "film_branch", "rss"]
    config.num_seeds = 2
    config.learning_rates = [3e-3]
    config.steps = 20
    config.batch_size = 64
    config.points_per_condition = 8
    config.train_grid = 2
    config.n_test_conditions = 6
    config.sweep_points = 4
    config.hidden = 16
    config.pde_hidden = 16
    config.pretrain_points = 64
    config.pretrain_steps = 20
    config.burgers_points = 32
    config.burgers_steps = 20
    config.conditions_grids = [2]
    config.conditions_methods = ["rss"]
    return config
