r"""Flax NNX front-end: an RSSBilinearLoRA linear layer, and injection into an existing NNX model.

.. math::

    y = f(x) + s\, B\big((A x) \odot g(\hat p) + S \hat p\big)

computed by :func:`rssbl_jax.core.adapter_update`, the same function as linen's. Adapter parameters are
:class:`RSSBilinearLoRAParam`, a subclass of ``nnx.LoRAParam``, so ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``,
``nnx.state(model, nnx.LoRAParam)`` and every tool built on ``LoRAParam`` select exactly the adapters.

How ``p`` reaches the layers. An unmodified model's code does not pass ``p`` to its layers, so injected layers read
it from :func:`operating_params`, a context that ``Adapted.__call__(*args, p=p)`` enters around the model call
(inside any ``nnx.jit``/``jax.jit``, with the traced ``p``); a standalone :class:`RSSBilinearLoRALinear` also takes
``p`` as its second argument. We evaluated composition instead (a wrapper holding the base layer and
``self.lora``, as ``nnx.LoRALinear`` does): it moves the base weights to ``<layer>/base/kernel``, so pretrained
checkpoints and linen-adapted trees no longer share paths, and it still needs a way to hand ``p`` past the
unmodified model code. The context works under ``nnx.jit``, ``nnx.vmap``, ``nnx.scan`` and ``nnx.remat`` (tested in
``tests/test_nnx.py``), so we keep it. Adapted layers change class in place to a subclass of their base class
(``nnx.Linear`` → :class:`RSSBilinearLoRALinear`), which keeps every path and attribute of the base layer.

>>> import jax.numpy as jnp, optax
>>> from flax import nnx
>>> from rssbl_jax import nnx as rss_nnx
>>> model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 1, rngs=nnx.Rngs(1)))
>>> adapted = rss_nnx.inject(model, r"layers/\d", rank=2, lora_alpha=4.0, d_p=2, rngs=nnx.Rngs(2))
>>> optimizer = nnx.Optimizer(adapted, optax.adam(1e-2), wrt=nnx.LoRAParam)      # only the adapters
>>> x, p = jnp.ones((4, 3)), jnp.ones((4, 2))
>>> grads = nnx.grad(lambda m: jnp.mean(m(x, p=p) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(adapted)
>>> _ = optimizer.update(adapted, grads)
>>> merged = rss_nnx.merge(adapted, p[0])                       # plain nnx.Linear layers at p0
>>> bool(jnp.allclose(merged(x), adapted(x, p=p[0]), atol=1e-6))
True
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from rssbl_jax import core, patterns
from rssbl_jax.config import AdapterConfig, LayerConfig, check_patterns_used
from rssbl_jax.factorization import KINDS, LayerKind, kind_of
from rssbl_jax.inject import check_keyword_free, make_config, metadata_holder, outside_quantizer

Initializer = jax.nn.initializers.Initializer
zeros_init = nnx.initializers.zeros_init()
default_kernel_init = nnx.initializers.lecun_normal()
"""Default initialiser of ``bias``."""


class RSSBilinearLoRAParam(nnx.LoRAParam):
    """An RSSBilinearLoRA adapter factor (``lora_a``, ``lora_b``, ``lora_c``, ...); an ``nnx.LoRAParam``.

    >>> layer = RSSBilinearLoRALinear(3, 2, rank=1, lora_alpha=1.0, d_p=2, rngs=nnx.Rngs(0))
    >>> type(layer.lora_c).__name__, isinstance(layer.lora_c, nnx.LoRAParam), isinstance(layer.kernel, nnx.LoRAParam)
    ('RSSBilinearLoRAParam', True, False)
    """


# --------------------------------------------------------------------------------------------------
# Operating parameters reach injected layers through a context
# --------------------------------------------------------------------------------------------------

_CONTEXT = threading.local()


@contextlib.contextmanager
def operating_params(p: jax.Array) -> Iterator[None]:
    """Make ``p`` the operating parameters of every adapted layer called inside the ``with`` block.

    ``Adapted.__call__`` does this for you; use it directly to call another method of an adapted model.
    Inside ``nnx.jit``/``jax.jit``, enter it inside the traced function, with the traced ``p``.

    >>> import jax.numpy as jnp
    >>> layer = RSSBilinearLoRALinear(3, 2, rank=1, lora_alpha=1.0, d_p=2, rngs=nnx.Rngs(0))
    >>> with operating_params(jnp.ones(2)):
    ...     layer(jnp.ones((4, 3))).shape
    (4, 2)
    """
    if p is None:
        raise ValueError("operating_params(p) got p=None; pass p of shape [d_p] or [batch, d_p].")
    stack = _CONTEXT.__dict__.setdefault("stack", [])
    stack.append(p)
    try:
        yield
    finally:
        stack.pop()


def _current_operating_params(where: str) -> jax.Array:
    stack = getattr(_CONTEXT, "stack", [])
    if not stack:
        raise ValueError(
            f"adapted layer {where!r} was called without operating parameters: call the adapted model as "
            "adapted(x, p=p), or wrap the call in `with rssbl_jax.nnx.operating_params(p):`."
        )
    return stack[-1]


# --------------------------------------------------------------------------------------------------
# Adapter parameters and update, shared by every kind
# --------------------------------------------------------------------------------------------------


def _kernel(layer: nnx.Module, kind: LayerKind) -> nnx.Variable:
    return getattr(layer, kind.kernel_name)


def _add_adapters(
    layer: nnx.Module,
    kind: LayerKind,
    settings: LayerConfig,
    path: str,
    d_p: int,
    *,
    shift: bool,
    param_dtype: Any,
    rngs: nnx.Rngs,
    initializers: Mapping[str, Initializer | None] | None = None,
    method: Any = core.RSS,
) -> None:
    kernel = _kernel(layer, kind)
    factorization = kind.factorize(layer, tuple(kernel[...].shape), settings.rank, None, (), {})
    if isinstance(method, core.RSSMethod):
        specs = core.adapter_params(settings, factorization, d_p, shift=shift, initializers=initializers)
    else:
        specs = method.params(settings, factorization, d_p, shift=shift)
    source = metadata_holder(kernel)  # a qwix-quantised kernel's partitioning is on its qvalue
    metadata = source.get_metadata() if hasattr(source, "get_metadata") else {}
    # the kernel's partition names, under whichever key this Flax version uses (adapters inherit them, as qwix does)
    key = next((k for k in ("out_sharding", "sharding_names", "sharding") if metadata.get(k) is not None), None)
    names = metadata[key] if key is not None else None
    n_in = len(factorization.a_shape) - 1
    for name, (shape, init) in specs.items():
        extra = {}
        if names is not None:
            if name == "lora_a" and len(shape) == n_in + 1:
                extra = {key: (*tuple(names)[:n_in], None)}
            elif name == "lora_b" and len(shape) == len(names) - n_in + 1:
                extra = {key: (None, *tuple(names)[n_in:])}
        setattr(layer, name, RSSBilinearLoRAParam(init(rngs.params(), tuple(shape), param_dtype), **extra))
    layer.rss_layer = settings
    layer.rss_path = path
    layer.rss_leaves = tuple(specs)
    layer.rss_method = method
    layer.rss_dropout = nnx.Dropout(settings.lora_dropout, rngs=rngs) if settings.lora_dropout > 0 else None


def _factors(layer: nnx.Module) -> dict[str, Any]:
    return {name: getattr(layer, name)[...] for name in layer.rss_leaves}


def _delta(layer: nnx.Module, base: type, x: jax.Array, p: jax.Array, y: jax.Array, args: tuple, kwargs: dict):
    """``y`` (the base layer's output) plus the layer's update."""
    settings: LayerConfig = layer.rss_layer
    kind = _kind_of_class(base)
    x = jnp.asarray(x)
    factorization = kind.factorize(layer, tuple(_kernel(layer, kind)[...].shape), settings.rank, x.shape, args, kwargs)
    factors = _factors(layer)
    names = list(factors)
    if factorization.integer_inputs:
        p, *values = promote_dtype(jnp.asarray(p), *factors.values(), dtype=layer.dtype)
    else:
        if layer.rss_dropout is not None:
            x = layer.rss_dropout(x)
        x, p, *values = promote_dtype(x, jnp.asarray(p), *factors.values(), dtype=layer.dtype)
    factors = dict(zip(names, values, strict=True))
    precision = getattr(layer, "precision", None)
    try:
        if isinstance(layer.rss_method, core.RSSMethod):  # y plus the update in one pass (Dense: never written alone)
            return core.adapter_update(factorization, x, p, factors, settings, precision=precision,
                                       add_to=y).astype(y.dtype)  # fmt: skip
        extra = {"base_output": y} if getattr(layer.rss_method, "needs_base_output", False) else {}
        p = core.normalize_operating_params(p, settings)  # every method sees the same standardised p
        delta = layer.rss_method.update(factorization, x, p, factors, settings, precision=precision, **extra)
    except ValueError as error:
        raise ValueError(f"adapted {type(layer).__name__} {layer.rss_path!r}: {error}") from None
    return y + delta.astype(y.dtype)


def _injected_call(layer: nnx.Module, base: type, inputs: jax.Array, args: tuple, kwargs: dict) -> jax.Array:
    """An injected layer's call: the base class's output plus the update, ``p`` from the context."""
    p = _current_operating_params(layer.rss_path)
    y = base.__call__(layer, inputs, *args, **kwargs)
    return outside_quantizer(_delta)(layer, base, inputs, p, y, args, kwargs)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class RSSBilinearLoRALinear(nnx.Linear):
    r"""An ``nnx.Linear`` with a rank-space update modulated by operating parameters ``p``.

    .. math::

        y = x W + b + s\, B\big((A x) \odot g(\hat p) + S \hat p\big)

    ``kernel (in_features, out_features)`` and ``bias (out_features,)`` are ``nnx.Param`` exactly as in
    ``nnx.Linear``; ``lora_a (in_features, r)``, ``lora_b (r, out_features)``, ``lora_c (d_p, r)`` and
    ``lora_s (d_p, r)`` (and the affine/MLP gate's leaves) are :class:`RSSBilinearLoRAParam`, initialised by
    :func:`rssbl_jax.core.adapter_params` as in the linen layer.

    Args:
      in_features, out_features: input and output widths.
      rank: adapter rank ``r``.
      lora_alpha: scaling numerator; the update is multiplied by ``lora_alpha / rank``.
      d_p: number of operating parameters.
      use_bias: whether the base layer has a bias.
      gate, gate_offset, gate_hidden, use_rslora, lora_dropout, lora_a_init, p_mean, p_std: as in
        :class:`rssbl_jax.AdapterConfig`.
      shift: whether to learn the shift ``S p`` (``lora_s``).
      dtype: compute dtype; inferred from inputs and params when ``None``.
      param_dtype: dtype of all parameters.
      precision: matmul precision.
      kernel_init, bias_init: initialisers of the base kernel and bias.
      initializers: ``{leaf name: initializer}`` overrides of the adapter leaves.
      rngs: the ``nnx.Rngs`` to draw initial values (and dropout masks) from.

    >>> import jax.numpy as jnp
    >>> layer = RSSBilinearLoRALinear(5, 4, rank=2, lora_alpha=4.0, d_p=3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 7, 5)), jnp.ones((2, 3))).shape          # per-example p, broadcast over tokens
    (2, 7, 4)
    >>> sorted(nnx.state(layer, nnx.LoRAParam).to_pure_dict())
    ['lora_a', 'lora_b', 'lora_c', 'lora_s']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        lora_alpha: float,
        d_p: int,
        *,
        use_bias: bool = True,
        gate: str = "linear",
        gate_offset: float = 0.0,
        gate_hidden: int = 16,
        shift: bool = True,
        use_rslora: bool = False,
        lora_dropout: float = 0.0,
        lora_a_init: str = "lora",
        p_mean: Sequence[float] | None = None,
        p_std: Sequence[float] | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = zeros_init,
        initializers: Mapping[str, Initializer] | None = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        self.rss_config = AdapterConfig(
            rank=rank, lora_alpha=lora_alpha, gate=gate, gate_offset=gate_offset, gate_hidden=gate_hidden,
            shift=shift, use_rslora=use_rslora, lora_dropout=lora_dropout, lora_a_init=lora_a_init,
            p_mean=p_mean, p_std=p_std,
        )  # fmt: skip
        _add_adapters(
            self, _kind_of_class(nnx.Linear), self.rss_config.resolve(None), "", d_p,
            shift=shift, param_dtype=param_dtype, rngs=rngs, initializers=initializers,
        )  # fmt: skip

    @property
    def adapter_config(self) -> AdapterConfig:
        """This layer's :class:`~rssbl_jax.AdapterConfig`."""
        return self.rss_config

    def __call__(self, inputs: jax.Array, operating_params: jax.Array | None = None, **kwargs: Any) -> jax.Array:
        """Apply the layer to ``x [..., in_features]``; ``p`` defaults to the :func:`operating_params` context."""
        if operating_params is None:
            return _injected_call(self, nnx.Linear, inputs, (), kwargs)
        y = nnx.Linear.__call__(self, inputs, **kwargs)
        return _delta(self, nnx.Linear, inputs, operating_params, y, (), kwargs)


class RSSBilinearLoRALinearGeneral(nnx.LinearGeneral):
    """An injected ``nnx.LinearGeneral``: ``lora_a (*in_features, r)``, ``lora_b (r, *out_features)``.

    >>> import jax.numpy as jnp
    >>> adapted = inject(nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=2.0, d_p=1,
    ...                  rngs=nnx.Rngs(1))                      # "" is the path of the root layer
    >>> layer = adapted.model
    >>> type(layer).__name__, layer.lora_a.shape, layer.lora_b.shape, adapted(jnp.ones((3, 8)), p=jnp.ones(1)).shape
    ('RSSBilinearLoRALinearGeneral', (8, 2), (2, 2, 4), (3, 2, 4))
    """

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The ``nnx.LinearGeneral`` output plus the update under the :func:`operating_params` context."""
        return _injected_call(self, nnx.LinearGeneral, inputs, args, kwargs)


class RSSBilinearLoRAEinsum(nnx.Einsum):
    """An injected ``nnx.Einsum``, factors laid out as in :mod:`rssbl_jax.factorization`; see :func:`inject`.

    >>> import jax.numpy as jnp
    >>> adapted = inject(nnx.Einsum("btd,dhk->bthk", (8, 2, 4), rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=2.0,
    ...                  d_p=1, rngs=nnx.Rngs(1))
    >>> layer = adapted.model
    >>> layer.lora_a.shape, layer.lora_b.shape, adapted(jnp.ones((3, 5, 8)), p=jnp.ones((3, 1))).shape
    ((8, 2), (2, 2, 4), (3, 5, 2, 4))
    """

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The ``nnx.Einsum`` output plus the update under the :func:`operating_params` context."""
        return _injected_call(self, nnx.Einsum, inputs, args, kwargs)


class RSSBilinearLoRAConv(nnx.Conv):
    """An injected ``nnx.Conv``: ``lora_a (*window, c_in, r)`` a conv, ``lora_b (r, c_out)`` 1×1; see :func:`inject`.

    >>> import jax.numpy as jnp
    >>> adapted = inject(nnx.Conv(3, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=2.0, d_p=1,
    ...                  rngs=nnx.Rngs(1))
    >>> layer = adapted.model
    >>> layer.lora_a.shape, layer.lora_b.shape, adapted(jnp.ones((2, 6, 6, 3)), p=jnp.ones((2, 1))).shape
    ((3, 3, 3, 2), (2, 4), (2, 6, 6, 4))
    """

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The ``nnx.Conv`` output plus the update under the :func:`operating_params` context."""
        return _injected_call(self, nnx.Conv, inputs, args, kwargs)


class RSSBilinearLoRAEmbed(nnx.Embed):
    """An injected ``nnx.Embed``: ``lora_a (vocab, r)`` a lookup table, ``lora_b (r, features)``; see :func:`inject`.

    >>> import jax.numpy as jnp
    >>> adapted = inject(nnx.Embed(10, 4, rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=2.0, d_p=1, rngs=nnx.Rngs(1))
    >>> adapted.model.lora_a.shape, adapted(jnp.array([[1, 2, 3]]), p=jnp.ones((1, 1))).shape
    ((10, 2), (1, 3, 4))
    """

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        """The ``nnx.Embed`` output plus the update under the :func:`operating_params` context."""
        return _injected_call(self, nnx.Embed, inputs, args, kwargs)


_ADAPTED = {
    nnx.Linear: RSSBilinearLoRALinear,
    nnx.LinearGeneral: RSSBilinearLoRALinearGeneral,
    nnx.Einsum: RSSBilinearLoRAEinsum,
    nnx.Conv: RSSBilinearLoRAConv,
    nnx.Embed: RSSBilinearLoRAEmbed,
}
_BASE_OF = {adapted: base for base, adapted in _ADAPTED.items()}


def _kind_of_class(cls: type) -> LayerKind:
    """The :class:`~rssbl_jax.factorization.LayerKind` of an NNX base class or its adapted subclass."""
    base = _BASE_OF.get(cls, cls)
    return next(kind for kind in KINDS if kind.nnx is base)


def _path(parts: Sequence[Any]) -> str:
    return "/".join(str(part) for part in parts)


def adaptable_paths(model: nnx.Module) -> dict[str, str]:
    """Paths and kinds of the layers :func:`inject` can adapt: Linear, LinearGeneral, Einsum, Conv and Embed.

    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.hidden = nnx.Linear(3, 8, rngs=rngs)
    ...         self.out = nnx.Linear(8, 1, rngs=rngs)
    >>> adaptable_paths(Net(nnx.Rngs(0)))
    {'hidden': 'Dense', 'out': 'Dense'}
    """
    found = {}
    for path, module in nnx.iter_modules(model):
        kind = kind_of(module)
        if kind is not None:
            found[_path(path)] = kind.name
    return found


class Adapted(nnx.Module):
    """An NNX model with injected RSSBilinearLoRA layers: ``adapted(*args, p=p, **kwargs)`` runs ``model`` under ``p``.

    Built by :func:`inject`. ``adapted.model`` is the (modified in place) model; its state has the original paths
    plus ``lora_*`` beside each adapted kernel. ``adapted.config`` is the :class:`~rssbl_jax.AdapterConfig`, a static
    attribute of the graph. ``p`` is passed under the keyword ``config.p_keyword``.

    >>> import jax.numpy as jnp
    >>> adapted = inject(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "", rank=1, lora_alpha=2.0, d_p=2, rngs=nnx.Rngs(1))
    >>> adapted(jnp.ones((4, 3)), p=jnp.ones((4, 2))).shape
    (4, 2)
    >>> adapted.config.rank, adapted.config.lora_alpha, adapted.config.gate
    (1, 2.0, 'linear')
    """

    def __init__(self, model: nnx.Module, config: AdapterConfig):
        self.model = model
        self.config = config

    @property
    def adapter_config(self) -> AdapterConfig:
        """The same as :attr:`config`."""
        return self.config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model with operating parameters ``p`` (``[d_p]`` or ``[batch, d_p]``) at every adapted layer."""
        keyword = self.config.p_keyword
        if keyword not in kwargs:
            raise TypeError(f"the adapted model needs its operating parameters as the keyword {keyword}=...")
        p = kwargs.pop(keyword)
        if p is None:
            raise ValueError(f"{keyword}=None: the adapted model needs operating parameters [d_p] or [batch, d_p].")
        with operating_params(p):
            return self.model(*args, **kwargs)


def trainable(config: Any) -> Any:
    """An NNX filter for what trains: the adapters (``nnx.LoRAParam``) and the config's ``modules_to_save``.

    Use it where ``nnx.LoRAParam`` would go: ``nnx.Optimizer(adapted, tx, wrt=trainable(adapted))``,
    ``nnx.DiffState(0, trainable(adapted))``, ``nnx.state(adapted, trainable(adapted))``. ``modules_to_save`` patterns
    match leaf paths relative to ``adapted.model`` (``"head/bias"``), as in linen.

    >>> import jax.numpy as jnp
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.hidden, self.head = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 1, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.head(self.hidden(x))
    >>> adapted = inject(Net(nnx.Rngs(0)), "hidden", rank=2, lora_alpha=2.0, d_p=1, rngs=nnx.Rngs(1),
    ...                  modules_to_save=["head/bias"])
    >>> sorted(nnx.state(adapted, trainable(adapted)).flat_state())[:1]
    [(('model', 'head', 'bias'), ...)]
    """
    cfg = config if isinstance(config, AdapterConfig) else config.config
    extra = cfg.modules_to_save

    def keep(path: tuple, value: Any) -> bool:
        if isinstance(value, nnx.LoRAParam):
            return True
        parts = [str(part) for part in path]
        if parts and parts[0] == "model":
            parts = parts[1:]
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
    method: Any = None,
    **settings: Any,
) -> Adapted:
    r"""Adapt, in place, the layers of an NNX model that an ``AdapterConfig`` targets; return the model wrapped.

    .. math::

        y_\ell = f_\ell(x_\ell) + s_\ell\, B_\ell\big((A_\ell x_\ell) \odot g_\ell(\hat p) + S_\ell \hat p\big)

    Every ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv`` and ``Embed`` whose path (attribute names joined by
    ``/``, e.g. ``"blocks/0/attention/query"``) the config adapts becomes the corresponding ``RSSBilinearLoRA*``
    layer: same object, same base variables, plus :class:`RSSBilinearLoRAParam` factors laid out as in
    :mod:`rssbl_jax.factorization` (so NNX and linen adapters of the same model have the same state tree). Call it
    as ``inject(model, config, d_p=..., rngs=...)`` or ``inject(model, targets, rank, lora_alpha, d_p, rngs,
    **settings)``. ``B = 0`` at init: the model is unchanged until trained.

    Raises:
      ValueError: when a target matches no adaptable layer (the error lists them), a pattern matches no adapted
        layer, or the model's ``__call__`` already takes an argument named ``p_keyword``.

    >>> import jax.numpy as jnp
    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.hidden = nnx.Linear(3, 8, rngs=rngs)
    ...         self.out = nnx.Linear(8, 1, rngs=rngs)
    ...     def __call__(self, x):
    ...         return self.out(nnx.relu(self.hidden(x)))
    >>> net = Net(nnx.Rngs(0))
    >>> before = net(jnp.ones((4, 3)))
    >>> adapted = inject(net, "hidden", rank=2, lora_alpha=4.0, d_p=2, rngs=nnx.Rngs(1))
    >>> bool(jnp.all(adapted(jnp.ones((4, 3)), p=jnp.ones((4, 2))) == before))      # B = 0
    True
    >>> sorted(nnx.state(adapted, nnx.LoRAParam).to_pure_dict()["model"]["hidden"])
    ['lora_a', 'lora_b', 'lora_c', 'lora_s']
    """
    if d_p is None or rngs is None:
        raise TypeError("rssbl_jax.nnx.inject needs d_p (the number of operating parameters) and rngs.")
    if int(d_p) < 1:
        raise ValueError(f"d_p must be positive; got d_p={d_p}.")
    cfg = make_config(config, rank, lora_alpha, dict(settings))
    if not cfg.targets:
        raise ValueError("inject needs targets (regexes over layer paths) in its AdapterConfig.")
    check_keyword_free(type(model).__call__, cfg.p_keyword, f"{type(model).__name__}.__call__")
    modules = {_path(path): module for path, module in nnx.iter_modules(model)}
    adaptable = {path: kind_of(m) for path, m in modules.items() if kind_of(m) is not None}
    listing = "\n".join(f"  {path or repr(path)}  ({kind.name})" for path, kind in adaptable.items()) or "  (none)"
    for pattern in cfg.targets:
        if not any(cfg.adapts(path) and patterns.matches([pattern], path) for path in adaptable):
            raise ValueError(
                f"target pattern {pattern!r} matches no adaptable layer (regex fullmatch on the layer path). "
                f"Adaptable paths:\n{listing}"
            )
    adapted = [path for path in adaptable if cfg.adapts(path)]
    check_patterns_used(cfg, adapted)
    for path in adapted:
        layer, kind = modules[path], adaptable[path]
        kind.check(layer, path)
        has_bias = getattr(layer, "bias", None) is not None
        layer.__class__ = _ADAPTED[type(layer)]
        _add_adapters(
            layer, kind, cfg.resolve(path), path, int(d_p),
            shift=cfg.use_shift(has_bias), param_dtype=param_dtype, rngs=rngs, initializers=initializers,
            method=core.RSS if method is None else method,
        )  # fmt: skip
    return Adapted(model, cfg)


def merge(model: nnx.Module, operating_params: jax.Array) -> nnx.Module:
    r"""A copy of an adapted NNX model with every adapted layer folded back into its base class at ``p0``.

    .. math::

        W' = W + s\, A\,\mathrm{diag}\big(g(\hat p_0)\big)\,B, \qquad b' = b + s\,(S \hat p_0)\,B

    with each layer's settings read from the layer itself (set by :func:`inject` from the config). Accepts an
    :class:`Adapted` (returns a merged copy of its ``model``) or a model holding adapted layers. The result has the
    unmodified model's classes and state tree and computes the adapted model's output at ``p0``. To merge a batch of
    operating points, ``jax.vmap`` :func:`rssbl_jax.merge` over ``nnx.state(adapted.model, nnx.Param)
    .to_pure_dict()`` with ``adapted.config``.

    Raises:
      ValueError: when the model holds no adapted layer (e.g. it was merged already), ``p0`` is not ``[d_p]``, or
        a bias-free layer learned a shift (it has nowhere to go).

    >>> import jax.numpy as jnp
    >>> layer = RSSBilinearLoRALinear(3, 2, rank=1, lora_alpha=1.0, d_p=1, rngs=nnx.Rngs(0))
    >>> type(merge(layer, jnp.ones(1))).__name__
    'Linear'
    """
    source = model.model if isinstance(model, Adapted) else model
    merged = nnx.clone(source)
    count = 0
    for path, layer in list(nnx.iter_modules(merged)):
        if type(layer) not in _BASE_OF:
            continue
        count += 1
        base = _BASE_OF[type(layer)]
        kind = _kind_of_class(base)
        kernel = _kernel(layer, kind)
        bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None
        factors = _factors(layer)
        if bias is None and factors.get("lora_s") is not None:
            raise ValueError(
                f"{_path(path) or 'layer'} has no bias, so its shift S p0 B cannot be merged into "
                f"{base.__name__}; inject with shift=None or False for bias-free layers."
            )
        try:
            folded = core.fold(
                kernel[...], bias, factors, operating_params, layer.rss_layer, precision=jax.lax.Precision.HIGHEST
            )
        except ValueError as error:
            raise ValueError(f"{_path(path) or 'layer'}: {error}") from None
        kernel[...] = folded.kernel
        if bias is not None:
            layer.bias[...] = folded.bias
        if not isinstance(layer.rss_method, core.RSSMethod):
            raise ValueError(
                f"{_path(path) or 'layer'} was adapted with {layer.rss_method!r}, which merge cannot fold."
            )
        for name in (
            *layer.rss_leaves,
            "rss_layer",
            "rss_path",
            "rss_dropout",
            "rss_config",
            "rss_leaves",
            "rss_method",
        ):
            if name in vars(layer):
                delattr(layer, name)
        layer.__class__ = base
    if count == 0:
        raise ValueError(
            "nnx merge found no adapted layer in the model (was it merged already? merge returns a new, plain model)."
        )
    return merged
