r"""The NNX adapted layers (exported by :mod:`rssbl_jax.nnx`, which explains how ``p`` reaches them).

Each is its base class plus :class:`RSSBilinearLoRAParam` leaves and an :class:`OperatingParams` variable; its call
adds :func:`rssbl_jax.apply.apply_adapter`'s update to the base class's output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rssbl_jax.apply import apply_adapter, factorize, leaf_specs, metadata_holder, outside_quantizer
from rssbl_jax.config import AdapterConfig, LayerConfig
from rssbl_jax.factorization import KINDS, LayerKind
from rssbl_jax.methods import RSS, AdapterMethod

Initializer = jax.nn.initializers.Initializer
zeros_init = nnx.initializers.zeros_init()
default_kernel_init = nnx.initializers.lecun_normal()


class RSSBilinearLoRAParam(nnx.LoRAParam):
    """An RSSBilinearLoRA adapter factor (``lora_a``, ``lora_b``, ``lora_c``, ...); an ``nnx.LoRAParam``.

    >>> from flax import nnx
    >>> layer = RSSBilinearLoRALinear(3, 2, rank=1, lora_alpha=1.0, d_p=2, rngs=nnx.Rngs(0))
    >>> isinstance(layer.lora_c, nnx.LoRAParam), isinstance(layer.kernel, nnx.LoRAParam)
    (True, False)
    """


class OperatingParams(nnx.Variable):
    """The operating parameters ``p`` of the call in progress (``None`` between calls); graph state, not a Param.

    >>> from flax import nnx
    >>> layer = RSSBilinearLoRALinear(3, 2, rank=1, lora_alpha=1.0, d_p=2, rngs=nnx.Rngs(0))
    >>> layer.operating_params.get_value() is None
    True
    """


@contextlib.contextmanager
def holding(variables: Sequence[OperatingParams], p: Any) -> Iterator[None]:
    """Set every variable to ``p`` inside the block; put each previous value back on exit, also on an error."""
    previous = [variable.get_value() for variable in variables]
    for variable in variables:
        variable.set_value(p)
    try:
        yield
    finally:
        for variable, value in zip(variables, previous, strict=True):
            variable.set_value(value)


class AdapterInfo(NamedTuple):
    """What an adapted layer remembers about its adapter (a static attribute: hashable)."""

    layer: LayerConfig
    path: str
    leaves: tuple[str, ...]
    method: AdapterMethod


def kernel_of(layer: nnx.Module, kind: LayerKind) -> nnx.Variable:
    """The base weight variable of ``layer`` (``kernel``, or ``embedding`` for Embed)."""
    return getattr(layer, kind.kernel_name)


def add_adapters(
    layer: nnx.Module,
    kind: LayerKind,
    settings: LayerConfig,
    path: str,
    d_p: int,
    p_variable: OperatingParams,
    *,
    shift: bool,
    param_dtype: Any,
    rngs: nnx.Rngs,
    initializers: Mapping[str, Initializer | None] | None = None,
    method: AdapterMethod,
) -> None:
    """Give ``layer`` the method's adapter leaves (sharded like its kernel), its settings and the ``p`` variable."""
    kernel = kernel_of(layer, kind)
    kernel_shape = tuple(kernel[...].shape)
    factorization = factorize(kind, layer, kernel_shape, method, settings.rank)
    source = metadata_holder(kernel)  # a qwix-quantised kernel's partitioning is on its qvalue
    metadata = source.get_metadata() if hasattr(source, "get_metadata") else {}
    # the kernel's partition names, under this Flax version's key (adapters inherit them, as in qwix)
    key = next((k for k in ("out_sharding", "sharding_names", "sharding") if metadata.get(k) is not None), None)
    specs = leaf_specs(
        method, settings, factorization, d_p, shift=shift, initializers=initializers,
        kernel_names=None if key is None else tuple(metadata[key]), kernel_shape=kernel_shape,
    )  # fmt: skip
    for name, leaf in specs.items():
        extra = {} if leaf.names is None else {key: leaf.names}
        setattr(layer, name, RSSBilinearLoRAParam(leaf.init(rngs.params(), leaf.shape, param_dtype), **extra))
    layer.rss_adapter = AdapterInfo(settings, path, tuple(specs), method)
    layer.operating_params = p_variable
    layer.rss_dropout = nnx.Dropout(settings.lora_dropout, rngs=rngs) if settings.lora_dropout > 0 else None


def factors_of(layer: nnx.Module) -> dict[str, Any]:
    """The adapter leaves' values of an adapted layer, by name."""
    return {name: getattr(layer, name)[...] for name in layer.rss_adapter.leaves}


def _update(layer: nnx.Module, base: type, x: jax.Array, p: Any, y: jax.Array, args: tuple, kwargs: dict):
    """``y`` (the base layer's output) plus the update."""
    info: AdapterInfo = layer.rss_adapter
    kind = kind_of_class(base)
    x = jnp.asarray(x)
    shape = tuple(kernel_of(layer, kind)[...].shape)
    factorization = factorize(kind, layer, shape, info.method, info.layer.rank, x.shape, args, kwargs)
    if layer.rss_dropout is not None and not factorization.integer_inputs:
        x = layer.rss_dropout(x)
    return apply_adapter(
        info.method, info.layer, factorization, x, p, y, factors_of(layer), dtype=layer.dtype,
        precision=getattr(layer, "precision", None), where=f"adapted {type(layer).__name__} {info.path!r}",
    )  # fmt: skip


def adapted_call(layer: nnx.Module, base: type, inputs: jax.Array, args: tuple, kwargs: dict, p: Any = None):
    """An adapted layer's call: the base class's output plus the update, ``p`` given or from the model's call."""
    info: AdapterInfo = layer.rss_adapter
    p = layer.operating_params.get_value() if p is None else p
    if p is None and info.method.uses_p:
        raise ValueError(
            f"adapted layer {info.path!r} was called without operating parameters: call the adapted model as "
            "adapted(x, p=p), or another of its methods inside `with rssbl_jax.nnx.operating_params(adapted, p):`."
        )
    y = base.__call__(layer, inputs, *args, **kwargs)
    return outside_quantizer(_update)(layer, base, inputs, p, y, args, kwargs)


class _Injected(nnx.Module):
    """The injected layers' call: the base class's output plus the update under the adapted model's ``p``."""

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        return adapted_call(self, BASE_CLASS[type(self)], inputs, args, kwargs)


class RSSBilinearLoRALinear(nnx.Linear):
    r"""An ``nnx.Linear`` with a rank-space update modulated by operating parameters ``p``.

    .. math::

        y = x W + b + s\, B\big((A x) \odot g(\hat p) + S \hat p\big)

    ``kernel (in_features, out_features)`` and ``bias (out_features,)`` are ``nnx.Linear``'s ``nnx.Param``;
    ``lora_a (in_features, r)``, ``lora_b (r, out_features)``, ``lora_c (d_p, r)``, ``lora_s (d_p, r)`` (and the
    affine/MLP gate's leaves) are :class:`RSSBilinearLoRAParam`, initialised by :func:`rssbl_jax.core.adapter_params`.

    Args:
      in_features, out_features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as in
        ``nnx.Linear`` (``param_dtype`` also for the adapters).
      rank, lora_alpha, d_p: adapter rank ``r``; update scale ``lora_alpha / rank``; number of operating parameters.
      gate, gate_offset, gate_hidden, shift, use_rslora, lora_dropout, lora_a_init, p_mean, p_std: as in
        :class:`rssbl_jax.AdapterConfig` (``shift``: learn ``S p``, ``lora_s``).
      initializers, rngs: ``{leaf name: initializer}`` overrides; the ``nnx.Rngs`` for initial values and dropout.

    >>> from flax import nnx
    >>> layer = RSSBilinearLoRALinear(5, 4, rank=2, lora_alpha=4.0, d_p=3, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 7, 5)), jnp.ones((2, 3))).shape          # per-example p, broadcast over tokens
    (2, 7, 4)
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
            in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
            kernel_init=kernel_init, bias_init=bias_init, rngs=rngs,
        )  # fmt: skip
        self.rss_config = AdapterConfig(
            rank=rank, lora_alpha=lora_alpha, gate=gate, gate_offset=gate_offset, gate_hidden=gate_hidden,
            shift=shift, use_rslora=use_rslora, lora_dropout=lora_dropout, lora_a_init=lora_a_init,
            p_mean=p_mean, p_std=p_std,
        )  # fmt: skip
        add_adapters(
            self, kind_of_class(nnx.Linear), self.rss_config.resolve(None), "", d_p, OperatingParams(None),
            shift=shift, param_dtype=param_dtype, rngs=rngs, initializers=initializers, method=RSS(),
        )  # fmt: skip

    @property
    def adapter_config(self) -> AdapterConfig:
        """This layer's :class:`~rssbl_jax.AdapterConfig`."""
        return self.rss_config

    def __call__(self, inputs: jax.Array, operating_params: jax.Array | None = None, **kwargs: Any) -> jax.Array:
        """Apply the layer to ``x [..., in_features]`` under ``p`` (by default the enclosing adapted model's)."""
        return adapted_call(self, nnx.Linear, inputs, (), kwargs, operating_params)


class RSSBilinearLoRALinearGeneral(_Injected, nnx.LinearGeneral):
    """An injected ``nnx.LinearGeneral``: ``lora_a (*in_features, r)``, ``lora_b (r, *out_features)``.

    >>> from flax import nnx
    >>> from rssbl_jax.nnx import inject                                      # "" is the root layer's path
    >>> adapted = inject(nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0)), "", 2, 2.0, d_p=1, rngs=nnx.Rngs(1))
    >>> adapted.model.lora_a.shape, adapted.model.lora_b.shape, adapted(jnp.ones((3, 8)), p=jnp.ones(1)).shape
    ((8, 2), (2, 2, 4), (3, 2, 4))
    """


class RSSBilinearLoRAEinsum(_Injected, nnx.Einsum):
    """An injected ``nnx.Einsum``, factors laid out as in :mod:`rssbl_jax.factorization`.

    >>> from flax import nnx
    >>> from rssbl_jax.nnx import inject
    >>> adapted = inject(nnx.Einsum("btd,dhk->bthk", (8, 2, 4), rngs=nnx.Rngs(0)), "", 2, 2.0, d_p=1, rngs=nnx.Rngs(1))
    >>> adapted.model.lora_a.shape, adapted.model.lora_b.shape, adapted(jnp.ones((3, 5, 8)), p=jnp.ones((3, 1))).shape
    ((8, 2), (2, 2, 4), (3, 5, 2, 4))
    """


class RSSBilinearLoRAConv(_Injected, nnx.Conv):
    """An injected ``nnx.Conv``: ``lora_a (*window, c_in, r)`` a conv, ``lora_b (r, c_out)`` 1×1.

    >>> from flax import nnx
    >>> from rssbl_jax.nnx import inject
    >>> adapted = inject(nnx.Conv(3, 4, kernel_size=(3, 3), rngs=nnx.Rngs(0)), "", 2, 2.0, d_p=1, rngs=nnx.Rngs(1))
    >>> adapted.model.lora_a.shape, adapted.model.lora_b.shape, adapted(jnp.ones((2, 6, 6, 3)), p=jnp.ones(1)).shape
    ((3, 3, 3, 2), (2, 4), (2, 6, 6, 4))
    """


class RSSBilinearLoRAEmbed(_Injected, nnx.Embed):
    """An injected ``nnx.Embed``: ``lora_a (vocab, r)`` a lookup table, ``lora_b (r, features)``.

    >>> from flax import nnx
    >>> from rssbl_jax.nnx import inject
    >>> adapted = inject(nnx.Embed(10, 4, rngs=nnx.Rngs(0)), "", rank=2, lora_alpha=2.0, d_p=1, rngs=nnx.Rngs(1))
    >>> adapted.model.lora_a.shape, adapted(jnp.array([[1, 2, 3]]), p=jnp.ones((1, 1))).shape
    ((10, 2), (1, 3, 4))
    """


ADAPTED_CLASS: dict[type, type] = {
    nnx.Linear: RSSBilinearLoRALinear,
    nnx.LinearGeneral: RSSBilinearLoRALinearGeneral,
    nnx.Einsum: RSSBilinearLoRAEinsum,
    nnx.Conv: RSSBilinearLoRAConv,
    nnx.Embed: RSSBilinearLoRAEmbed,
}
BASE_CLASS = {adapted: base for base, adapted in ADAPTED_CLASS.items()}


def kind_of_class(cls: type) -> LayerKind:
    """The :class:`~rssbl_jax.factorization.LayerKind` of an NNX base class or its adapted subclass."""
    return next(kind for kind in KINDS if kind.nnx is BASE_CLASS.get(cls, cls))
