"""Path patterns: one matching rule (``re.fullmatch``) for injection, merge, sharding, checkpoints and partitioning.

A layer's path is its params' keys joined by ``/`` (``"block_0/attention/query"``; the root is ``""``), and every
pattern must match the *whole* path: ``"query"`` matches only a root-level ``query``, ``".*/query"`` any ``query``.

>>> path = "block_0/attention/query"
>>> matches([r".*/query", "head"], path), matches([r"query"], path), first_match(((r".*/key", 4), (".*", 8)), path, 16)
(True, False, 8)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def as_patterns(patterns: str | Iterable[str] | None, name: str = "patterns") -> tuple[str, ...]:
    """A tuple of checked regexes from one regex or an iterable of them (``None`` gives ``()``).

    Raises ``TypeError`` for a non-string, ``ValueError`` naming ``name`` and the pattern for an invalid regex.

    >>> as_patterns("a|b")
    ('a|b',)
    """
    if patterns is None:
        return ()
    items = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    for pattern in items:
        if not isinstance(pattern, str):
            raise TypeError(f"{name} must be regex strings; got {pattern!r}.")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{name} has an invalid regex {pattern!r}: {error}.") from None
    return items


def as_pairs(mapping: Mapping[str, Any] | Iterable[tuple[str, Any]] | None, name: str) -> tuple[tuple[str, Any], ...]:
    """``{regex: value}`` (or ``(regex, value)`` pairs) as a tuple of pairs, in order, regexes checked.

    >>> as_pairs({".*/value": 4}, "rank_pattern")
    (('.*/value', 4),)
    """
    items = tuple((mapping or {}).items()) if isinstance(mapping, Mapping) or mapping is None else tuple(mapping)
    as_patterns([pattern for pattern, _ in items], name)
    return tuple((pattern, value) for pattern, value in items)


def matches(patterns: Sequence[str], path: str) -> bool:
    """Whether any of ``patterns`` fully matches ``path``."""
    return any(re.fullmatch(pattern, path) for pattern in patterns)


def first_match(pairs: Sequence[tuple[str, Any]], path: str, default: Any) -> Any:
    """The value of the first ``(regex, value)`` pair whose regex fully matches ``path``, else ``default``."""
    return next((value for pattern, value in pairs if re.fullmatch(pattern, path)), default)


def unmatched(patterns: Iterable[str], paths: Iterable[str]) -> list[str]:
    """The patterns that fully match none of ``paths``.

    >>> unmatched([r".*/value", "head"], ["block/attention/value"])
    ['head']
    """
    paths = list(paths)
    return [pattern for pattern in patterns if not any(re.fullmatch(pattern, path) for path in paths)]


def path_str(key_path: Sequence[Any]) -> str:
    """A pytree key path (``jax.tree_util`` keys or plain names) as ``"a/b/c"``.

    >>> import jax
    >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 1}, "c": [2]})[0]]
    ['a/b', 'c/0']
    """
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in key_path)
