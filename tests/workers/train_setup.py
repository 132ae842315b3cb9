"""The small training run of the fault tests, shared with their worker processes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rssbl_jax import training


def small_run(tx=None):
    """An 8 KiB adapter leaf (a plain orbax data file) and Adam: moments, count and rng in the checkpoint too."""
    tx = tx or optax.adam(0.05)
    params = {"layer": {"kernel": jnp.ones((256, 4)), "lora_a": jnp.linspace(0.0, 1.0, 2048).reshape(256, 8)}}
    state = training.init_train_state(params, tx, jax.random.key(0))
    step = jax.jit(training.make_train_step(lambda q, b, r: jnp.mean((q["layer"]["lora_a"] - b) ** 2), tx))
    return state, step, lambda i: jnp.full((256, 8), i / 10.0)
