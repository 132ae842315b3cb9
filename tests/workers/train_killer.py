"""A training run that SIGKILLs itself while writing its step-10 checkpoint (tests/test_faults_training.py).

    python -m tests.workers.train_killer CHECKPOINT_DIR --kill-at {meta,async}

``meta``: inside orbax, while step 10's metadata item is being written (its arrays already scheduled).
``async``: right after ``save(10)`` returned, while orbax's background thread commits it.
"""

from __future__ import annotations

import argparse
import os
import signal

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import orbax.checkpoint as ocp  # noqa: E402

from rssbl_jax import training  # noqa: E402
from tests.workers.train_setup import small_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("--kill-at", choices=["meta", "async"], required=True)
    args = parser.parse_args()
    state, step, batch_fn = small_run()
    calls = []
    if args.kill_at == "meta":
        original = ocp.JsonCheckpointHandler.async_save

        async def json_save(self, *a, **kw):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint's metadata: step 10
                os.kill(os.getpid(), signal.SIGKILL)
            return await original(self, *a, **kw)

        ocp.JsonCheckpointHandler.async_save = json_save

    def hook(metrics: dict) -> None:
        if args.kill_at == "async" and metrics["step"] == 11:
            os.kill(os.getpid(), signal.SIGKILL)

    training.train(state, step, batch_fn, 20, checkpoint_dir=args.checkpoint_dir, save_every=5, log_every=1, hook=hook)


if __name__ == "__main__":
    main()
