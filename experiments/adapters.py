r"""Every method of the comparison by name: ``inject(model, name, targets, rank, lora_alpha)``.

The methods themselves live in the library (:mod:`rssbl_jax.methods`: :class:`~rssbl_jax.RSS`,
:class:`~rssbl_jax.LoRA`, :class:`~rssbl_jax.LoRAConcat`, :class:`~rssbl_jax.FiLM`, :class:`~rssbl_jax.HyperNet`,
with their formulas); this module names the variants the experiments run and which of their leaves train:

==============================  ===============================================================================
name                            method
==============================  ===============================================================================
``frozen``                      LoRA with every adapter leaf frozen (the base model)
``lora``, ``lora_wide``         LoRA (the rank decides the width)
``lora_concat``, ``full_ft``    LoRA on ``[x, p]``; ``full_ft`` trains the base too
``film_branch{o}``              FiLM on the LoRA branch, constant offset ``o``
``film_layer{o}``               FiLM on the whole layer, constant offset ``o``
``film_{branch,layer}_affine{o}``  FiLM with a learnable offset initialised to ``o`` (as the affine gate's ``c0``)
``film_{branch,layer}_mlp{o}``  FiLM conditioned by an MLP of ``p`` (8 hidden units, as ``rss_mlp``), learnable offset
``hypernet{w}[_nou][_shift]``   hypernetwork of width ``w``; ``_nou`` without the unconditioned factors, ``_shift``
                                with a rank-space shift ``S p`` (as RSS's)
``rss``, ``rss_*``              RSSBilinearLoRA and its gate family
==============================  ===============================================================================
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

import rssbl_jax
from rssbl_jax.config import LayerConfig
from rssbl_jax.methods import RSS, FiLM, HyperNet, LoRA, LoRAConcat

__all__ = ["RSS", "FiLM", "HyperNet", "LoRA", "LoRAConcat", "Spec", "count_trainable", "inject", "layer_config",
           "spec", "trainable_mask"]  # fmt: skip

FILM_MLP_HIDDEN = 8
"""Hidden width of the MLP-conditioned FiLM, the same as ``rss_mlp``'s gate."""

# --------------------------------------------------------------------------------------------------
# The method table
# --------------------------------------------------------------------------------------------------


class Spec(NamedTuple):
    """How to build one method: the plug-in (``None``: the library's RSS), config overrides, frozen leaves."""

    method: Any
    settings: dict[str, Any]
    frozen_leaves: tuple[str, ...] = ()
    trains_base: bool = False


def spec(name: str) -> Spec:
    """The :class:`Spec` of a method name (``film_branch0``, ``hypernet8``, ``hypernet8_nou``, ``rss_mlp``, ...)."""
    if name == "frozen":
        return Spec(LoRA(), {}, frozen_leaves=("lora_a", "lora_b"))
    if name in ("lora", "lora_wide"):
        return Spec(LoRA(), {})
    if name == "lora_concat":
        return Spec(LoRAConcat(), {})
    if name == "full_ft":
        return Spec(LoRAConcat(), {}, trains_base=True)
    for prefix, on_layer in (("film_branch", False), ("film_layer", True)):
        if name.startswith(prefix):
            body = name[len(prefix) :]
            forms = (("_affine", {"learn_offset": True}), ("_mlp", {"learn_offset": True, "hidden": FILM_MLP_HIDDEN}))
            for form, options in forms:
                if body.startswith(form):
                    return Spec(FiLM(_number(body[len(form) :], name), on_layer, **options), {})
            return Spec(FiLM(_number(body, name), on_layer), {})
    if name.startswith("hypernet"):
        body = name[len("hypernet") :]
        shift = body.endswith("_shift")
        body = body.removesuffix("_shift")
        unconditioned = not body.endswith("_nou")
        return Spec(HyperNet(int(_number(body.removesuffix("_nou"), name)), unconditioned, shift), {})
    rss = {
        "rss": {},
        "rss_one_plus": {"gate_offset": 1.0},
        "rss_affine": {"gate": "affine", "gate_offset": 0.0},
        "rss_affine1": {"gate": "affine", "gate_offset": 1.0},
        "rss_mlp": {"gate": "mlp", "gate_hidden": 8},
        "rss_gate_only": {"shift": False},
        "rss_shift_only": {"gate_offset": 1.0},
    }
    if name in rss:
        frozen = ("lora_c",) if name == "rss_shift_only" else ()
        return Spec(RSS(), {"shift": True} | rss[name], frozen_leaves=frozen)
    raise ValueError(f"unknown method {name!r}.")


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"unknown method {name!r}.") from None


def inject(model: nn.Module, name: str, targets: Any, rank: int, lora_alpha: float, **settings: Any):
    """``rssbl_jax.inject`` of method ``name`` into the unmodified ``model``; returns the adapted model."""
    s = spec(name)
    config = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=lora_alpha, targets=targets, **(s.settings | settings))
    return rssbl_jax.inject(model, config, method=s.method)


def trainable_mask(params: Any, name: str) -> Any:
    """Which leaves method ``name`` trains: its adapter leaves (minus its frozen ones), or everything (full_ft)."""
    s = spec(name)
    adapters = rssbl_jax.trainable_mask(params)
    if s.trains_base:
        return jax.tree.map(lambda _: True, adapters)

    def rule(path, is_adapter):
        return bool(is_adapter) and getattr(path[-1], "key", None) not in s.frozen_leaves

    return jax.tree_util.tree_map_with_path(rule, adapters)


def count_trainable(params: Any, name: str) -> int:
    """Number of parameters method ``name`` trains in ``params``."""
    mask = trainable_mask(params, name)
    return int(sum(jnp.size(v) for v, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True) if m))


def layer_config(rank: int, lora_alpha: float, **settings: Any) -> LayerConfig:
    """A :class:`~rssbl_jax.LayerConfig` for calling a method's ``update`` directly (tests, analysis)."""
    return rssbl_jax.AdapterConfig(rank=rank, lora_alpha=lora_alpha, **settings).resolve(None)
