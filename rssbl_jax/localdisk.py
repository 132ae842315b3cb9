"""Replace a directory on local disk so that a crash at any point leaves the whole old or the whole new one.

Used by :mod:`rssbl_jax.checkpoint` on local paths (remote ones rely on orbax's commit). Writing ``dir/name``
holds an exclusive, non-blocking ``fcntl.flock`` on ``.name.lock`` for the whole write (POSIX only; per host, so
on a network file system as good as its locks): a second writer fails at once with :class:`CheckpointBusyError`,
and as the kernel releases the lock when its holder exits, even by ``kill -9``, the next writer simply takes a
leftover lock file. The new directory is written completely to ``.name.new``, verified by the caller, fsynced,
then swapped with the old one (deleted) by one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere by two
renames through ``.name.old``, and a kill between them leaves the old one there for the next write to put back.
The next write also removes a killed or failed writer's partial copies (orbax's threads may still write into them,
so they are not removed at once).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "out")
>>> write = lambda staging: os.makedirs(staging) or open(os.path.join(staging, "f"), "w").close()
>>> replace_directory(path, write, verify=os.listdir, is_ours=os.path.isdir, check_existing=lambda p: None)
>>> replace_directory(path, write, verify=os.listdir, is_ours=os.path.isdir, check_existing=lambda p: None)
>>> sorted(os.listdir(os.path.dirname(path)))
['out']
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)


class CheckpointBusyError(RuntimeError):
    """Another writer holds the lock of this checkpoint path; nothing was written.

    >>> issubclass(CheckpointBusyError, RuntimeError)   # raised at once, never after waiting
    True
    """


def sibling(path: str, suffix: str) -> str:
    """``dir/.name.suffix`` for ``path = dir/name``.

    >>> sibling("/runs/adapters", "old")
    '/runs/.adapters.old'
    """
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{suffix}")


@contextlib.contextmanager
def exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path``'s lock file, or raise :class:`CheckpointBusyError`.

    The holder unlinks the lock file before releasing it; a writer that opened it in between sees another inode at
    the lock path and tries again, so two writers never both hold it. Without ``flock`` (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = sibling(path, "lock")
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a writer that is just starting"
            os.close(fd)
            raise CheckpointBusyError(
                f"another writer is saving the adapter checkpoint {path!r} ({holder}; lock file {lock_path!r}). "
                "Nothing was written. Retry when it is done, or save to another path."
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(lock_path)):
                break
        os.close(fd)  # the previous holder removed this file after we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.ctime()}".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def exchange(a: str, b: str) -> bool:
    """Atomically swap the directories ``a`` and ``b`` (Linux ``renameat2``); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rename_exchange, at_fdcwd = 2, -100
    if renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) of {a!r} and {b!r} failed: {os.strerror(code)}")


def _fsync(path: str, tree: bool = False) -> None:
    """Flush ``path`` (with ``tree``: everything under it); directories only on POSIX."""
    walk = os.walk(path) if tree else [(path, [], [])]
    for root, _, files in walk:
        for name in [*files, "."] if os.name == "posix" else files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _remove_leftovers(path: str, *kinds: str) -> None:
    """Delete ``.<name>.<kind>`` and orbax's temporaries of it (``.<name>.<kind>.orbax-checkpoint-tmp...``)."""
    head, name = os.path.split(path)
    for leftover in os.listdir(head):
        if leftover.startswith(tuple(f".{name}.{kind}" for kind in kinds)):
            shutil.rmtree(os.path.join(head, leftover), ignore_errors=True)


def replace_directory(
    path: str,
    write: Callable[[str], object],
    *,
    verify: Callable[[str], object],
    is_ours: Callable[[str], bool],
    check_existing: Callable[[str], object],
    on_stage: Callable[[str], object] = lambda stage: None,
) -> None:
    """Write a directory with ``write(staging)`` and swap it in at ``path``: locked, staged, verified, fsynced.

    Args:
      path: the absolute local path of the directory.
      write: writes the new directory at the path it is given.
      verify: raises if the directory at the path it is given is not what was meant to be written.
      is_ours: whether a directory is a whole one of this kind (only then is an interrupted swap's ``.old`` put back).
      check_existing: called (under the lock) when ``path`` exists; raises to refuse replacing it.
      on_stage: called with ``"locked"``, ``"staged"``, ``"verified"``, ``"swapped"``, ``"done"`` (fault tests).

    Raises:
      CheckpointBusyError: when another writer holds the lock of ``path``.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with exclusive(path):
        on_stage("locked")
        old = sibling(path, "old")
        if not os.path.exists(path) and is_ours(old):  # a killed writer's two-rename swap: put the old one back
            os.rename(old, path)
            logger.warning("restored %s from %s, left by an interrupted overwrite", path, old)
        _remove_leftovers(path, "new", "old")
        if os.path.lexists(path):
            check_existing(path)
        staging = sibling(path, "new")
        try:  # a failure leaves the partial staging copy: orbax's threads may still write into it
            write(staging)
            on_stage("staged")
            verify(staging)
            _fsync(staging, tree=True)
            on_stage("verified")
            if not os.path.exists(path):
                os.rename(staging, path)
            elif exchange(staging, path):
                on_stage("swapped")
            else:
                os.rename(path, old)
                on_stage("swapped")
                os.rename(staging, path)
                shutil.rmtree(old)
            _fsync(os.path.dirname(path))
        except BaseException:
            logger.warning("writing %s failed; its partial copy is left at %s* until the next write", path, staging)
            raise
        _remove_leftovers(path, "new")  # the old directory, swapped out
        on_stage("done")
