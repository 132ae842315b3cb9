r"""CoLoRA's reduced model built from a plain Flax INR with rssbl_jax adapters injected, and the comparison's menu.

The INR maps a space point to the field, ``x ↦ u(x; μ, t)``: a periodic first layer
``φ(x)_k = mean_i a_{ki} cos(2π x_i / L_i + c_{ki}) + b_{ki}``, then ``nn.Dense`` layers of width 25 with swish
between them (CoLoRA's ``DNN``). Every method is injected into that unmodified model by ``rssbl_jax.inject``:

- ``colora``: CoLoRA's conditioning. A trunk ``z = swish(W_2 swish(W_1 p̂ + b_1) + b_2)`` (width 15) of the
  normalised ``p̂ = ((μ, t) - mean) / std`` is computed once and passed as ``p`` to every adapted layer, whose
  ``affine`` gate with ``scalar_gate=True`` is one row of the hypernetwork's last layer:
  ``α_ℓ(μ, t) = c_{0,ℓ} + C_ℓ z`` and ``W_ℓ + α_ℓ A_ℓ B_ℓ`` (``lora_alpha = r``: no ``1/r`` scaling, as in CoLoRA).
- ``rss_linear[_shift]``, ``rss_affine[_shift]``: the library's linear and affine gates on ``p̂`` directly
  (``p_mean``/``p_std`` in the AdapterConfig), without and with the rank-space shift ``S p̂``.
- ``film_branch1``, ``film_layer1``, ``lora_concat``, ``hypernet{h}_nou``: the baselines of
  :mod:`experiments.adapters` on ``p̂``.

Every parameter trains (the base ``W``, ``b`` and the periodic layer too: CoLoRA learns them offline). The count is
CoLoRA's: every trained leaf, INR plus hypernetwork.

>>> import jax, numpy as np
>>> model = build("colora", n_layers=7, width=25, out_dim=1, rank=3, period=(2.0, 2.0), p_mean=(0.3, 2.5),
...               p_std=(0.07, 1.4))
>>> params = model.init(jax.random.key(0), np.zeros((2, 5, 2), np.float32), np.zeros((2, 2), np.float32))
>>> count(params)
5451
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

import rssbl_jax
from experiments import adapters

lecun = nn.initializers.lecun_normal()

METHODS = ("colora", "rss_linear", "rss_linear_shift", "rss_affine", "rss_affine_shift", "film_branch1",
           "film_layer1", "lora_concat", "hypernet2_nou")  # fmt: skip
"""The comparison's menu, CoLoRA's conditioning first."""


class Periodic(nn.Module):
    """CoLoRA's periodic first layer: ``φ(x)_k = mean_i a_{ki} cos(2π x_i / L_i + c_{ki}) + b_{ki}``.

    Attributes:
      width: number of features.
      period: ``L_i``, one per input dimension.
    """

    width: int
    period: tuple[float, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if d != len(self.period):
            raise ValueError(f"Periodic got x with {d} coordinates but period has {len(self.period)} entries.")
        a = self.param("a", lecun, (self.width, d))
        c = self.param("c", lecun, (self.width, d))
        b = self.param("b", lecun, (self.width, d))
        lead = (1,) * (x.ndim - 1)
        omega = (2 * jnp.pi / jnp.asarray(self.period, x.dtype)).reshape(*lead, 1, d)
        a, c, b = (v.reshape(*lead, self.width, d) for v in (a, c, b))
        return jnp.mean(a * jnp.cos(omega * x[..., None, :] + c) + b, axis=-1)


class INR(nn.Module):
    """The plain INR: :class:`Periodic`, then ``n_layers`` Dense layers (the last of width ``out_dim``), swish between.

    Attributes:
      n_layers: number of Dense layers after the periodic one.
      width: hidden width.
      out_dim: number of quantities ``Q``.
      period: the space period, one per coordinate.
    """

    n_layers: int
    width: int
    out_dim: int
    period: tuple[float, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.swish(Periodic(self.width, self.period)(x))
        for i in range(self.n_layers):
            last = i == self.n_layers - 1
            h = nn.Dense(self.out_dim if last else self.width, name=f"Dense_{i}")(h)
            if not last:
                h = nn.swish(h)
        return h


class Trunk(nn.Module):
    """The shared part of CoLoRA's hypernetwork: ``swish(Dense(swish(Dense(p̂))))`` (its last layer is the gates)."""

    width: int = 15
    depth: int = 2

    @nn.compact
    def __call__(self, p: jax.Array) -> jax.Array:
        for _ in range(self.depth):
            p = nn.swish(nn.Dense(self.width)(p))
        return p


class Model(NamedTuple):
    """A method on the INR: ``init(key, x, mu_t) -> params`` and ``apply(params, x, mu_t) -> u``.

    ``x`` is ``[n, points, d_x]`` and ``mu_t`` the raw ``[n, d_mu + 1]`` (one condition per row of ``x``).
    """

    init: Callable[..., Any]
    apply: Callable[..., jax.Array]
    adapted: Any


def targets(n_layers: int, adapted_layers: int | None = None) -> str:
    """Regex of the adapted Dense layers: all of them, or the first ``adapted_layers`` (CoLoRA's ``'C'`` layers)."""
    k = n_layers if adapted_layers is None else adapted_layers
    return "|".join(f"Dense_{i}" for i in range(k))


def build(
    method: str,
    *,
    n_layers: int,
    width: int,
    out_dim: int,
    rank: int,
    period: Sequence[float],
    p_mean: Sequence[float],
    p_std: Sequence[float],
    adapted_layers: int | None = None,
    trunk_width: int = 15,
    hypernet_rank: int = 2,
) -> Model:
    """``method`` injected into :class:`INR` (see the module docstring for the menu).

    Args:
      method: one of :data:`METHODS` (``hypernet{h}_nou`` with any hidden width ``h``).
      n_layers, width, out_dim, period: the INR.
      rank: adapter rank ``r`` (``hypernet_rank`` for the hypernetwork, so its count matches).
      p_mean, p_std: mean and std of the training ``(μ, t)``: CoLoRA's normalisation.
      adapted_layers: adapt only the first ``adapted_layers`` Dense layers (``None``: all).
      trunk_width: width of CoLoRA's hypernetwork trunk.
      hypernet_rank: rank of the ``hypernet*`` adapters.
    """
    inr = INR(n_layers, width, out_dim, tuple(float(v) for v in period))
    target = targets(n_layers, adapted_layers)
    mean = jnp.asarray(p_mean, jnp.float32)[None]
    std = jnp.asarray(p_std, jnp.float32)[None]
    if method == "colora":
        config = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=float(rank), targets=target, gate="affine",
                                         scalar_gate=True, shift=False)  # fmt: skip
        adapted = rssbl_jax.inject(inr, config, initializers={"lora_a": lecun})
        trunk = Trunk(trunk_width)

        def init(key, x, mu_t):
            k1, k2 = jax.random.split(key)
            trunk_params = trunk.init(k1, (mu_t - mean) / std)["params"]
            z = trunk.apply({"params": trunk_params}, (mu_t - mean) / std)
            return {"inr": adapted.init(k2, x, p=z)["params"], "trunk": trunk_params}

        def apply(params, x, mu_t):
            z = trunk.apply({"params": params["trunk"]}, (mu_t - mean) / std)
            return adapted.apply({"params": params["inr"]}, x, p=z)

        return Model(init, apply, adapted)
    normalisation = {"p_mean": tuple(float(v) for v in p_mean), "p_std": tuple(float(v) for v in p_std)}
    rss = {
        "rss_linear": {"gate": "linear", "shift": False},
        "rss_linear_shift": {"gate": "linear", "shift": True},
        "rss_affine": {"gate": "affine", "shift": False},
        "rss_affine_shift": {"gate": "affine", "shift": True},
    }
    if method in rss:
        config = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=float(rank), targets=target,
                                         **rss[method], **normalisation)  # fmt: skip
        adapted = rssbl_jax.inject(inr, config)
    else:
        r = hypernet_rank if method.startswith("hypernet") else rank
        adapted = adapters.inject(inr, method, target, r, float(r), **normalisation)

    def init_plain(key, x, mu_t):
        return {"inr": adapted.init(key, x, p=mu_t)["params"]}

    def apply_plain(params, x, mu_t):
        return adapted.apply({"params": params["inr"]}, x, p=mu_t)

    return Model(init_plain, apply_plain, adapted)


def count(params: Any) -> int:
    """Every trained parameter (CoLoRA counts the INR's ``θ`` and the hypernetwork's ``ψ``; ``α`` is generated)."""
    return int(sum(math.prod(jnp.shape(v)) for v in jax.tree.leaves(params)))


def colora_count(x_dim: int, mu_t_dim: int, out_dim: int, layers: str, width: int = 25, rank: int = 3,
                 h_width: int = 15, h_layers: int = 3) -> int:  # fmt: skip
    """CoLoRA's parameter count of ``build_colora`` (``θ`` without the ``α`` leaves, plus ``ψ``), from its layer string.

    ``layers`` is CoLoRA's ``u_layers`` (``"PCCCCCCC"``: periodic, then CoLoRA ``'C'`` or Dense ``'D'`` layers; the
    last has width ``out_dim``). Each ``'C'`` has ``W (D, K)``, ``A (D, r)``, ``B (r, K)``, ``b (K,)`` and one ``α``
    generated by the hypernetwork ``DNN(width=h_width, layers=h_layers)`` whose output is the number of ``α``.

    >>> colora_count(2, 2, 1, "PCCCCCCC"), colora_count(2, 2, 1, "PCCDDDDD")
    (5451, 4693)
    """
    theta, d, n_alpha = 0, x_dim, 0
    for i, kind in enumerate(layers):
        k = out_dim if i == len(layers) - 1 else width
        if kind == "P":
            theta += 3 * k * d
        elif kind == "D":
            theta += d * k + k
        elif kind == "C":
            theta += d * k + d * rank + rank * k + k
            n_alpha += 1
        else:
            raise ValueError(f"unknown CoLoRA layer {kind!r} in layers={layers!r}.")
        d = k
    psi, d = 0, mu_t_dim
    for i in range(h_layers):
        k = n_alpha if i == h_layers - 1 else h_width
        psi += d * k + k
        d = k
    return theta + psi
