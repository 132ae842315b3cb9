"""rssbl_jax.training in one process: layouts give the same params, runs resume exactly, faults are caught.

The model, data and layouts are in tests/workers/common.py, shared with the subprocess tests.
"""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rssbl_jax import training
from tests.workers import common

# Restoring a deliberately damaged checkpoint can make tensorstore complete a read callback after orbax's asyncio
# loop has closed; the RuntimeError surfaces (at a GC-dependent moment, in whichever test of this file runs) as an
# "unraisable exception" raised inside orbax/tensorstore, not in rssbl_jax. It is not a test outcome here: every
# test asserts what was restored.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N = 20


@pytest.fixture(scope="module")
def reference():
    """20 steps on one device: what every other way of running must reproduce."""
    state, step, batch_fn = common.single_device_setup()
    return common.flat_params(training.train(state, step, batch_fn, N))


def report(name, diffs):
    abs_diff, rel, bitwise = diffs
    print(f"{name}: max|Δ| = {abs_diff:.3g}, max relative Δ = {rel:.3g}, bitwise = {bitwise}")


@pytest.mark.parametrize("layout", ["data", "model"])
def test_mesh_of_8_devices_matches_one_device(reference, layout):
    state, step, batch_fn, mesh = common.sharded_setup(layout)
    assert mesh.size == 8
    out = training.train(state, step, batch_fn, N)
    # The layout really is the one asked for: tensor-parallel factors follow their kernels.
    lora_b = out.trainable["hidden"]["lora_b"]
    if layout == "model":
        assert lora_b.sharding.spec == jax.sharding.PartitionSpec(None, "model")
        assert lora_b.addressable_shards[0].data.shape == (common.RANK, common.HIDDEN // 4)
        assert out.trainable["head"]["lora_a"].addressable_shards[0].data.shape == (common.HIDDEN // 4, common.RANK)
        assert out.opt_state[0].mu["hidden"]["lora_b"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    else:
        assert lora_b.sharding.is_fully_replicated
    got = common.flat_params(out)
    diffs = common.differences(got, reference)
    report(f"1 device vs 8-device mesh ({layout})", diffs)
    assert diffs[1] < 1e-5, diffs
    # and training did something: the adapters moved, the frozen base did not
    params0 = common.init_params(0)
    assert np.abs(got["hidden/lora_a"] - params0["hidden"]["lora_a"]).max() > 1e-2
    np.testing.assert_array_equal(got["hidden/kernel"], params0["hidden"]["kernel"])


def test_pmap_matches_one_device(reference):
    n = jax.local_device_count()
    tx = common.optimizer()
    state = training.init_train_state(common.init_params(0), tx, jax.random.key(0))
    step = jax.pmap(training.make_train_step(common.loss_fn(common.AdaptedMLP()), tx, axis_name="i"), axis_name="i")

    def batch_fn(i):
        return jax.tree.map(lambda v: v.reshape(n, common.BATCH // n, *v.shape[1:]), common.global_batch(i, 0))

    out = training.train(state, step, batch_fn, N, replicated=True)
    assert out.trainable["hidden"]["lora_a"].shape == (common.D_IN, common.RANK)  # unreplicated
    diffs = common.differences(common.flat_params(out), reference)
    report(f"1 device vs pmap over {n}", diffs)
    assert diffs[1] < 1e-5, diffs


def test_bfloat16_compute_float32_state(reference):
    state, step, batch_fn = common.single_device_setup(dtype=jnp.bfloat16)
    hlo = step.lower(state, batch_fn(0)).as_text()
    assert "bf16" in hlo  # the matmuls run in bfloat16
    losses = []
    out = training.train(state, step, batch_fn, N, log_every=1, hook=lambda m: losses.append(m["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((out.trainable, out.frozen, out.opt_state)) if leaf.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}  # params, moments: float32
    diffs = common.differences(common.flat_params(out), reference)
    report("float32 vs bfloat16 compute", diffs)
    assert diffs[0] < 0.15, diffs  # 20 Adam steps of lr 3e-2 move each weight by up to 0.6
    # The float32 run's losses, for comparison: the same curve within bfloat16's resolution.
    state, step, batch_fn = common.single_device_setup()
    losses32 = []
    training.train(state, step, batch_fn, N, log_every=1, hook=lambda m: losses32.append(m["loss"]))
    rel = np.abs(np.array(losses) - np.array(losses32)) / np.array(losses32)
    print(f"bfloat16 vs float32 loss curve: max relative Δ = {rel.max():.3g}")
    assert rel.max() < 0.05, rel


def test_resume_is_bitwise(tmp_path):
    state, step, batch_fn = common.single_device_setup()
    uninterrupted = common.flat_params(training.train(state, step, batch_fn, N))
    ckpt = str(tmp_path / "ckpt")
    first = training.train(state, step, batch_fn, 12, checkpoint_dir=ckpt, save_every=5)
    assert int(first.step) == 12
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [5, 10, 12]
    # A fresh start with the same command resumes from step 12 and finishes the run.
    seen = []
    resumed = training.train(
        state, step, batch_fn, N, checkpoint_dir=ckpt, save_every=5, log_every=1, hook=lambda m: seen.append(m["step"])
    )
    assert seen[0] == 13 and seen[-1] == N
    diffs = common.differences(common.flat_params(resumed), uninterrupted)
    report("interrupted (in-process) vs uninterrupted", diffs)
    assert diffs[2], diffs  # bitwise
    # Restoring the final checkpoint gives the final state, opt_state and step included.
    restored, at = training.restore_latest(ckpt, state)
    assert at == N and int(restored.step) == N
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)


def big_leaf_run():
    """A state with an 8 KiB adapter leaf: orbax stores arrays this size in plain data files that it reads
    back without a checksum, so a flipped bit there is restored silently unless the digest catches it."""
    tx = optax.sgd(0.1)
    params = {"layer": {"kernel": jnp.ones((256, 4)), "lora_a": jnp.linspace(0.0, 1.0, 2048).reshape(256, 8),
                        "lora_b": jnp.zeros((8, 4)), "lora_c": jnp.zeros((1, 8))}}  # fmt: skip
    state = training.init_train_state(params, tx, jax.random.key(0))
    step = jax.jit(training.make_train_step(lambda q, b, r: jnp.mean((q["layer"]["lora_a"] - b) ** 2), tx))
    return state, step, lambda i: jnp.full((256, 8), i / 10.0)


def _array_file(step_dir):
    return max((step_dir / "state").rglob("d/*"), key=lambda f: f.stat().st_size)


def _flip_bit(step_dir):
    f = _array_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _truncate(step_dir):
    for f in (step_dir / "state").rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{not json")


@pytest.mark.parametrize("damage", [_flip_bit, _truncate, _garble_meta], ids=["bitflip", "truncate", "meta"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, caplog, damage):
    state, step, batch_fn = big_leaf_run()
    ckpt = tmp_path / "ckpt"
    training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)
    damage(ckpt / "10")
    with caplog.at_level(logging.WARNING, logger="rssbl_jax.training"):
        restored, at = training.restore_latest(str(ckpt), state)
    assert at == 5 and int(restored.step) == 5
    skipped = [r.message for r in caplog.records if r.name == "rssbl_jax.training" and "skipping" in r.message]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipping checkpoint {ckpt}/10:"), skipped
    if damage is _flip_bit:  # orbax reads this flipped bit back without complaint; the digest catches it
        assert "does not match its SHA-256 digest" in skipped[0], skipped
    assert (ckpt / "10.corrupt").is_dir() and not (ckpt / "10").exists()
    # Training goes on from step 5 and saves step 10 again; the result is the uninterrupted one, bitwise.
    final = training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)
    expected = training.train(state, step, batch_fn, 10)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)
    assert training.restore_latest(str(ckpt), state)[1] == 10


def test_no_intact_checkpoint_is_an_error(tmp_path):
    state, step, batch_fn = big_leaf_run()
    ckpt = tmp_path / "ckpt"
    training.train(state, step, batch_fn, 5, checkpoint_dir=str(ckpt), save_every=5)
    _flip_bit(ckpt / "5")
    with pytest.raises(RuntimeError, match=r"no intact checkpoint.*step 5: .*SHA-256"):
        training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    state, step, batch_fn = common.single_device_setup()
    ckpt = str(tmp_path / "ckpt")
    training.train(state, step, batch_fn, 3, checkpoint_dir=ckpt, save_every=3)
    tx = common.optimizer()
    other = training.init_train_state(common.init_params(0, rank=2), tx, jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"'trainable/head/lora_a' is float32\(16, 4\) in the checkpoint but float32\(16, 2\)"
    ):
        training.restore_latest(ckpt, other)
    # A different optimizer (other state tree) is refused too, naming the path.
    sgd_state = training.init_train_state(common.init_params(0), optax.sgd(0.1), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'opt_state/0/count' is in the checkpoint but not here"):
        training.restore_latest(ckpt, sgd_state)
    assert sorted(os.listdir(ckpt)) == ["3"]  # nothing renamed or deleted


def test_nan_in_operating_params_stops_and_keeps_last_good_checkpoint(tmp_path):
    state, step, batch_fn = common.single_device_setup()
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(
        training.NonFiniteError, match=r"values in batch/p.* at step 7.*Last good checkpoint: step 5"
    ) as info:
        training.train(state, step, lambda i: batch_fn(i, nan_at=7), N, checkpoint_dir=ckpt, save_every=5)
    assert "batch/p" in info.value.names and info.value.step == 7 and info.value.last_checkpoint == 5
    assert "batch/x" not in info.value.names
    assert isinstance(info.value, FloatingPointError)
    restored, at = training.restore_latest(ckpt, state)
    assert at == 5 and all(np.isfinite(x).all() for x in jax.tree.leaves(restored.trainable))
    expected = training.train(state, step, batch_fn, 5)
    assert common.differences(common.flat_params(restored), common.flat_params(expected))[2]


def test_diverging_loss_stops_training(tmp_path):
    tx = optax.sgd(1e8)
    state = training.init_train_state(common.init_params(0), tx, jax.random.key(0))
    step = jax.jit(training.make_train_step(common.loss_fn(common.AdaptedMLP()), tx))
    with pytest.raises(training.NonFiniteError, match=r"non-finite values in .*loss at step") as info:
        training.train(state, step, common.global_batch, N, checkpoint_dir=str(tmp_path / "ckpt"), save_every=1)
    bad = info.value.step
    assert 0 < bad < N and info.value.last_checkpoint == bad
    restored, at = training.restore_latest(str(tmp_path / "ckpt"), state)
    assert at == bad and all(np.isfinite(x).all() for x in jax.tree.leaves(restored.trainable))


# --------------------------------------------------------------------------------------------------
# Metrics: a hook, an eval function and a TensorBoard writer, read every log_every steps
# --------------------------------------------------------------------------------------------------

N_ROWS, D_FEATURES, LR_SGD = 32, 3, 0.1
W_TRUE = np.array([0.5, -1.0, 2.0])


def regression_batch(step):
    """A fresh draw of a noisy linear regression per step, float32 (what the device sees)."""
    rng = np.random.default_rng([7, step])
    x = rng.standard_normal((N_ROWS, D_FEATURES)).astype(np.float32)
    y = (x @ W_TRUE + 0.1 * rng.standard_normal(N_ROWS)).astype(np.float32)
    return {"x": x, "y": y}


def regression_loss(params, batch, rng):
    del rng
    return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)


def regression_run():
    tx = optax.sgd(LR_SGD)
    state = training.init_train_state({"w": jnp.zeros(D_FEATURES)}, tx, jax.random.key(0), trainable={"w": True})
    return state, jax.jit(training.make_train_step(regression_loss, tx))


def regression_reference(num_steps):
    """Gradient descent in float64 numpy: per step t the loss and gradient norm at w_t, and w_{t+1}."""
    w, losses, norms, weights = np.zeros(D_FEATURES), [], [], []
    for t in range(num_steps):
        batch = regression_batch(t)
        x, y = batch["x"].astype(np.float64), batch["y"].astype(np.float64)
        residual = x @ w - y
        grad = 2.0 * x.T @ residual / N_ROWS
        losses.append(np.mean(residual**2))
        norms.append(np.linalg.norm(grad))
        w = w - LR_SGD * grad
        weights.append(w)
    return np.array(losses), np.array(norms), np.array(weights)


def held_out_mse(state):
    batch = regression_batch(10_000)
    return {"mse": regression_loss(state.trainable, batch, None), "w0": state.trainable["w"][0]}


def test_hook_gets_each_logged_steps_metrics_and_eval_at_its_steps():
    losses, norms, weights = regression_reference(10)
    state, step = regression_run()
    logged = []
    final = training.train(
        state, step, regression_batch, 10, log_every=3, hook=logged.append, eval_fn=held_out_mse, eval_every=4
    )
    # Logged every 3 steps and at the end; evaluated every 4 steps and at the end (those steps are logged too).
    assert [m["step"] for m in logged] == [3, 4, 6, 8, 9, 10]
    assert [m["step"] for m in logged if "eval/mse" in m] == [4, 8, 10]
    for m in logged:
        assert isinstance(m["loss"], float) and isinstance(m["grad_norm"], float)
        t = m["step"] - 1  # the step's loss and gradient are those of the state before its update
        np.testing.assert_allclose(m["loss"], losses[t], rtol=1e-5)
        np.testing.assert_allclose(m["grad_norm"], norms[t], rtol=1e-5)
        if "eval/mse" in m:  # eval_fn sees the state after the step
            held = regression_batch(10_000)
            x, y = held["x"].astype(np.float64), held["y"].astype(np.float64)
            np.testing.assert_allclose(m["eval/mse"], np.mean((x @ weights[t] - y) ** 2), rtol=1e-5)
            np.testing.assert_allclose(m["eval/w0"], weights[t][0], rtol=1e-5)
        assert set(m) <= {"step", "loss", "grad_norm", "eval/mse", "eval/w0"}
    np.testing.assert_allclose(final.trainable["w"], weights[-1], rtol=1e-5)
    assert losses[-1] < 0.2 * losses[0]  # and it did learn


class Spy:
    """A value the loop got from a step; records how many batches had been asked for when the host reads it."""

    def __init__(self, value, reads, requested):
        self.value, self._reads, self._requested = value, reads, requested

    def _read(self):
        self._reads.append(len(self._requested))
        return np.asarray(self.value)

    def __array__(self, dtype=None, copy=None):
        return self._read() if dtype is None else self._read().astype(dtype)

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())


def test_steps_between_log_steps_do_not_wait_for_the_device():
    """Every state and metric leaf a step returns is wrapped, so any host read of them (the device sync that
    the hook must avoid between log steps) is recorded with the step count at which it happened."""
    state, step = regression_run()
    requested, reads = [], []

    def batch_fn(i):
        requested.append(i)
        return regression_batch(i)

    def spy_step(state, batch):
        new, metrics = step(jax.tree.map(lambda x: x.value if isinstance(x, Spy) else x, state), batch)
        return jax.tree.map(lambda x: Spy(x, reads, requested), (new, metrics))

    def run(**kwargs):
        requested.clear(), reads.clear()
        final = training.train(state, spy_step, batch_fn, 20, **kwargs)
        assert int(final.step.value) == 20
        return sorted(set(reads))

    calls = []
    assert run(log_every=8, hook=calls.append) == [8, 16, 20]  # read only at the log steps
    assert [m["step"] for m in calls] == [8, 16, 20]
    assert len(reads) <= 8 + 8 + 4 + 3 * 2  # the window's `applied` flags + the logged step's loss and grad_norm
    assert run() == [20]  # no hook: the finite checks are read once, at the end (log_every=100)
    # The deprecated on_step reads the loss after every step: the spy sees it (this test can fail).
    with pytest.warns(DeprecationWarning, match="on_step"):
        assert run(on_step=lambda i, loss: None) == list(range(1, 21))


def read_events(logdir):
    """(tag, step, value) of every scalar in the TensorBoard event files under ``logdir``.

    Event files are TFRecord files: per record a little-endian uint64 length, its CRC (4 bytes), the
    serialised ``Event`` proto, and its CRC (4 bytes).
    """
    import struct

    from tensorboardX.proto import event_pb2

    found = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                found.append((value.tag, event.step, value.simple_value))
    return found


def test_tensorboard_writer_writes_the_logged_scalars(tmp_path):
    from rssbl_jax.writers import TensorBoardWriter

    losses, norms, weights = regression_reference(12)
    state, step = regression_run()
    logged = []
    with TensorBoardWriter(tmp_path / "tb") as writer:
        training.train(
            state, step, regression_batch, 12, log_every=5, hook=logged.append, writer=writer, eval_fn=held_out_mse
        )
    events = read_events(tmp_path / "tb")
    steps = {tag: [s for t, s, _ in events if t == tag] for tag in ("loss", "grad_norm", "eval/mse", "eval/w0")}
    assert steps == {tag: [5, 10, 12] for tag in steps}, steps
    assert {t for t, _, _ in events} == set(steps)
    for tag, at, value in events:
        expected = next(m for m in logged if m["step"] == at)[tag]
        np.testing.assert_allclose(value, expected, rtol=1e-6)  # TensorBoard stores float32
        if tag == "loss":
            np.testing.assert_allclose(value, losses[at - 1], rtol=1e-5)


def test_a_nan_between_log_steps_is_still_named_with_its_step():
    """Reads every 100 steps: the step that failed is found afterwards, and nothing after it is reported."""
    state, step, batch_fn = common.single_device_setup()
    logged = []
    with pytest.raises(training.NonFiniteError, match=r"values in batch/p.* at step 7\b") as info:
        training.train(state, step, lambda i: batch_fn(i, nan_at=7), N, log_every=100, hook=logged.append)
    assert info.value.step == 7 and info.value.last_checkpoint is None and logged == []


def test_metric_arguments_are_checked():
    state, step = regression_run()
    with pytest.raises(ValueError, match="log_every must be >= 1; got 0"):
        training.train(state, step, regression_batch, 2, log_every=0)
    with pytest.raises(ValueError, match="eval_every must be >= 1; got -1"):
        training.train(state, step, regression_batch, 2, eval_fn=held_out_mse, eval_every=-1, hook=print)
    with pytest.raises(ValueError, match="eval_every=5 needs an eval_fn"):
        training.train(state, step, regression_batch, 2, eval_every=5, hook=print)
    with pytest.raises(ValueError, match="eval_fn's metrics are reported through hook or writer"):
        training.train(state, step, regression_batch, 2, eval_fn=held_out_mse)
