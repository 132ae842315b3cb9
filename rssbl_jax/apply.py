r"""The one function that applies an adapter (:func:`apply_adapter`), for the linen layer, linen injection and NNX.

Each front-end only finds the base output ``y``, its input ``x`` and the adapter leaves its own way (a linen scope,
an NNX attribute); the rest is written once here, so the front-ends cannot drift apart: leaves and their sharding
(:func:`leaf_specs`), factorizations, ``d_p``, checks, normalisation, dropout, dtype promotion, the linear gate's
``p = 0`` pitfall (:func:`warn_if_silent`).

.. math::

    y' = y + \Delta y(x, \hat p), \qquad \hat p = (p - \mu) / \sigma

>>> from rssbl_jax import LayerConfig, core, methods
>>> layer = LayerConfig(rank=1, lora_alpha=1.0, scale=1.0, p_mean=(1.0,), p_std=(2.0,))
>>> factors = {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2)), "lora_c": jnp.ones((1, 1))}
>>> apply_adapter(methods.RSS(), layer, core.dense_factorization((3, 2), rank=1), jnp.ones((1, 3)), jnp.array([5.0]),
...               jnp.zeros((1, 2)), factors).tolist()                      # 3 * (5 - 1) / 2
[[6.0, 6.0]]
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta
from flax.linen.dtypes import promote_dtype

from rssbl_jax import core, patterns, tree
from rssbl_jax.config import AdapterConfig, LayerConfig, check_patterns_used
from rssbl_jax.factorization import Factorization, LayerKind
from rssbl_jax.fastpath import DEFAULT_THRESHOLDS
from rssbl_jax.methods import AdapterMethod

Initializer = jax.nn.initializers.Initializer


class Leaf(NamedTuple):
    """One adapter leaf to create: its shape, initializer and partition names (``None``: unannotated kernel)."""

    shape: tuple[int, ...]
    init: Initializer
    names: tuple[Any, ...] | None = None


def leaf_specs(
    method: AdapterMethod, layer: LayerConfig, factorization: Factorization, d_p: int, *, shift: bool,
    initializers: Mapping[str, Initializer | None] | None = None, kernel_names: tuple[Any, ...] | None = None,
    kernel_shape: tuple[int, ...] | None = None,
) -> dict[str, Leaf]:  # fmt: skip
    """The adapter leaves of one layer: the method's ``params`` with ``initializers`` overrides and sharding names.

    With the kernel's partition names and shape, leaf names follow :func:`rssbl_jax.tree.axes_from_kernel`.

    Raises:
      ValueError: when an ``initializers`` key names no leaf of the method.

    >>> from rssbl_jax import LayerConfig, core, methods
    >>> specs = leaf_specs(methods.RSS(), LayerConfig(2, 2.0, 1.0), core.dense_factorization((8, 16), 2), 3,
    ...                    shift=False, kernel_names=("embed", "mlp"), kernel_shape=(8, 16))
    >>> specs["lora_a"].names, specs["lora_b"].names, specs["lora_c"].names
    (('embed', None), (None, 'mlp'), (None, None))
    """
    specs = method.params(layer, factorization, d_p, shift=shift)
    unknown = sorted({name for name, init in (initializers or {}).items() if init is not None} - set(specs))
    if unknown:
        raise ValueError(f"initializers {unknown} name no adapter leaf of {method!r}; its leaves are {sorted(specs)}.")
    if kernel_names is not None and kernel_shape is None:
        raise ValueError("leaf_specs: kernel_names need the kernel_shape they annotate.")
    return {
        name: Leaf(
            tuple(shape),
            (initializers or {}).get(name) or init,
            None if kernel_names is None else tree.axes_from_kernel(name, shape, kernel_names, kernel_shape),
        )
        for name, (shape, init) in specs.items()
    }


def factorize(
    kind: LayerKind, module: Any, kernel_shape: tuple[int, ...], method: AdapterMethod, rank: int,
    x_shape: tuple[int, ...] | None = None, args: tuple = (), kwargs: Mapping[str, Any] | None = None,
) -> Factorization:  # fmt: skip
    """``kind.factorize`` for ``module`` with the method's fast-path thresholds (the defaults if it has none).

    >>> import flax.linen as nn
    >>> from rssbl_jax import factorization, fastpath, methods
    >>> method = methods.RSS(thresholds=fastpath.Thresholds(fused_max_b_size=0))
    >>> factorize(factorization.kind_of(nn.Dense(4)), nn.Dense(4), (3, 4), method, rank=2).b_shape
    (2, 4)
    """
    thresholds = getattr(method, "thresholds", DEFAULT_THRESHOLDS)
    return kind.factorize(module, kernel_shape, rank, x_shape, args, dict(kwargs or {}), thresholds=thresholds)


def d_p_of(p: Any, method: AdapterMethod, keyword: str = "p") -> int:
    """``d_p`` from ``p`` (``[d_p]`` or ``[*lead, d_p]``); 1 for a method without ``p``.

    Raises:
      ValueError: when the method uses ``p`` and ``p`` is ``None`` or a scalar.
    """
    if not method.uses_p:
        return 1 if p is None or jnp.ndim(p) == 0 else jnp.shape(p)[-1]
    if p is None:
        raise ValueError(f"operating parameters {keyword}=None (operating_params (p) is None): pass [d_p].")
    if jnp.ndim(p) == 0:
        raise ValueError(f"operating parameters {keyword}= must be [d_p] or [*lead, d_p]; got a scalar.")
    return jnp.shape(p)[-1]


def warn_if_silent(method: AdapterMethod, layer: LayerConfig, p: Any, where: str) -> None:
    """Warn (once per call site) when ``p`` has all-zero rows where the method's update vanishes and ``p_mean`` is None.

    Such rows learn nothing: ``method.vanishes_at_zero(layer)`` (``Δy ≡ 0`` at ``p̂ = 0``, as ``C p̂`` and ``S p̂``).
    Only a concrete ``p`` is inspected; the linen front-ends call it at ``init`` (NNX's ``inject`` sees no ``p``).
    """
    if p is None or layer.p_mean is not None or not method.vanishes_at_zero(layer) or isinstance(p, jax.core.Tracer):
        return
    rows = np.asarray(p).reshape(-1, np.shape(p)[-1])
    zero = int(np.sum(np.all(rows == 0, axis=1)))
    if zero:
        warnings.warn(
            f"{where}: {zero} of {rows.shape[0]} rows of p are all 0 and no p_mean is set; the linear gate C p and "
            "the shift S p vanish there, so the adapter learns nothing for those conditions. Set p_mean (and p_std) "
            "so that p - p_mean is not 0 there, or use gate='affine' (or gate_offset=1.0).",
            UserWarning,
            stacklevel=3,
        )


def apply_adapter(
    method: AdapterMethod, layer: LayerConfig, factorization: Factorization, x: Any, p: Any, y: jax.Array,
    factors: Mapping[str, Any], *, dtype: Any = None, precision: Any = None, dropout_rng: jax.Array | None = None,
    where: str = "adapted layer", keyword: str = "p",
) -> jax.Array:  # fmt: skip
    r"""The adapted layer's output ``y + Δy``: the one place every front-end applies an adapter.

    In order: refuse ``p = None`` when the method uses ``p``; promote ``x``, ``p``, the factors to ``dtype`` (or
    inferred); dropout on ``x`` (only with ``dropout_rng``); ``p̂ = (p - p_mean) / p_std``; ``method.adapt``; check
    the output shape and cast to ``y``'s dtype.

    Raises:
      ValueError: prefixed with ``where``, naming ``d_p`` and the shapes when ``p`` does not fit the layer.
    """
    if p is None and method.uses_p:
        raise ValueError(
            f"{where}: operating parameters {keyword}=None (operating_params (p) is None) for input shape "
            f"{jnp.shape(x)}; pass p of shape [d_p] or [*lead, d_p]."
        )
    x = jnp.asarray(x)
    inputs = ([] if factorization.integer_inputs else [x]) + ([] if p is None else [jnp.asarray(p)])
    promoted = promote_dtype(*inputs, *(jnp.asarray(value) for value in factors.values()), dtype=dtype)
    if not factorization.integer_inputs:
        x, promoted = promoted[0], promoted[1:]
    if p is not None:
        p, promoted = promoted[0], promoted[1:]
    factors = dict(zip(factors, promoted, strict=True))
    if dropout_rng is not None and layer.lora_dropout > 0 and not factorization.integer_inputs:
        keep = 1.0 - layer.lora_dropout
        mask = jax.random.bernoulli(dropout_rng, keep, x.shape)
        x = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
    try:
        if p is not None and layer.p_mean is not None:
            if p.ndim == 0 or p.shape[-1] != len(layer.p_mean):
                raise ValueError(
                    f"p_mean/p_std have {len(layer.p_mean)} entries but operating_params.shape={p.shape} "
                    f"for x.shape={x.shape}."
                )
            p = core.normalize_operating_params(p, layer)
        out = method.adapt(y, factorization, x, p, factors, layer, precision=precision)
        if out.shape != y.shape:
            raise ValueError(f"the adapted output has shape {out.shape}, the layer output {y.shape}.")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return out.astype(y.dtype)


# Shared front-end glue: config from inject's arguments, the p keyword, quantised bases

ALIASES = {"target_modules": "targets"}
"""PEFT's names for :class:`~rssbl_jax.AdapterConfig` fields, accepted by ``inject``."""


def make_config(config: Any, rank: Any, lora_alpha: Any, settings: Mapping[str, Any]) -> AdapterConfig:
    """The :class:`AdapterConfig` of an ``inject`` call: ``config`` itself, or one built from targets and settings.

    >>> make_config(None, 2, 4.0, {"target_modules": ["q", "v"]}).targets
    ('q', 'v')
    """
    settings = dict(settings)
    for alias, name in ALIASES.items():
        if alias in settings:
            if name in settings or (name == "targets" and config is not None and not isinstance(config, AdapterConfig)):
                raise TypeError(f"inject got both {alias}= (PEFT's name) and {name}=; pass one.")
            settings[name] = settings.pop(alias)
    fields = {field.name for field in dataclasses.fields(AdapterConfig)}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise TypeError(
            f"inject got unknown keyword(s) {unknown}; it takes the AdapterConfig fields {sorted(fields)} "
            f"(and PEFT's {sorted(ALIASES)})."
        )
    if isinstance(config, AdapterConfig):
        if rank is not None or lora_alpha is not None or settings:
            given = ["rank"] * (rank is not None) + ["lora_alpha"] * (lora_alpha is not None) + sorted(settings)
            raise TypeError(
                f"inject got an AdapterConfig and other settings ({given}); put every setting in the config "
                "(config.replace(...))."
            )
        return config
    if rank is None or lora_alpha is None:
        raise TypeError("inject needs an AdapterConfig, or targets, rank and lora_alpha.")
    targets = settings.pop("targets", config)
    if targets is None:
        raise TypeError("inject needs targets (a regex or regexes over layer paths; PEFT's target_modules).")
    return AdapterConfig(rank=rank, lora_alpha=lora_alpha, targets=targets, **settings)


def check_keyword_free(fn: Any, keyword: str, where: str) -> None:
    """Raise when ``fn`` already takes an argument named ``keyword`` (the adapter would shadow it)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if keyword in parameters:
        raise ValueError(
            f"{where} already has an argument named {keyword!r}, which the adapted model would take as the "
            f"operating parameters and hide from it. Choose another name: AdapterConfig(p_keyword=...) or "
            f"inject(..., p_keyword='operating_params')."
        )


def check_targets(
    config: AdapterConfig, adaptable: Mapping[str, str], candidates: Sequence[str], adapted: Sequence[str]
) -> None:
    """Raise if a target matches no ``candidates`` path (listing ``adaptable``) or a pattern matches no ``adapted`` one.

    >>> from rssbl_jax.config import AdapterConfig
    >>> check_targets(AdapterConfig(1, 1.0, targets=("mlp",)), {"attn": "Dense"}, ["attn"], [])
    Traceback (most recent call last):
    ValueError: target pattern 'mlp' matches no adaptable layer (regex fullmatch on the layer path). Adaptable paths:
      attn  (Dense)
    """
    listing = "\n".join(f"  {path or repr(path)}  ({kind})" for path, kind in adaptable.items()) or "  (none)"
    for pattern in config.targets:
        if not any(patterns.matches([pattern], path) for path in candidates):
            raise ValueError(
                f"target pattern {pattern!r} matches no adaptable layer (regex fullmatch on the layer path). "
                f"Adaptable paths:\n{listing}"
            )
    check_patterns_used(config, adapted)


def outside_quantizer(fn: Any) -> Any:
    """``fn`` run with qwix's op interception switched off, when qwix is loaded; ``fn`` itself otherwise.

    qwix quantises every ``dot_general``/``einsum`` operand that is a param of the current module, ``lora_a``/``lora_b``
    too: the base call stays quantised, the update in full precision (conditional QLoRA: :mod:`rssbl_jax.quantize`).
    """
    if "qwix" not in sys.modules:  # qwix quantises only models it was imported to quantise
        return fn
    disable = getattr(sys.modules.get("qwix._src.interception"), "disable_interceptions", None)
    if disable is None:  # the adapters would run quantised, silently: refuse
        version = getattr(sys.modules["qwix"], "__version__", "unknown")
        raise RuntimeError(
            f"qwix {version} is loaded but has no qwix._src.interception.disable_interceptions, which rssbl_jax uses "
            "to keep the adapters out of qwix's quantisation (without it lora_a/lora_b would be quantised too). "
            "Install the qwix range rssbl_jax supports: pip install 'rssbl_jax[quantize]' (qwix>=0.1.5,<0.2)."
        )
    return disable(fn)


def metadata_holder(box: Any) -> Any:
    """The kernel box carrying partition names; for a qwix ``WithAux`` of a ``QArray``, its ``qvalue``."""
    qvalue = getattr(getattr(box, "array", None), "qvalue", None)
    return qvalue if isinstance(qvalue, meta.Partitioned) or hasattr(qvalue, "get_metadata") else box


def linen_leaves(
    module: Any, method: AdapterMethod, layer: LayerConfig, factorization: Factorization, p: Any, *, shift: bool,
    param_dtype: Any, initializers: Mapping[str, Initializer | None] | None = None, kernel_box: Any = None,
    keyword: str = "p", where: str = "adapted layer",
) -> dict[str, Any]:  # fmt: skip
    """The adapter leaves of a linen layer, read from its scope, or created there (``d_p`` from ``p``) at init.

    Existing leaves are read as they are, so a ``p`` that does not fit is reported by :func:`apply_adapter` against
    the input, not as a shape mismatch. A partitioned ``kernel_box`` gives leaves annotated the same way.
    """
    if module.has_variable("params", "lora_a"):
        names = [n for n in method.params(layer, factorization, 1, shift=shift) if module.has_variable("params", n)]
        return {name: meta.unbox(module.get_variable("params", name)) for name in names}
    partitioned = isinstance(kernel_box, meta.Partitioned)
    specs = leaf_specs(
        method, layer, factorization, d_p_of(p, method, keyword), shift=shift, initializers=initializers,
        kernel_names=tuple(kernel_box.names) if partitioned else None,
        kernel_shape=tuple(jnp.shape(kernel_box.value)) if partitioned else None,
    )  # fmt: skip
    factors = {}
    for name, leaf in specs.items():
        init = leaf.init
        if partitioned:

            def init(*args, init=leaf.init, names=leaf.names):
                return dataclasses.replace(kernel_box, value=init(*args), names=names)

        # through the scope: Module.param refuses in __call__ for layers (nn.Embed) defining params in setup()
        factors[name] = meta.unbox(module.scope.param(name, init, leaf.shape, param_dtype))
    return factors
