"""Paths and SHA-256 digests shared by :mod:`rssbl_jax.checkpoint` and :mod:`rssbl_jax.train_checkpoints`.

Both live on ``etils.epath`` paths and store a digest per leaf and one of their JSON config; one definition keeps
a digest meaning the same in both.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is on a local file system (no URI scheme such as ``gs://``).

    >>> is_local("/tmp/run"), is_local("runs/adapters"), is_local("gs://bucket/run")
    (True, True, False)
    """
    return "://" not in os.fspath(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``etils.epath.Path``: a local one made absolute, a remote one (``gs://...``) as given.

    >>> str(as_path("gs://bucket/run")), as_path("run").is_absolute()
    ('gs://bucket/run', True)
    """
    text = os.fspath(path)
    return epath.Path(os.path.abspath(text) if is_local(text) else text)


def array_sha256(array: Any) -> str:
    """The SHA-256 of an array's bytes in C order (the digest both kinds of checkpoint store per leaf).

    >>> import hashlib, numpy as np
    >>> array_sha256(np.zeros(2, np.float32)) == hashlib.sha256(bytes(8)).hexdigest()
    True
    """
    return hashlib.sha256(np.ascontiguousarray(np.asarray(array)).tobytes()).hexdigest()


def json_sha256(document: Mapping[str, Any]) -> str:
    """The SHA-256 of a JSON document without its own ``"sha256"`` field (canonical: sorted keys, no spaces).

    >>> json_sha256({"a": 1, "sha256": "x"}) == json_sha256({"a": 1}) != json_sha256({"a": 2})
    True
    """
    body = {k: v for k, v in document.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
