"""The smallest run of the whole pipeline, for the reproduce_results notebook under test (seconds).

One task, three methods (frozen base, LoRA, RSSBilinearLoRA), two seeds, and the conditions-count sweep on one
grid. Launch (from the repository root):

    python -m experiments.run --config configs/notebook_tiny.py --workdir runs/notebook_tiny
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.tasks = ["planted_shared"]
    config.methods = ["frozen", "lora", "rss"]
    return config
