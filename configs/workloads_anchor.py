"""Keeping the nominal condition: every anchor of experiments.workloads on KS (main part, all layers).

    python -m experiments.workloads --config configs/workloads_anchor.py --workdir results/workloads_anchor

Anchors (applied identically to every method: the same data and the same p for all):

* ``none``: the protocol of configs/workloads.py (p standardised with the training conditions' mean and std);
* ``centre``: p standardised with mean = the nominal condition, so p̂_nominal = 0 for every method;
* ``replay``: the nominal condition as one more training condition (nominal trajectories the evaluation does not
  use); p as in ``none``;
* ``centre+replay``: both.

Same draws, seeds, lr grid and steps as configs/workloads.py. Records per anchor in ``workdir/<anchor>/``,
the comparison in ``workdir/report.md``; ``--config.anchors="('none','centre')"`` runs a subset.
"""

import ml_collections

from configs import workloads

METHODS = ("frozen", "lora", "lora_concat", "film_layer1", "rss", "rss_gate_only", "rss_affine")
# The baselines that, like rss, have no update at p̂ = 0 (no offset, no unconditioned term): under ``centre`` they are
# the frozen base at nominal too. A separate part, run under none and centre:
#   --config.parts="('offset0',)" --config.anchors="('none','centre')"
OFFSET0_METHODS = ("film_branch0", "film_layer0", "hypernet_nou")


def get_config() -> ml_collections.ConfigDict:
    config = workloads.get_config()
    config.workloads = ("ks",)
    config.parts = ("main",)
    config.part_jobs = {"main": [(m, "all") for m in METHODS], "offset0": [(m, "all") for m in OFFSET0_METHODS],
                        "ablation": []}  # fmt: skip
    config.anchors = ("none", "centre", "replay", "centre+replay")
    return config
