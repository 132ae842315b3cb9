"""A training process the tests launch: one of N processes of JAX's distributed runtime, or a lone one.

    python -m tests.workers.train_worker --out params.npz --steps 20 [--local-devices 2] \\
        [--num-processes 2 --process-id 0 --coordinator 127.0.0.1:PORT] [--checkpoint-dir DIR --save-every 5]

Runs rssbl_jax.training.train on tests/workers/common.py's model over a mesh of all global devices
(data-parallel, or data x model with --layout model) and writes the final params from process 0 as .npz.
On CPU the processes talk through gloo collectives over loopback: the same multi-controller model as a TPU pod.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where process 0 writes the final params (.npz)")
    parser.add_argument("--steps", type=int, required=True, help="total steps of the run")
    parser.add_argument("--local-devices", type=int, default=1, help="forced CPU devices of this process")
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--coordinator", default=None, help="host:port of process 0 (several processes)")
    parser.add_argument("--layout", choices=("data", "model"), default="data")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--save-every", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--die-at-step", type=int, default=None, help="exit with code 17 after this step")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # Before jax is imported: this process's CPU devices.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
    import jax

    jax.config.update("jax_numpy_rank_promotion", "raise")
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    import numpy as np

    from rssbl_jax import training
    from tests.workers import common

    state, step, batch_fn, mesh = common.sharded_setup(args.layout, jax.devices())
    first_step = []

    def on_step(i: int, loss: float) -> None:
        if not first_step:
            first_step.append(i)
            print(json.dumps({"event": "first_step", "step": i}), flush=True)
        if args.die_at_step is not None and i == args.die_at_step:
            print(f"worker {args.process_id}: dying at step {i} as asked", file=sys.stderr, flush=True)
            os._exit(17)
        if args.sleep:
            time.sleep(args.sleep)

    final = training.train(
        state,
        step,
        batch_fn,
        args.steps,
        checkpoint_dir=args.checkpoint_dir,
        save_every=args.save_every,
        on_step=on_step,
    )
    params = common.flat_params(final)  # a collective: every process takes part
    info = {
        "event": "done",
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "step": args.steps,
    }
    if jax.process_index() == 0:
        tmp = args.out + ".tmp.npz"
        np.savez(tmp, **params)
        os.replace(tmp, args.out)
    print(json.dumps(info), flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
