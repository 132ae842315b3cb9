"""Config of the end-to-end demo: adapt a frozen network to operating conditions it never saw.

Launch (from the repository root):

    python -m experiments.demo --config configs/demo.py
    python -m experiments.demo --config configs/demo.py --config.seed=3 --config.adapt_steps=3000
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Teacher: a random two-layer network whose first layer has a planted conditional rank-k update
    # W1 + U diag(G p) V and a conditional bias (H p) V; p = 0 is the nominal condition.
    config.d_in = 8
    config.hidden = 64
    config.d_out = 4
    config.d_p = 2
    config.teacher_rank = 4
    config.teacher_strength = 1.0  # size of the planted update relative to W1
    # Data: conditions on a grid in [-1, 1]^d_p for training, random held-out ones inside the range,
    # and extrapolation at radius 1.5-2.
    config.train_grid = 4  # 4 x 4 = 16 training conditions
    config.points_per_condition = 128
    config.n_test_conditions = 32
    # Student: the frozen base is the nominal network (p = 0); adapters on both layers.
    config.rank = 4
    config.lora_alpha = 8.0
    config.adapt_steps = 1500
    config.adapt_lr = 3e-3
    # Training curves (loss, gradient norm, held-out error) every log_every steps, as TensorBoard event files in
    # <tensorboard_dir>/rss and <tensorboard_dir>/lora; "" writes none.
    config.log_every = 50
    config.tensorboard_dir = "runs/demo/tensorboard"
    return config
