r"""``AdapterConfig``: every setting of an adapter, in one frozen object that travels with its parameters.

The adapted model exposes it (``adapted.config``, ``RSSBilinearLoRADense.adapter_config``), checkpoints store it,
and :func:`rssbl_jax.merge` and :func:`rssbl_jax.load_adapters` read it, so no setting can silently differ
between training, saving, loading and merging. For the layer at path ``ℓ``,

.. math::

    \Delta y_\ell = s_\ell\, B_\ell\big((A_\ell x) \odot g_\ell(\hat p) + S_\ell \hat p\big), \qquad
    s_\ell = \frac{\alpha_\ell}{r_\ell}\ \Big(\text{or } \frac{\alpha_\ell}{\sqrt{r_\ell}}\text{ with rsLoRA}\Big),
    \qquad \hat p = \frac{p - \mu}{\sigma}

with the gate ``g`` a member of :mod:`rssbl_jax.gates` (``AdapterConfig.gate``; its leaves are listed there).
"""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from rssbl_jax import gates, patterns

LORA_A_INITS = ("lora", "gaussian")
"""``lora``: PEFT's Kaiming-uniform ``A``; ``gaussian``: ``A ~ N(0, 1/r²)``, PEFT's ``init_lora_weights="gaussian"``."""


class LayerConfig(NamedTuple):
    """The settings of one adapted layer, resolved from an :class:`AdapterConfig` by its path (hashable, static).

    Fields mean what :class:`AdapterConfig`'s do, ``rank`` and ``lora_alpha`` after the patterns, with their ``scale``.

    >>> AdapterConfig(rank=4, lora_alpha=8.0, rank_pattern={"head": 2}).resolve("head").scale
    4.0
    """

    rank: int
    lora_alpha: float
    scale: float
    gate: str = "linear"
    gate_offset: float = 0.0
    gate_hidden: int = 16
    lora_dropout: float = 0.0
    lora_a_init: str = "lora"
    p_mean: tuple[float, ...] | None = None
    p_std: tuple[float, ...] | None = None
    scalar_gate: bool = False


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool | str) or type(value).__name__ == "bool_":  # True is not 1.0, "8" is not 8.0
        raise TypeError(f"{name} must be a number; got {name}={value!r}.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite; got {name}={value!r}.")
    return number


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {name}={value!r}.")
    return int(value)


def _alpha(value: Any, name: str) -> float:
    number = _finite(value, name)
    if number <= 0:
        raise ValueError(f"{name} must be > 0 (0 would make the adapter silently do nothing); got {name}={value!r}.")
    return number


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _bool(value: Any, name: str, *, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE + _FALSE:
            return text in _TRUE
    elif type(value).__name__ in ("bool", "bool_") or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    allowed = "True, False" + (", None" if allow_none else "")
    raise ValueError(f'{name} must be {allowed} or one of "true", "false", "1", "0"; got {name}={value!r}.')


def _vector(value: Any, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(f"{name} must be a sequence of d_p numbers; got the string {name}={value!r}.")
    try:
        items = tuple(float(v) for v in (value.reshape(-1).tolist() if hasattr(value, "reshape") else value))
    except TypeError:
        items = (float(value),)
    for v in items:
        _finite(v, name)
    return items


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    r"""Every setting of an RSSBilinearLoRA adapter; frozen and hashable, so it is a static argument under ``jit``.

    Attributes:
      rank, lora_alpha: default rank ``r`` and scaling numerator (> 0); the update is multiplied by ``lora_alpha / r``.
      targets: regexes (``re.fullmatch``) over layer paths to adapt; ``()`` for a model built from
        :class:`rssbl_jax.RSSBilinearLoRADense` layers, where every such layer is an adapter.
      exclude: regexes of layer paths never adapted, even when a target matches.
      rank_pattern, alpha_pattern: ``{regex: value}`` per-path overrides, as PEFT's; the first full match wins.
      gate: ``"linear"`` (default), ``"affine"``, ``"mlp"`` (:mod:`rssbl_jax.gates`) or any name registered there.
      gate_offset: ``linear``'s constant ``g0`` (0: the original formula; 1: ``1 + C p``, which starts as plain
        LoRA); for ``affine`` and ``mlp`` the initial value of the learnable ``c0``.
      gate_hidden: hidden width of the ``mlp`` gate.
      scalar_gate: one gate value for every rank (``C (d_p, 1)``, ``c0 (1,)``): ``ΔW(p) = g(p̂) B A``, as CoLoRA.
      shift: learn the shift ``S p`` on every target (``True``), none (``False``) or, by default (``None``), only on
        targets with a bias, so every adapted model merges into the unmodified architecture.
      use_rslora: scale by ``lora_alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of ``lora_alpha / rank``.
      lora_dropout: dropout rate on the adapter's input ``x`` (before ``A``) while training.
      lora_a_init: one of :data:`LORA_A_INITS`; ``B`` starts at 0.
      p_mean, p_std: ``p̂ = (p - p_mean) / p_std``, applied in every adapted layer and folded in by
        :func:`rssbl_jax.merge`; ``None``: ``p`` is used as given.
      p_keyword: the keyword an injected model takes ``p`` under (``adapted.apply(..., p=p)``).
      modules_to_save: regexes over *leaf* paths of base parameters trained too (a head, a LayerNorm), PEFT's
        ``modules_to_save``; read by :func:`rssbl_jax.partition` and :func:`rssbl_jax.freeze_base`.

    Parsing is strict, so a config from JSON, YAML or a command line means what it says: the flags take a bool
    (Python's or numpy's), 0, 1 or ``"true"``/``"false"``/``"1"``/``"0"`` in any case (``"yes"`` or ``2`` is an error
    naming the field); a pattern field given one string takes it as one regex; ``rank_pattern``/``alpha_pattern``
    take a mapping or ``(regex, value)`` pairs; ``p_mean``/``p_std`` numbers, not a string; ``p_keyword`` an
    identifier, no keyword.

    >>> config = AdapterConfig(rank=4, lora_alpha=8.0, targets=r".*/(query|value)", gate="affine")
    >>> config.adapts("block_0/attention/query"), config.adapts("block_0/mlp"), config.scale
    (True, False, 2.0)
    """

    rank: int
    lora_alpha: float
    targets: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    gate: str = "linear"
    gate_offset: float = 0.0
    gate_hidden: int = 16
    shift: bool | None = None
    use_rslora: bool = False
    lora_dropout: float = 0.0
    lora_a_init: str = "lora"
    p_mean: tuple[float, ...] | None = None
    p_std: tuple[float, ...] | None = None
    p_keyword: str = "p"
    modules_to_save: tuple[str, ...] = ()
    scalar_gate: bool = False

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:  # frozen: normalise once, here
            object.__setattr__(self, name, value)

        set_("rank", _positive_int(self.rank, "rank"))
        set_("lora_alpha", _alpha(self.lora_alpha, "lora_alpha"))
        for name in ("targets", "exclude", "modules_to_save"):
            set_(name, patterns.as_patterns(getattr(self, name), name))
        for name in ("rank_pattern", "alpha_pattern"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a mapping {{regex: value}} or (regex, value) pairs; got a string.")
        ranks = patterns.as_pairs(self.rank_pattern, "rank_pattern")
        set_("rank_pattern", tuple((k, _positive_int(v, f"rank_pattern[{k!r}]")) for k, v in ranks))
        alphas = patterns.as_pairs(self.alpha_pattern, "alpha_pattern")
        set_("alpha_pattern", tuple((k, _alpha(v, f"alpha_pattern[{k!r}]")) for k, v in alphas))
        gates.get(self.gate)  # a registered gate (rssbl_jax.gates), else an error naming the known ones
        set_("gate_offset", _finite(self.gate_offset, "gate_offset"))
        set_("gate_hidden", _positive_int(self.gate_hidden, "gate_hidden"))
        set_("shift", _bool(self.shift, "shift", allow_none=True))
        set_("use_rslora", _bool(self.use_rslora, "use_rslora"))
        set_("scalar_gate", _bool(self.scalar_gate, "scalar_gate"))
        dropout = _finite(self.lora_dropout, "lora_dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got lora_dropout={self.lora_dropout!r}.")
        set_("lora_dropout", dropout)
        if self.lora_a_init not in LORA_A_INITS:
            raise ValueError(f"lora_a_init must be one of {LORA_A_INITS}; got lora_a_init={self.lora_a_init!r}.")
        set_("p_mean", _vector(self.p_mean, "p_mean"))
        set_("p_std", _vector(self.p_std, "p_std"))
        if (self.p_mean is None) != (self.p_std is None):
            raise ValueError("p_mean and p_std must be given together (or neither).")
        if self.p_mean is not None:
            if len(self.p_mean) != len(self.p_std):
                raise ValueError(
                    f"p_mean has {len(self.p_mean)} entries and p_std {len(self.p_std)}; both must have d_p entries."
                )
            if any(s <= 0 for s in self.p_std):
                raise ValueError(f"p_std must be > 0 everywhere; got p_std={self.p_std}.")
        if not (isinstance(self.p_keyword, str) and self.p_keyword.isidentifier()) or keyword.iskeyword(self.p_keyword):
            raise ValueError(
                f"p_keyword must be a Python identifier that is not a keyword (it is passed as `{{p_keyword}}=p`); "
                f"got p_keyword={self.p_keyword!r}."
            )

    @property
    def scale(self) -> float:
        """The default layer's scale: ``lora_alpha / rank`` (``lora_alpha / sqrt(rank)`` with rsLoRA)."""
        return self.resolve(None).scale

    def adapts(self, path: str) -> bool:
        """Whether the layer at ``path`` is adapted: a target matches (or there are none) and no ``exclude`` does."""
        if patterns.matches(self.exclude, path):
            return False
        return not self.targets or patterns.matches(self.targets, path)

    def resolve(self, path: str | None) -> LayerConfig:
        """The :class:`LayerConfig` of the layer at ``path`` (``None``: the defaults, no pattern applied).

        >>> AdapterConfig(rank=4, lora_alpha=8.0, rank_pattern={"head": 2}, use_rslora=True).resolve("head")[:3]
        (2, 8.0, 5.65685424949238)
        """
        rank = self.rank if path is None else patterns.first_match(self.rank_pattern, path, self.rank)
        alpha = self.lora_alpha if path is None else patterns.first_match(self.alpha_pattern, path, self.lora_alpha)
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        resolved = ("rank", "lora_alpha", "scale")
        shared = {name: getattr(self, name) for name in LayerConfig._fields if name not in resolved}
        return LayerConfig(rank=rank, lora_alpha=alpha, scale=scale, **shared)

    def use_shift(self, has_bias: bool) -> bool:
        """Whether a layer with (``has_bias``) or without a bias learns the shift ``S p``."""
        return has_bias if self.shift is None else self.shift

    def replace(self, **changes: Any) -> AdapterConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it exactly."""
        return json.loads(json.dumps({field.name: getattr(self, field.name) for field in dataclasses.fields(self)}))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        """Rebuild a config from :meth:`to_dict`'s output (or JSON like it), parsed as strictly; unknown keys raise.

        >>> AdapterConfig.from_dict({"rank": 2, "lora_alpha": 4.0, "targets": "abc", "use_rslora": "0"}).targets
        ('abc',)
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown AdapterConfig fields {unknown}; known fields are {sorted(names)}.")
        return cls(**data)  # JSON's lists become the config's tuples in __post_init__

    def differences(self, other: AdapterConfig) -> list[tuple[str, Any, Any]]:
        """``(field, self's value, other's value)`` for every field that differs.

        >>> AdapterConfig(rank=2, lora_alpha=4.0).differences(AdapterConfig(rank=2, lora_alpha=16.0))
        [('lora_alpha', 4.0, 16.0)]
        """
        return [
            (field.name, getattr(self, field.name), getattr(other, field.name))
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]

    def check_same(self, other: AdapterConfig, *, mine: str = "this config", theirs: str = "the other") -> None:
        """Raise ``ValueError`` naming every differing field and both values, unless the configs are equal."""
        diffs = self.differences(other)
        if diffs:
            lines = "\n".join(f"  {name}: {a!r} ({mine}) != {b!r} ({theirs})" for name, a, b in diffs)
            raise ValueError(f"adapter configs differ:\n{lines}")


def as_config(config: Any, where: str) -> AdapterConfig:
    """The :class:`AdapterConfig` of ``config``: itself, or the ``.config``/``.adapter_config`` of an adapted model.

    Raises:
      TypeError: naming ``where`` when ``config`` carries none (e.g. a bare ``lora_alpha`` number).
    """
    if isinstance(config, AdapterConfig):
        return config
    for attribute in ("config", "adapter_config"):
        value = getattr(config, attribute, None)
        if isinstance(value, AdapterConfig):
            return value
    raise TypeError(
        f"{where} needs the adapters' AdapterConfig (or the adapted model that carries it, e.g. "
        f"`adapted.config` / `layer.adapter_config`); got {type(config).__name__} {config!r}. Since rssbl_jax 0.2 "
        "settings such as lora_alpha and gate_offset are no longer restated separately, so they cannot differ "
        "from training."
    )


def check_adapted(config: AdapterConfig, adapter_paths: Iterable[str], verb: str) -> None:
    """Raise when an adapter layer's path is one the config does not adapt (a tree other than the one it describes)."""
    foreign = sorted(path for path in adapter_paths if not config.adapts(path))
    if foreign:
        raise ValueError(
            f"adapter layers {foreign} are not adapted by the config (targets={config.targets}, exclude="
            f"{config.exclude}); {verb} the params tree whose paths the config was written for (for NNX: the "
            "adapted model itself, or nnx.state(adapted.model, ...), not nnx.state(adapted, ...))."
        )


def check_patterns_used(config: AdapterConfig, adapted_paths: Sequence[str]) -> None:
    """Raise when a ``rank_pattern``/``alpha_pattern`` regex matches none of the adapted layers' paths."""
    for name, pairs in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        unmatched = patterns.unmatched([pattern for pattern, _ in pairs], adapted_paths)
        if unmatched:
            raise ValueError(f"{name} {unmatched} matches no adapted layer; adapted paths: {sorted(adapted_paths)}.")
