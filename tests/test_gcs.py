"""Checkpoints on ``gs://`` paths, against a real GCS JSON API: ``gcp-storage-emulator``, in memory, on a free
loopback port of this machine.

gcsfs (which ``etils.epath`` uses for ``gs://``) finds the emulator through ``STORAGE_EMULATOR_HOST``;
tensorstore (orbax's array store) through ``TENSORSTORE_GCS_HTTP_URL`` and ``GOOGLE_AUTH_TOKEN_FOR_TESTING``.
Adapter checkpoints are saved, overwritten, loaded, damaged and refused; a training run on ``gs://`` is killed
mid-save and resumes to the same bits as an uninterrupted run.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid

import gcsfs
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from gcp_storage_emulator.server import create_server

from rssbl_jax import checkpoint, training
from rssbl_jax.checkpoint import load_adapter_config, load_adapters, save_adapters
from tests.test_faults import ROOT, holds
from tests.test_faults_training import leaves_equal
from tests.workers.adapter_writer import CONFIG, adapter_params
from tests.workers.train_setup import small_run

# See tests/test_training.py: tensorstore's late callback after reading a damaged checkpoint.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

BUCKET = "rssbl-checkpoints"


def _forget_filesystems() -> None:
    """Drop cached gcsfs clients, so the next ``gs://`` access reads the emulator's address from the environment."""
    gcsfs.GCSFileSystem.clear_instance_cache()
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()


@pytest.fixture(scope="module")
def gcs():
    """A GCS emulator holding one empty bucket, and the environment that points gcsfs and tensorstore at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    quiet = logging.getLogger("gcp_storage_emulator")
    level, quiet.level = quiet.level, logging.CRITICAL  # it logs every 404 that an existence check causes
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)
        env.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        _forget_filesystems()
        try:
            yield f"gs://{BUCKET}"
        finally:
            server.stop()
            _forget_filesystems()
            quiet.setLevel(level)


@pytest.fixture(autouse=True)
def collect_garbage():
    """Collect orbax's abandoned coroutines inside the test (where the filter above applies), not at exit."""
    yield
    gc.collect()


@pytest.fixture
def prefix(gcs):
    """A fresh ``gs://`` folder for one test."""
    return f"{gcs}/{uuid.uuid4().hex[:12]}"


def files(path: epath.Path) -> list[epath.Path]:
    """Every object under ``path`` (epath refuses ``**`` on GCS, so this walks the folders itself)."""
    out = []
    for child in path.iterdir():
        out.extend(files(child) if child.is_dir() else [child])
    return sorted(out)


def test_save_overwrite_and_load_on_gcs(prefix, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the old failure made a local folder ./gs:/bucket/... here
    path = f"{prefix}/run1/adapters"
    save_adapters(path, adapter_params(1), CONFIG)
    assert holds(path, 1) and load_adapter_config(path) == CONFIG
    names = {str(f).removeprefix(path + "/") for f in files(epath.Path(path))}
    assert {"commit_success.txt", "config/metadata"} <= names, names  # orbax's commit, on the bucket
    with pytest.raises(ValueError, match="already exists"):
        save_adapters(path, adapter_params(2), CONFIG)
    assert holds(path, 1)
    save_adapters(path, adapter_params(2), CONFIG, force=True)
    assert holds(path, 2) and not holds(path, 1)
    assert list(tmp_path.iterdir()) == [], "a gs:// path was written to the local disk"
    # A plain orbax directory on the bucket is not replaced by force.
    with ocp.StandardCheckpointer() as writer:
        writer.save(epath.Path(f"{prefix}/orbax"), {"w": np.ones(3)})
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_adapters(f"{prefix}/orbax", adapter_params(2), CONFIG, force=True)


def test_damage_on_gcs_is_refused(prefix):
    path = epath.Path(f"{prefix}/adapters")
    save_adapters(path, adapter_params(1), CONFIG)
    data = max((f for f in files(path / "adapters") if f.parent.name == "d"), key=lambda f: len(f.read_bytes()))
    pristine = data.read_bytes()
    flipped = bytearray(pristine)
    flipped[len(flipped) // 2] ^= 0x01
    data.write_bytes(bytes(flipped))
    with pytest.raises(checkpoint.CheckpointCorruptError, match=rf"{path}.* leaf 'layer/lora_a' does not match"):
        load_adapters(path, adapter_params(99), CONFIG)
    data.write_bytes(pristine)
    assert holds(path, 1)
    meta = path / "config" / "metadata"
    meta.write_text(meta.read_text().replace('"lora_alpha": 4.0', '"lora_alpha": 5.0', 1))
    with pytest.raises(checkpoint.CheckpointCorruptError, match="config does not match its SHA-256"):
        load_adapter_config(path)


def test_an_uncommitted_write_on_gcs_is_refused_and_then_replaced(prefix, monkeypatch):
    """Orbax writes in place on gs:// and commits last: a write that dies before the commit loads as nothing."""
    path = f"{prefix}/adapters"

    async def crash(self, *args, **kwargs):  # every file is written; the process dies before the commit object
        raise RuntimeError("simulated crash before the commit")

    with monkeypatch.context() as patch:
        patch.setattr(ocp.path.atomicity.CommitFileTemporaryPath, "finalize", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_adapters(path, adapter_params(1), CONFIG)
    assert (epath.Path(path) / "config" / "metadata").exists()
    assert not (epath.Path(path) / "commit_success.txt").exists()
    with pytest.raises(FileNotFoundError, match="no adapter checkpoint.*uncommitted copy"):
        load_adapters(path, adapter_params(99), CONFIG)
    save_adapters(path, adapter_params(2), CONFIG)  # not a checkpoint, so no force needed to replace it
    assert holds(path, 2)


@pytest.mark.slow
def test_training_on_gcs_killed_while_saving_resumes_bitwise(prefix):
    ckpt = f"{prefix}/train"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.workers.train_killer", ckpt, "--kill-at", "meta"],
        cwd=ROOT, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state, step, batch_fn = small_run()
    restored, at = training.restore_latest(ckpt, state)
    assert at == 5, sorted(p.name for p in epath.Path(ckpt).iterdir())
    reference = training.train(state, step, batch_fn, 20)
    assert leaves_equal(restored, training.train(state, step, batch_fn, 5))
    final = training.train(state, step, batch_fn, 20, checkpoint_dir=ckpt, save_every=5)
    assert leaves_equal(final, reference)
    assert {p.name for p in epath.Path(ckpt).iterdir()} == {"10", "15", "20"}
    # A damaged step on the bucket is set aside (renamed through gcsfs) and the previous one restored.
    data = max((f for f in files(epath.Path(ckpt) / "20") if f.parent.name == "d"), key=lambda f: len(f.read_bytes()))
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    data.write_bytes(bytes(flipped))
    restored, at = training.restore_latest(ckpt, state)
    assert at == 15 and leaves_equal(restored, training.train(state, step, batch_fn, 15))
    assert {p.name for p in epath.Path(ckpt).iterdir()} == {"10", "15", "20.corrupt"}
