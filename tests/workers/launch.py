"""Start worker processes, watch them, and clean up: every process is killed on any failure or timeout."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = "tests.workers.train_worker"


class WorkerFailed(AssertionError):
    """A worker process died, failed, or did not finish in time; the message holds its stderr tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """One worker process in its own process group, with stdout/stderr in files under ``logdir``."""

    def __init__(self, name: str, args: Sequence[str], logdir: pathlib.Path):
        self.name = name
        self.stdout_path = logdir / f"{name}.out"
        self.stderr_path = logdir / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the worker sets its own
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", WORKER, *args], cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True
            )

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill(self) -> None:
        """SIGKILL this worker's process group (the worker and anything it started), then reap it."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = 25) -> str:
        text = self.stderr_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


def wait_all(workers: Sequence[Worker], timeout: float) -> None:
    """Wait for every worker to exit 0; on the first failure or at the timeout kill them all and raise."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            failed = [w for w in workers if w.poll() not in (None, 0)]
            if failed:  # every worker that failed by now (a peer's death can fail the others), then kill the rest
                report = "\n".join(
                    f"worker {w.name} {w.describe_exit()}; its stderr ends with:\n{w.stderr_tail()}" for w in failed
                )
                raise WorkerFailed(f"{report}\nThe other workers were killed.")
            if all(w.poll() == 0 for w in workers):
                return
            if time.monotonic() > deadline:
                running = [w.name for w in workers if w.poll() is None]
                tails = "\n".join(f"--- {w.name} stderr:\n{w.stderr_tail(10)}" for w in workers)
                raise WorkerFailed(f"workers {running} still running after {timeout:.0f} s; killed.\n{tails}")
            time.sleep(0.05)
    finally:
        for w in workers:
            w.kill()


def run_processes(
    num_processes: int, common_args: Sequence[str], logdir: pathlib.Path, *, timeout: float = 120, per_process=None
) -> list[Worker]:
    """Launch ``num_processes`` workers of one distributed run over loopback and wait for all of them."""
    logdir.mkdir(parents=True, exist_ok=True)
    args = list(common_args)
    if num_processes > 1:
        args += ["--num-processes", str(num_processes), "--coordinator", f"127.0.0.1:{free_port()}"]
    workers = []
    try:
        for i in range(num_processes):
            extra = list(per_process(i)) if per_process else []
            workers.append(Worker(f"process {i}", [*args, "--process-id", str(i), *extra], logdir))
    except BaseException:
        for w in workers:
            w.kill()
        raise
    wait_all(workers, timeout)
    return workers
