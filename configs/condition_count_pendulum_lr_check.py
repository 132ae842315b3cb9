"""Is the small-K edge on the pendulum a tuning artefact? Held-out error at every learning rate (a diagnostic).

    for lr in 0.0003 0.001 0.003 0.01 0.03 0.1 0.3; do
      python -m experiments.condition_count --config configs/condition_count_pendulum_lr_check.py \
          --workdir results/condition_count/pendulum_lr_check/lr$lr --config.learning_rates="($lr,)"
    done
    python -m experiments.condition_count --config configs/condition_count_pendulum_lr_check.py \
        --workdir results/condition_count/pendulum_lr_check --lr_report     # report.md over the rates

The sweeps pick each method's learning rate by its validation error at the *training* conditions. At 4 training
conditions that rewards fitting those 4, not generalising between them, and the hypernetwork picks lower rates than the
others. Here each rate of the sweeps' grid is run on its own (a one-point grid, so no tuning: one run per rate and draw
× seed) for the methods behind ``rss_affine`` at K = 4 (``hypernet8`` in the pre-registered sweep, FiLM on the layer
with a learnable offset in the ablation) and ``rss_affine`` itself, at K = 4 and 8, with the sweeps' draws, seeds and
budget: the held-out error of each method at its best rate *chosen on the held-out conditions* (an oracle that favours
no method) shows whether the edge survives a rate chosen for generalisation. Run after the sweeps and reported apart.
The rate 0.0003, below the sweeps' grid, was added after the first six had run, because the hypernetwork's held-out
optimum at K = 4 sat at the grid's lowest rate.

``hypernet8`` trains 8.6x ``rss_affine``'s parameters on the pendulum (9,912 against 1,156). The closest
hypernetwork in size, width 1 (``hypernet1``, 2,198 parameters), was run afterwards with the same seven rates into its
own workdir, beside ``rss_affine`` again (whose runs must come out as before):

    for lr in 0.0003 0.001 0.003 0.01 0.03 0.1 0.3; do
      python -m experiments.condition_count --config configs/condition_count_pendulum_lr_check.py \
          --workdir results/condition_count/pendulum_lr_check_width1/lr$lr --config.learning_rates="($lr,)" \
          --config.methods="('rss_affine','hypernet1')"
    done
    python -m experiments.condition_count --config configs/condition_count_pendulum_lr_check.py \
        --workdir results/condition_count/pendulum_lr_check_width1 --lr_report
"""

import ml_collections

from configs import condition_count_pendulum


def get_config() -> ml_collections.ConfigDict:
    config = condition_count_pendulum.get_config()
    config.methods = ("rss_affine", "hypernet8", "film_layer_affine0")
    config.references = ("rss_affine",)
    config.counts = (4, 8)
    config.methods_note = "a learning-rate diagnostic, run after the sweeps (one rate per run)"
    return config
