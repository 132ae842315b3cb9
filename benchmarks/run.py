"""Speed and memory of RSSBilinearLoRA, measured side by side with references in one process.

    python -m benchmarks.run                 # quick mode: the target shapes (a few minutes on 2 CPU cores)
    python -m benchmarks.run --full          # + item 1 at d = 4096 and one-at-a-time sweeps of r, d_p, tokens (2k-16k)
    python -m benchmarks.run --smoke         # tiny shapes: checks that every benchmark runs (used by the tests)

Every time is the median of repeated calls of a jit-compiled function after warm-up (``block_until_ready``), with
the candidates interleaved round by round in a random order so drift of the machine hits them alike; an A/A
control (the frozen Dense timed twice under two names) shows the noise; every figure is reported as a
ratio to a reference measured in the same run, beside the FLOP floor computed from the shapes. Peak memory is
XLA's own buffer assignment for the compiled step (``compiled.memory_analysis()``). ``--full`` writes the
committed ``BENCHMARKS.md`` (machine, versions, shapes, command, tables); quick mode writes
``runs/bench/BENCHMARKS.quick.md`` instead, so it never replaces the full-mode numbers; ``--no-write`` only prints.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

import rssbl_jax
from benchmarks.report import Lines

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTES_MARKER = "<!-- analysis: kept when this file is regenerated -->"


# ------------------------------------------------------------------------------------------------ timing


def time_interleaved(fns: dict[str, Callable[[], Any]], rounds: int, min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each zero-argument jitted function, measured in interleaved rounds.

    Each round calls the candidates in a fresh random order (seeded), so what a call inherits from the one
    before it (warm caches: seen here as 10-15% when the same program ran twice in a row) is spread over all.
    """
    for fn in fns.values():  # compile + warm up
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    r = 0
    names = list(fns)
    order = np.random.default_rng(0)
    while r < rounds or time.perf_counter() - start < min_seconds:
        for name in order.permutation(names):
            fn = fns[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - t0)
        r += 1
        if r >= 10 * rounds:
            break
    return {name: statistics.median(s) for name, s in samples.items()}


def bind(fn: Callable, *args: Any) -> Callable[[], Any]:
    """A zero-argument call of ``jax.jit(fn)`` on ``args`` passed as runtime arguments.

    Arrays closed over by a jitted function become compile-time constants that XLA may fold away, which
    would time nothing; every benchmarked array goes through here.
    """
    jitted = jax.jit(fn)
    return lambda: jitted(*args)


# ------------------------------------------------------------------------------------------------ candidates


def make_params(key, d_in, d_out, rank, d_p, hyper_hidden=4):
    ks = jax.random.split(key, 10)
    n = jax.random.normal
    return {
        "kernel": n(ks[0], (d_in, d_out)) / math.sqrt(d_in),
        "bias": jnp.zeros(d_out),
        "lora_a": n(ks[1], (d_in, rank)) / math.sqrt(d_in),
        "lora_b": n(ks[2], (rank, d_out)) * 0.01,
        "lora_c": n(ks[3], (d_p, rank)) / math.sqrt(d_p),
        "lora_s": n(ks[4], (d_p, rank)) * 0.01,
        "film_gamma": n(ks[5], (d_p, d_out)) * 0.01,
        "film_beta": n(ks[6], (d_p, d_out)) * 0.01,
        "hyper_p": n(ks[7], (d_p, hyper_hidden)) / math.sqrt(d_p),
        "hyper_a": n(ks[8], (hyper_hidden, d_in * rank)) * 0.01,
        "hyper_b": n(ks[9], (hyper_hidden, rank * d_out)) * 0.01,
    }


def dense(q, x, p):
    del p
    d_in = q["kernel"].shape[0]
    return (x.reshape(-1, d_in) @ q["kernel"] + q["bias"][None, :]).reshape(*x.shape[:-1], -1)


def lora_ours(q, x, p, scale):
    """Plain LoRA written the way the library writes its update (2-D matmuls, scale folded into B)."""
    del p
    d_in, rank = q["lora_a"].shape
    x2 = x.reshape(-1, d_in)
    y = x2 @ q["kernel"] + q["bias"][None, :] + (x2 @ q["lora_a"]) @ (scale * q["lora_b"])
    return y.reshape(*x.shape[:-1], -1)


def rss(q, x, p, scale):
    return rssbl_jax.rss_dense(
        x, p, q["kernel"], q["bias"], q["lora_a"], q["lora_b"], q["lora_c"], q["lora_s"], scale=scale
    )


def film_branch(q, x, p, scale):
    """Output-space FiLM on the LoRA branch: W x + b + (1 + Γ p) ⊙ α B A x + Β p (per-example p)."""
    batch, d_in = x.shape[0], q["kernel"].shape[0]
    x2 = x.reshape(-1, d_in)
    branch = (scale * ((x2 @ q["lora_a"]) @ q["lora_b"])).reshape(batch, -1, q["kernel"].shape[1])
    gamma, beta = (p @ q["film_gamma"])[:, None, :], (p @ q["film_beta"])[:, None, :]
    base = (x2 @ q["kernel"] + q["bias"][None, :]).reshape(branch.shape)
    return (base + (1.0 + gamma) * branch + beta).reshape(*x.shape[:-1], -1)


def hypernet(q, x, p, scale):
    """LoRA factors generated per example from p: A(p), B(p) = A0, B0 + reshape(H tanh(P p))."""
    batch, d_in = x.shape[0], q["kernel"].shape[0]
    rank, d_out = q["lora_b"].shape
    z = jnp.tanh(p @ q["hyper_p"])
    a = q["lora_a"][None] + (z @ q["hyper_a"]).reshape(batch, d_in, rank)
    b = q["lora_b"][None] + (z @ q["hyper_b"]).reshape(batch, rank, d_out)
    x3 = x.reshape(batch, -1, d_in)
    delta = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x3, a), b)
    base = (x3.reshape(-1, d_in) @ q["kernel"] + q["bias"][None, :]).reshape(delta.shape)
    return (base + scale * delta).reshape(*x.shape[:-1], -1)


ADAPTERS = {
    "lora_ours": ("lora_a", "lora_b"),
    "rss": ("lora_a", "lora_b", "lora_c", "lora_s"),
    "film_branch": ("lora_a", "lora_b", "film_gamma", "film_beta"),
    "hypernet": ("lora_a", "lora_b", "hyper_p", "hyper_a", "hyper_b"),
}


def ours_steps(params, x, p, scale) -> tuple[dict, dict]:
    """Forward and train-step (loss + grads w.r.t. the adapters only) closures of our candidates."""
    forward, step = {}, {}
    frozen = {"kernel": params["kernel"], "bias": params["bias"]}
    forward["dense"] = bind(dense, frozen, x, p)
    step["dense"] = bind(lambda f, x, p: jnp.mean(dense(f, x, p) ** 2), frozen, x, p)  # frozen forward + loss
    # A/A control: the same computation timed again under another name shows the noise of the measurement
    forward["dense (A/A control)"] = bind(dense, frozen, x, p)
    step["dense (A/A control)"] = bind(lambda f, x, p: jnp.mean(dense(f, x, p) ** 2), frozen, x, p)
    for name, fn in (("lora_ours", lora_ours), ("rss", rss), ("film_branch", film_branch), ("hypernet", hypernet)):
        train = {k: params[k] for k in ADAPTERS[name]}

        def loss(t, f, x, p, fn=fn):
            return jnp.mean(fn({**f, **t}, x, p, scale) ** 2)

        forward[name] = bind(lambda t, f, x, p, fn=fn: fn({**f, **t}, x, p, scale), train, frozen, x, p)
        step[name] = bind(jax.value_and_grad(loss), train, frozen, x, p)  # grads w.r.t. the adapters only
    return forward, step


def nnx_lora_steps(params, x, rank) -> tuple[Callable, Callable]:
    """flax's nnx.LoRALinear with our base weights; grads w.r.t. its LoRAParams only."""
    d_in, d_out = params["kernel"].shape
    model = nnx.LoRALinear(d_in, d_out, lora_rank=rank, rngs=nnx.Rngs(0))
    model.kernel.value = params["kernel"]
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lora_state, rest, x):
        return jnp.mean(nnx.merge(graphdef, lora_state, rest)(x) ** 2)

    forward = bind(lambda lora_state, rest, x: nnx.merge(graphdef, lora_state, rest)(x), lora_state, rest, x)
    step = bind(jax.value_and_grad(loss), lora_state, rest, x)
    return forward, step


def qwix_lora_steps(params, x, rank, alpha) -> tuple[Callable, Callable] | None:
    """qwix's LoRA on a linen Dense (benchmark-only extra); None when qwix is not installed."""
    try:
        import qwix
    except ImportError:
        return None
    d_out = params["kernel"].shape[1]
    model = qwix.apply_lora_to_model(nn.Dense(d_out), qwix.LoraProvider(module_path=".*", rank=rank, alpha=alpha))
    variables = model.init(jax.random.key(0), x)
    flat = dict(variables["params"])
    flat["kernel"] = params["kernel"]
    lora = {k: v for k, v in flat.items() if "lora" in k}
    rest = {k: v for k, v in flat.items() if "lora" not in k}

    def loss(lora, rest, x):
        return jnp.mean(model.apply({"params": {**rest, **lora}}, x) ** 2)

    forward = bind(lambda lora, rest, x: model.apply({"params": {**rest, **lora}}, x), lora, rest, x)
    step = bind(jax.value_and_grad(loss), lora, rest, x)
    return forward, step


# ------------------------------------------------------------------------------------------------ benchmarks


def flop_floor(d_in, d_out, rank) -> float:
    """Adapted / frozen forward FLOPs: 1 + r (d_in + d_out) / (d_in d_out)."""
    return 1.0 + rank * (d_in + d_out) / (d_in * d_out)


def bench_layers(batch, tokens, d, rank, d_p, rounds) -> dict[str, Any]:
    """Item 1: forward and train step of every candidate at one shape."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, tokens, d))
    p = jax.random.normal(jax.random.key(1), (batch, d_p))
    params = make_params(jax.random.key(2), d, d, rank, d_p)
    scale = 2.0
    forward, step = ours_steps(params, x, p, scale)
    forward["nnx.LoRALinear"], step["nnx.LoRALinear"] = nnx_lora_steps(params, x, rank)
    q = qwix_lora_steps(params, x, rank, alpha=scale * rank)
    if q is not None:
        forward["qwix LoRA"], step["qwix LoRA"] = q
    fwd = time_interleaved(forward, rounds)
    stp = time_interleaved(step, rounds)
    return {"shape": (batch, tokens, d, rank, d_p), "forward": fwd, "step": stp}


def bench_merged(batch, tokens, d, rank, d_p, rounds) -> dict[str, float]:
    """Item 2: the merged layer at a fixed p vs plain nn.Dense with the base weights."""
    x = jax.random.normal(jax.random.key(0), (batch, tokens, d))
    params = make_params(jax.random.key(2), d, d, rank, d_p)
    adapted = {k: params[k] for k in ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s")}
    merged = rssbl_jax.merge(adapted, jnp.ones(d_p), rssbl_jax.AdapterConfig(rank=rank, lora_alpha=2.0 * rank))
    base = {"kernel": params["kernel"], "bias": params["bias"]}
    layer = nn.Dense(d)
    return time_interleaved(
        {"nn.Dense": bind(lambda q, x: layer.apply({"params": q}, x), base, x),
         "merged": bind(lambda q, x: layer.apply({"params": q}, x), merged, x)},
        rounds,
    )  # fmt: skip


def bench_sweep(batch, tokens, d, rank, d_p, conditions, rounds) -> dict[str, float]:
    """Item 3: K operating conditions for one input batch, jax.vmap over p vs K separate calls."""
    x = jax.random.normal(jax.random.key(0), (batch, tokens, d))
    ps = jax.random.normal(jax.random.key(1), (conditions, d_p))
    params = make_params(jax.random.key(2), d, d, rank, d_p)
    params = {k: params[k] for k in ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s")}
    one = jax.jit(lambda q, x, p: rss(q, x, p, 2.0))
    swept = bind(jax.vmap(lambda q, x, p: rss(q, x, p, 2.0), in_axes=(None, None, 0)), params, x, ps)
    rows = [ps[k] for k in range(conditions)]
    base = jax.jit(lambda q, x: dense(q, x, None))(params, x)
    # the floor of any sweep that returns every output: writing K fresh outputs of the base's size. Measured three
    # ways (one add, a broadcast copy, a contraction-2 matmul, which XLA runs multi-threaded like a GEMM) since
    # which writer is fastest depends on the size; the floor is the fastest.
    pair = jnp.stack([base, 0.5 * base]).reshape(2, -1)
    writers = {
        "write: add": bind(lambda b, ps: b[None] + ps[:, :1, None, None], base, ps),
        "write: broadcast": bind(lambda b, ps: jnp.broadcast_to(b[None], (ps.shape[0], *b.shape)) * 1.0, base, ps),
        "write: matmul": bind(lambda t, ps: (ps[:, :2] @ t).reshape(ps.shape[0], *base.shape), pair, ps),
    }
    times = time_interleaved(
        {"separate calls": lambda: [one(params, x, row) for row in rows], "vmap over p": swept, **writers},
        max(3, rounds // 3),
    )  # fmt: skip
    times["write floor"] = min(times[name] for name in writers)
    return times


def bench_memory(batch, tokens, d, rank, d_p) -> dict[str, float]:
    """Item 4: XLA's peak buffer bytes of one Adam training step, adapters only vs full fine-tuning."""
    import optax

    x = jax.ShapeDtypeStruct((batch, tokens, d), jnp.float32)
    p = jax.ShapeDtypeStruct((batch, d_p), jnp.float32)
    params = jax.eval_shape(lambda: make_params(jax.random.key(0), d, d, rank, d_p))
    params = {k: params[k] for k in ("kernel", "bias", "lora_a", "lora_b", "lora_c", "lora_s")}

    def loss(q, x, p):
        return jnp.mean(rss(q, x, p, 2.0) ** 2)

    results = {}
    for name, tx in (("adapters only (freeze_base)", rssbl_jax.freeze_base(optax.adam(1e-3))),
                     ("full fine-tuning", optax.adam(1e-3))):  # fmt: skip
        state = jax.eval_shape(tx.init, params)

        def step(q, state, x, p, tx=tx):
            grads = jax.grad(loss)(q, x, p)
            updates, state = tx.update(grads, state, q)
            return optax.apply_updates(q, updates), state

        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x, p).compile()
        m = compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        results[name] = float(peak)
        results[name + " (temp)"] = float(m.temp_size_in_bytes)
    return results


def bench_scaling(base_shape, axis, values, rounds) -> list[tuple[int, float, float]]:
    """Item 5: RSS train-step time and its overhead over plain LoRA as one of r, d_p, tokens grows."""
    rows = []
    for v in values:
        batch, tokens, d, rank, d_p = base_shape
        if axis == "r":
            rank = v
        elif axis == "d_p":
            d_p = v
        else:
            batch = max(1, v // tokens)
        x = jax.random.normal(jax.random.key(0), (batch, tokens, d))
        p = jax.random.normal(jax.random.key(1), (batch, d_p))
        params = make_params(jax.random.key(2), d, d, rank, d_p)
        _, step = ours_steps(params, x, p, 2.0)
        t = time_interleaved({"rss": step["rss"], "lora_ours": step["lora_ours"]}, rounds)
        rows.append((v, t["rss"], t["lora_ours"]))
    return rows


def slope(xs, ys) -> float:
    """Least-squares exponent k of y ∝ x^k."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


# ------------------------------------------------------------------------------------------------ report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import flax
    import optax

    return (
        f"{cpu}; {os.cpu_count()} cores visible; backend {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}"
    )


def layer_table(result) -> list[str]:
    batch, tokens, d, rank, d_p = result["shape"]
    fwd, stp = result["forward"], result["step"]
    floor = flop_floor(d, d, rank)
    lines = [
        f"Shape: x [{batch}, {tokens}, {d}] ({batch * tokens} tokens), d_in = d_out = {d}, r = {rank}, d_p = {d_p}, "
        f"per-example p. FLOP floor adapted/frozen forward: {floor:.4f}.",
        "",
        "| candidate | forward ms | forward / Dense | train step ms | step / Dense fwd+loss | step / rss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in fwd:
        lines.append(
            f"| {name} | {1e3 * fwd[name]:.2f} | {fwd[name] / fwd['dense']:.3f} | {1e3 * stp[name]:.2f} | "
            f"{stp[name] / stp['dense']:.3f} | {stp[name] / stp['rss']:.3f} |"
        )
    return lines


def targets(result, merged, sweeps, memory) -> list[str]:
    fwd, stp = result["forward"], result["step"]
    batch, tokens, d, rank, d_p = result["shape"]
    floor = flop_floor(d, d, rank)
    theirs = [stp[k] for k in ("nnx.LoRALinear", "qwix LoRA") if k in stp]
    rows = [
        ("train step rss / faster of nnx.LoRALinear, qwix LoRA", stp["rss"] / min(theirs), "≤ 0.7"),
        ("train step rss / frozen Dense forward+loss", stp["rss"] / stp["dense"], "≤ 1.6 (FLOP floor ≈ 1.1)"),
        ("forward rss / our plain LoRA", fwd["rss"] / fwd["lora_ours"], "≤ 1.05"),
        ("train step rss / our plain LoRA", stp["rss"] / stp["lora_ours"], "≤ 1.05"),
        ("forward rss / frozen Dense", fwd["rss"] / fwd["dense"], f"≤ 1.5 × floor = {1.5 * floor:.3f}"),
        ("merged / nn.Dense", merged["merged"] / merged["nn.Dense"], "≤ 1.02"),
        ("A/A control: dense / dense, forward", fwd["dense (A/A control)"] / fwd["dense"], "noise, ideally 1"),
        ("A/A control: dense / dense, train step", stp["dense (A/A control)"] / stp["dense"], "noise, ideally 1"),
        ("train step hypernet / rss", stp["hypernet"] / stp["rss"], "report"),
        ("train step film_branch / rss", stp["film_branch"] / stp["rss"], "report"),
    ]
    for k, s in sweeps.items():
        rows.append((f"sweep K={k}: vmap over p / {k} separate calls", s["vmap over p"] / s["separate calls"],
                     "≤ 0.15" if str(k).startswith("256") else "report"))  # fmt: skip
    names = list(memory)
    rows.append(("peak memory adapters only / full fine-tuning", memory[names[0]] / memory[names[2]], "≤ 0.6"))
    lines = ["| figure | measured | target |", "|---|---:|---|"]
    lines += [f"| {name} | {value:.3f} | {target} |" for name, value, target in rows]
    return lines


def output_path(full: bool) -> pathlib.Path:
    """Where a run writes its tables: only full mode replaces the committed ``BENCHMARKS.md``."""
    return ROOT / "BENCHMARKS.md" if full else ROOT / "runs" / "bench" / "BENCHMARKS.quick.md"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="add one-at-a-time sweeps of r, d_p, tokens at d=4096")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: only checks that everything runs")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--no-write", action="store_true", help="print only; write no file")
    args = parser.parse_args(argv)
    if args.smoke:
        shape, mem_shape, sweep_shape, rounds = (2, 16, 32, 4, 3), (2, 16, 64, 4, 3), (2, 8, 32, 4, 3), 2
        sweep_ks, scaling = (4, 8), {"r": [2, 4], "d_p": [1, 4], "tokens": [16, 32]}
    else:
        shape, mem_shape, sweep_shape, rounds = (
            (32, 128, 1024, 16, 8),
            (8, 128, 4096, 16, 8),
            (4, 64, 1024, 16, 8),
            args.rounds,
        )
        sweep_ks, scaling = (16, 256), {"r": [4, 16, 64], "d_p": [1, 8, 64], "tokens": [2048, 4096, 16384]}

    emit = Lines()

    command = "python -m benchmarks.run" + (" --full" if args.full else "") + (" --smoke" if args.smoke else "")
    emit("# Benchmarks")
    emit()
    emit(f"Command: `{command}` (from the repository root). Machine: {machine()}.")
    emit(
        f"Date: {time.strftime('%Y-%m-%d')}. Times are medians of interleaved rounds of jitted calls: {rounds} rounds "
        f"for item 1 at the first shape and item 2, {max(5, rounds // 3)} at d = 4096, {max(3, rounds // 3)} for "
        "items 3 and 5 (3 for item 5 at d = 4096)."
    )
    emit()
    emit("## 1. Forward and train step (grads w.r.t. adapters only)")
    emit()
    layers = bench_layers(*shape, rounds)
    for line in layer_table(layers):
        emit(line)
    if args.full:
        for big in ((8, 256, 4096, 16, 8), (4, 512, 4096, 64, 64)):
            emit()
            for line in layer_table(bench_layers(*big, max(5, rounds // 3))):
                emit(line)
    emit()
    emit("## 2. Merged at a fixed p vs nn.Dense")
    merged = bench_merged(*shape, rounds)
    emit()
    emit(f"nn.Dense {1e3 * merged['nn.Dense']:.2f} ms, merged {1e3 * merged['merged']:.2f} ms "
         f"(ratio {merged['merged'] / merged['nn.Dense']:.3f}).")  # fmt: skip
    emit()
    emit("## 3. Sweep over K operating conditions of one input batch")
    emit()
    b, t, d, r, dp = sweep_shape
    emit(f"x [{b}, {t}, {d}], r = {r}, d_p = {dp}.")
    emit()
    emit("Write floor: the time to write the K outputs alone (the fastest of an add, a broadcast copy and a")
    emit("contraction-2 matmul producing them), what any sweep that returns every output must spend.")
    emit()
    header = "| K | K separate calls ms | vmap over p ms | ratio | write floor ms | floor / separate | vmap / floor |"
    emit(header)
    emit("|---:|---:|---:|---:|---:|---:|---:|")
    sweeps = {}

    def sweep_row(k, s):
        sep, vm, fl = s["separate calls"], s["vmap over p"], s["write floor"]
        return (f"| {k} | {1e3 * sep:.1f} | {1e3 * vm:.1f} | {vm / sep:.3f} | {1e3 * fl:.1f} | {fl / sep:.3f} "
                f"| {vm / fl:.2f} |")  # fmt: skip

    for k in sweep_ks:
        sweeps[k] = bench_sweep(*sweep_shape, k, rounds)
        emit(sweep_row(k, sweeps[k]))
    if not args.smoke:
        big = (8, 128, 1024, 16, 8)
        emit()
        emit(f"The same at x [{big[0]}, {big[1]}, {big[2]}] (4× the tokens per call, 1 GiB of outputs at K = 256):")
        emit()
        emit(header)
        emit("|---:|---:|---:|---:|---:|---:|---:|")
        s = bench_sweep(*big, sweep_ks[-1], 3)
        sweeps[f"{sweep_ks[-1]} (1024 tokens)"] = s
        emit(sweep_row(sweep_ks[-1], s))
    emit()
    emit("## 4. Peak memory of one Adam step (XLA buffer assignment)")
    emit()
    b, t, d, r, dp = mem_shape
    emit(f"x [{b}, {t}, {d}], d_in = d_out = {d}, r = {r}, d_p = {dp}; arguments donated.")
    emit()
    memory = bench_memory(*mem_shape)
    emit("| training | peak MiB | temporaries MiB |")
    emit("|---|---:|---:|")
    for name in [n for n in memory if not n.endswith("(temp)")]:
        emit(f"| {name} | {memory[name] / 2**20:.1f} | {memory[name + ' (temp)'] / 2**20:.1f} |")
    emit()
    emit("## 5. Scaling of the RSS train step")
    emit()
    axes = dict(scaling) if (args.full or args.smoke) else {"r": scaling["r"], "tokens": scaling["tokens"][:2]}
    if not (args.full or args.smoke):
        axes["d_p"] = scaling["d_p"]
    emit("| axis | values | rss ms | rss / plain LoRA | exponent of rss time |")
    emit("|---|---|---|---|---:|")
    for axis, values in axes.items():
        rows = bench_scaling(shape, axis, values, max(3, rounds // 3))
        emit(f"| {axis} | {', '.join(str(v) for v, _, _ in rows)} | "
             f"{', '.join(f'{1e3 * r_:.1f}' for _, r_, _ in rows)} | "
             f"{', '.join(f'{r_ / l_:.3f}' for _, r_, l_ in rows)} | "
             f"{slope([v for v, _, _ in rows], [r_ for _, r_, _ in rows]):.2f} |")  # fmt: skip
    if args.full:
        emit()
        emit("### At d = 4096")
        emit()
        big = (8, 256, 4096, 16, 8)
        emit("| axis | values | rss ms | rss / plain LoRA | exponent of rss time |")
        emit("|---|---|---|---|---:|")
        for axis, values in {"r": [4, 16, 64], "d_p": [1, 8, 64], "tokens": [2048, 4096, 16384]}.items():
            rows = bench_scaling(big, axis, values, 3)
            emit(f"| {axis} | {', '.join(str(v) for v, _, _ in rows)} | "
                 f"{', '.join(f'{1e3 * r_:.1f}' for _, r_, _ in rows)} | "
                 f"{', '.join(f'{r_ / l_:.3f}' for _, r_, l_ in rows)} | "
                 f"{slope([v for v, _, _ in rows], [r_ for _, r_, _ in rows]):.2f} |")  # fmt: skip
    emit()
    emit("## Targets")
    emit()
    for line in targets(layers, merged, sweeps, memory):
        emit(line)
    text = emit.text
    if not args.no_write and not args.smoke:
        path = output_path(args.full)
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_text() if path.exists() else ""
        if NOTES_MARKER in old:  # hand-written analysis below the marker survives a regeneration
            text += "\n" + NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}", flush=True)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
