"""The full study, part 2 of 3: error vs trainable parameters per family on two tasks not built for RSS.

    python -m experiments.run --config configs/full_pareto.py --workdir runs/full_pareto

Every point (``method@rank``) is tuned and evaluated like the main table (3 draws × 5 seeds).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.tasks = ()
    config.pareto_tasks = ("pendulum_corner", "burgers")
    config.pareto_points = (
        *(f"rss_affine@{r}" for r in (1, 4, 16)),
        *(f"film_branch1@{r}" for r in (1, 4, 16)),
        *(f"lora@{r}" for r in (1, 4, 16)),
        *(f"rss@{r}" for r in (1, 4, 16)),
        "lora_concat@4", "hypernet2@4", "hypernet32@4",
    )  # fmt: skip
    return config
