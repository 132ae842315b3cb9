"""Conditional QLoRA on a qwix-quantised base: memory, train step against qwix's own QLoRA, accuracy, merge error.

    python -m benchmarks.quantized            # writes the "Quantised base" section of BENCHMARKS.md
    python -m benchmarks.quantized --smoke    # tiny shapes, prints only (used by the tests)

Memory figures are exact (qvalue bits, and XLA's own argument buffer sizes of the compiled forward). Times are
medians of interleaved rounds (``benchmarks.run.time_interleaved``) with an A/A control; the section states the load
average measured when the step timings ended.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import qwix
from flax import linen as nn

import rssbl_jax
from benchmarks.report import Lines, load_average, write_section
from benchmarks.run import bind, machine, time_interleaved
from rssbl_jax import quantize

FORMATS = ("int8", "int4", "nf4")


class Mlp(nn.Module):
    """A stack of square Dense layers with GELU between: the frozen base."""

    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            x = nn.Dense(self.width, name=f"dense_{i}")(x)
            if i < self.depth - 1:
                x = nn.gelu(x)
        return x


def _targets(depth):
    return [f"dense_{i}" for i in range(depth)]


# ------------------------------------------------------------------------------------------------ memory


def bench_memory(width, depth, rank, d_p, tokens):
    """Bytes of the frozen base per format: qvalue+scale bits, and XLA's argument bytes of the compiled forward."""
    cfg = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=2.0 * rank, targets=_targets(depth))
    x = jax.ShapeDtypeStruct((tokens, width), jnp.float32)
    p = jax.ShapeDtypeStruct((d_p,), jnp.float32)
    rows = {}
    for fmt in ("bf16", *FORMATS):
        if fmt == "bf16":
            adapted = rssbl_jax.inject(Mlp(width, depth), cfg)
            params = jax.eval_shape(
                lambda a=adapted: a.init(jax.random.key(0), jnp.zeros(x.shape), p=jnp.zeros(p.shape))
            )
            params = jax.tree_util.tree_map_with_path(
                lambda path, leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.bfloat16)
                if str(path[-1].key) in ("kernel", "bias") else leaf, params)  # fmt: skip
        else:
            adapted = rssbl_jax.inject(quantize.quantize_base(Mlp(width, depth), fmt), cfg)
            params = jax.eval_shape(
                lambda a=adapted: a.init(jax.random.key(0), jnp.zeros(x.shape), p=jnp.zeros(p.shape))
            )
        trainable, frozen = rssbl_jax.partition(params["params"], cfg)
        compiled = jax.jit(lambda f, t, x, p, a=adapted: a.apply({"params": rssbl_jax.combine(t, f)}, x, p=p)).lower(
            frozen, trainable, x, p).compile()  # fmt: skip
        base_xla = compiled.memory_analysis().argument_size_in_bytes - sum(
            math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves((trainable, x, p))
        )
        kernels = sum(math.prod(leaf.shape) * (jnp.iinfo(leaf.dtype).bits if jnp.issubdtype(leaf.dtype, jnp.integer)
                      else 8 * jnp.dtype(leaf.dtype).itemsize) // 8
                      for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]
                      if "kernel" in jax.tree_util.keystr(path) and not jax.tree_util.keystr(path).endswith("scale']"))  # fmt: skip  # noqa: E501
        adapters = sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in jax.tree.leaves(trainable))
        rows[fmt] = {"kernel bytes": kernels, "base bytes (xla)": base_xla, "adapter bytes": adapters}
    return rows


# ------------------------------------------------------------------------------------------------ step


def bench_step(width, depth, rank, d_p, tokens, fmt, rounds):
    """Grads w.r.t. adapters of one quantised base: RSS (ours) vs qwix's own QLoRA vs ours on a float base."""
    x = jax.random.normal(jax.random.key(0), (tokens // 128, 128, width))
    p = jax.random.normal(jax.random.key(1), (tokens // 128, d_p))
    cfg = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=2.0 * rank, targets=_targets(depth))
    qtype = quantize.QTYPES[fmt]

    def step_of(model, variables, loss_of):
        # by name, so that qwix's own adapters (``kernel_lora_a``/``kernel_lora_b``) are the trainable half too
        mask = jax.tree_util.tree_map_with_path(lambda path, _: "lora" in jax.tree_util.keystr(path[-1:]),
                                                variables["params"])  # fmt: skip
        trainable = jax.tree.map(lambda x, m: x if m else None, variables["params"], mask)
        frozen = jax.tree.map(lambda x, m: None if m else x, variables["params"], mask)
        n_trainable = len(jax.tree.leaves(trainable))
        assert n_trainable >= 2 * depth, (n_trainable, jax.tree.map(jnp.shape, trainable))
        return bind(jax.value_and_grad(lambda t, f, x, p: loss_of(model, rssbl_jax.combine(t, f), x, p)),
                    trainable, frozen, x, p)  # fmt: skip

    def ours_loss(model, params, x, p):
        return jnp.mean(model.apply({"params": params}, x, p=p) ** 2)

    def qwix_loss(model, params, x, p):
        del p
        return jnp.mean(model.apply({"params": params}, x) ** 2)

    ours_q = rssbl_jax.inject(quantize.quantize_base(Mlp(width, depth), fmt), cfg)
    ours_f = rssbl_jax.inject(Mlp(width, depth), cfg)
    provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=2.0 * rank, weight_qtype=qtype)
    theirs = qwix.apply_lora_to_model(Mlp(width, depth), provider)
    fns = {
        "RSS, quantised base (ours)": step_of(ours_q, ours_q.init(jax.random.key(2), x, p=p), ours_loss),
        "RSS, quantised base (A/A control)": step_of(ours_q, ours_q.init(jax.random.key(2), x, p=p), ours_loss),
        "qwix LoRA, quantised base": step_of(theirs, theirs.init(jax.random.key(2), x), qwix_loss),
        "RSS, float32 base": step_of(ours_f, ours_f.init(jax.random.key(2), x, p=p), ours_loss),
    }
    return time_interleaved(fns, rounds)


# ------------------------------------------------------------------------------------------------ accuracy


def _task(key, width, d_p, n_train, n_test):
    """Regression onto a conditioned teacher: the base MLP with kernels W(p) = W0 + Σ_j φ_j(p) U_j V_jᵀ.

    The perturbation is smooth and nonlinear in p (sin, products), rank 3 per layer, and not of RSS form (its column
    space moves with p), so the adapters approximate it. Test conditions are held out of the training ones.
    """
    ks = jax.random.split(key, 4)
    p_train = jax.random.uniform(ks[0], (n_train, d_p), minval=-1.0, maxval=1.0)
    p_test = jax.random.uniform(ks[1], (n_test, d_p), minval=-1.0, maxval=1.0)
    x_train = jax.random.normal(ks[2], (n_train, 16, width))
    x_test = jax.random.normal(ks[3], (n_test, 16, width))
    return (x_train, p_train), (x_test, p_test)


def _teacher(base_params, key, width, depth, x, p):
    ks = jax.random.split(key, 2 * depth)

    def one(x, p):
        h = x
        for i in range(depth):
            u = jax.random.normal(ks[2 * i], (3, width, 1)) / math.sqrt(width)
            v = jax.random.normal(ks[2 * i + 1], (3, 1, width)) * 0.5
            phi = jnp.stack([jnp.sin(2.0 * p[0]), p[0] * p[-1], jnp.cos(p[-1]) - 0.5])
            kernel = base_params[f"dense_{i}"]["kernel"] + jnp.einsum("j,jab->ab", phi, u * v)
            h = h @ kernel + base_params[f"dense_{i}"]["bias"][None]
            if i < depth - 1:
                h = nn.gelu(h)
        return h

    return jax.vmap(one)(x, p)


def bench_accuracy(width, depth, rank, d_p, steps, seeds, n_train=256, n_test=128, lr=3e-3):
    """Held-out MSE of the adapted model on each base format (same task, init, batches), mean ± sd over seeds."""
    cfg = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=2.0 * rank, targets=_targets(depth), gate_offset=1.0)
    results = {fmt: {"before": [], "after": []} for fmt in ("float32", "bf16", *FORMATS)}
    for seed in range(seeds):
        key = jax.random.key(100 + seed)
        (x_tr, p_tr), (x_te, p_te) = _task(key, width, d_p, n_train, n_test)
        float_model = rssbl_jax.inject(Mlp(width, depth), cfg)
        float_params = float_model.init(jax.random.fold_in(key, 1), x_tr[:1], p=p_tr[:1])["params"]
        y_tr = _teacher(float_params, jax.random.fold_in(key, 2), width, depth, x_tr, p_tr)
        y_te = _teacher(float_params, jax.random.fold_in(key, 2), width, depth, x_te, p_te)
        for fmt in results:
            if fmt in ("float32", "bf16"):
                model = float_model
                dtype = jnp.float32 if fmt == "float32" else jnp.bfloat16
                params = jax.tree_util.tree_map_with_path(
                    lambda path, leaf, dtype=dtype: leaf.astype(dtype)
                    if str(path[-1].key) in ("kernel", "bias") else leaf, float_params)  # fmt: skip
            else:
                model = rssbl_jax.inject(quantize.quantize_base(Mlp(width, depth), fmt), cfg)
                abstract = jax.eval_shape(lambda m=model, x=x_tr[:1], p=p_tr[:1]: m.init(jax.random.key(0), x, p=p))[
                    "params"
                ]
                params = quantize.quantize_params(float_params, abstract)
            tx = optax.adam(lr)
            state = rssbl_jax.init_train_state(params, tx, jax.random.key(seed), config=cfg)

            def loss_fn(q, batch, rng, model=model):
                del rng
                return jnp.mean((model.apply({"params": q}, batch["x"], p=batch["p"]) - batch["y"]) ** 2)

            def test_mse(state, model=model, x_te=x_te, p_te=p_te, y_te=y_te):
                q = rssbl_jax.combine(state.trainable, state.frozen)
                return float(jnp.mean((model.apply({"params": q}, x_te, p=p_te) - y_te) ** 2))

            step = jax.jit(rssbl_jax.make_train_step(loss_fn, tx))
            results[fmt]["before"].append(test_mse(state))
            order = np.random.default_rng(seed)
            for _ in range(steps):
                idx = order.choice(n_train, 32, replace=False)
                state, _ = step(state, {"x": x_tr[idx], "p": p_tr[idx], "y": y_tr[idx]})
            results[fmt]["after"].append(test_mse(state))
    return results


# ------------------------------------------------------------------------------------------------ merge


def bench_merge(width, depth, rank, d_p, seeds=3):
    """Relative RMS output error at p0: merged (dequantised / re-quantised) vs the adapted quantised model.

    For scale, the error that quantising the float base introduced in the first place (the adapted float model vs
    the adapted quantised one, same adapters).
    """
    cfg = rssbl_jax.AdapterConfig(rank=rank, lora_alpha=2.0 * rank, targets=_targets(depth))
    rows = {}
    for fmt in FORMATS:
        errs = {"dequantised": [], "re-quantised": [], "base quantisation": []}
        for seed in range(seeds):
            key = jax.random.key(200 + seed)
            x = jax.random.normal(key, (64, width))
            p0 = jax.random.normal(jax.random.fold_in(key, 1), (d_p,))
            float_adapted = rssbl_jax.inject(Mlp(width, depth), cfg)
            float_params = float_adapted.init(jax.random.fold_in(key, 2), x, p=p0)["params"]
            float_params = {layer: {**node, **{n: 0.05 * jax.random.normal(jax.random.fold_in(key, 3 + j), node[n].shape)  # noqa: E501
                                               for j, n in enumerate(("lora_a", "lora_b", "lora_c", "lora_s"))}}
                            for layer, node in float_params.items()}  # fmt: skip
            model = quantize.quantize_base(Mlp(width, depth), fmt)
            adapted = rssbl_jax.inject(model, cfg)
            abstract = jax.eval_shape(lambda a=adapted, x=x, p0=p0: a.init(jax.random.key(0), x, p=p0))["params"]
            params = quantize.quantize_params(float_params, abstract)
            y = adapted.apply({"params": params}, x, p=p0)
            scale = float(jnp.sqrt(jnp.mean(y**2)))
            y_deq = Mlp(width, depth).apply({"params": quantize.merge(params, p0, cfg, requantize=False)}, x)
            y_req = model.apply({"params": quantize.merge(params, p0, cfg, requantize=True)}, x)
            y_float = float_adapted.apply({"params": float_params}, x, p=p0)
            errs["dequantised"].append(float(jnp.sqrt(jnp.mean((y_deq - y) ** 2))) / scale)
            errs["re-quantised"].append(float(jnp.sqrt(jnp.mean((y_req - y) ** 2))) / scale)
            errs["base quantisation"].append(float(jnp.sqrt(jnp.mean((y_float - y) ** 2))) / scale)
        rows[fmt] = errs
    return rows


# ------------------------------------------------------------------------------------------------ report


def _ms(v):
    return f"{1e3 * v:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        mem, step, acc, mrg, rounds, steps, seeds = (
            (64, 2, 4, 2, 128),
            (32, 2, 4, 2, 128),
            (16, 2, 2, 2),
            (16, 2, 2, 2),
            2,
            3,
            1,
        )
    else:
        mem = (4096, 8, 16, 8, 2048)
        step = (1024, 2, 16, 8, 4096)
        acc = (256, 2, 8, 2)
        mrg = (1024, 2, 16, 8)
        rounds, steps, seeds = args.rounds, 400, 3
    emit = Lines()

    emit("## Quantised base (conditional QLoRA, `rssbl_jax.quantize`)")
    emit()
    emit(f"Command: `python -m benchmarks.quantized{' --smoke' if args.smoke else ''}`. Machine: {machine()}; "
         f"qwix {qwix.__version__}. Date: {time.strftime('%Y-%m-%d')}.")  # fmt: skip
    emit()
    emit("The base kernels are quantised by qwix (weight-only PTQ, per output channel, absmax); the RSS adapters")
    emit("stay float32. Quantised models are built as `rssbl_jax.inject(quantize.quantize_base(model, fmt), config)`.")
    emit()
    w, d, r, dp, t = mem
    emit(f"### Memory of the frozen base ({d} Dense layers {w}×{w}, r = {r}; exact, not timed)")
    emit()
    memory = bench_memory(*mem)
    emit(
        "| base format | kernel bytes (MiB) | / bf16 | frozen arguments of the compiled forward, XLA (MiB) | / bf16 | adapters (MiB) |"  # noqa: E501
    )
    emit("|---|---:|---:|---:|---:|---:|")
    for fmt, row in memory.items():
        emit(f"| {fmt} | {row['kernel bytes'] / 2**20:.2f} | {row['kernel bytes'] / memory['bf16']['kernel bytes']:.3f} | "  # noqa: E501
             f"{row['base bytes (xla)'] / 2**20:.2f} | {row['base bytes (xla)'] / memory['bf16']['base bytes (xla)']:.3f} | "  # noqa: E501
             f"{row['adapter bytes'] / 2**20:.2f} |")  # fmt: skip
    emit()
    emit("XLA's column is `compiled.memory_analysis().argument_size_in_bytes` of the jitted adapted forward minus the")
    emit("adapters and inputs: qvalues, per-channel float32 scales and biases (4-bit values are stored packed).")
    emit()
    w, d, r, dp, t = step
    emit(f"### Train step against qwix's own QLoRA ({d} Dense layers {w}×{w}, x [{t // 128}, 128, {w}], r = {r}, "
         f"d_p = {dp}; grads w.r.t. adapters only)")  # fmt: skip
    emit()
    emit("Ratios only, and only between rows of one table (interleaved rounds); the A/A control row shows the noise.")
    emit()
    emit("| base | candidate | step ms | / qwix LoRA | / RSS on float32 base |")
    emit("|---|---|---:|---:|---:|")
    steps_ = {}
    for fmt in ("int8", "nf4"):
        s = bench_step(*step, fmt, rounds)
        steps_[fmt] = s
        for name, v in s.items():
            emit(f"| {fmt} | {name} | {_ms(v)} | {v / s['qwix LoRA, quantised base']:.3f} | "
                 f"{v / s['RSS, float32 base']:.3f} |")  # fmt: skip
    emit()
    emit(f"Load average (1 min) when the step timings ended: {load_average()} (the")
    emit("benchmark itself counts; more means other jobs shared the cores and stretched the absolute times).")
    emit()
    w, d, r, dp = acc
    emit(f"### Accuracy: adapted quantised base vs adapted bf16 base ({d} layers of width {w}, r = {r}, d_p = {dp}, "
         f"{steps} Adam steps, {seeds} seeds)")  # fmt: skip
    emit()
    emit("Task: regress a teacher whose kernels are `W0 + Σ_j φ_j(p) U_j V_jᵀ` (rank 3 per layer, φ = sin(2p₁), p₁p₂,")
    emit(
        "cos p₂ − ½: not of RSS form) from the base `W0`, on held-out conditions p ∈ [−1, 1]². The quantised bases are"
    )
    emit(
        "qwix's quantisation of the same `W0`; every format sees the same data, init and batches. Test MSE (mean ± sd)."
    )
    emit()
    accuracy = bench_accuracy(*acc, steps=steps, seeds=seeds)
    emit("| base format | test MSE, base only (adapters at init) | test MSE after training | / bf16 after |")
    emit("|---|---:|---:|---:|")
    ref = np.mean(accuracy["bf16"]["after"])
    for fmt, row in accuracy.items():
        b, a = np.asarray(row["before"]), np.asarray(row["after"])
        emit(f"| {fmt} | {b.mean():.4g} ± {b.std():.2g} | {a.mean():.4g} ± {a.std():.2g} | {a.mean() / ref:.3f} |")
    emit()
    w, d, r, dp = mrg
    emit(f"### Merge at p0 onto a quantised base ({d} layers {w}×{w}, r = {r}, adapters ~N(0, 0.05²), 3 draws)")
    emit()
    emit("Relative RMS error of the merged model's output against the adapted quantised model at p0 (64 inputs), mean")
    emit("of 3 draws. For scale, the last column is the error quantising the float base introduced in the first place")
    emit("(adapted float model vs adapted quantised model, same adapters).")
    emit()
    merge_rows = bench_merge(*mrg)
    emit(
        "| base format | `requantize=False` (float kernels) | `requantize=True` (same format) | base quantisation itself |"  # noqa: E501
    )
    emit("|---|---:|---:|---:|")
    for fmt, errs in merge_rows.items():
        emit(
            f"| {fmt} | {np.mean(errs['dequantised']):.2e} | {np.mean(errs['re-quantised']):.2e} | "
            f"{np.mean(errs['base quantisation']):.2e} |"
        )
    text = emit.text
    if not args.no_write and not args.smoke:
        write_section("quantized", text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
