"""The pendulum condition-count sweep at 8,000 steps: is the 4,000-step sweep converged by the doubling criterion?

    python -m experiments.condition_count --config configs/condition_count_pendulum_8000.py \
        --workdir results/condition_count/pendulum_8000

The 4,000-step sweep (``configs/condition_count_pendulum_long.py``) meets no cell of its flatness criterion, and
that criterion is confounded by the cosine schedule (its windows compare rates from 10-20 % of the peak with under
3 %). This runs the same methods, counts, draws, seeds, data, rate grid and protocol at twice the steps, and applies
the workloads' criterion instead, named before the run: a cell (method, K) counts as converged at 4,000 steps if
8,000 steps change its interpolation error by less than 10 % on every draw (geometric mean over seeds). Reported
beside it: the paired ratio 8,000 / 4,000 per cell with its draw-level interval, and the TOST test of that ratio
within +-10 %, each Holm-corrected over its table; and the sweep's own tables against ``rss_affine`` at 8,000 steps,
whose comparisons are those of the sweep it repeats.
"""

import ml_collections

from configs import condition_count_pendulum_long


def get_config() -> ml_collections.ConfigDict:
    config = condition_count_pendulum_long.get_config()
    config.steps = 8000
    config.compare_with = "results/condition_count/pendulum_long"  # the budget it doubles
    return config
