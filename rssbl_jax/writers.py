"""Training metrics as TensorBoard event files, through tensorboardX, behind clu's metric-writer interface.

:func:`rssbl_jax.train` writes through any object with clu's ``write_scalars(step, scalars)``. clu's own
writers need TensorFlow (its ``SummaryWriter``) or PyTorch; this one needs only ``tensorboardX`` (pure Python,
installed with the ``plot`` extra: ``pip install 'rssbl_jax[plot]'``), which is imported when a writer is made,
so the core install does not need it.

>>> import tempfile, jax, jax.numpy as jnp, optax
>>> from rssbl_jax import init_train_state, make_train_step, train
>>> params = {"lora_a": jnp.ones(1), "lora_c": jnp.ones(1), "lora_b": jnp.ones(2)}
>>> state = init_train_state(params, optax.sgd(0.1), jax.random.key(0))
>>> step = jax.jit(make_train_step(lambda params, batch, rng: jnp.sum(params["lora_b"] ** 2), optax.sgd(0.1)))
>>> with TensorBoardWriter(tempfile.mkdtemp()) as writer:   # then: tensorboard --logdir <that directory>
...     final = train(state, step, lambda i: None, 20, log_every=5, writer=writer)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


class TensorBoardWriter:
    """Scalars to TensorBoard event files in ``logdir`` (``tensorboard --logdir <logdir>`` shows them).

    The methods are those of clu's ``MetricWriter`` that :func:`rssbl_jax.train` uses: ``write_scalars``,
    ``flush`` and ``close``; it is also a context manager that closes on exit.

    Args:
      logdir: the directory of the event files (created if missing); one directory per run, e.g.
        ``runs/demo/rss`` and ``runs/demo/lora``, shows as one curve per run.

    >>> import glob, tempfile
    >>> logdir = tempfile.mkdtemp()
    >>> with TensorBoardWriter(logdir) as writer:
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
