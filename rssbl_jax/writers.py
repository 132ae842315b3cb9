"""Training metrics as TensorBoard event files, through tensorboardX, behind clu's metric-writer interface.

clu's own writers need TensorFlow or PyTorch; this one needs only ``tensorboardX`` (pure Python, in the ``plot``
extra: ``pip install 'rssbl_jax[plot]'``), imported when a writer is made, so the core install does not need it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


class TensorBoardWriter:
    """Scalars to TensorBoard event files in ``logdir`` (``tensorboard --logdir <logdir>`` shows them).

    The ``writer`` of :func:`rssbl_jax.train`: has clu ``MetricWriter``'s ``write_scalars``, ``flush`` and ``close``,
    and closes on leaving a ``with`` block.

    Args:
      logdir: the event files' directory (created if missing); one per run (``runs/demo/rss``, ``runs/demo/lora``)
        shows one curve per run.

    >>> import glob, tempfile
    >>> with TensorBoardWriter(logdir := tempfile.mkdtemp()) as writer:
    ...     writer.write_scalars(10, {"loss": 0.5, "eval/mse": 0.25})
    >>> len(glob.glob(f"{logdir}/events.out.tfevents.*"))
    1
    """

    def __init__(self, logdir: str | os.PathLike[str]):
        try:
            import tensorboardX
        except ImportError as error:  # an optional dependency
            raise ImportError(
                "TensorBoardWriter needs tensorboardX: pip install 'rssbl_jax[plot]' (or tensorboardX)."
            ) from error
        self.logdir = os.fspath(logdir)
        self._writer = tensorboardX.SummaryWriter(logdir=self.logdir, flush_secs=60)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write each ``{tag: value}`` at ``step`` (values: Python or NumPy scalars, 0-d arrays)."""
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def flush(self) -> None:
        """Write what is buffered to disk."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
