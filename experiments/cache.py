"""An on-disk cache of generated arrays (datasets, pretrained parameters), keyed by a hash of what made them.

An entry is one ``.npz`` file named ``<name>-<key>.npz`` in the cache directory, where ``key`` is the SHA-256
(first 16 hex digits) of the canonical JSON of the entry's configuration, the versions of the packages that
produced it, the source text of the modules that produced it (``sources``: an entry built by other code is never
reused, which a key of configuration and versions alone allowed), and :data:`SCHEMA`. The configuration is
stored inside the file as well. Writes go to a temporary file in the same directory and are renamed into place
(``os.replace`` is atomic on POSIX), so an interrupted or concurrent run never leaves a half-written entry.

The directory is the ``data_dir`` argument, else ``$RSSBL_JAX_CACHE``, else ``~/.cache/rssbl_jax``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

SCHEMA = 1


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory (created if missing)."""
    path = Path(data_dir or os.environ.get("RSSBL_JAX_CACHE") or Path.home() / ".cache" / "rssbl_jax")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"__class__": type(value).__name__, **_jsonable(dataclasses.asdict(value))}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return repr(value)  # exact, and stable across platforms
    return value


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """``{package: installed version}`` (``"absent"`` for a package that is not installed)."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def source_digest(sources: Sequence[Any]) -> str:
    """SHA-256 of the source text of ``sources`` (modules or functions), in order."""
    return hashlib.sha256("\0".join(inspect.getsource(s) for s in sources).encode()).hexdigest()


def cache_key(config: Any, packages: Sequence[str] = (), sources: Sequence[Any] = ()) -> str:
    """The hash that names an entry: its configuration, the versions of ``packages``, the source of ``sources`` and
    :data:`SCHEMA`.

    >>> cache_key({"a": 1, "b": (2.0, 3)}) == cache_key({"b": [2.0, 3], "a": 1})
    True
    >>> cache_key({"a": 1}) == cache_key({"a": 2})
    False
    """
    key = {"config": _jsonable(config), "versions": package_versions(packages), "schema": SCHEMA}
    if sources:
        key["sources"] = source_digest(sources)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def entry_path(
    name: str,
    config: Any,
    packages: Sequence[str] = (),
    sources: Sequence[Any] = (),
    data_dir: str | os.PathLike | None = None,
) -> Path:
    """Where the entry ``name`` for ``config`` (built with ``packages`` and ``sources``) lives in the cache."""
    return cache_dir(data_dir) / f"{name}-{cache_key(config, packages, sources)}.npz"


def cached_arrays(
    name: str,
    config: Any,
    build: Callable[[], Mapping[str, np.ndarray]],
    *,
    packages: Sequence[str] = (),
    sources: Sequence[Any] = (),
    data_dir: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """Load ``name``'s arrays for ``config`` from the cache, or ``build()`` them and store them atomically.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> calls = []
    >>> build = lambda: calls.append(1) or {"x": np.arange(3)}
    >>> a = cached_arrays("demo", {"n": 3}, build, data_dir=d)
    >>> b = cached_arrays("demo", {"n": 3}, build, data_dir=d)
    >>> len(calls), b["x"].tolist()
    (1, [0, 1, 2])
    """
    path = entry_path(name, config, packages, sources, data_dir)
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            return {k: stored[k] for k in stored.files if k != "__config__"}
    arrays = {k: np.asarray(v) for k, v in build().items()}
    meta = json.dumps({"config": _jsonable(config), "versions": package_versions(packages), "schema": SCHEMA})
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __config__=np.array(meta), **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache should be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return arrays


def flatten_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A nested parameter dict as ``{"a/b/kernel": array}`` (what :func:`cached_arrays` stores)."""
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The inverse of :func:`flatten_params`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")
