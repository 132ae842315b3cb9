"""The pendulum_imperfect condition-count sweep at 4x the steps (named before the run, reported beside the original).

    python -m experiments.condition_count --config configs/condition_count_pendulum_imperfect_long.py \
        --workdir results/condition_count/pendulum_imperfect_long

``configs/condition_count_pendulum_imperfect.py`` at 4,000 steps instead of 1,000 (no cell met the convergence
criterion there), with the rate grid extended one point down (0.0003), as ``condition_count_pendulum_long.py`` does
for pendulum_corner. The question: does the offset still decide (the offset-0 methods about 5-9x ``rss_affine`` at
every count) when every method trains longer?
"""

import ml_collections

from configs import condition_count_pendulum_imperfect


def get_config() -> ml_collections.ConfigDict:
    config = condition_count_pendulum_imperfect.get_config()
    config.steps = 4000
    config.learning_rates = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    # Added after the run, for the report only (no training changes): each cell paired against the 1,000-step sweep.
    config.compare_with = "results/condition_count/pendulum_imperfect"
    return config
