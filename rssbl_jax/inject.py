r"""Adapt an existing, unmodified Flax linen model by layer-path patterns (method interception, as qwix does).

While the model runs, every layer of a kind in :data:`rssbl_jax.factorization.KINDS` that the config adapts adds
:func:`rssbl_jax.apply.apply_adapter`'s update to its output. The params are the model's own tree plus ``lora_*``
leaves beside each adapted kernel (pretrained weights load with :func:`load_base`), partitioned by
:func:`rssbl_jax.tree.axes_from_kernel`.

Why ``p`` is an argument: ``adapted.apply(variables, x, p=p)`` builds the interceptor that hands ``p`` to every
adapted layer for that call only, so a ``jax.jit``-traced function computes with the ``p`` it is given, never one
captured at trace time. Why :class:`Adapted` shares the wrapped model's scope: its params stay the wrapped model's
tree (no prefix), so ``tabulate`` lists the ``lora_*`` leaves, it nests in larger linen modules, and targets name
paths in the wrapped model wherever it sits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta

from rssbl_jax import apply, patterns
from rssbl_jax.apply import apply_adapter, check_keyword_free, check_targets, linen_leaves, make_config, metadata_holder
from rssbl_jax.apply import outside_quantizer as outside_quantizer
from rssbl_jax.config import AdapterConfig
from rssbl_jax.factorization import kind_of
from rssbl_jax.methods import RSS, AdapterMethod
from rssbl_jax.tree import adapter_layers, adapter_leaf_paths

PyTree = Any


@dataclasses.dataclass(frozen=True)
class _Unadopted:
    """Holds the wrapped model out of linen's reach (a module field is adopted as a child: params under its name)."""

    module: nn.Module


class Adapted(nn.Module):
    r"""An unmodified linen ``model`` whose adapted layers carry a rank-space update modulated by ``p``: a linen module.

    Built by :func:`inject`; ``init``, ``apply``, ``tabulate`` and calls as a submodule hand ``p`` (the keyword
    ``config.p_keyword``) to every adapted layer. ``lora_dropout`` acts only with a ``"dropout"`` rng.

    Attributes:
      base: the wrapped linen model (not modified), where linen does not adopt it; read it as ``model``.
      config: the :class:`~rssbl_jax.AdapterConfig`; merge and checkpoints take it (or this object).
      param_dtype, method, initializers: as :func:`inject`'s arguments (``initializers`` as a tuple of pairs).

    >>> import flax.linen as nn
    >>> adapted = inject(nn.Sequential([nn.Dense(4), nn.Dense(2)]), "layers_0", rank=2, lora_alpha=2.0)
    >>> "lora_c" in adapted.tabulate(jax.random.key(0), jnp.ones((1, 3)), p=jnp.ones(2))   # the summary table
    True
    """

    base: _Unadopted
    config: AdapterConfig
    param_dtype: Any = jnp.float32
    method: AdapterMethod = RSS()
    initializers: tuple[tuple[str, Any], ...] | None = None

    @property
    def model(self) -> nn.Module:
        """The wrapped linen model (not modified)."""
        return self.base.module

    @property
    def adapter_config(self) -> AdapterConfig:
        """The same as :attr:`config`."""
        return self.config

    def setup(self) -> None:
        """Bind the wrapped model to this module's own scope, so its params sit where ``model.init`` puts them."""
        object.__setattr__(self, "_bound", self.base.module.clone(parent=self.scope))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)``, adapted layers under the keyword ``p``: ``[d_p]``, or ``[batch, d_p]`` when every
        adapted layer's input leads with the batch axis."""
        return self._run(None, args, kwargs)

    @nn.nowrap
    def apply(self, variables: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        """``Module.apply``; ``method`` names a method of the wrapped model (or is a function taking it)."""
        return super().apply(variables, *args, method=self._entry(method), **kwargs)

    @nn.nowrap
    def init(self, rngs: Any, *args: Any, method: Any = None, **kwargs: Any) -> Any:
        """``Module.init``: ``model.init``'s variables plus adapters beside each adapted kernel; ``d_p`` from ``p``."""
        return super().init(rngs, *args, method=self._entry(method), **kwargs)

    @nn.nowrap
    def adapted_paths(self, variables: Any) -> list[str]:
        """The paths of the adapted layers in ``variables`` (or its ``"params"``)."""
        params = variables.get("params", variables) if isinstance(variables, Mapping) else variables
        return adapter_layers(params)

    @nn.nowrap
    def _entry(self, method: Any) -> Any:
        """``Module.apply``'s ``method`` for a method of the wrapped model: it runs under the interceptor too."""
        if method is None or method == "__call__" or getattr(method, "__func__", method) is Adapted.__call__:
            return method  # this module's own call (as nn.tabulate names it)
        if isinstance(method, str):
            check_keyword_free(getattr(type(self.model), method), self.config.p_keyword, f"method {method!r}")
        else:
            check_keyword_free(method, self.config.p_keyword, f"method {getattr(method, '__name__', method)!r}")

        def entry(adapted: Adapted, *args: Any, **kwargs: Any) -> Any:
            return adapted._run(method, args, kwargs)

        return entry

    def _run(self, fun: Any, args: tuple, kwargs: dict) -> Any:
        keyword = self.config.p_keyword
        if keyword not in kwargs and self.method.uses_p:
            raise TypeError(f"the adapted model needs its operating parameters as the keyword {keyword}=...")
        kwargs = dict(kwargs)
        p = kwargs.pop(keyword, None)
        if self.is_initializing():
            apply.warn_if_silent(self.method, self.config.resolve(None), p, f"inject({type(self.model).__name__})")
        model = self._bound
        seen: dict[str, str] = {}
        adapted: list[str] = []
        with nn.intercept_methods(self._interceptor(seen, adapted, p)):
            if isinstance(fun, str):
                out = getattr(model, fun)(*args, **kwargs)
            else:
                out = model(*args, **kwargs) if fun is None else fun(model, *args, **kwargs)
        if fun is None:  # another method may legitimately skip some layers
            check_targets(self.config, seen, list(seen), adapted)
        return out

    def _interceptor(self, seen: dict[str, str], adapted: list[str], p: Any):
        own = tuple(self.scope.path)

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            kind = kind_of(module)
            full = tuple(module.path) if module.scope is not None else ()
            if context.method_name != "__call__" or kind is None or full[: len(own)] != own:
                return next_fun(*args, **kwargs)
            path = "/".join(str(name) for name in full[len(own) :])  # the layer's path in the wrapped model
            seen[path] = kind.name
            if not self.config.adapts(path):
                return next_fun(*args, **kwargs)
            kind.check(module, path)
            adapted.append(path)
            y = next_fun(*args, **kwargs)
            return outside_quantizer(self._update)(module, kind, path, args, kwargs, p, y)

        return interceptor

    def _update(self, module, kind, path, args, kwargs, p, y):
        """``y`` plus this call's update, the ``lora_*`` leaves read from (or created in) ``module``'s scope."""
        layer = self.config.resolve(path)
        box = module.get_variable("params", kind.kernel_name)
        x = jnp.asarray(args[0] if args else kwargs["inputs"])
        factorization = apply.factorize(
            kind, module, tuple(jnp.shape(meta.unbox(box))), self.method, layer.rank, x.shape, args[1:], kwargs
        )
        where = f"adapted layer {path!r}"
        shift = self.config.use_shift(module.has_variable("params", "bias"))
        factors = linen_leaves(
            module, self.method, layer, factorization, p, shift=shift, param_dtype=self.param_dtype,
            initializers=dict(self.initializers or ()), kernel_box=metadata_holder(box),
            keyword=self.config.p_keyword, where=where,
        )  # fmt: skip
        rng = module.make_rng("dropout") if layer.lora_dropout > 0 and module.has_rng("dropout") else None
        return apply_adapter(
            self.method, layer, factorization, x, p, y, factors, dtype=module.dtype,
            precision=getattr(module, "precision", None), dropout_rng=rng, where=where, keyword=self.config.p_keyword,
        )  # fmt: skip


def inject(
    model: nn.Module, config: AdapterConfig | str | Sequence[str] | None = None, rank: int | None = None,
    lora_alpha: float | None = None, *, param_dtype: Any = jnp.float32, method: Any = None,
    initializers: Mapping[str, Any] | None = None, **settings: Any,
) -> Adapted:  # fmt: skip
    r"""Adapt the layers of an unmodified linen model that an :class:`~rssbl_jax.AdapterConfig` targets.

    .. math::

        y_\ell = f_\ell(x_\ell) + s_\ell\, B_\ell\big((A_\ell x_\ell) \odot g_\ell(\hat p) + S_\ell \hat p\big)

    for every ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``, ``Embed`` layer ``ℓ`` whose path (params keys joined
    by ``/``, e.g. ``"block_0/attention/query"``) fully matches a target and no ``exclude``. ``B = 0`` at init.

    Args:
      model: the linen model (not modified).
      config: an :class:`~rssbl_jax.AdapterConfig`, or its targets (regexes over layer paths).
      rank, lora_alpha, settings: with targets, the config's fields as keywords (PEFT's ``target_modules`` too).
      param_dtype: dtype of the adapter parameters.
      method: an :class:`~rssbl_jax.AdapterMethod`, e.g. a baseline of :mod:`rssbl_jax.methods` (default: RSS).
      initializers: ``{leaf name: initializer}`` overrides (principal-subspace start: :func:`rssbl_jax.init_principal`).

    Returns:
      an :class:`Adapted` module; ``adapted.init(key, *args, p=p)`` reads ``d_p`` from ``p``; ``adapted.config`` is
      what ``partition``, ``merge`` and ``save_adapters`` take.

    Raises:
      TypeError: naming an unknown keyword.
      ValueError: when the model's ``__call__`` already takes ``p_keyword``; at the first call, when a target matches
        no adaptable layer (the error lists them) or a pattern matches no adapted one.

    >>> import flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> adapted, x, p = inject(model, r"layers_0", rank=2, lora_alpha=4.0), jnp.ones((3, 5)), jnp.ones((3, 2))
    >>> variables = adapted.init(jax.random.key(0), x, p=p)
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
        base=_Unadopted(model), config=cfg, param_dtype=param_dtype, method=RSS() if method is None else method,
        initializers=tuple(initializers.items()) if initializers else None,
    )  # fmt: skip


def adaptable_paths(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, str]:
    """The paths and kinds of the layers of a linen ``model`` that :func:`inject` can adapt (by ``jax.eval_shape``).

    >>> import flax.linen as nn
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


def _flat(tree: PyTree) -> dict[str, Any]:
    return {patterns.path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_base(variables: PyTree, pretrained: PyTree) -> PyTree:
    """Replace every non-adapter leaf of an adapted model's ``variables`` by the pretrained one.

    Args:
      variables: the adapted model's variables (or params); its adapter leaves are kept.
      pretrained: the model's params, or variables (every collection, e.g. ``batch_stats``); paths and shapes must
        match exactly, values keep their dtype.

    Raises:
      ValueError: naming the first path that is missing, unexpected or of another shape.

    >>> import flax.linen as nn
    >>> model, x = nn.Dense(3), jnp.ones((1, 2))
    >>> variables = inject(model, "", rank=1, lora_alpha=1.0).init(jax.random.key(0), x, p=jnp.ones(1))  # root: ""
    >>> pretrained = model.init(jax.random.key(1), x)["params"]
    >>> loaded = load_base(variables, pretrained)["params"]
    >>> bool(jnp.all(loaded["kernel"] == pretrained["kernel"])), sorted(loaded)
    (True, ['bias', 'kernel', 'lora_a', 'lora_b', 'lora_c', 'lora_s'])
    """
    if not (isinstance(variables, Mapping) and "params" in variables):
        return load_base({"params": variables}, {"params": pretrained})["params"]
    if not (isinstance(pretrained, Mapping) and "params" in pretrained):
        pretrained = {"params": pretrained}
    adapters = {f"params/{path}" for path in adapter_leaf_paths(variables["params"])}
    flat_pretrained = _flat(pretrained)
    collections = {str(name) for name in pretrained}
    frozen = {k: v for k, v in _flat(variables).items() if k.split("/")[0] in collections and k not in adapters}
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
