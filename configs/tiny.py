"""A tiny configuration of the whole pipeline, for tests and smoke runs (seconds).

python -m experiments.run --config configs/tiny.py --workdir runs/tiny
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.progress = False
    config.tasks = ("planted_shared",)
    config.methods = ("frozen", "lora", "film_branch0", "rss")
    config.num_draws = 2
    config.num_seeds = 2
    config.tune_seeds = 1
    config.learning_rates = (3e-3, 3e-2)
    config.steps = 20
    config.curve_points = 5
    config.batch_size = 32
    config.points_per_condition = 8
    config.train_grid = 2
    config.n_test_conditions = 6
    config.hidden = 16
    config.pde_hidden = 16
    config.pretrain_points = 64
    config.pretrain_steps = 20
    config.imperfect_pretrain_steps = 5
    config.burgers_points = 32
    config.burgers_steps = 20
    config.analyse = True
    config.rank_grid = 3
    config.projection_methods = ("film_branch0",)
    config.references = ("rss",)
    config.curve_task = "planted_shared"
    return config
