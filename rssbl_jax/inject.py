r"""Adapt an existing, unmodified Flax linen model by layer-path patterns (method interception, as qwix does).

:func:`inject` wraps a model so that, while it runs, every linen layer whose kind is in
:data:`rssbl_jax.factorization.KINDS` (``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``, ``Embed``) and whose path
the :class:`~rssbl_jax.AdapterConfig` adapts returns its own output plus

.. math::

    \Delta y = s\, B\big((A x) \odot g(\hat p) + S \hat p\big)

computed by :func:`rssbl_jax.core.adapter_update`, with the ``lora_*`` leaves created beside the layer's own
kernel. The model's code is not touched, so ``variables["params"]`` is the model's own tree plus ``lora_*`` leaves
and pretrained weights load with :func:`load_base`. A kernel annotated with ``nn.with_partitioning`` or
``nn.with_logical_partitioning`` gives adapters annotated the same way (``A`` keeps the kernel's input axes, ``B``
its output axes; the rank axis and ``C``, ``S`` are replicated).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta
from flax.linen.dtypes import promote_dtype

from rssbl_jax import core, patterns
from rssbl_jax.config import AdapterConfig, check_patterns_used
from rssbl_jax.factorization import kind_of
from rssbl_jax.partition import adapter_layers

PyTree = Any


def make_config(config: Any, rank: Any, lora_alpha: Any, settings: Mapping[str, Any]) -> AdapterConfig:
    """The :class:`AdapterConfig` of an ``inject`` call: ``config`` itself, or one built from targets and settings."""
    if isinstance(config, AdapterConfig):
        if rank is not None or lora_alpha is not None or settings:
            raise TypeError(
                "inject got an AdapterConfig and other settings "
                f"({['rank'] * (rank is not None) + ['lora_alpha'] * (lora_alpha is not None) + sorted(settings)}); "
                "put every setting in the config (config.replace(...))."
            )
        return config
    if rank is None or lora_alpha is None:
        raise TypeError("inject needs an AdapterConfig, or targets, rank and lora_alpha.")
    targets = settings.pop("targets", config)
    if targets is None:
        raise TypeError("inject needs targets (a regex or regexes over layer paths).")
    if not patterns.as_patterns(targets, "targets"):
        raise ValueError("targets must be a regex or a non-empty sequence of regexes over layer paths.")
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


def outside_quantizer(fn: Any) -> Any:
    """``fn`` run with qwix's op interception switched off, when qwix is loaded; ``fn`` itself otherwise.

    A model quantised by ``qwix.quantize_model`` has its ``dot_general``/``einsum`` calls intercepted, and qwix
    quantises any operand that is a param of the current module: inside an adapted layer that would be ``lora_a``
    and ``lora_b`` too. The base layer's own call stays intercepted (its kernel runs quantised); the adapter's
    update runs outside, in full precision (conditional QLoRA, :mod:`rssbl_jax.quantize`).
    """
    if "qwix" not in sys.modules:  # nothing can intercept: qwix quantises only models it was imported to quantise
        return fn
    disable = getattr(sys.modules.get("qwix._src.interception"), "disable_interceptions", None)
    if disable is None:
        # without the switch the adapters would run quantised, silently: refuse instead
        version = getattr(sys.modules["qwix"], "__version__", "unknown")
        raise RuntimeError(
            f"qwix {version} is loaded but has no qwix._src.interception.disable_interceptions, which rssbl_jax uses "
            "to keep the adapters out of qwix's quantisation (without it lora_a/lora_b would be quantised too). "
            "Install the qwix range rssbl_jax supports: pip install 'rssbl_jax[quantize]' (qwix>=0.1.5,<0.2)."
        )
    return disable(fn)


def metadata_holder(box: Any) -> Any:
    """What carries a kernel's partitioning metadata (linen box or NNX variable): the kernel itself, or for a
    qwix-quantised kernel (a ``WithAux`` of a ``QArray``) its ``qvalue``, which keeps the float kernel's names."""
    qvalue = getattr(getattr(box, "array", None), "qvalue", None)
    return qvalue if isinstance(qvalue, meta.Partitioned) or hasattr(qvalue, "get_metadata") else box


def _matching_box(box: Any, names: tuple[Any, ...]):
    """An initializer wrapper that boxes a new param like ``box`` (Partitioned / LogicallyPartitioned), or None."""
    if not isinstance(box, meta.Partitioned):
        return None
    return lambda init: lambda *a: dataclasses.replace(box, value=init(*a), names=names)


def _adapter_names(box: Any, kernel_ndim: int, n_in: int, name: str, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """Partition names of adapter leaf ``name``: A keeps the kernel's input axes, B its output axes."""
    kernel_names = tuple(box.names)
    if name == "lora_a" and len(shape) == n_in + 1:
        return (*kernel_names[:n_in], None)
    if name == "lora_b" and len(shape) == kernel_ndim - n_in + 1:
        return (None, *kernel_names[n_in:])
    return (None,) * len(shape)


@dataclasses.dataclass(frozen=True)
class Adapted:
    r"""An unmodified linen ``model`` whose adapted layers carry a rank-space update modulated by ``p``.

    Built by :func:`inject`. ``init`` and ``apply`` are ``model.init`` and ``model.apply`` (every other keyword,
    such as ``method``, ``mutable`` or ``rngs``, is passed through) run under a method interceptor; ``p`` is
    passed under the keyword ``config.p_keyword`` (``"p"`` by default). ``lora_dropout`` acts when a
    ``"dropout"`` rng is passed (``rngs={"dropout": key}``, training) and not otherwise (evaluation).

    Attributes:
      model: the linen model (not modified).
      config: the :class:`~rssbl_jax.AdapterConfig`; merge and checkpoints take it (or this object).
      param_dtype: dtype of the adapter parameters.
      method: the :class:`~rssbl_jax.core.AdapterMethod` computing the update (RSSBilinearLoRA by default).
      initializers: ``{leaf name: initializer}`` overrides of the RSS adapter leaves' initialisers.
    """

    model: nn.Module
    config: AdapterConfig
    param_dtype: Any = jnp.float32
    method: Any = core.RSS
    initializers: Any = None

    @property
    def adapter_config(self) -> AdapterConfig:
        """The same as :attr:`config`."""
        return self.config

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.init(rngs, *args, **kwargs)`` plus adapters beside each adapted kernel; ``d_p`` from ``p``."""
        return self._run(self.model.init, rngs, args, kwargs)

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.apply(variables, *args, **kwargs)`` with the adapted layers under operating parameters ``p``.

        ``p`` is ``[d_p]`` (one condition for everything) or ``[batch, d_p]`` (one per example; every adapted
        layer's input must then lead with the batch axis).
        """
        return self._run(self.model.apply, variables, args, kwargs)

    def adapted_paths(self, variables: Any) -> list[str]:
        """The paths of the adapted layers in ``variables`` (or its ``"params"``)."""
        params = variables.get("params", variables) if isinstance(variables, Mapping) else variables
        return adapter_layers(params)

    def _run(self, fun, first, args, kwargs):
        keyword = self.config.p_keyword
        if keyword not in kwargs:
            raise TypeError(f"the adapted model needs its operating parameters as the keyword {keyword}=...")
        kwargs = dict(kwargs)
        p = kwargs.pop(keyword)
        method = kwargs.get("method")
        if callable(method):
            check_keyword_free(method, keyword, f"method {getattr(method, '__name__', method)!r}")
        elif isinstance(method, str):
            check_keyword_free(getattr(type(self.model), method), keyword, f"method {method!r}")
        seen: dict[str, str] = {}
        adapted: list[str] = []
        with nn.intercept_methods(self._interceptor(seen, adapted, p)):
            out = fun(first, *args, **kwargs)
        if method is None:  # another method may legitimately skip some layers
            _check_targets(self.config, seen, adapted)
        return out

    def _interceptor(self, seen: dict[str, str], adapted: list[str], p: Any):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            kind = kind_of(module)
            if context.method_name != "__call__" or kind is None:
                return next_fun(*args, **kwargs)
            path = "/".join(str(name) for name in module.path)
            seen[path] = kind.name
            if not self.config.adapts(path):
                return next_fun(*args, **kwargs)
            kind.check(module, path)
            adapted.append(path)
            y = next_fun(*args, **kwargs)
            try:
                return outside_quantizer(self._update)(module, kind, path, args, kwargs, p, y)
            except ValueError as error:
                raise ValueError(f"adapted layer {path!r}: {error}") from None

        return interceptor

    def _update(self, module, kind, path, args, kwargs, operating_params, y):
        """Create (or read) the ``lora_*`` leaves in ``module``'s scope and return ``y`` plus this call's update."""
        layer = self.config.resolve(path)
        if operating_params is None:
            raise ValueError(f"operating parameters {self.config.p_keyword}=None; pass [d_p] or [batch, d_p].")
        p = jnp.asarray(operating_params)
        existing = next((n for n in ("lora_gate_w", "lora_s", "lora_c") if module.has_variable("params", n)), None)
        if existing == "lora_c" and layer.gate == "mlp":
            existing = None
        rss = isinstance(self.method, core.RSSMethod)  # a plug-in method's leaves may lay d_p out otherwise
        if existing is not None and rss:
            d_p = jnp.shape(meta.unbox(module.get_variable("params", existing)))[-2]
        else:
            if p.ndim == 0:
                raise ValueError(f"{self.config.p_keyword} must be [d_p] or [batch, d_p]; got a scalar.")
            d_p = p.shape[-1]
        box = module.get_variable("params", kind.kernel_name)
        kernel_shape = tuple(jnp.shape(meta.unbox(box)))
        box = metadata_holder(box)
        x = jnp.asarray(args[0] if args else kwargs["inputs"])
        factorization = kind.factorize(module, kernel_shape, layer.rank, x.shape, args[1:], kwargs)
        shift = self.config.use_shift(module.has_variable("params", "bias"))
        if isinstance(self.method, core.RSSMethod):
            specs = core.adapter_params(layer, factorization, d_p, shift=shift, initializers=self.initializers)
        else:
            specs = self.method.params(layer, factorization, d_p, shift=shift)
        n_in = len(factorization.a_shape) - 1
        factors = {}
        for name, (shape, init) in specs.items():
            wrap = (
                _matching_box(box, _adapter_names(box, len(kernel_shape), n_in, name, shape))
                if isinstance(box, meta.Partitioned)
                else None
            )
            # through the scope: layers such as nn.Embed define their params in setup(), where Module.param
            # refuses to run from __call__
            value = module.scope.param(name, wrap(init) if wrap else init, shape, self.param_dtype)
            factors[name] = meta.unbox(value)
        names = list(factors)
        if factorization.integer_inputs:
            p, *values = promote_dtype(p, *factors.values(), dtype=module.dtype)
        else:
            x, p, *values = promote_dtype(x, p, *factors.values(), dtype=module.dtype)
        factors = dict(zip(names, values, strict=True))
        rng = module.make_rng("dropout") if layer.lora_dropout > 0 and module.has_rng("dropout") else None
        precision = getattr(module, "precision", None)
        if isinstance(
            self.method, core.RSSMethod
        ):  # the update is added to y in one pass (Dense: never materialised on its own)
            out = core.adapter_update(factorization, x, p, factors, layer, precision=precision, dropout_rng=rng,
                                      add_to=y)  # fmt: skip
            if out.shape != y.shape:
                raise ValueError(f"adapter update of {path!r} has shape {out.shape}, the layer output {y.shape}.")
            return out.astype(y.dtype)
        extra = {"base_output": y} if getattr(self.method, "needs_base_output", False) else {}
        p = core.normalize_operating_params(p, layer)  # every method sees the same standardised p
        delta = self.method.update(factorization, x, p, factors, layer, precision=precision, dropout_rng=rng, **extra)
        if delta.shape != y.shape:
            raise ValueError(f"adapter update of {path!r} has shape {delta.shape}, the layer output {y.shape}.")
        return y + delta.astype(y.dtype)


def _check_targets(config: AdapterConfig, seen: Mapping[str, str], adapted: Sequence[str]) -> None:
    """Raise when a target regex matches no adaptable layer, or an override regex matches no adapted one."""
    listing = "\n".join(f"  {path or repr(path)}  ({kind})" for path, kind in seen.items()) or "  (none)"
    for pattern in config.targets:
        if not any(patterns.matches([pattern], path) for path in seen):
            raise ValueError(
                f"target pattern {pattern!r} matches no adaptable layer (regex fullmatch on the layer path). "
                f"Adaptable paths:\n{listing}"
            )
    check_patterns_used(config, adapted)


def inject(
    model: nn.Module,
    config: AdapterConfig | str | Sequence[str] | None = None,
    rank: int | None = None,
    lora_alpha: float | None = None,
    *,
    param_dtype: Any = jnp.float32,
    method: Any = None,
    initializers: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Adapted:
    r"""Adapt the layers of an unmodified linen model that an :class:`~rssbl_jax.AdapterConfig` targets.

    .. math::

        y_\ell = f_\ell(x_\ell) + s_\ell\, B_\ell\big((A_\ell x_\ell) \odot g_\ell(\hat p) + S_\ell \hat p\big)

    for every ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Conv`` and ``nn.Embed`` layer ``ℓ`` whose
    path in the model (its params' keys joined by ``/``, e.g. ``"block_0/attention/query"``) fully matches one
    of the targets and none of ``exclude``. Call it as ``inject(model, config)`` or, equivalently,
    ``inject(model, targets, rank, lora_alpha, **settings)`` with any :class:`~rssbl_jax.AdapterConfig` field as a
    keyword. ``adapted.init(key, *args, p=p)`` returns ``model.init``'s variables with ``lora_*`` leaves beside
    each adapted kernel; ``d_p`` is read from ``p``. At init ``B = 0``, so the adapted model computes exactly the
    base model. ``partition``, ``freeze_base``, ``merge`` and ``save_adapters`` take ``adapted.config``.

    ``initializers`` overrides the initialiser of any RSS adapter leaf by name (``{"lora_a": ...}``); for the
    principal-subspace start (PiSSA-like, exact merge) see :func:`rssbl_jax.init_principal`. ``method`` replaces what
    the adapters compute (an :class:`~rssbl_jax.core.AdapterMethod`; RSSBilinearLoRA by
    default): baselines such as output-space FiLM or a hypernetwork reach every layer kind the same way.

    Raises:
      ValueError: when the model's ``__call__`` already takes an argument named ``p_keyword``; at the first
        call, when a target matches no adaptable layer (the error lists them) or a pattern matches no adapted one.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> adapted = inject(model, r"layers_0", rank=2, lora_alpha=4.0)
    >>> x, p = jnp.ones((3, 5)), jnp.ones((3, 2))
    >>> variables = adapted.init(jax.random.key(0), x, p=p)
    >>> sorted(variables["params"]["layers_0"])
    ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_c', 'lora_s']
    >>> bool(jnp.all(adapted.apply(variables, x, p=p) == model.apply(variables, x)))   # B = 0 at init
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"inject expects a flax.linen Module; got {type(model).__name__} (for NNX use rssbl_jax.nnx.inject)."
        )
    cfg = make_config(config, rank, lora_alpha, dict(settings))
    if not cfg.targets:
        raise ValueError("inject needs targets (regexes over layer paths) in its AdapterConfig.")
    check_keyword_free(type(model).__call__, cfg.p_keyword, f"{type(model).__name__}.__call__")
    return Adapted(
        model=model,
        config=cfg,
        param_dtype=param_dtype,
        method=core.RSS if method is None else method,
        initializers=dict(initializers) if initializers else None,
    )


def adaptable_paths(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, str]:
    """The paths and kinds of the layers of a linen ``model`` that :func:`inject` can adapt.

    Found by one abstract trace (``jax.eval_shape`` of ``model.init``), without computing anything.

    >>> import jax.numpy as jnp, flax.linen as nn
    >>> adaptable_paths(nn.Sequential([nn.Dense(8), nn.Conv(4, (3,))]), jnp.ones((2, 6, 3)))
    {'layers_0': 'Dense', 'layers_1': 'Conv'}
    """
    found: dict[str, str] = {}

    def record(next_fun, args, kwargs, context):
        kind = kind_of(context.module)
        if context.method_name == "__call__" and kind is not None:
            found["/".join(context.module.path)] = kind.name
        return next_fun(*args, **kwargs)

    def init():
        with nn.intercept_methods(record):
            return model.init(jax.random.key(0), *args, **kwargs)

    jax.eval_shape(init)
    return found


# --------------------------------------------------------------------------------------------------
# Pretrained base weights
# --------------------------------------------------------------------------------------------------


def _flat(tree: PyTree) -> dict[str, Any]:
    return {patterns.path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_base(variables: PyTree, pretrained: PyTree) -> PyTree:
    """Replace every non-adapter leaf of an adapted model's ``variables`` by the pretrained one.

    ``pretrained`` is the unmodified model's params (``model.init(...)["params"]`` or a checkpoint of
    them), or its whole variables dict (then every collection it holds, e.g. ``batch_stats``, is
    loaded). Paths and shapes must match the adapted tree's non-adapter leaves exactly; values keep
    ``pretrained``'s dtype. The adapter leaves are kept.

    Raises:
      ValueError: naming the first path that is missing, unexpected or of another shape.

    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Dense(3)
    >>> adapted = inject(model, "", rank=1, lora_alpha=1.0)   # the root layer's path is ""
    >>> variables = adapted.init(jax.random.key(0), jnp.ones((1, 2)), p=jnp.ones(1))
    >>> pretrained = model.init(jax.random.key(1), jnp.ones((1, 2)))["params"]
    >>> loaded = load_base(variables, pretrained)
    >>> bool(jnp.all(loaded["params"]["kernel"] == pretrained["kernel"])), sorted(loaded["params"])
    (True, ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_c', 'lora_s'])
    """
    if (
        isinstance(variables, Mapping)
        and "params" in variables
        and not (isinstance(pretrained, Mapping) and "params" in pretrained)
    ):
        pretrained = {"params": pretrained}
    elif not (isinstance(variables, Mapping) and "params" in variables):
        return load_base({"params": variables}, {"params": pretrained})["params"]

    adapters = {f"params/{layer}" if layer else "params" for layer in adapter_layers(variables["params"])}
    flat_pretrained = _flat(pretrained)
    collections = {str(name) for name in pretrained}

    def is_adapter(path: str) -> bool:
        layer, _, name = path.rpartition("/")
        return layer in adapters and core.is_adapter_leaf_name(name)

    frozen = {
        path: leaf
        for path, leaf in _flat(variables).items()
        if path.split("/")[0] in collections and not is_adapter(path)
    }
    for path, leaf in frozen.items():
        if path not in flat_pretrained:
            raise ValueError(
                f"pretrained weights have no leaf {path!r} (shape {jnp.shape(leaf)} in the adapted model)."
            )
        if jnp.shape(flat_pretrained[path]) != jnp.shape(leaf):
            raise ValueError(
                f"pretrained {path!r} has shape {jnp.shape(flat_pretrained[path])}; "
                f"the adapted model expects {jnp.shape(leaf)}."
            )
    for path, leaf in flat_pretrained.items():
        if path not in frozen:
            raise ValueError(f"pretrained leaf {path!r} (shape {jnp.shape(leaf)}) does not exist in the adapted model.")

    def pick(path, leaf):
        key = patterns.path_str(path)
        return jnp.asarray(flat_pretrained[key]) if key in frozen else leaf

    return jax.tree_util.tree_map_with_path(pick, variables)
