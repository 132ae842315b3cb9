r"""Flax NNX front-end: an RSSBilinearLoRA linear layer, and injection into an existing NNX model.

.. math::

    y = f(x) + \frac{\alpha_{\text{lora}}}{r}\, B\big((A x) \odot (g_0 + C p) + S p\big)

Adapter parameters are :class:`RSSBilinearLoRAParam`, a subclass of ``nnx.LoRAParam``, so
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, ``nnx.state(model, nnx.LoRAParam)`` and every tool
built on ``LoRAParam`` select exactly the adapters. The math is shared with the linen front-end
(:mod:`rssbl_jax.inject`, :mod:`rssbl_jax.core`); ``p`` acts only in :func:`rssbl_jax.core.modulate`.

Injected layers read the operating parameters from :func:`operating_params`, a context that
``Adapted.__call__(*args, p=p)`` sets around the model call; a standalone
:class:`RSSBilinearLoRALinear` also takes ``p`` as its second argument.

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
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import promote_dtype

from rssbl_jax import core
from rssbl_jax import linen as rss_linen
from rssbl_jax.inject import (
    Factorization,
    _as_pairs,
    _as_patterns,
    _check_patterns_matched,
    _first_match,
    adapter_delta,
    conv_factorization,
    dense_factorization,
    dense_general_factorization,
    einsum_factorization,
)

Initializer = jax.nn.initializers.Initializer
zeros_init = nnx.initializers.zeros_init()
"""Default initialiser of ``bias``, ``lora_b`` and ``lora_s``."""


class RSSBilinearLoRAParam(nnx.LoRAParam):
    """An RSSBilinearLoRA adapter factor (``lora_a``, ``lora_b``, ``lora_c``, ``lora_s``); an ``nnx.LoRAParam``.

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
            f"adapted layer {where} was called without operating parameters: call the adapted model as "
            "adapted(x, p=p), or wrap the call in `with rssbl_jax.nnx.operating_params(p):`."
        )
    return stack[-1]


# --------------------------------------------------------------------------------------------------
# Adapter parameters and update, shared by every kind
# --------------------------------------------------------------------------------------------------


class AdapterSettings(NamedTuple):
    """Static settings of one adapted NNX layer (its ``rss_settings``); the update is scaled by ``lora_alpha / rank``.

    >>> RSSBilinearLoRALinear(3, 2, rank=2, lora_alpha=4.0, d_p=1, rngs=nnx.Rngs(0)).rss_settings
    AdapterSettings(rank=2, lora_alpha=4.0, gate_offset=0.0, path='')
    """

    rank: int
    lora_alpha: float
    gate_offset: float
    path: str


def _add_adapters(
    layer: nnx.Module,
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    d_p: int,
    settings: AdapterSettings,
    *,
    shift: bool,
    param_dtype: Any,
    rngs: nnx.Rngs,
    lora_a_init: Initializer = rss_linen.default_lora_a_init,
    lora_b_init: Initializer = zeros_init,
    lora_c_init: Initializer | None = None,
    lora_s_init: Initializer = zeros_init,
) -> None:
    rank = settings.rank
    if rank < 1 or d_p < 1:
        raise ValueError(f"rank and d_p must be positive; got rank={rank}, d_p={d_p} for {settings.path or 'layer'}.")
    if lora_c_init is None:
        lora_c_init = rss_linen.default_lora_c_init if settings.gate_offset == 0 else nnx.initializers.zeros_init()
    layer.lora_a = RSSBilinearLoRAParam(lora_a_init(rngs.params(), tuple(a_shape), param_dtype))
    layer.lora_b = RSSBilinearLoRAParam(lora_b_init(rngs.params(), tuple(b_shape), param_dtype))
    layer.lora_c = RSSBilinearLoRAParam(lora_c_init(rngs.params(), (d_p, rank), param_dtype))
    layer.lora_s = RSSBilinearLoRAParam(lora_s_init(rngs.params(), (d_p, rank), param_dtype)) if shift else None
    layer.rss_settings = settings


def _factorization(layer: nnx.Module, x_shape: Sequence[int] | None, einsum_str: str | None = None) -> Factorization:
    """The factorization of an NNX layer's kernel; ``x_shape=None`` gives the factor shapes only."""
    rank = layer.rss_settings.rank
    kernel_shape = tuple(layer.kernel[...].shape)
    kind = _KIND_OF[_base_class(type(layer))]
    if kind == "Dense":
        return dense_factorization(kernel_shape, rank, layer.precision)
    if kind == "DenseGeneral":
        n_in = len(layer.in_features)
        x_ndim = len(x_shape) if x_shape is not None else n_in + 1
        return dense_general_factorization(kernel_shape, layer.axis, x_ndim, rank, layer.precision)
    if kind == "Einsum":
        equation = (einsum_str or layer.einsum_str).replace(" ", "")
        if x_shape is None:  # any input of the right number of axes gives the factor shapes
            lhs = equation.split(",")[0]
            x_shape = (1,) * (len(lhs.replace("...", "")) + ("..." in lhs))
        return einsum_factorization(equation, x_shape, kernel_shape, rank, layer.precision)
    return conv_factorization(
        kernel_shape,
        rank,
        kernel_size=layer.kernel_size,
        strides=layer.strides,
        padding=layer.padding,
        input_dilation=layer.input_dilation,
        kernel_dilation=layer.kernel_dilation,
        precision=layer.precision,
    )


def _delta(layer: nnx.Module, x: jax.Array, p: jax.Array, y: jax.Array, einsum_str: str | None = None) -> jax.Array:
    settings: AdapterSettings = layer.rss_settings
    x, p = jnp.asarray(x), jnp.asarray(p)
    factorization = _factorization(layer, x.shape, einsum_str)
    lora_s = None if layer.lora_s is None else layer.lora_s[...]
    x, p, a, b, c, s = promote_dtype(
        x, p, layer.lora_a[...], layer.lora_b[...], layer.lora_c[...], lora_s, dtype=layer.dtype
    )
    try:
        delta = adapter_delta(
            factorization, x, p, a, b, c, s,
            scale=settings.lora_alpha / settings.rank, gate_offset=settings.gate_offset, precision=layer.precision,
        )  # fmt: skip
    except ValueError as error:
        raise ValueError(f"adapted {type(layer).__name__}: {error}") from None
    return delta.astype(y.dtype)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class RSSBilinearLoRALinear(nnx.Linear):
    r"""An ``nnx.Linear`` with a rank-space update modulated by operating parameters ``p``.

    .. math::

        y = x W + b + \frac{\alpha_{\text{lora}}}{r}\, B\big((A x) \odot (g_0 + C p) + S p\big)

    ``kernel (in_features, out_features)`` and ``bias (out_features,)`` are ``nnx.Param`` exactly as in
    ``nnx.Linear``; ``lora_a (in_features, r)``, ``lora_b (r, out_features)``, ``lora_c (d_p, r)`` and
    ``lora_s (d_p, r)`` are :class:`RSSBilinearLoRAParam`. Initialisation as
    :class:`rssbl_jax.RSSBilinearLoRADense`: ``B = 0`` (the layer starts as its base), ``A`` as PEFT's
    LoRA, ``C`` lecun-normal (zeros when ``gate_offset != 0``), ``S = 0``.

    Args:
      in_features, out_features: input and output widths.
      rank: adapter rank ``r``.
      lora_alpha: scaling numerator; the update is multiplied by ``lora_alpha / rank``.
      d_p: number of operating parameters.
      use_bias: whether the base layer has a bias.
      gate_offset: constant ``g_0`` added to the gate (0.0: the seed's ``C p``; 1.0: ``1 + C p``).
      shift: whether to learn the shift ``S p`` (``lora_s``).
      dtype: compute dtype; inferred from inputs and params when ``None``.
      param_dtype: dtype of all parameters.
      precision: matmul precision.
      kernel_init, bias_init: initialisers of the base kernel and bias.
      lora_a_init, lora_b_init, lora_c_init, lora_s_init: initialisers of the adapter factors;
        ``lora_c_init=None`` picks lecun-normal for ``gate_offset == 0`` and zeros otherwise.
      rngs: the ``nnx.Rngs`` to draw initial values from.

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
        gate_offset: float = 0.0,
        shift: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Initializer = rss_linen.default_kernel_init,
        bias_init: Initializer = zeros_init,
        lora_a_init: Initializer = rss_linen.default_lora_a_init,
        lora_b_init: Initializer = zeros_init,
        lora_c_init: Initializer | None = None,
        lora_s_init: Initializer = zeros_init,
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
        settings = AdapterSettings(int(rank), float(lora_alpha), float(gate_offset), "")
        _add_adapters(
            self, (in_features, rank), (rank, out_features), d_p, settings,
            shift=shift, param_dtype=param_dtype, rngs=rngs,
            lora_a_init=lora_a_init, lora_b_init=lora_b_init, lora_c_init=lora_c_init, lora_s_init=lora_s_init,
        )  # fmt: skip

    def __call__(
        self, inputs: jax.Array, operating_params: jax.Array | None = None, out_sharding: Any = None
    ) -> jax.Array:
        """Apply the layer to ``x [..., in_features]``; ``p`` defaults to the :func:`operating_params` context."""
        p = (
            _current_operating_params(self.rss_settings.path or "RSSBilinearLoRALinear")
            if operating_params is None
            else operating_params
        )
        y = super().__call__(inputs, out_sharding=out_sharding)
        return y + _delta(self, inputs, p, y)


def _injected_call(layer: nnx.Module, base: type, inputs: jax.Array, args: tuple, kwargs: dict) -> jax.Array:
    """An injected layer's call: the base class's output plus the update, ``p`` from the context."""
    p = _current_operating_params(layer.rss_settings.path)
    y = base.__call__(layer, inputs, *args, **kwargs)
    einsum_str = kwargs.get("einsum_str", args[0] if args else None) if base is nnx.Einsum else None
    return y + _delta(layer, inputs, p, y, einsum_str)


# Each injected class subclasses its base alone (no mixin), so injection can swap ``__class__`` in place.


class RSSBilinearLoRALinearGeneral(nnx.LinearGeneral):
    r"""An injected ``nnx.LinearGeneral``: ``lora_a (*in_features, r)``, ``lora_b (r, *out_features)``.

    .. math::

        y = \mathrm{LinearGeneral}(x) + \frac{\alpha_{\text{lora}}}{r}\, B\big((A x) \odot (g_0 + C p) + S p\big)

    with ``A`` contracting the layer's input axes and ``B`` producing its output axes. Made by :func:`inject`.

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
    r"""An injected ``nnx.Einsum``, factors laid out as in :mod:`rssbl_jax.inject`. Made by :func:`inject`.

    .. math::

        y = \mathrm{Einsum}(x) + \frac{\alpha_{\text{lora}}}{r}\, B\big((A x) \odot (g_0 + C p) + S p\big)

    with ``A`` over the kernel's contracted axes and ``B`` over its output axes.

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
    r"""An injected ``nnx.Conv``: ``lora_a (*window, c_in, r)`` a conv, ``lora_b (r, c_out)`` 1×1; see :func:`inject`.

    .. math::

        y = \mathrm{Conv}(x) + \frac{\alpha_{\text{lora}}}{r}\, B \ast \big((A \ast x) \odot (g_0 + C p) + S p\big)

    ``A`` has the layer's window, strides, padding and dilations; ``p`` (one row per image) is broadcast over pixels.

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


_ADAPTED = {
    nnx.Linear: RSSBilinearLoRALinear,
    nnx.LinearGeneral: RSSBilinearLoRALinearGeneral,
    nnx.Einsum: RSSBilinearLoRAEinsum,
    nnx.Conv: RSSBilinearLoRAConv,
}
_KIND_OF = {nnx.Linear: "Dense", nnx.LinearGeneral: "DenseGeneral", nnx.Einsum: "Einsum", nnx.Conv: "Conv"}
_BASE_OF = {adapted: base for base, adapted in _ADAPTED.items()}


def _base_class(cls: type) -> type:
    return _BASE_OF.get(cls, cls)


def _path(parts: Sequence[Any]) -> str:
    return "/".join(str(part) for part in parts)


def adaptable_paths(model: nnx.Module) -> dict[str, str]:
    """Paths and kinds of the layers :func:`inject` can adapt: ``nnx.Linear``, ``LinearGeneral``, ``Einsum``, ``Conv``.

    >>> class Net(nnx.Module):
    ...     def __init__(self, rngs):
    ...         self.hidden = nnx.Linear(3, 8, rngs=rngs)
    ...         self.out = nnx.Linear(8, 1, rngs=rngs)
    >>> adaptable_paths(Net(nnx.Rngs(0)))
    {'hidden': 'Dense', 'out': 'Dense'}
    """
    return {_path(path): _KIND_OF[type(module)] for path, module in nnx.iter_modules(model) if type(module) in _KIND_OF}


class Adapted(nnx.Module):
    """An NNX model with injected RSSBilinearLoRA layers: ``adapted(*args, p=p, **kwargs)`` runs ``model`` under ``p``.

    Built by :func:`inject`. ``adapted.model`` is the (modified in place) model; its state has the
    original paths plus ``lora_*`` beside each target's ``kernel``.

    >>> import jax.numpy as jnp
    >>> adapted = inject(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), "", rank=1, lora_alpha=2.0, d_p=2, rngs=nnx.Rngs(1))
    >>> adapted(jnp.ones((4, 3)), p=jnp.ones((4, 2))).shape
    (4, 2)
    >>> config = adapted.adapter_config                 # the keyword arguments of rssbl_jax.save_adapters
    >>> config["targets"], config["rank"], config["lora_alpha"], config["gate_offset"]
    ([''], 1, 2.0, 0.0)
    """

    def __init__(self, model: nnx.Module, adapter_config: Mapping[str, Any]):
        self.model = model
        self.adapter_config_json = json.dumps(dict(adapter_config))  # a static string in the graph

    @property
    def adapter_config(self) -> dict[str, Any]:
        """The injection settings, as keyword arguments of :func:`rssbl_jax.save_adapters`."""
        return json.loads(self.adapter_config_json)

    def __call__(self, *args: Any, p: jax.Array, **kwargs: Any) -> Any:
        """Call the model with operating parameters ``p`` (``[d_p]`` or ``[batch, d_p]``) at every adapted layer."""
        with operating_params(p):
            return self.model(*args, **kwargs)


def inject(
    model: nnx.Module,
    targets: str | Sequence[str],
    rank: int,
    lora_alpha: float,
    d_p: int,
    rngs: nnx.Rngs,
    *,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    gate_offset: float = 0.0,
    shift: bool | None = None,
    param_dtype: Any = jnp.float32,
) -> Adapted:
    r"""Adapt, in place, the layers of an NNX model whose path matches ``targets``; return it wrapped.

    .. math::

        y_\ell = f_\ell(x_\ell)
            + \frac{\alpha_\ell}{r_\ell}\, B_\ell\big((A_\ell x_\ell) \odot (g_0 + C_\ell p) + S_\ell p\big)

    Every ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv`` whose path (attribute
    names joined by ``/``, e.g. ``"blocks/0/attention/query"``) fully matches one of ``targets`` becomes
    the corresponding ``RSSBilinearLoRA*`` layer: same object, same ``kernel``/``bias`` variables, plus
    :class:`RSSBilinearLoRAParam` factors laid out as in :mod:`rssbl_jax.inject` (so NNX and linen
    adapters of the same model have the same state tree). ``B = 0`` at init: the model is unchanged
    until trained.

    Args:
      model: an NNX model; its target layers are modified in place.
      targets: a regex or regexes over layer paths; each must match at least one adaptable layer, else
        ``ValueError`` lists the adaptable paths.
      rank: adapter rank ``r``.
      lora_alpha: scaling numerator; the update is multiplied by ``lora_alpha / rank``.
      d_p: number of operating parameters.
      rngs: ``nnx.Rngs`` to initialise the adapters from.
      rank_pattern, alpha_pattern: ``{regex: value}`` overrides per path (first full match wins).
      gate_offset: constant ``g_0`` added to the gate.
      shift: learn ``S p`` everywhere (``True``), nowhere (``False``), or only on targets with a bias.
      param_dtype: dtype of the adapter parameters.

    Returns:
      :class:`Adapted`, an ``nnx.Module`` called as ``adapted(*args, p=p, **kwargs)``.

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
    patterns = _as_patterns(targets)
    rank_pairs = _as_pairs(rank_pattern, "rank_pattern")
    alpha_pairs = _as_pairs(alpha_pattern, "alpha_pattern")
    modules = {_path(path): module for path, module in nnx.iter_modules(model)}
    adaptable = {path: _KIND_OF[type(m)] for path, m in modules.items() if type(m) in _KIND_OF}
    adapted = [path for path in adaptable if any(re.fullmatch(pattern, path) for pattern in patterns)]
    _check_patterns_matched(patterns, rank_pairs, alpha_pairs, adaptable, adapted)
    for path in adapted:
        layer = modules[path]
        kind = _KIND_OF[type(layer)]
        if kind == "DenseGeneral" and layer.batch_axis:
            raise ValueError(f"cannot adapt LinearGeneral {path!r} with batch_axis={dict(layer.batch_axis)}.")
        if kind == "Conv" and (layer.feature_group_count != 1 or layer.mask is not None):
            raise ValueError(f"cannot adapt Conv {path!r}: feature_group_count must be 1 and mask None.")
        layer_rank = int(_first_match(rank_pairs, path, rank))
        settings = AdapterSettings(
            layer_rank, float(_first_match(alpha_pairs, path, lora_alpha)), float(gate_offset), path
        )
        layer.__class__ = _ADAPTED[type(layer)]
        layer.rss_settings = settings
        factorization = _factorization(layer, None)
        has_bias = getattr(layer, "bias", None) is not None
        _add_adapters(
            layer, factorization.a_shape, factorization.b_shape, d_p, settings,
            shift=has_bias if shift is None else shift, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
    config = {
        "targets": list(patterns),
        "rank": int(rank),
        "lora_alpha": float(lora_alpha),
        "rank_pattern": dict(rank_pairs),
        "alpha_pattern": dict(alpha_pairs),
        "gate_offset": float(gate_offset),
        "shift": shift,
    }
    return Adapted(model, config)


def merge(model: nnx.Module, operating_params: jax.Array) -> nnx.Module:
    r"""A copy of an adapted NNX model with every adapted layer folded back into its base class at ``p0``.

    .. math::

        W' = W + \frac{\alpha}{r}\, A\,\mathrm{diag}(g_0 + C p_0)\,B, \qquad b' = b + \frac{\alpha}{r}\,(S p_0)\,B

    Accepts an :class:`Adapted` (returns a copy of its ``model``) or a model holding adapted layers.
    The result has the unmodified model's classes and state tree and computes the adapted model's
    output at ``p0``. To merge a batch of operating points, ``jax.vmap`` :func:`rssbl_jax.merge` over
    ``nnx.state(adapted.model, nnx.Param).to_pure_dict()``, which has the same layout as linen's params.

    Raises:
      ValueError: when ``p0`` is not ``[d_p]``, or a bias-free layer learned a shift (it has nowhere to go).

    >>> import jax.numpy as jnp
    >>> layer = RSSBilinearLoRALinear(3, 2, rank=1, lora_alpha=1.0, d_p=1, rngs=nnx.Rngs(0))
    >>> type(merge(layer, jnp.ones(1))).__name__
    'Linear'
    """
    source = model.model if isinstance(model, Adapted) else model
    merged = nnx.clone(source)
    for path, layer in list(nnx.iter_modules(merged)):
        if type(layer) not in _BASE_OF:
            continue
        settings: AdapterSettings = layer.rss_settings
        bias = layer.bias[...] if layer.bias is not None else None
        lora_s = None if layer.lora_s is None else layer.lora_s[...]
        if bias is None and lora_s is not None:
            raise ValueError(
                f"{_path(path) or 'layer'} has no bias, so its shift S p0 B cannot be merged into "
                f"{_BASE_OF[type(layer)].__name__}; inject with shift=None or False for bias-free layers."
            )
        folded = core.merge_kernel(
            layer.kernel[...], bias, layer.lora_a[...], layer.lora_b[...], layer.lora_c[...], lora_s, operating_params,
            scale=settings.lora_alpha / settings.rank, gate_offset=settings.gate_offset, precision=layer.precision,
        )  # fmt: skip
        layer.kernel[...] = folded.kernel
        if bias is not None:
            layer.bias[...] = folded.bias
        for name in (*core.ADAPTER_NAMES, "rss_settings"):
            delattr(layer, name)
        layer.__class__ = _BASE_OF[type(layer)]
    return merged
