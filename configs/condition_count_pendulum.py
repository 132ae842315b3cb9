"""Error against the number of training conditions on the pendulum (pre-registered methods, named before the run).

    python -m experiments.condition_count --config configs/condition_count_pendulum.py \
        --workdir results/condition_count/pendulum
    # re-render report.md and the plot from the committed metrics.jsonl, no training:
    python -m experiments.condition_count --config configs/condition_count_pendulum.py \
        --workdir results/condition_count/pendulum --render

Headline comparisons (pre-registered): the linear gate ``rss`` (``C p`` on p centred at the nominal condition,
offset 0) against output-space FiLM with the same offset on the branch (``film_branch0``) and on the layer
(``film_layer0``), the hypernetwork (``hypernet8``), ``lora_concat`` and ``full_ft``; the same comparisons against
the learnable-offset gate ``rss_affine`` (FiLM with a learnable offset is not in this sweep: its nearest match is
offset 0, where ``rss_affine`` also starts). No other variant is run.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.tasks = ("pendulum_corner",)
    config.methods = ("rss", "rss_affine", "film_branch0", "film_layer0", "hypernet8", "lora_concat", "full_ft")
    config.references = ("rss", "rss_affine")
    config.counts = (4, 8, 16, 32, 64)
    config.centre = True  # every method sees p - p_nominal
    config.physical_extrapolation = True  # no anti-damped (ζ <= 0) extrapolated conditions
    config.num_draws = 4  # each draw: its own pretrained base, Sobol training conditions, held-out/extrapolated ones
    config.num_seeds = 3
    config.tune_seeds = 2
    config.learning_rates = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # the same 6-point grid for every method and K
    config.steps = 1000
    config.batch_size = 128
    config.batch_sampler = "top_k"  # uniform batches without replacement, without a sort of every row per step
    config.points_per_condition = 64
    config.n_test_conditions = 24
    config.analyse = False
    return config
