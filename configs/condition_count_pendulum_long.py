"""The pendulum condition-count sweep at 4x the steps: does its answer survive training closer to convergence?

    python -m experiments.condition_count --config configs/condition_count_pendulum_long.py \
        --workdir results/condition_count/pendulum_long

The pre-registered sweep (``configs/condition_count_pendulum.py``) trains 1,000 steps, where only 4 of its 35 cells
meet its convergence criterion (flatness >= 0.95). This runs the same methods, counts, draws, seeds and protocol at
4,000 steps, with the rate grid extended one point down (0.0003, since longer training tends to pick lower rates),
and is reported beside it. Named before the run; its comparisons are those of the sweep it repeats. The question it
answers: do the sweep's conclusions (the hypernetwork behind ``rss_affine`` at K = 4 only; FiLM on the layer ahead of
it in interpolation; ``lora_concat`` and ``full_ft`` behind at every K) hold when every method trains longer?
"""

import ml_collections

from configs import condition_count_pendulum


def get_config() -> ml_collections.ConfigDict:
    config = condition_count_pendulum.get_config()
    config.steps = 4000
    config.learning_rates = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
    # Added after the run, for the report only (no training changes): each cell paired against the 1,000-step sweep.
    config.compare_with = "results/condition_count/pendulum"
    return config
