r"""Conditional QLoRA: a frozen base quantised by qwix, RSSBilinearLoRA adapters in full precision.

.. math::

    y = Q(W)\, x + b + s\, B\big((A x) \odot g(\hat p) + S \hat p\big)

``Q(W)``, the base kernel, is stored quantised (int8, int4, nf4, fp8 or any ``qtype`` qwix knows) and computed by
qwix's ``dot_general``/``einsum``; ``A``, ``B``, ``C``, ``S`` stay in ``param_dtype``. :func:`quantize_base` is
``qwix.quantize_model`` with a weight-only ``PtqProvider``; :func:`rssbl_jax.inject` / :func:`rssbl_jax.nnx.inject`
compose with it as the update runs with qwix's interception off (:func:`rssbl_jax.inject.outside_quantizer`): only
the base layer's products see ``Q(W)``. ``qwix.quantize_model`` subclasses the model it is given, so adapt layers
inside it (as below), not a bare root layer. A quantised kernel is a ``WithAux`` leaf (a ``QArray`` of ``qvalue``
and per-channel ``scale``, plus its recipe), frozen by :func:`rssbl_jax.partition` and :func:`rssbl_jax.freeze_base`
so no integer leaf is differentiated; :func:`merge` folds adapters into it (errors: BENCHMARKS.md, "Quantised base").

>>> import flax.linen as nn, rssbl_jax
>>> model = rssbl_jax.quantize.quantize_base(nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)]), "int8")
>>> adapted = rssbl_jax.inject(model, r"layers_\d", rank=2, lora_alpha=4.0)
>>> variables = adapted.init(jax.random.key(0), x := jnp.ones((3, 16)), p=(p := jnp.ones((3, 2))))
>>> layer = variables["params"]["layers_0"]
>>> str(layer["kernel"].array.qvalue.dtype), str(layer["lora_a"].dtype), adapted.apply(variables, x, p=p).shape
('int8', 'float32', (3, 4))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rssbl_jax import patterns, tree
from rssbl_jax.merge import merge as merge_params
from rssbl_jax.tree import PyTree

QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4", "fp8": jnp.float8_e4m3fn}
"""Short names of common weight formats; any other ``qtype`` qwix accepts can be passed as is."""


def _qwix():
    try:
        import qwix
        from qwix._src.providers import ptq
    except ImportError as error:  # pragma: no cover - qwix is a dependency of this module only
        raise ImportError("rssbl_jax.quantize needs qwix (pip install qwix).") from error
    return qwix, ptq


def quantize_base(
    model: Any,
    qtype: Any = "int8",
    *model_inputs: Any,
    module_path: str = ".*",
    tile_size: int | None = None,
    **model_inputs_kwargs: Any,
) -> Any:
    r"""The model with its kernels quantised by qwix (weight-only PTQ); inject adapters into the result.

    Linen: ``init`` (or ``inject(...).init``) creates the quantised kernels, ``apply`` refuses float ones (quantise a
    pretrained tree with :func:`quantize_params`).

    Args:
      model: a linen or NNX model (unadapted, or NNX already adapted).
      qtype: ``"int8"``, ``"int4"``, ``"nf4"``, ``"fp8"`` or any ``weight_qtype`` qwix takes.
      model_inputs, model_inputs_kwargs: NNX only: the inputs, as for ``quantize_model`` (with ``p=...`` once adapted).
      module_path: regex (fullmatch) over layer paths whose kernels are quantised; adapters are never quantised.
      tile_size: qwix's sub-channel tile along the contracted axis (e.g. 64 or 128 for 4-bit; ``None``: per channel).

    >>> import flax.linen as nn
    >>> params = quantize_base(nn.Sequential([nn.Dense(4)]), "nf4").init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> str(quantized_kernels(params)["layers_0/kernel"].qvalue.dtype)  # nf4 codes in 4 bits
    'uint4'
    """
    qwix, _ = _qwix()
    rule = qwix.QuantizationRule(module_path=module_path, weight_qtype=QTYPES.get(qtype, qtype), tile_size=tile_size)
    return qwix.quantize_model(model, qwix.PtqProvider([rule]), *model_inputs, **model_inputs_kwargs)


def _is_quantized(x: Any) -> bool:
    _, ptq = _qwix()
    return isinstance(x, ptq.WithAux)


def quantized_kernels(params: PyTree) -> dict[str, Any]:
    """The quantised leaves of ``params`` (qwix ``QArray``s) by path: what the base stores.

    >>> import flax.linen as nn
    >>> params = quantize_base(nn.Sequential([nn.Dense(4)]), "int8").init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> {path: q.qvalue.shape for path, q in quantized_kernels(params).items()}
    {'layers_0/kernel': (8, 4)}"""
    return {path: leaf.array for path, leaf in _quantized_leaves(params).items()}


def _quantized_leaves(params: PyTree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_quantized)[0]
    return {patterns.path_str(path): leaf for path, leaf in flat if _is_quantized(leaf)}


def dequantize(params: PyTree) -> PyTree:
    """``params`` with every quantised kernel replaced by its dequantised float array (``qwix.dequantize``).

    The unquantised model computes with the result what the quantised one does, up to float round-off.

    >>> import flax.linen as nn
    >>> model = quantize_base(nn.Sequential([nn.Dense(4)]), "int8")
    >>> params = model.init(jax.random.key(0), x := jnp.ones((2, 8)))["params"]
    >>> bool(jnp.allclose(nn.Sequential([nn.Dense(4)]).apply({"params": dequantize(params)}, x),
    ...                   model.apply({"params": params}, x), atol=1e-6))
    True
    """
    qwix, _ = _qwix()
    return jax.tree.map(
        lambda leaf: qwix.dequantize(leaf.array) if _is_quantized(leaf) else leaf, params, is_leaf=_is_quantized
    )


def quantize_params(params: PyTree, abstract_quantized: PyTree) -> PyTree:
    """Quantise a float (e.g. pretrained) params tree like ``abstract_quantized`` (``qwix.quantize_params``).

    ``abstract_quantized`` is the quantised model's params (``jax.eval_shape`` of its ``init`` will do); leaves
    absent from it (adapters of a float adapted tree) are kept.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, rssbl_jax.quantize as quantize
    >>> pretrained = nn.Sequential([nn.Dense(4)]).init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    >>> model = quantize.quantize_base(nn.Sequential([nn.Dense(4)]), "int8")
    >>> abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 8))))["params"]
    >>> kernel = quantize.dequantize(quantize.quantize_params(pretrained, abstract))["layers_0"]["kernel"]
    >>> float(jnp.abs(kernel - pretrained["layers_0"]["kernel"]).max()) < 0.01
    True
    """
    qwix, _ = _qwix()
    return qwix.quantize_params(params, abstract_quantized, allow_extra_params=False)


def merge(params: PyTree, operating_params: Any, config: Any, *, requantize: bool, **merge_kwargs: Any) -> PyTree:
    r"""Merge every adapted layer at ``p0`` onto a quantised base: re-quantised, or dequantised, as asked.

    :math:`W' = D(Q(W)) + s\, A\,\mathrm{diag}(g(\hat p_0))\,B` exactly, ``D`` being qwix's dequantisation.
    ``requantize=True`` quantises it again with ``Q``, the kernel's own recipe (``qtype``, channel axes, tiles,
    calibration), recomputing the scales: the whole kernel is rounded again (up to half a step per weight) at the
    quantised model's memory. Dequantised kernels load into the unquantised model, matching the adapted one to float
    round-off at float memory.

    Args:
      params, operating_params, config: as for :func:`rssbl_jax.merge`.
      requantize: ``True`` to keep the quantised format, ``False`` to return float kernels.
      merge_kwargs: passed to :func:`rssbl_jax.merge` (``add_bias``, ``precision``).

    >>> import flax.linen as nn, rssbl_jax
    >>> model = quantize_base(nn.Sequential([nn.Dense(4)]), "int8")
    >>> adapted = rssbl_jax.inject(model, "layers_0", rank=2, lora_alpha=4.0)
    >>> params = adapted.init(jax.random.key(0), jnp.ones((2, 8)), p=(p0 := jnp.ones(3)))["params"]
    >>> merged = rssbl_jax.quantize.merge(params, p0, adapted.config, requantize=True)
    >>> sorted(merged["layers_0"]), str(quantized_kernels(merged)["layers_0/kernel"].qvalue.dtype)
    (['bias', 'kernel'], 'int8')
    """
    _qwix()
    from qwix._src.core import qarray

    recipes = _quantized_leaves(params)
    merged = merge_params(dequantize(params), operating_params, config, **merge_kwargs)
    if not requantize:
        return merged

    def requantize_leaf(path, leaf):
        recipe = recipes.get(patterns.path_str(path))
        if recipe is None:
            return leaf
        return recipe.replace(array=qarray.quantize(jnp.reshape(leaf, recipe.array.shape), recipe.how))

    return jax.tree_util.tree_map_with_path(requantize_leaf, merged)


def base_bytes(params: PyTree, *, packed: bool = True) -> int:
    """Bytes of the non-adapter leaves of ``params`` (the frozen base), quantised ``qvalue``s at their bit width.

    ``packed``: sub-byte types at their width (``int4``/``nf4``: half a byte, as XLA stores them), else a byte each.

    >>> import jax, jax.numpy as jnp, flax.linen as nn, rssbl_jax.quantize as quantize
    >>> model = quantize.quantize_base(nn.Sequential([nn.Dense(256, use_bias=False)]), "int4")
    >>> params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 256))))["params"]
    >>> quantize.base_bytes(params)    # 256·256 values at 4 bits + 256 float32 scales
    33792
    """
    total = 0
    adapter_paths = tree.adapter_leaf_paths(params)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if patterns.path_str(path) in adapter_paths:
            continue
        dtype = jnp.dtype(leaf.dtype)
        bits = jnp.iinfo(dtype).bits if packed and jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize
        total += (leaf.size * bits + 7) // 8
    return int(total)
