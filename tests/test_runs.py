"""rssbl_jax.runs: many runs in one vmapped step give what the runs give one by one.

Runs differ in adapter initialisation (seed), learning rate (``optax.inject_hyperparams``), rng key (the loss is
noisy through it) and data; the frozen base is shared (one copy) or one per run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rssbl_jax
from rssbl_jax import runs, training
from tests.workers import common

STEPS = 12
LRS = (1e-2, 3e-2, 1e-1)
adamw = optax.inject_hyperparams(optax.adamw)


def noisy_loss(params, batch, rng):
    """The MLP's MSE with per-example weights drawn from ``rng``: a run's key changes its gradients."""
    out = common.AdaptedMLP().apply({"params": params}, batch["x"], batch["p"])
    weights = 1.0 + 0.5 * jax.random.uniform(rng, (common.BATCH, 1))
    return jnp.mean(weights * (out - batch["y"]) ** 2)


def run_states(share_frozen=True):
    """Run i: adapters of seed i, learning rate LRS[i], key i; the base of seed 0 (or of seed i)."""
    states = []
    for i, lr in enumerate(LRS):
        params = common.init_params(i)
        if share_frozen:
            params = {layer: {**params[layer], **{k: base for k, base in common.init_params(0)[layer].items()
                                                   if k in ("kernel", "bias")}} for layer in params}  # fmt: skip
        states.append(training.init_train_state(params, adamw(learning_rate=lr, weight_decay=1e-2), jax.random.key(i)))
    if share_frozen:  # the same base arrays in every run
        states = [s._replace(frozen=states[0].frozen) for s in states]
    return states


def batches(step):
    """Run i draws its own data: ``common.global_batch(step, seed=i)``, stacked on a leading run axis."""
    draws = [common.global_batch(step, seed=i) for i in range(len(LRS))]
    return jax.tree.map(lambda *xs: np.stack(xs), *draws)


def one_by_one(states, optimizer=adamw):
    finals, losses = [], []
    for i, state in enumerate(states):
        step = jax.jit(training.make_train_step(noisy_loss, optimizer(learning_rate=LRS[i], weight_decay=1e-2)))
        logged = []
        finals.append(
            training.train(
                state, step, lambda t, i=i: common.global_batch(t, seed=i), STEPS, log_every=1, hook=logged.append
            )
        )
        losses.append([m["loss"] for m in logged])
    return finals, np.array(losses).T  # [steps, runs]


def assert_states_close(got, expected):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("share_frozen", [True, False], ids=["shared_base", "base_per_run"])
def test_train_many_equals_the_runs_one_by_one(share_frozen):
    states = run_states(share_frozen)
    expected, expected_losses = one_by_one(states)
    step = training.make_train_step(noisy_loss, adamw(learning_rate=LRS[0], weight_decay=1e-2))
    logged, written = [], []

    class RecordingWriter:  # clu's MetricWriter interface, as train calls it
        def write_scalars(self, at, scalars):
            written.append((at, dict(scalars)))

    finals = runs.train_many(
        states, step, batches, STEPS, share_frozen=share_frozen, log_every=1, hook=logged.append,
        writer=RecordingWriter(),
    )  # fmt: skip
    assert len(finals) == len(LRS)
    for got, want in zip(finals, expected, strict=True):
        assert_states_close(got, want)
        assert int(got.step) == STEPS
    losses = np.stack([m["loss"] for m in logged])  # each hook value is an array over the runs
    assert losses.shape == (STEPS, len(LRS))
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
    # The writer gets one scalar per run: loss/0, loss/1, loss/2 (and grad_norm/<run>).
    assert [at for at, _ in written] == list(range(1, STEPS + 1))
    assert set(written[0][1]) == {f"{name}/{i}" for name in ("loss", "grad_norm") for i in range(len(LRS))}
    np.testing.assert_allclose([[w[f"loss/{i}"] for i in range(len(LRS))] for _, w in written], losses, rtol=1e-7)
    # The runs really differ (seed, lr, key, data), and the largest learning rate moved the adapters most.
    moved = [float(jnp.abs(f.trainable["hidden"]["lora_a"] - s.trainable["hidden"]["lora_a"]).max())
             for f, s in zip(finals, states, strict=True)]  # fmt: skip
    assert moved[0] < moved[1] < moved[2], moved
    if share_frozen:  # one base for every run, not a copy per run
        assert finals[0].frozen["hidden"]["kernel"] is finals[2].frozen["hidden"]["kernel"]


def test_the_stack_keeps_one_base_and_per_run_hyperparameters():
    states = run_states()
    stacked = runs.stack_runs(states)
    assert stacked.frozen["hidden"]["kernel"].shape == (common.D_IN, common.HIDDEN)
    assert stacked.trainable["hidden"]["lora_a"].shape == (len(LRS), common.D_IN, common.RANK)
    np.testing.assert_allclose(stacked.opt_state.hyperparams["learning_rate"], LRS, rtol=1e-6)
    back = runs.unstack_runs(stacked)
    for got, want in zip(back, states, strict=True):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)


def test_stacking_refuses_runs_that_do_not_fit():
    states = run_states(share_frozen=False)
    with pytest.raises(ValueError, match=r"run 1's frozen 'head/bias' differs from run 0's.*share_frozen=False"):
        runs.stack_runs(states)
    other = training.init_train_state(common.init_params(0), optax.sgd(0.1), jax.random.key(0))
    with pytest.raises(ValueError, match=r"run 1's opt_state has another tree than run 0's"):
        runs.stack_runs([states[0], other], share_frozen=False)
    with pytest.raises(ValueError, match="at least one run"):
        runs.stack_runs([])
    with pytest.raises(ValueError, match="replicated"):
        runs.train_many(states, lambda s, b: (s, {}), batches, 1, share_frozen=False, replicated=True)


def test_a_nan_in_one_run_names_that_run():
    states = run_states()
    step = training.make_train_step(noisy_loss, adamw(learning_rate=LRS[0], weight_decay=1e-2))

    def poisoned(t):
        batch = batches(t)
        if t == 3:
            batch["p"][1, 0, 0] = np.nan
        return batch

    with pytest.raises(training.NonFiniteError, match=r"values in batch/p.* \(runs 1\) at step 3") as info:
        runs.train_many(states, step, poisoned, STEPS, log_every=5)
    assert info.value.step == 3 and "batch/p" in info.value.names


def test_many_runs_resume_from_their_checkpoint(tmp_path):
    states = run_states()
    step = training.make_train_step(noisy_loss, adamw(learning_rate=LRS[0], weight_decay=1e-2))
    uninterrupted = runs.train_many(states, step, batches, STEPS)
    ckpt = str(tmp_path / "ckpt")
    runs.train_many(states, step, batches, 7, checkpoint_dir=ckpt, save_every=5)
    resumed = runs.train_many(states, step, batches, STEPS, checkpoint_dir=ckpt, save_every=5)
    for got, want in zip(resumed, uninterrupted, strict=True):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)  # bitwise: the same program from the same state


def test_unchecked_step_scanned_and_vmapped_matches_the_checked_step_and_lets_a_nan_through():
    """``check_finite=False``: the same update as the checked step on finite data, pure enough for a
    ``jax.lax.scan`` of a ``jax.vmap`` over runs; a NaN batch is applied (the run shows it) instead of skipped."""
    tx = optax.adam(3e-2)
    states = [training.init_train_state(common.init_params(i), tx, jax.random.key(i)) for i in range(2)]
    batches = [jax.tree.map(jnp.asarray, common.global_batch(step)) for step in range(STEPS)]
    checked = jax.jit(training.make_train_step(noisy_loss, tx))
    want = []
    for state in states:
        for b in batches:
            state, _ = checked(state, b)
        want.append(state)
    unchecked = training.make_train_step(noisy_loss, tx, check_finite=False)
    stacked = runs.stack_runs(states, share_frozen=False)
    xs = jax.tree.map(lambda *a: jnp.stack(a), *batches)
    axes = runs._axes(share_frozen=False)

    def scan(state):
        return jax.lax.scan(lambda s, b: (lambda out: (out[0], out[1]["loss"]))(unchecked(s, b)), state, xs)

    got, losses = jax.jit(jax.vmap(scan, in_axes=(axes,)))(stacked)
    assert losses.shape == (2, STEPS) and bool(jnp.all(jnp.isfinite(losses)))
    for i, state in enumerate(runs.unstack_runs(got, share_frozen=False)):
        assert int(state.step) == STEPS
        for a, b in zip(jax.tree.leaves(state.trainable), jax.tree.leaves(want[i].trainable), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    bad = dict(batches[0], y=batches[0]["y"].at[0, 0].set(jnp.nan))
    after, metrics = jax.jit(unchecked)(states[0], bad)
    assert int(after.step) == 1 and metrics["finite"] == {} and bool(metrics["applied"])
    assert not bool(jnp.isfinite(metrics["loss"]))
    assert not all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(after.trainable))


def test_runs_started_and_scanned_inside_jit_equal_the_runs_one_by_one():
    """init_runs + a lax.scan of vmap_train_step, all in one jit, with each run's learning rate in its batch."""
    states = [s._replace(opt_state=optax.adamw(1.0).init(s.trainable)) for s in run_states()]
    expected, expected_losses = one_by_one(states, optax.adamw)
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[rssbl_jax.combine(s.trainable, s.frozen) for s in states])
    keys = jnp.stack([jax.random.key(i) for i in range(len(LRS))])

    def one_step(state, inputs):  # the run's optimizer is built with the learning rate its batch carries
        lr, batch = inputs
        return training.make_train_step(noisy_loss, optax.adamw(lr, weight_decay=1e-2))(state, batch)

    @jax.jit
    def start_and_train(params, keys, lrs, data):
        start = runs.init_runs(params, optax.adamw(1.0, weight_decay=1e-2), keys)
        step = runs.vmap_train_step(one_step, batch_axis=(0, 0))
        final, metrics = jax.lax.scan(lambda s, batch: step(s, (lrs, batch)), start, data)
        return start, final, metrics["loss"]

    data = jax.tree.map(lambda *xs: np.stack(xs), *[batches(t) for t in range(STEPS)])  # [steps, runs, ...]
    start, final, losses = start_and_train(params, keys, jnp.asarray(LRS), data)
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(runs.stack_runs(states)), strict=True):
        np.testing.assert_array_equal(a, b)  # the traced start is the host-stacked one, base included once
    assert start.frozen["hidden"]["kernel"].shape == (common.D_IN, common.HIDDEN)
    for got, want in zip(runs.unstack_runs(final), expected, strict=True):
        assert_states_close(got, want)
        assert int(got.step) == STEPS
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)


def test_init_runs_checks_a_shared_base_when_it_can():
    states = run_states(share_frozen=False)  # every run has its own base
    params = jax.tree.map(lambda *xs: jnp.stack(xs), *[rssbl_jax.combine(s.trainable, s.frozen) for s in states])
    keys = jax.random.split(jax.random.key(0), len(LRS))
    with pytest.raises(ValueError, match=r"run 1's frozen 'head/bias' differs from run 0's.*share_frozen=False"):
        runs.init_runs(params, optax.sgd(0.1), keys)
    own = runs.init_runs(params, optax.sgd(0.1), keys, share_frozen=False)
    np.testing.assert_array_equal(own.frozen["hidden"]["kernel"][2], states[2].frozen["hidden"]["kernel"])
