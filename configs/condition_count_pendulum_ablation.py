"""Variants run after the pre-registered condition-count sweep on the pendulum (an ablation, reported apart).

    python -m experiments.condition_count --config configs/condition_count_pendulum_ablation.py \
        --workdir results/condition_count/pendulum_ablation

The pre-registered sweep (``configs/condition_count_pendulum.py``) compares the learnable-offset gate
``rss_affine`` with FiLM at offset 0 only, and its hypernetwork has no p-dependent shift. Here, with the same
draws, seeds, counts, grid and budget: FiLM with a learnable offset initialised to 0 (the match of ``rss_affine``)
on the branch and on the layer, and the hypernetwork with RSS's rank-space shift ``S p``. ``rss_affine`` is rerun
in the same job as the reference of the paired ratios (same keys, so the same runs as in the pre-registered sweep).
"""

import ml_collections

from configs import condition_count_pendulum


def get_config() -> ml_collections.ConfigDict:
    config = condition_count_pendulum.get_config()
    config.methods = ("rss_affine", "film_branch_affine0", "film_layer_affine0", "hypernet8_shift")
    config.references = ("rss_affine",)
    config.methods_note = "an ablation, run after the pre-registered sweep"
    return config
