"""A process that saves an adapter checkpoint, for the fault-injection tests (tests/test_faults.py).

    python -m tests.workers.adapter_writer PATH --seed 1 [--force] [--kill-at STAGE] [--pause-at STAGE]
        [--ready-file F --release-file G] [--repeat N] [--no-exchange]

``--kill-at`` SIGKILLs this process at a stage of ``rssbl_jax.checkpoint``'s write (the stages its private
``_write`` reports to ``on_stage``, plus ``arrays``: inside orbax, after the arrays were scheduled and before the
config is written).
``--pause-at`` creates ``--ready-file`` at that stage and waits until ``--release-file`` exists. Each save
prints one JSON line: ``{"event": "saved" | "busy" | "error", "seconds": ..., "message": ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from rssbl_jax import checkpoint, localdisk  # noqa: E402
from rssbl_jax.config import AdapterConfig  # noqa: E402

ALPHA = 4.0
CONFIG = AdapterConfig(rank=8, lora_alpha=ALPHA)


def adapter_params(seed: int) -> dict:
    """Adapters of one layer, every value drawn from ``seed`` (8 KiB ``lora_a``: a plain orbax data file)."""
    rng = np.random.default_rng(seed)
    shapes = {"kernel": (256, 8), "lora_a": (256, 8), "lora_b": (8, 8), "lora_c": (3, 8), "lora_s": (3, 8)}
    return {"layer": {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--kill-at")
    parser.add_argument("--pause-at")
    parser.add_argument("--ready-file")
    parser.add_argument("--release-file")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-exchange", action="store_true")
    args = parser.parse_args()

    def hook(stage: str) -> None:
        if stage == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if stage == args.pause_at:
            pathlib.Path(args.ready_file).touch()
            deadline = time.monotonic() + 120
            while not os.path.exists(args.release_file) and time.monotonic() < deadline:
                time.sleep(0.01)

    if args.kill_at == "arrays" or args.pause_at == "arrays":
        original = ocp.JsonCheckpointHandler.async_save

        async def json_save(self, *a, **kw):  # orbax has scheduled the arrays; the config is next
            hook("arrays")
            return await original(self, *a, **kw)

        ocp.JsonCheckpointHandler.async_save = json_save
    if args.no_exchange:
        localdisk.exchange = lambda a, b: False

    params = adapter_params(args.seed)
    for _ in range(args.repeat):
        start = time.monotonic()
        try:
            # save_adapters, with the stage hook given to the write itself
            checkpoint._write(*checkpoint._prepare(args.path, params, CONFIG), force=args.force, on_stage=hook)
            event = {"event": "saved"}
        except getattr(checkpoint, "CheckpointBusyError", ()) as error:
            event = {"event": "busy", "message": str(error)}
        except Exception as error:
            event = {"event": "error", "message": f"{type(error).__name__}: {error}"}
        event["seconds"] = time.monotonic() - start
        print(json.dumps(event), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
