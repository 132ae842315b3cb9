"""The smallest run of the whole pipeline, for the reproduce_results notebook under test (seconds).

One task, three methods (frozen base, LoRA, RSSBilinearLoRA), two draws × two seeds. Launch (from the repository
root):

    python -m experiments.run --config configs/notebook_tiny.py --workdir runs/notebook_tiny
"""

import ml_collections

from configs import tiny


def get_config() -> ml_collections.ConfigDict:
    config = tiny.get_config()
    config.methods = ("frozen", "lora", "rss")
    config.projection_methods = ()
    return config
