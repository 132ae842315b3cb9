"""Real processes: 2 processes of JAX's distributed runtime over loopback, a dying process, a SIGKILLed run.

Each test launches ``python -m tests.workers.train_worker`` subprocesses (tests/workers/launch.py), which set
their own ``XLA_FLAGS`` and, for several processes, call ``jax.distributed.initialize`` with gloo CPU
collectives on 127.0.0.1. Every process a test starts is killed (its whole process group) when the test ends.
"""

import json
import os
import time

import numpy as np
import pytest

from rssbl_jax import training
from tests.workers import common, launch

STEPS = 20


def load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def events(worker):
    return [json.loads(line) for line in worker.stdout().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def one_device():
    """The 1-device, in-process run every multi-process run is compared with."""
    state, step, batch_fn = common.single_device_setup()
    return common.flat_params(training.train(state, step, batch_fn, STEPS))


def report(name, diffs):
    print(f"{name}: max|Δ| = {diffs[0]:.3g}, max relative Δ = {diffs[1]:.3g}, bitwise = {diffs[2]}")


def test_two_processes_match_one_process(tmp_path, one_device):
    """2 processes x 2 devices (one 4-device global mesh, checkpoints written by both) vs 1 process x 4 devices."""
    ckpt = str(tmp_path / "ckpt")
    two, one = str(tmp_path / "two.npz"), str(tmp_path / "one.npz")
    args = ["--steps", str(STEPS), "--local-devices", "2", "--checkpoint-dir", ckpt, "--save-every", "5", "--out", two]
    workers = launch.run_processes(2, args, tmp_path / "logs_2", timeout=120)
    done = [e for w in workers for e in events(w) if e["event"] == "done"]
    assert [(e["process"], e["processes"], e["devices"]) for e in done] == [(0, 2, 4), (1, 2, 4)]
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [10, 15, 20]
    launch.run_processes(1, ["--steps", str(STEPS), "--local-devices", "4", "--out", one], tmp_path / "logs_1")

    got = load(two)
    diffs = common.differences(got, load(one))
    report("2 processes vs 1 process, same 4-device mesh", diffs)
    assert diffs[1] < 1e-5, diffs
    diffs = common.differences(got, one_device)
    report("2 processes vs 1 device", diffs)
    assert diffs[1] < 1e-5, diffs
    assert np.abs(got["hidden/lora_a"] - common.init_params(0)["hidden"]["lora_a"]).max() > 1e-2  # it trained


@pytest.mark.slow
def test_two_processes_resume_from_their_checkpoint(tmp_path, one_device):
    """Both processes stop at step 10; the same command with 20 steps resumes both from the step-10 checkpoint."""
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "two.npz")
    args = ["--steps", "10", "--local-devices", "2", "--checkpoint-dir", ckpt, "--save-every", "5", "--out", out]
    launch.run_processes(2, args, tmp_path / "logs_a", timeout=120)
    args[1] = str(STEPS)
    second = launch.run_processes(2, args, tmp_path / "logs_b", timeout=120)
    assert [e["step"] for w in second for e in events(w) if e["event"] == "first_step"] == [11, 11]
    diffs = common.differences(load(out), one_device)
    report("2 processes, stopped at 10 and resumed, vs 1 device", diffs)
    assert diffs[1] < 1e-5, diffs
    # and the same 2-process run without the stop: bitwise equal
    uninterrupted = str(tmp_path / "uninterrupted.npz")
    plain = ["--steps", str(STEPS), "--local-devices", "2", "--out", uninterrupted]
    launch.run_processes(2, plain, tmp_path / "logs_c")
    diffs = common.differences(load(out), load(uninterrupted))
    report("2 processes, stopped at 10 and resumed, vs uninterrupted", diffs)
    assert diffs[2], diffs


def test_a_dying_process_fails_the_run_clearly(tmp_path):
    args = ["--steps", str(STEPS), "--local-devices", "1", "--out", str(tmp_path / "x.npz")]
    started = time.monotonic()
    with pytest.raises(launch.WorkerFailed, match=r"worker process 1 exited with code 17") as info:
        launch.run_processes(2, args, tmp_path / "logs", timeout=120, per_process=lambda i: ["--die-at-step", "3"] * i)
    assert "worker 1: dying at step 3 as asked" in str(info.value)  # its stderr tail is in the message
    assert time.monotonic() - started < 60  # detected at once, not at a timeout
    assert not (tmp_path / "x.npz").exists()


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_matches_uninterrupted_run(tmp_path):
    ckpt = tmp_path / "ckpt"
    reference = str(tmp_path / "reference.npz")
    launch.run_processes(1, ["--steps", "24", "--out", reference], tmp_path / "logs_ref")

    resumed = str(tmp_path / "resumed.npz")
    args = ["--steps", "24", "--out", resumed, "--checkpoint-dir", str(ckpt), "--save-every", "4", "--sleep", "0.1"]
    victim = launch.Worker("victim", args, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (ckpt.is_dir() and any(d.isdigit() and int(d) >= 8 for d in os.listdir(ckpt))):
            assert victim.poll() is None, f"the worker ended before it was killed:\n{victim.stderr_tail()}"
            assert time.monotonic() < deadline, f"no checkpoint after 60 s:\n{victim.stderr_tail()}"
            time.sleep(0.02)
        assert victim.poll() is None
    finally:
        victim.kill()  # SIGKILL to the process group
    assert victim.proc.returncode == -9
    saved = sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())
    assert saved and max(saved) < 24 and not os.path.exists(resumed), saved

    restarted = launch.run_processes(1, args, tmp_path / "logs_restart")
    first = [e["step"] for e in events(restarted[0]) if e["event"] == "first_step"]
    assert first[0] > 8, first  # resumed, did not start over
    diffs = common.differences(load(resumed), load(reference))
    print(
        f"SIGKILLed at step ~{max(saved)} and restarted vs uninterrupted: max|Δ| = {diffs[0]:.3g}, bitwise = {diffs[2]}"
    )
    assert diffs[2], diffs  # bitwise on CPU: same program, same inputs, restored bits
