"""Error against the number of training conditions on KS and the battery (pre-registered, named before the run).

    python -m experiments.workload_counts --config configs/workload_counts.py --workdir results/workload_counts \
        --config.workloads="('ks',)" --config.run_draws="(0,)"        # part ks-0; likewise (1,), (2,)
    python -m experiments.workload_counts --config configs/workload_counts.py --workdir results/workload_counts \
        --config.workloads="('battery',)" --config.run_draws="(0,)"   # part battery-0; likewise (1,), (2,)
    python -m experiments.workload_counts --config configs/workload_counts.py --workdir results/workload_counts \
        --config.part=render                                           # report.md from the committed records

Methods, one per family as in the workload study (``configs/workload_study.py``), p centred at the nominal
condition for every method: the linear gate ``rss`` and the learnable-offset gate ``rss_affine``; FiLM with offset
0 on the branch and on the layer; ``lora_concat``; the hypernetwork of width 1 with its p-dependent shift; and
``full_ft``; the ``frozen`` base as the reference. Learning rates: the workload study's pick at 16 conditions on
most of its six workload draws (0.01 for every adapter, 0.001 for ``full_ft``), fixed for every count. Paired
ratios use ``rss`` and ``rss_affine`` as references. No other variant is run here.
"""

import ml_collections

from configs import workload_study


def get_config() -> ml_collections.ConfigDict:
    config = workload_study.get_config()
    config.methods = ("frozen", "rss", "rss_affine", "film_branch0", "film_layer0", "lora_concat", "hypernet1_shift",
                      "full_ft")  # fmt: skip
    config.counts = (4, 8, 16, 32, 64)
    config.run_draws = (0, 1, 2)  # the workload study's independent draws (bases, held-out conditions)
    config.seeds = 2  # per draw and count
    config.learning_rate = {m: 0.01 for m in config.methods if m not in ("frozen", "full_ft")} | {"full_ft": 1e-3}
    config.val_points = 4
    # Part lr_check (run after the main parts): on draw 0, every method at K = 4 and 64 with lr / 3, lr, lr * 3
    config.lr_check_counts = (4, 64)
    config.lr_check_factor = 3.0
    return config
