"""Fault injection for training checkpoints and the loop: damaged bytes in every file, a changed optimizer,
non-finite state, a too-small ``num_steps``, a full disk, and clipping placed outside ``freeze_base``.

Every fault must end in one of two ways: a checkpoint restored bit for bit (the damaged one set aside as
``<step>.corrupt`` when it is really damaged), or an error that names what is wrong. Never wrong numbers.
"""

from __future__ import annotations

import errno
import gc
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from rssbl_jax import training
from rssbl_jax.partition import freeze_base
from tests.test_faults import ROOT, _fill, _flip, _kind, _truncate, small_disk
from tests.workers.train_setup import small_run

# See tests/test_training.py: tensorstore's late callback after reading a damaged checkpoint.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def collect_garbage():
    """Collect orbax's abandoned coroutines inside the test (where the filter above applies), not at exit."""
    yield
    gc.collect()


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


# --------------------------------------------------------------------------------------------------
# kill -9 while a checkpoint is written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["meta", pytest.param("async", marks=pytest.mark.slow)])
def test_kill_while_saving_resumes_from_an_intact_step_and_ends_bitwise(tmp_path, stage):
    ckpt = tmp_path / "ckpt"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.workers.train_killer", str(ckpt), "--kill-at", stage],
        cwd=ROOT, env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state, step, batch_fn = small_run()
    restored, at = training.restore_latest(str(ckpt), state)
    print(f"killed at {stage!r}: on disk {sorted(os.listdir(ckpt))}, restored step {at}")
    assert at in (5, 10) and not any(name.endswith(".corrupt") for name in os.listdir(ckpt))
    assert leaves_equal(restored, training.train(state, step, batch_fn, at))
    final = training.train(state, step, batch_fn, 20, checkpoint_dir=str(ckpt), save_every=5)
    assert leaves_equal(final, training.train(state, step, batch_fn, 20))


# --------------------------------------------------------------------------------------------------
# Damaged bytes in every file of a training checkpoint
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    state, step, batch_fn = small_run()
    ckpt = tmp_path_factory.mktemp("train") / "ckpt"
    training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)
    intact = {at: training.restore_latest(str(ckpt), state)[0] for at in (10,)}
    shutil.copytree(ckpt, ckpt.parent / "only5")
    shutil.rmtree(ckpt.parent / "only5" / "10")
    intact[5] = training.restore_latest(str(ckpt.parent / "only5"), state)[0]
    return state, ckpt, intact


@pytest.mark.parametrize(
    "damage", [_flip, pytest.param(_truncate, marks=pytest.mark.slow)], ids=["bitflip", "truncate"]
)
def test_damaged_bytes_in_any_file_fall_back_or_restore_exactly(two_checkpoints, tmp_path, damage):
    state, pristine, intact = two_checkpoints
    step_dir = pristine / "10"
    files = sorted(str(f.relative_to(step_dir)) for f in step_dir.rglob("*") if f.is_file() and f.stat().st_size)
    outcomes = {}
    for relative in files:
        ckpt = tmp_path / relative.replace("/", "_")
        shutil.copytree(pristine, ckpt)
        damage(ckpt / "10" / relative)
        restored, at = training.restore_latest(str(ckpt), state)  # never raises: step 5 is intact
        assert at in (5, 10), at
        assert leaves_equal(restored, intact[at]), f"{damage.__name__} in {relative}: step {at} restored wrong values"
        if at == 5:
            assert (ckpt / "10.corrupt").is_dir() and not (ckpt / "10").exists()
            outcomes[relative] = "fell back to step 5; step 10 renamed 10.corrupt"
        else:
            assert sorted(os.listdir(ckpt)) == ["10", "5"]
            outcomes[relative] = "restored step 10 exactly (file not read for values)"
    print("\n".join(f"{damage.__name__} {_kind(k)}: {v}" for k, v in outcomes.items()))
    assert outcomes["meta/metadata"].startswith("fell back")
    values = max((f for f in files if "/d/" in f"/{f}"), key=lambda f: (step_dir / f).stat().st_size)
    assert outcomes[values].startswith("fell back"), (values, outcomes[values])


def test_a_changed_number_in_the_metadata_is_damage_not_a_mismatch(two_checkpoints, tmp_path):
    """A flip that still parses (a shape 256 -> 257) must set the checkpoint aside, not blame the caller."""
    state, pristine, intact = two_checkpoints
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpt)
    meta = ckpt / "10" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace("[256, 8]", "[257, 8]", 1))
    restored, at = training.restore_latest(str(ckpt), state)
    assert at == 5 and leaves_equal(restored, intact[5]) and (ckpt / "10.corrupt").is_dir()


# --------------------------------------------------------------------------------------------------
# The caller's mismatch is an error, never corruption
# --------------------------------------------------------------------------------------------------


def test_resume_with_another_optimizer_is_an_error_that_quarantines_nothing(tmp_path):
    state, step, batch_fn = small_run(optax.adam(0.05))
    ckpt = tmp_path / "ckpt"
    training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)
    other, other_step, _ = small_run(optax.adamw(0.05))  # the same leaves as adam's state, in another tree
    for _ in range(2):  # and a rerun does not silently start over
        with pytest.raises(
            ValueError,
            match=r"optimizer state's tree has another structure \(was the optimizer changed.*"
            r"In the checkpoint: tuple\(ScaleByAdamState\(\*, \{\.\.\.\}, \{\.\.\.\}\), EmptyState\(\)\); "
            r"here: tuple\(ScaleByAdamState\(\*, \{\.\.\.\}, \{\.\.\.\}\), EmptyState\(\), EmptyState\(\)\)",
        ):
            training.train(other, other_step, batch_fn, 15, checkpoint_dir=str(ckpt), save_every=5)
    assert sorted(os.listdir(ckpt)) == ["10", "5"]
    restored, at = training.restore_latest(str(ckpt), state)  # the right optimizer still resumes
    assert at == 10 and int(restored.step) == 10


def test_num_steps_below_the_restored_step_raises(tmp_path):
    state, step, batch_fn = small_run()
    ckpt = str(tmp_path / "ckpt")
    training.train(state, step, batch_fn, 10, checkpoint_dir=ckpt, save_every=5)
    with pytest.raises(ValueError, match=r"num_steps=7 is below step 10 of the checkpoint restored from .*ckpt"):
        training.train(state, step, batch_fn, 7, checkpoint_dir=ckpt, save_every=5)
    assert int(training.train(state, step, batch_fn, 10, checkpoint_dir=ckpt).step) == 10  # equal: nothing to do


# --------------------------------------------------------------------------------------------------
# Non-finite state is never saved
# --------------------------------------------------------------------------------------------------


def test_nan_params_from_finite_gradients_are_never_saved(tmp_path):
    """Adam with eps=0 turns a zero gradient into 0/0 = NaN while the loss and gradients stay finite."""
    tx = optax.adam(0.1, eps=0.0)
    # one adapter layer (lora_a, lora_b, lora_c); the loss does not depend on lora_s
    params = {"lora_a": jnp.ones(2), "lora_b": jnp.ones(2), "lora_c": jnp.ones(2), "lora_s": jnp.ones(2)}
    state = training.init_train_state(params, tx, jax.random.key(0))
    step = jax.jit(training.make_train_step(lambda q, b, r: jnp.sum((q["lora_b"] - b) ** 2), tx))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(
        training.NonFiniteError, match=r"values in params/.*lora_s at step 0.*Last good checkpoint: none"
    ):
        training.train(state, step, lambda i: jnp.zeros(2), 5, checkpoint_dir=str(ckpt), save_every=1)
    assert training.restore_latest(str(ckpt), state)[1] is None  # nothing was saved


def test_a_state_holding_nan_is_refused_at_save_time(tmp_path):
    """A custom step without the finite checks: the save itself refuses, naming the step and the leaves."""
    tx = optax.sgd(0.1)
    state = training.init_train_state(
        {"lora_a": jnp.ones(2), "lora_b": jnp.ones(2), "lora_c": jnp.ones(2), "kernel": jnp.ones(2)},
        tx,
        jax.random.key(0),
    )

    def careless_step(s, batch):
        trainable = {**s.trainable, "lora_b": s.trainable["lora_b"] * batch}
        return s._replace(step=s.step + 1, trainable=trainable), {"loss": jnp.zeros(()), "finite": {}}

    ckpt = tmp_path / "ckpt"
    with pytest.raises(training.NonFiniteError, match=r"refusing to save the state of step 4: .*params/lora_b") as info:
        training.train(state, careless_step, lambda i: jnp.nan if i == 3 else 1.0, 6, checkpoint_dir=str(ckpt),
                       save_every=2)  # fmt: skip
    assert info.value.step == 4 and info.value.names == ("params/lora_b",) and info.value.last_checkpoint == 2
    restored, at = training.restore_latest(str(ckpt), state)
    assert at == 2 and np.all(np.isfinite(restored.trainable["lora_b"]))


# --------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------


def test_a_full_disk_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    state, step, batch_fn = small_run()
    with small_disk(tmp_path / "disk", size="1m") as disk:
        ckpt = (disk or tmp_path / "disk") / "ckpt"
        training.train(state, step, batch_fn, 5, checkpoint_dir=str(ckpt), save_every=5)
        if disk is None:  # no tmpfs here: the next write fails with ENOSPC inside orbax

            async def no_space(self, *args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")

            monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", no_space)
        else:
            _fill(disk, leave=4096)
        with pytest.raises(Exception) as info:
            training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)
        print(f"full disk while training: {type(info.value).__name__}: {str(info.value)[:200]}")
        assert "space" in str(info.value).lower() or isinstance(info.value, OSError)
        monkeypatch.undo()
        pathlib.Path(ckpt.parent / "filler").unlink(missing_ok=True)
        restored, at = training.restore_latest(str(ckpt), state)
        assert at == 5 and int(restored.step) == 5
        final = training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)
        assert leaves_equal(final, training.train(state, step, batch_fn, 10))


# --------------------------------------------------------------------------------------------------
# Gradient clipping and freeze_base
# --------------------------------------------------------------------------------------------------


def test_clipping_through_freeze_base_ignores_the_frozen_gradients():
    params = {"kernel": jnp.ones((64, 64)), "lora_a": jnp.ones(4), "lora_b": jnp.ones(4), "lora_c": jnp.ones(4)}
    grads = {"kernel": jnp.full((64, 64), 5.0), "lora_a": jnp.zeros(4), "lora_b": jnp.array([3.0, 4.0, 0.0, 0.0]),
             "lora_c": jnp.zeros(4)}  # fmt: skip  # |g_A| = 5
    tx = freeze_base(optax.adam(1e-2), clip_global_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    inside = freeze_base(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)))
    expected, _ = inside.update(grads, inside.init(params), params)
    np.testing.assert_array_equal(updates["lora_b"], expected["lora_b"])
    np.testing.assert_array_equal(updates["kernel"], 0.0)
    sgd = freeze_base(optax.sgd(1.0), clip_global_norm=1.0)
    np.testing.assert_allclose(sgd.update(grads, sgd.init(params), params)[0]["lora_b"], [-0.6, -0.8, 0, 0], rtol=1e-6)
    with pytest.raises(ValueError, match="clip_global_norm must be a positive number"):
        freeze_base(optax.sgd(1.0), clip_global_norm=0.0)


def test_a_newer_training_format_is_refused_not_set_aside(tmp_path):
    """A step written by a newer release stops the resume with an error naming both formats; nothing is renamed,
    and no older step is silently resumed from."""
    import json

    state, step, batch_fn = small_run()
    ckpt = tmp_path / "ckpt"
    training.train(state, step, batch_fn, 10, checkpoint_dir=str(ckpt), save_every=5)
    files = [p for p in (ckpt / "10" / "meta").rglob("*") if p.is_file()]
    metas = [p for p in files if b'"rssbl_jax.training/1"' in p.read_bytes()]
    assert len(metas) == 1, sorted(str(p) for p in (ckpt / "10").rglob("*"))
    document = json.loads(metas[0].read_text())
    document["format"] = "rssbl_jax.training/2"
    metas[0].write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"'rssbl_jax.training/2', not this rssbl_jax's 'rssbl_jax.training/1'"):
        training.restore_latest(str(ckpt), state)
    assert sorted(os.listdir(ckpt)) == ["10", "5"]
