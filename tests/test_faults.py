"""Fault injection for adapter checkpoints: kill -9 mid-save and mid-overwrite, damaged bytes in every file,
two concurrent writers, a full disk.

Writers that get killed or raced run as real subprocesses (tests/workers/adapter_writer.py), which SIGKILL or
pause themselves at named stages of ``rssbl_jax.checkpoint``'s write (``on_stage`` of its private ``_write``).
Every fault must end in one of two ways: the whole old or the whole new checkpoint at the path, or a clear error
naming the path (and the leaf, for damaged bytes). Never a silently different value.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rssbl_jax import checkpoint
from rssbl_jax.checkpoint import load_adapter_config, load_adapters, save_adapters
from tests.workers.adapter_writer import CONFIG, adapter_params

# A deliberately damaged checkpoint can make tensorstore complete a read callback after orbax's asyncio loop has
# closed; it surfaces as an unraisable exception inside orbax/tensorstore (see tests/test_training.py).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def collect_garbage():
    """Collect orbax's abandoned coroutines inside the test (where the filter above applies), not at exit."""
    yield
    gc.collect()


ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD, NEW = 1, 2  # the seeds of the old and the new checkpoint's values


def start_writer(logdir: pathlib.Path, name: str, path, seed: int, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    out = open(logdir / f"{name}.out", "wb")
    err = open(logdir / f"{name}.err", "wb")
    with out, err:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.workers.adapter_writer", str(path), "--seed", str(seed), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, logdir: pathlib.Path, name: str, timeout: float = 120) -> tuple[int, list]:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = (logdir / f"{name}.out").read_text().splitlines()
    return proc.returncode, [json.loads(line) for line in lines if line.startswith("{")]


def run_writer(logdir, name, path, seed, *args) -> tuple[int, list]:
    return finish(start_writer(logdir, name, path, seed, *args), logdir, name)


def holds(path, seed: int) -> bool:
    """Whether ``path`` loads, verified, to exactly the adapters drawn from ``seed``."""
    expected = adapter_params(seed)
    restored, _ = load_adapters(path, adapter_params(99), CONFIG)
    return all(
        np.array_equal(restored["layer"][name], expected["layer"][name]) for name in restored["layer"] if "lora" in name
    )


def leftovers(path) -> list[str]:
    path = pathlib.Path(path)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# --------------------------------------------------------------------------------------------------
# kill -9 during a save and during an overwrite
# --------------------------------------------------------------------------------------------------

FAST_KILLS = {"arrays", "swapped"}


def _kill_params(stages):
    return [pytest.param(s, marks=() if s in FAST_KILLS else pytest.mark.slow) for s in stages]


@pytest.mark.parametrize("stage", _kill_params(["arrays", "staged", "verified"]))
def test_kill_during_first_save_leaves_no_checkpoint_and_the_retry_succeeds(tmp_path, stage):
    path = tmp_path / "adapters"
    code, _ = run_writer(tmp_path, "victim", path, NEW, "--kill-at", stage)
    assert code == -signal.SIGKILL, f"the writer was not killed at {stage!r}"
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint"):
        load_adapters(path, adapter_params(99))
    save_adapters(path, adapter_params(NEW), CONFIG)  # no force needed; nothing stale blocks it
    assert holds(path, NEW) and leftovers(path) == []


@pytest.mark.parametrize("stage", _kill_params(["locked", "arrays", "staged", "verified", "swapped"]))
def test_kill_during_overwrite_leaves_the_old_or_the_new_checkpoint(tmp_path, stage):
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    code, _ = run_writer(tmp_path, "victim", path, NEW, "--force", "--kill-at", stage)
    assert code == -signal.SIGKILL, f"the writer was not killed at {stage!r}"
    expected = NEW if stage == "swapped" else OLD
    assert holds(path, expected), (
        f"killed at {stage!r}: the path does not hold the {'new' if expected == NEW else 'old'}"
    )
    # The next overwrite is not blocked by the dead writer's lock or leftovers, and removes them.
    save_adapters(path, adapter_params(3), CONFIG, force=True)
    assert holds(path, 3) and leftovers(path) == []


@pytest.mark.slow
def test_kill_between_the_two_renames_without_rename_exchange_is_recovered(tmp_path):
    """Where the file system has no RENAME_EXCHANGE the swap is two renames; a kill between them leaves the old
    checkpoint beside the path, the error says where, and the next write puts it back before anything else."""
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    code, _ = run_writer(tmp_path, "victim", path, NEW, "--force", "--no-exchange", "--kill-at", "swapped")
    assert code == -signal.SIGKILL
    with pytest.raises(FileNotFoundError, match=r"previous checkpoint at .*\.adapters\.old"):
        load_adapters(path, adapter_params(99))
    with pytest.raises(ValueError, match="already exists"):  # the old one is back first, so no force: refused
        save_adapters(path, adapter_params(NEW), CONFIG)
    assert holds(path, OLD) and leftovers(path) == []


def test_force_refuses_to_replace_a_directory_that_is_not_an_adapter_checkpoint(tmp_path):
    path = tmp_path / "results"
    path.mkdir()
    (path / "notes.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="refusing to overwrite .*not an rssbl_jax adapter checkpoint"):
        save_adapters(path, adapter_params(NEW), CONFIG, force=True)
    assert (path / "notes.txt").read_text() == "a user's file"
    # A training checkpoint is not an adapter checkpoint either.
    other = tmp_path / "orbax"
    with ocp.StandardCheckpointer() as writer:
        writer.save(other, {"w": np.ones(3)})
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_adapters(other, adapter_params(NEW), CONFIG, force=True)


# --------------------------------------------------------------------------------------------------
# Damaged bytes: every file of an adapter checkpoint, flipped and truncated
# --------------------------------------------------------------------------------------------------


def _flip(f: pathlib.Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def _truncate(f: pathlib.Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _kind(relative: str) -> str:
    """A file's kind: its path with orbax's content hashes replaced by ``*``."""
    parts = relative.split("/")
    return "/".join("*" if len(p) == 32 and all(c in "0123456789abcdef" for c in p) else p for p in parts)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine") / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    return path


@pytest.mark.parametrize("damage", [_flip, _truncate], ids=["bitflip", "truncate"])
def test_damaged_bytes_in_any_file_raise_or_load_exactly(pristine, tmp_path, damage):
    config = load_adapter_config(pristine)
    files = sorted(str(f.relative_to(pristine)) for f in pristine.rglob("*") if f.is_file() and f.stat().st_size)
    outcomes = {}
    for relative in files:
        copy = tmp_path / relative.replace("/", "_")
        shutil.copytree(pristine, copy)
        damage(copy / relative)
        try:
            same = holds(copy, OLD) and load_adapter_config(copy) == config
        except checkpoint.CheckpointCorruptError as error:
            assert str(copy) in str(error), error
            outcomes[relative] = "raised: " + str(error).split(" is damaged: ")[1][:70]
            continue
        assert same, f"{damage.__name__} in {relative} loaded different values without an error"
        outcomes[relative] = "loaded exactly (file not read for values)"
    print("\n".join(f"{damage.__name__} {_kind(k)}: {v}" for k, v in outcomes.items()))
    # The config and the file holding lora_a's values (the largest data file) are always read: damage there is
    # always an error. (Some of orbax's files are not read at all by a restore; damage there changes nothing.)
    assert outcomes["config/metadata"].startswith("raised"), outcomes["config/metadata"]
    values = max((f for f in files if "/d/" in f"/{f}"), key=lambda f: (pristine / f).stat().st_size)
    assert outcomes[values].startswith("raised"), (values, outcomes[values])


def test_a_flipped_bit_in_the_array_data_names_the_leaf(tmp_path):
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    data = max((path / "adapters").rglob("d/*"), key=lambda f: f.stat().st_size)  # lora_a, 8 KiB
    _flip(data)
    with pytest.raises(checkpoint.CheckpointCorruptError, match=rf"{path}.* leaf 'layer/lora_a' does not match"):
        load_adapters(path, adapter_params(99))


def test_a_changed_value_in_the_config_is_caught(tmp_path):
    """A flip that still parses (lora_alpha 4.0 -> 5.0) would scale every update silently."""
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    meta = path / "config" / "metadata"
    text = meta.read_text()
    assert '"lora_alpha": 4.0' in text
    meta.write_text(text.replace('"lora_alpha": 4.0', '"lora_alpha": 5.0', 1))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="config does not match its SHA-256"):
        load_adapter_config(path)


def _relabel(path: pathlib.Path, version, *, digest: bool) -> None:
    """Rewrite the stored config's format version; with ``digest``, as a writer of that version would (its digest
    recomputed), without it as damage would."""
    meta = path / "config" / "metadata"
    config = json.loads(meta.read_text())
    config["version"] = version
    if digest:
        config["sha256"] = checkpoint.json_sha256(config)
    meta.write_text(json.dumps(config))


def test_a_relabelled_version_is_damage_whatever_version_it_claims(tmp_path):
    """The config digest is checked for every version: it covers the version field, so a version-3 checkpoint
    relabelled as version 1 (which had no digests) is caught, not loaded with its digests skipped."""
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    for version in (1, 2):
        _relabel(path, version, digest=False)
        with pytest.raises(checkpoint.CheckpointCorruptError, match="config does not match its SHA-256"):
            load_adapters(path, adapter_params(99), CONFIG)
    _relabel(path, checkpoint.VERSION + 1, digest=False)  # a newer label is refused as newer (before the digest)
    with pytest.raises(ValueError, match="newer than this rssbl_jax's"):
        load_adapters(path, adapter_params(99), CONFIG)
    _relabel(path, checkpoint.VERSION, digest=False)
    assert holds(path, OLD)  # the original label restores the original digest


@pytest.mark.parametrize("version", [1, 2, checkpoint.VERSION + 1, "3"])
def test_a_checkpoint_of_another_format_version_is_refused_naming_both(tmp_path, version):
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    _relabel(path, version, digest=True)  # as written by that version, digests intact
    if isinstance(version, str):
        pattern = "format version '3', not a number"
    elif version > checkpoint.VERSION:
        pattern = rf"format version {version}, newer than this rssbl_jax's \(version {checkpoint.VERSION}\)"
    else:
        pattern = (
            rf"format version {version}, written before the AdapterConfig was stored \(version {checkpoint.VERSION}\)"
        )
    for load in (load_adapter_config, lambda p: load_adapters(p, adapter_params(99), CONFIG)):
        with pytest.raises(ValueError, match=pattern):
            load(path)


# --------------------------------------------------------------------------------------------------
# Two writers
# --------------------------------------------------------------------------------------------------


def test_a_held_lock_fails_a_second_writer_at_once_and_a_dead_ones_lock_file_does_not(tmp_path):
    import fcntl  # POSIX only, like the lock itself

    path = tmp_path / "adapters"
    lock_file = tmp_path / ".adapters.lock"
    with open(lock_file, "w") as held:
        held.write("pid 12345 on elsewhere")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(checkpoint.CheckpointBusyError, match=r"another writer .*pid 12345 on elsewhere"):
            save_adapters(path, adapter_params(NEW), CONFIG)
        assert time.monotonic() - start < 2.0
    assert not path.exists()
    # The holder is gone (its lock released with its file descriptor); its file is left: not a stale lock.
    assert lock_file.exists()
    save_adapters(path, adapter_params(NEW), CONFIG)
    assert holds(path, NEW) and not lock_file.exists()


def test_two_writers_one_wins_whole_the_other_fails_fast(tmp_path):
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    ready, release = tmp_path / "ready", tmp_path / "release"
    first = start_writer(
        tmp_path, "first", path, NEW, "--force", "--pause-at", "arrays", "--ready-file", str(ready),
        "--release-file", str(release),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert first.poll() is None, (tmp_path / "first.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "the first writer never reached the middle of its write"
            time.sleep(0.05)
        code, events = run_writer(tmp_path, "second", path, 3, "--force")
        assert code == 0 and [e["event"] for e in events] == ["busy"], events
        assert events[0]["seconds"] < 2.0, events  # failed at once, not after a wait
        assert str(path) in events[0]["message"]
        assert holds(path, OLD)  # while the first one writes, readers see the old checkpoint
    finally:
        release.touch()
    code, events = finish(first, tmp_path, "first")
    assert code == 0 and [e["event"] for e in events] == ["saved"], events
    assert holds(path, NEW) and leftovers(path) == []


@pytest.mark.slow
def test_two_writers_racing_in_a_loop_never_mix(tmp_path):
    path = tmp_path / "adapters"
    save_adapters(path, adapter_params(OLD), CONFIG)
    writers = [start_writer(tmp_path, f"w{seed}", path, seed, "--force", "--repeat", "15") for seed in (NEW, 3)]
    results = [finish(w, tmp_path, f"w{seed}") for w, seed in zip(writers, (NEW, 3), strict=True)]
    for code, events in results:
        assert code == 0 and {e["event"] for e in events} <= {"saved", "busy"}, events
        assert (
            max(e["seconds"] for e in events if e["event"] == "busy") < 2.0
            if any(e["event"] == "busy" for e in events)
            else True
        )
    print({seed: [e["event"] for e in ev] for seed, (_, ev) in zip((NEW, 3), results, strict=True)})
    assert holds(path, NEW) or holds(path, 3)
    assert leftovers(path) == []


# --------------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(directory: pathlib.Path, size: str = "512k"):
    """A tmpfs of ``size`` at ``directory``, or ``None`` where this machine does not allow mounting one."""
    directory.mkdir()
    mounted = (
        shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield directory if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], check=True)


def _fill(directory: pathlib.Path, leave: int) -> None:
    """Fill the file system of ``directory`` up to ``leave`` free bytes."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    with open(directory / "filler", "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(free - leave, 0))


def test_a_full_disk_keeps_the_old_checkpoint_and_fails_clearly(tmp_path, monkeypatch):
    with small_disk(tmp_path / "disk") as disk:
        if disk is None:  # no tmpfs here: simulate the write failing with ENOSPC inside orbax

            async def no_space(self, *args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")

            disk = tmp_path / "disk"
            path = disk / "adapters"
            save_adapters(path, adapter_params(OLD), CONFIG)
            monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", no_space)
        else:
            path = disk / "adapters"
            save_adapters(path, adapter_params(OLD), CONFIG)
            _fill(disk, leave=4096)
        with pytest.raises(Exception) as info:  # orbax/tensorstore wrap the OSError in several ways
            save_adapters(path, adapter_params(NEW), CONFIG, force=True)
        print(f"full disk: {type(info.value).__name__}: {str(info.value)[:200]}")
        assert "space" in str(info.value).lower() or "ENOSPC" in str(info.value) or isinstance(info.value, OSError)
        assert holds(path, OLD)  # the partial new copy may be left beside it; the next write removes it
        monkeypatch.undo()
        (disk / "filler").unlink(missing_ok=True)
        save_adapters(path, adapter_params(NEW), CONFIG, force=True)  # space again: it works
        assert holds(path, NEW) and leftovers(path) == []


def test_jax_arrays_round_trip(tmp_path):
    """Leaves given as jax arrays (the usual case) are digested as the bytes orbax stores."""
    params = jax.tree.map(jax.numpy.asarray, adapter_params(NEW))
    save_adapters(tmp_path / "adapters", params, CONFIG)
    assert holds(tmp_path / "adapters", NEW)


def test_the_write_reports_its_stages_in_order(tmp_path):
    """The stage hook is an argument of the write: each stage once, in order; a swap only over an old checkpoint."""
    path, stages = tmp_path / "adapters", []
    checkpoint._write(*checkpoint._prepare(path, adapter_params(OLD), CONFIG), force=False, on_stage=stages.append)
    assert stages == ["locked", "staged", "verified", "done"] and holds(path, OLD)
    stages.clear()
    checkpoint._write(*checkpoint._prepare(path, adapter_params(NEW), CONFIG), force=True, on_stage=stages.append)
    assert stages == ["locked", "staged", "verified", "swapped", "done"] and holds(path, NEW)
    stages.clear()
    save_adapters(path, adapter_params(OLD), CONFIG, force=True)  # no hook: nothing reported
    assert stages == [] and holds(path, OLD)
