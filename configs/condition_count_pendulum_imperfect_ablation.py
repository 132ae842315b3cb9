"""The ablation of ``configs/condition_count_pendulum_ablation.py`` on pendulum_imperfect.

    python -m experiments.condition_count --config configs/condition_count_pendulum_imperfect_ablation.py \
        --workdir results/condition_count/pendulum_imperfect_ablation

On the imperfect base the ideal update is not zero at the nominal condition, so an offset-0 FiLM must put it into
its shift; FiLM with a learnable offset can learn it into the offset, as ``rss_affine`` can. Same draws, seeds,
counts, grid and budget as ``configs/condition_count_pendulum_imperfect.py``.
"""

import ml_collections

from configs import condition_count_pendulum_ablation, condition_count_pendulum_imperfect


def get_config() -> ml_collections.ConfigDict:
    config = condition_count_pendulum_imperfect.get_config()
    ablation = condition_count_pendulum_ablation.get_config()
    config.methods, config.references = ablation.methods, ablation.references
    config.methods_note = ablation.methods_note
    return config
