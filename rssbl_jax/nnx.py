r"""Flax NNX front-end: an RSSBilinearLoRA linear layer, and injection into an existing NNX model.

The update (:func:`rssbl_jax.inject.inject`'s math) is applied by :func:`rssbl_jax.apply.apply_adapter`, as in linen.
The factors are :class:`RSSBilinearLoRAParam`, an ``nnx.LoRAParam``, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``,
``nnx.state(model, nnx.LoRAParam)`` and every tool built on ``LoRAParam`` select exactly the adapters (as below;
the guide "Adapt an existing model", ``docs/guides/adapt.md``, trains and merges an injected model).

How ``p`` reaches the layers: the model's code does not pass it on, so ``adapted(*args, p=p)`` writes ``p`` into the
one :class:`OperatingParams` variable its adapted layers share and restores the old value afterwards, also on an
error (a standalone :class:`RSSBilinearLoRALinear` takes ``p`` as its second argument). The variable is graph state,
so ``nnx.jit``, ``nnx.vmap``, ``nnx.scan`` and ``nnx.remat`` trace it as an input: a traced function computes with
the ``p`` of the call that runs it, never one captured at trace time (a ``jax.jit`` closing over the model captures
it as a constant, like the weights: use ``nnx.jit``). A nested ``adapted(x, p=p2)`` or :func:`operating_params` block
uses ``p2``; between calls it is ``None``, and a layer reached without ``p`` says how to pass it. Rejected: a
thread-local context, invisible to the tracer, so one entered outside ``nnx.jit`` is baked into the trace;
composition (a wrapper around the base layer, as ``nnx.LoRALinear``), which moves the base weights to
``<layer>/base/kernel``, off the paths of pretrained checkpoints and linen-adapted trees, and still needs a way to
hand ``p`` past the model's code. Kept: a class swap on each adapted layer of the clone, to a subclass of its own
class whose ``__call__`` adds the update (:func:`merge` swaps back). The layer keeps its paths, its ``isinstance`` and
its caller's code; the subclass holds no ``p``, only the shared variable, so it cannot leave a stale one in a trace
(qwix, too, swaps a class, the root model's, and intercepts the products inside its call).

>>> from flax import nnx
>>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
>>> adapted = inject(model, r"layers/\d", rank=2, lora_alpha=4.0, d_p=2, rngs=nnx.Rngs(2))
>>> {i: sorted(leaves) for i, leaves in nnx.state(adapted, nnx.LoRAParam).to_pure_dict()["model"]["layers"].items()}
{0: ['lora_a', 'lora_b', 'lora_c', 'lora_s'], 2: ['lora_a', 'lora_b', 'lora_c', 'lora_s']}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rssbl_jax import patterns
from rssbl_jax.apply import check_keyword_free, check_targets, make_config
from rssbl_jax.config import AdapterConfig
from rssbl_jax.factorization import kind_of
from rssbl_jax.merge import fold_at
from rssbl_jax.methods import RSS, AdapterMethod
from rssbl_jax.nnx_layers import ADAPTED_CLASS, BASE_CLASS, add_adapters, factors_of, holding, kernel_of, kind_of_class
from rssbl_jax.nnx_layers import AdapterInfo as AdapterInfo
from rssbl_jax.nnx_layers import OperatingParams as OperatingParams
from rssbl_jax.nnx_layers import RSSBilinearLoRAConv as RSSBilinearLoRAConv
from rssbl_jax.nnx_layers import RSSBilinearLoRAEinsum as RSSBilinearLoRAEinsum
from rssbl_jax.nnx_layers import RSSBilinearLoRAEmbed as RSSBilinearLoRAEmbed
from rssbl_jax.nnx_layers import RSSBilinearLoRALinear as RSSBilinearLoRALinear
from rssbl_jax.nnx_layers import RSSBilinearLoRALinearGeneral as RSSBilinearLoRALinearGeneral
from rssbl_jax.nnx_layers import RSSBilinearLoRAParam as RSSBilinearLoRAParam

Initializer = jax.nn.initializers.Initializer


@contextlib.contextmanager
def operating_params(model: nnx.Module, p: jax.Array) -> Iterator[None]:
    """Give every adapted layer of ``model`` the operating parameters ``p`` inside the ``with`` block.

    For calling a method other than ``__call__`` (``adapted(x, p=p)`` does this itself); restored on exit.

    >>> from flax import nnx
    >>> adapted = inject(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "", rank=1, lora_alpha=1.0, d_p=2, rngs=nnx.Rngs(1))
    >>> with operating_params(adapted, jnp.ones(2)):
    ...     adapted.model(jnp.ones((4, 3))).shape
    (4, 2)
    """
    if p is None:
        raise ValueError("operating_params(model, p) got p=None; pass p of shape [d_p] or [batch, d_p].")
    found = {
        id(v): v
        for _, m in nnx.iter_modules(model)
        if isinstance(v := vars(m).get("operating_params"), OperatingParams)
    }
    if not found:
        raise ValueError(f"operating_params: {type(model).__name__} holds no adapted layer.")
    with holding(list(found.values()), p):
        yield


def adaptable_paths(model: nnx.Module) -> dict[str, str]:
    """Paths and kinds of the layers :func:`inject` can adapt: Linear, LinearGeneral, Einsum, Conv and Embed.

    >>> from flax import nnx
    >>> adaptable_paths(nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Embed(8, 1, rngs=nnx.Rngs(0))))
    {'layers/0': 'Dense', 'layers/2': 'Embed'}
    """
    return {
        patterns.path_str(path): kind.name for path, m in nnx.iter_modules(model) if (kind := kind_of(m)) is not None
    }


class Adapted(nnx.Module):
    """An NNX model with injected RSSBilinearLoRA layers: ``adapted(*args, p=p, **kwargs)`` runs ``model`` under ``p``.

    Built by :func:`inject`. ``model`` is the adapted copy (the original paths plus ``lora_*`` beside each adapted
    kernel); ``config`` (:class:`~rssbl_jax.AdapterConfig`) and ``method`` (:class:`~rssbl_jax.AdapterMethod`) are
    static; ``p`` (keyword ``config.p_keyword``) is held for the call in :attr:`operating_params`.

    >>> from flax import nnx
    >>> adapted = inject(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "", rank=1, lora_alpha=2.0, d_p=2, rngs=nnx.Rngs(1))
    >>> adapted(jnp.ones((4, 3)), p=jnp.ones((4, 2))).shape, adapted.config.gate
    ((4, 2), 'linear')
    """

    def __init__(self, model: nnx.Module, config: AdapterConfig, method: AdapterMethod, variable: OperatingParams):
        self.model = model
        self.config = config
        self.method = method
        self.operating_params = variable

    @property
    def adapter_config(self) -> AdapterConfig:
        """The same as :attr:`config`."""
        return self.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model with operating parameters ``p`` (``[d_p]`` or ``[batch, d_p]``) at every adapted layer."""
        keyword = self.config.p_keyword
        if keyword not in kwargs and self.method.uses_p:
            raise TypeError(f"the adapted model needs its operating parameters as the keyword {keyword}=...")
        p = kwargs.pop(keyword, None)
        if p is None and self.method.uses_p:
            raise ValueError(f"{keyword}=None: the adapted model needs operating parameters [d_p] or [batch, d_p].")
        with holding([self.operating_params], p):
            return self.model(*args, **kwargs)


def trainable(config: Any) -> Any:
    """An NNX filter for what trains: the adapters (``nnx.LoRAParam``) and the config's ``modules_to_save``.

    Use it where ``nnx.LoRAParam`` would go (``nnx.Optimizer``'s ``wrt``, ``nnx.DiffState``, ``nnx.state``);
    ``modules_to_save`` matches leaf paths relative to ``adapted.model`` (``"head/bias"``), as in linen.

    >>> from flax import nnx
    >>> adapted = inject(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=2.0, d_p=1, rngs=nnx.Rngs(2),
    ...                  modules_to_save=["bias"])
    >>> sorted(nnx.state(adapted, trainable(adapted)).to_pure_dict()["model"])
    ['bias', 'lora_a', 'lora_b', 'lora_c', 'lora_s']
    """
    extra = (config if isinstance(config, AdapterConfig) else config.config).modules_to_save

    def keep(path: tuple, value: Any) -> bool:
        if isinstance(value, nnx.LoRAParam):
            return True
        parts = [str(part) for part in path]
        parts = parts[1:] if parts[:1] == ["model"] else parts
        return isinstance(value, nnx.Param) and patterns.matches(extra, "/".join(parts))

    return keep


def inject(
    model: nnx.Module,
    config: AdapterConfig | str | Sequence[str] | None = None,
    rank: int | None = None,
    lora_alpha: float | None = None,
    d_p: int | None = None,
    rngs: nnx.Rngs | None = None,
    *,
    param_dtype: Any = jnp.float32,
    initializers: Mapping[str, Initializer] | None = None,
    method: AdapterMethod | None = None,
    **settings: Any,
) -> Adapted:
    r"""A copy (``nnx.clone``) of an NNX model, the layers an ``AdapterConfig`` targets adapted; ``model`` unchanged.

    The NNX counterpart of :func:`rssbl_jax.inject.inject`: each ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``
    and ``Embed`` whose path (attribute names joined by ``/``, e.g. ``"blocks/0/query"``) the config adapts becomes its
    ``RSSBilinearLoRA*`` subclass: the same base variables plus :class:`RSSBilinearLoRAParam` factors laid out as in
    :mod:`rssbl_jax.factorization`, so the NNX and linen adapters of one model have the same state tree. ``B = 0`` at
    init: the output is unchanged.

    Args:
      model: the NNX model (not modified).
      config, rank, lora_alpha, settings: an ``AdapterConfig``, or targets (regexes over layer paths; PEFT's
        ``target_modules`` too) with the config's fields.
      d_p, rngs: the number of operating parameters (not needed by a method that ignores ``p``); the ``nnx.Rngs``.
      param_dtype, initializers: the adapters' dtype; ``{leaf name: initializer}`` overrides.
      method: what the adapters compute (an :class:`~rssbl_jax.AdapterMethod`; :class:`~rssbl_jax.methods.RSS`).

    Raises:
      ValueError: a target matches no adaptable layer (the error lists them), a pattern matches no adapted layer,
        or the model's ``__call__`` already takes an argument named ``p_keyword``.
      TypeError: naming an unknown keyword.

    >>> from flax import nnx
    >>> net = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
    >>> adapted, x = inject(net, "layers/0", rank=2, lora_alpha=4.0, d_p=2, rngs=nnx.Rngs(2)), jnp.ones((4, 3))
    >>> bool(jnp.all(adapted(x, p=jnp.ones((4, 2))) == net(x))), type(net.layers[0]).__name__  # B = 0; net as it was
    (True, 'Linear')
    """
    method = RSS() if method is None else method
    if rngs is None or (d_p is None and method.uses_p):
        raise TypeError("rssbl_jax.nnx.inject needs d_p (the number of operating parameters) and rngs.")
    d_p = 1 if d_p is None else d_p
    if int(d_p) < 1:
        raise ValueError(f"d_p must be positive; got d_p={d_p}.")
    cfg = make_config(config, rank, lora_alpha, dict(settings))
    if not cfg.targets:
        raise ValueError("inject needs targets (regexes over layer paths) in its AdapterConfig.")
    check_keyword_free(type(model).__call__, cfg.p_keyword, f"{type(model).__name__}.__call__")
    model = nnx.clone(model)
    modules = {patterns.path_str(path): module for path, module in nnx.iter_modules(model)}
    adaptable = {path: kind for path, m in modules.items() if (kind := kind_of(m)) is not None}
    adapted = [path for path in adaptable if cfg.adapts(path)]
    # NNX: only adapted paths are candidates (a target matching excluded layers alone raises)
    check_targets(cfg, {path: kind.name for path, kind in adaptable.items()}, adapted, adapted)
    variable = OperatingParams(None)
    for path in adapted:
        layer, kind = modules[path], adaptable[path]
        kind.check(layer, path)
        has_bias = getattr(layer, "bias", None) is not None
        layer.__class__ = ADAPTED_CLASS[type(layer)]
        add_adapters(
            layer, kind, cfg.resolve(path), path, int(d_p), variable,
            shift=cfg.use_shift(has_bias), param_dtype=param_dtype, rngs=rngs, initializers=initializers,
            method=method,
        )  # fmt: skip
    return Adapted(model, cfg, method, variable)


def merge(model: nnx.Module, operating_params: jax.Array) -> nnx.Module:
    r"""A copy of an adapted NNX model with every adapted layer folded back into its base class at ``p0``.

    The fold is :func:`rssbl_jax.merge.merge`'s, with each layer's settings read from the layer. Takes an
    :class:`Adapted` (merges its ``model``) or a model holding adapted layers; the result has the unmodified model's
    classes and state tree, and the adapted model's output at ``p0``. For a batch of points, ``jax.vmap``
    :func:`rssbl_jax.merge.merge` over ``nnx.state(adapted.model, nnx.Param).to_pure_dict()`` with ``adapted.config``.

    Raises:
      ValueError: the model holds no adapted layer (e.g. merged already), a layer's method cannot be folded (checked
        before anything is folded), ``p0`` is not ``[d_p]``, or a bias-free layer learned a shift.

    >>> from flax import nnx
    >>> layer = RSSBilinearLoRALinear(3, 2, rank=1, lora_alpha=1.0, d_p=1, rngs=nnx.Rngs(0))
    >>> type(merge(layer, jnp.ones(1))).__name__
    'Linear'
    """
    merged = nnx.clone(model.model if isinstance(model, Adapted) else model)
    layers = [(patterns.path_str(path), layer) for path, layer in nnx.iter_modules(merged) if type(layer) in BASE_CLASS]
    if not layers:
        raise ValueError(
            "nnx merge found no adapted layer in the model (was it merged already? merge returns a new, plain model)."
        )
    for path, layer in layers:
        if not layer.rss_adapter.method.mergeable:
            raise ValueError(
                f"{path or 'layer'} was adapted with {layer.rss_adapter.method!r}, which merge cannot fold."
            )
    for path, layer in layers:
        base, info = BASE_CLASS[type(layer)], layer.rss_adapter
        kernel = kernel_of(layer, kind_of_class(base))
        bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None
        factors = factors_of(layer)
        folded = fold_at(
            path or "layer", kernel[...], bias, factors, operating_params, info.layer,
            precision=jax.lax.Precision.HIGHEST, hint="Inject with shift=None or False for bias-free layers.",
        )  # fmt: skip
        kernel[...] = folded.kernel
        if bias is not None:
            layer.bias[...] = folded.bias
        for name in (*info.leaves, "rss_adapter", "operating_params", "rss_dropout", "rss_config"):
            if name in vars(layer):
                delattr(layer, name)
        layer.__class__ = base
    return merged
