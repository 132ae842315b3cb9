"""The full study, part 4: the task built *against* RSS, and the ablations and hypernetwork variant not in part 1.

    python -m experiments.run --config configs/full_extra.py --workdir runs/full_extra

``planted_moving``: the planted teacher's update rotates its column and row spaces with p (rank 4 at each p, a
larger span over p), so RSS's fixed subspace should not suffice. No ΔW(p) analysis (part 1 has it).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.tasks = ("planted_moving",)
    config.methods = ("frozen", "lora", "lora_concat", "film_branch0", "film_branch1", "hypernet8", "hypernet8_nou",
                      "rss", "rss_one_plus", "rss_affine", "rss_mlp", "rss_gate_only", "rss_shift_only")  # fmt: skip
    config.references = ("rss", "rss_affine")
    config.curve_task = "planted_moving"
    return config
