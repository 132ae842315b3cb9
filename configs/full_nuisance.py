"""The full study, part 3 of 3: d_p sweep, 2 informative operating parameters plus 0, 6 or 14 nuisance dimensions.

    python -m experiments.run --config configs/full_nuisance.py --workdir runs/full_nuisance

The pendulum (base at the centre); a nuisance dimension varies from condition to condition but does not change
the system, so a method that conditions on it can only overfit.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.tasks = ()
    config.nuisance_task = "pendulum"
    config.nuisance_dims_sweep = (0, 6, 14)
    config.nuisance_methods = ("lora_concat", "film_branch1", "hypernet8", "rss", "rss_affine", "rss_mlp")
    return config
