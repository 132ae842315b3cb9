"""End-to-end demo: a frozen network adapted to operating conditions with LoRA and with RSSBilinearLoRA.

    python -m experiments.demo --config configs/demo.py [--config.seed=3]

A teacher network has a planted conditional update of rank ``k`` in its first layer, ``W1 + U diag(G p) V``
(the structure RSSBilinearLoRA assumes). The frozen base is the nominal network (the teacher at ``p = 0``, as
a model pretrained on nominal conditions); adapters are trained on 16 conditions and evaluated on those, on
held-out conditions inside the range and on extrapolated ones. The demo prints the errors and what the adapter
learned: how well its update ``ΔW(p) = α A diag(C p) B`` aligns with the planted one.

Training runs through :func:`rssbl_jax.train` with a metrics hook: every ``log_every`` steps the training loss,
the gradient norm and the held-out (interpolation) error go to TensorBoard event files in
``config.tensorboard_dir`` (one folder per method; ``tensorboard --logdir runs/demo/tensorboard`` shows them).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn

import rssbl_jax
from rssbl_jax.writers import TensorBoardWriter


class BaseMLP(nn.Module):
    """The pretrained network: two Dense layers."""

    hidden: int
    d_out: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.d_out, name="out")(nn.tanh(nn.Dense(self.hidden, name="hidden")(x)))


class AdaptedMLP(nn.Module):
    """The same network with RSSBilinearLoRADense layers (same base param names, adapters beside them)."""

    hidden: int
    d_out: int
    rank: int
    lora_alpha: float

    @nn.compact
    def __call__(self, x, p):
        kw = dict(rank=self.rank, lora_alpha=self.lora_alpha)
        h = nn.tanh(rssbl_jax.RSSBilinearLoRADense(self.hidden, name="hidden", **kw)(x, p))
        return rssbl_jax.RSSBilinearLoRADense(self.d_out, name="out", **kw)(h, p)


def make_teacher(config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, jax.Array]:
    """Random teacher weights with a planted rank-k conditional update of the first layer."""
    k = jax.random.split(key, 8)
    d_in, hidden, d_out, d_p, rank = config.d_in, config.hidden, config.d_out, config.d_p, config.teacher_rank
    w1 = jax.random.normal(k[0], (d_in, hidden)) / np.sqrt(d_in)
    u = jnp.linalg.qr(jax.random.normal(k[1], (d_in, rank)))[0]
    v = jnp.linalg.qr(jax.random.normal(k[2], (hidden, rank)))[0].T
    # Scale so the update at |p| ~ 1 has Frobenius norm ~ teacher_strength * |W1|_F.
    gain = config.teacher_strength * jnp.linalg.norm(w1) / np.sqrt(rank)
    return {
        "w1": w1,
        "b1": 0.1 * jax.random.normal(k[3], (hidden,)),
        "u": u,
        "v": v * gain,
        "g": jax.random.normal(k[4], (d_p, rank)) / np.sqrt(d_p),
        "h": 0.3 * jax.random.normal(k[5], (d_p, rank)) / np.sqrt(d_p),
        "w2": jax.random.normal(k[6], (hidden, d_out)) / np.sqrt(hidden),
        "b2": 0.1 * jax.random.normal(k[7], (d_out,)),
    }


def planted_update(teacher: dict[str, jax.Array], p: jax.Array) -> jax.Array:
    """The teacher's first-layer update U diag(G p) V at one condition, in kernel convention (d_in, hidden)."""
    return (teacher["u"] * (p @ teacher["g"])[None, :]) @ teacher["v"]


def teacher_apply(teacher: dict[str, jax.Array], x: jax.Array, p: jax.Array) -> jax.Array:
    """Teacher outputs for per-example conditions p [n, d_p]."""
    h = x @ teacher["w1"] + teacher["b1"][None, :]
    h = h + (((x @ teacher["u"]) * (p @ teacher["g"]) + p @ teacher["h"]) @ teacher["v"])
    return jnp.tanh(h) @ teacher["w2"] + teacher["b2"][None, :]


def conditions(config: ml_collections.ConfigDict, key: jax.Array) -> dict[str, jax.Array]:
    """Training grid in [-1, 1]^d_p, held-out points inside it, and extrapolation at radius 1.5-2."""
    axis = jnp.linspace(-1.0, 1.0, config.train_grid)
    grid = jnp.stack(jnp.meshgrid(*([axis] * config.d_p)), -1).reshape(-1, config.d_p)
    k1, k2, k3 = jax.random.split(key, 3)
    inside = jax.random.uniform(k1, (config.n_test_conditions, config.d_p), minval=-0.9, maxval=0.9)
    direction = jax.random.normal(k2, (config.n_test_conditions, config.d_p))
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    radius = jax.random.uniform(k3, (config.n_test_conditions, 1), minval=1.5, maxval=2.0)
    return {"seen": grid, "interpolation": inside, "extrapolation": direction * radius}


def dataset(teacher, conds: jax.Array, n: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """n inputs per condition: x [K*n, d_in], per-example p [K*n, d_p], targets [K*n, d_out]."""
    x = jax.random.normal(key, (conds.shape[0] * n, teacher["w1"].shape[0]))
    p = jnp.repeat(conds, n, axis=0)
    return x, p, teacher_apply(teacher, x, p)


def fit(loss_fn, params, tx, steps: int, *, trainable=None, log_every: int = 100, logdir=None, eval_fn=None):
    """Full-batch optimisation with the library's loop (:func:`rssbl_jax.train`), metrics through its hook.

    ``trainable`` (a tree of bools) overrides which leaves train; by default the adapters do. ``eval_fn(params)``
    returns held-out metrics. With ``logdir`` the metrics also go to TensorBoard event files there. Returns the
    params and the logged metrics (one dict per ``log_every`` steps and the last step)."""
    state = rssbl_jax.init_train_state(params, tx, jax.random.key(0), trainable=trainable)
    step = jax.jit(rssbl_jax.make_train_step(lambda q, batch, rng: loss_fn(q), tx))
    evaluate = None if eval_fn is None else jax.jit(lambda s: eval_fn(rssbl_jax.combine(s.trainable, s.frozen)))
    logged = []
    writer = TensorBoardWriter(logdir) if logdir else None
    try:
        final = rssbl_jax.train(
            state, step, lambda i: None, steps, log_every=log_every, hook=logged.append, writer=writer, eval_fn=evaluate
        )
    finally:
        if writer is not None:
            writer.close()
    return rssbl_jax.combine(final.trainable, final.frozen), logged


def lora_view(params: Any) -> Any:
    """Plain LoRA as the neutral condition of the same layer: p = [1], C = 1, S = 0 (only A, B trained)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.ones_like(leaf[:1]) if path[-1].key == "lora_c" else
        (jnp.zeros_like(leaf[:1]) if path[-1].key == "lora_s" else leaf),
        params,
    )  # fmt: skip


def relative_error(pred: jax.Array, target: jax.Array, base_target: jax.Array) -> float:
    """MSE of the prediction divided by the MSE of predicting the nominal (p = 0) teacher output."""
    return float(jnp.mean((pred - target) ** 2) / jnp.mean((base_target - target) ** 2))


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Pretrain, adapt with each method, evaluate on the three splits; returns the numbers it prints."""
    start = time.perf_counter()
    keys = jax.random.split(jax.random.key(config.seed), 5)
    teacher = make_teacher(config, keys[0])
    conds = conditions(config, keys[1])

    # 1. The frozen base is the nominal network (the teacher at p = 0), as a model pretrained on
    #    nominal conditions would be; it has never seen p, and neither has its architecture.
    base = BaseMLP(config.hidden, config.d_out)
    base_params = {
        "hidden": {"kernel": teacher["w1"], "bias": teacher["b1"]},
        "out": {"kernel": teacher["w2"], "bias": teacher["b2"]},
    }

    # 2. Build the adapted network, load the pretrained base into it, freeze it.
    model = AdaptedMLP(config.hidden, config.d_out, config.rank, config.lora_alpha)
    x, p, y = dataset(teacher, conds["seen"], config.points_per_condition, keys[2])
    fresh = model.init(keys[3], x, p)["params"]
    start_params = {layer: {**fresh[layer], **base_params[layer]} for layer in fresh}
    tx = optax.adam(config.adapt_lr)  # the train step differentiates and updates the adapters only

    def mse(q, p_used, x=x, y=y):
        return jnp.mean((model.apply({"params": q}, x, p_used) - y) ** 2)

    # Held-out conditions inside the range, for the curves (the reported errors below use fresh inputs).
    x_held, p_held, y_held = dataset(teacher, conds["interpolation"], 16, jax.random.fold_in(keys[4], 100))
    logdir = config.get("tensorboard_dir") or None
    curves = dict(steps=config.adapt_steps, log_every=config.log_every)
    rss_params, rss_log = fit(
        lambda q: mse(q, p),
        start_params,
        tx,
        **curves,
        logdir=logdir and os.path.join(logdir, "rss"),
        eval_fn=lambda q: {"interpolation_mse": mse(q, p_held, x_held, y_held)},
    )
    lora_start = lora_view(start_params)
    only_ab = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("lora_a", "lora_b"), lora_start)
    ones = jnp.ones((x.shape[0], 1))
    lora_params, lora_log = fit(
        lambda q: mse(q, ones),
        lora_start,
        tx,
        **curves,
        trainable=only_ab,
        logdir=logdir and os.path.join(logdir, "lora"),
        eval_fn=lambda q: {"interpolation_mse": mse(q, jnp.ones((x_held.shape[0], 1)), x_held, y_held)},
    )

    # 3. Evaluate every method on every split.
    methods = {
        "frozen base": lambda xs, ps: base.apply({"params": base_params}, xs),
        f"LoRA r={config.rank}": lambda xs, ps: model.apply({"params": lora_params}, xs, jnp.ones((xs.shape[0], 1))),
        f"RSSBilinearLoRA r={config.rank}": lambda xs, ps: model.apply({"params": rss_params}, xs, ps),
    }
    errors: dict[str, dict[str, float]] = {m: {} for m in methods}
    for i, (split, split_conds) in enumerate(conds.items()):
        xs, ps, ys = dataset(teacher, split_conds, 128, jax.random.fold_in(keys[4], i))
        y_nominal = teacher_apply(teacher, xs, jnp.zeros_like(ps))
        for name, predict in methods.items():
            errors[name][split] = relative_error(predict(xs, ps), ys, y_nominal)

    # 4. What the adapter learned: alignment of its first-layer update with the planted one.
    sweep = jnp.concatenate([conds["interpolation"], conds["extrapolation"]])
    layer = rss_params["hidden"]
    scale = config.lora_alpha / config.rank

    def cosine(q):
        learned = scale * (layer["lora_a"] * (q @ layer["lora_c"])[None, :]) @ layer["lora_b"]
        planted = planted_update(teacher, q)
        return jnp.sum(learned * planted) / (jnp.linalg.norm(learned) * jnp.linalg.norm(planted))

    cosines = np.asarray(jax.vmap(cosine)(sweep))
    counts = rssbl_jax.count_parameters(rss_params)
    return {
        "errors": errors,
        "adapt_final_mse": {"LoRA": lora_log[-1]["loss"], "RSSBilinearLoRA": rss_log[-1]["loss"]},
        "curves": {"LoRA": lora_log, "RSSBilinearLoRA": rss_log},
        "tensorboard_dir": logdir,
        "update_cosine": {"median": float(np.median(cosines)), "min": float(cosines.min())},
        "trainable": {
            "LoRA": sum(
                v.size for k, v in rssbl_jax.partition(rss_params)[0]["hidden"].items() if k in ("lora_a", "lora_b")
            )
            + sum(v.size for k, v in rssbl_jax.partition(rss_params)[0]["out"].items() if k in ("lora_a", "lora_b")),
            "RSSBilinearLoRA": counts.trainable,
        },
        "base_params": counts.base,
        "seconds": time.perf_counter() - start,
    }


def report(results: dict[str, Any]) -> str:
    """The printed summary: an error table and what the adapter learned."""
    errors = results["errors"]
    splits = list(next(iter(errors.values())))
    lines = [
        "Relative MSE (1.0 = predicting the nominal p=0 output; lower is better)",
        f"{'method':<24}" + "".join(f"{s:>15}" for s in splits),
    ]
    for name, row in errors.items():
        lines.append(f"{name:<24}" + "".join(f"{row[s]:>15.4f}" for s in splits))
    cos = results["update_cosine"]
    lines += [
        "",
        f"trainable parameters: LoRA {results['trainable']['LoRA']:,}, RSSBilinearLoRA "
        f"{results['trainable']['RSSBilinearLoRA']:,} (base {results['base_params']:,}, frozen)",
        f"final training MSE: LoRA {results['adapt_final_mse']['LoRA']:.2e}, "
        f"RSSBilinearLoRA {results['adapt_final_mse']['RSSBilinearLoRA']:.2e}",
        "what RSSBilinearLoRA learned: cosine between its first-layer update A diag(C p) B and the planted",
        f"U diag(G p) V over held-out and extrapolated p: median {cos['median']:.3f}, worst {cos['min']:.3f}",
        f"({results['seconds']:.1f} s)",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/demo.py", "Path to a config file with get_config().")

    def _main(_):
        results = run(flags.FLAGS.config)
        print(report(results))
        if results["tensorboard_dir"]:
            print(f"TensorBoard curves: tensorboard --logdir {results['tensorboard_dir']}")

    app.run(_main, argv=argv)


if __name__ == "__main__":
    main(sys.argv)
