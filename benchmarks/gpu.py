"""On a GPU: check that the library compiles there and agrees with the CPU, run the benchmarks, write a GPU section.

    bash benchmarks/gpu.sh                 # = python -m benchmarks.gpu (needs jax with CUDA in the environment)
    python -m benchmarks.gpu --check-only  # only the compile + agreement checks (a minute)
    python -m benchmarks.gpu --smoke       # tiny shapes; also runs on CPU (what the tests run), prints only

Writes the "GPU" section of BENCHMARKS.md (``benchmarks.report.write_section``): the device, the agreement table,
and the tables of ``benchmarks.run`` (quick mode) and ``benchmarks.quantized`` measured on the GPU. The CPU tables
stay as they are. Tests never need a GPU: this module is exercised on CPU with ``--smoke --allow-cpu``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import rssbl_jax
from benchmarks.report import Lines, write_section


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(24, name="down")(nn.gelu(nn.Dense(48, name="up")(x)))


def _cases():
    """Library entry points as functions of host arrays: each returns a pytree of outputs."""
    ks = jax.random.split(jax.random.key(0), 8)
    x = np.asarray(jax.random.normal(ks[0], (4, 16, 32)))
    p = np.asarray(jax.random.normal(ks[1], (4, 3)))
    cfg = rssbl_jax.AdapterConfig(rank=4, lora_alpha=8.0, targets=["up", "down"], gate_offset=1.0)
    adapted = rssbl_jax.inject(_Net(), cfg)
    params = jax.device_get(adapted.init(jax.random.key(1), x, p=p))["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: (np.asarray(0.1 * jax.random.normal(ks[2], v.shape))
                         if str(path[-1].key) in ("lora_b", "lora_c", "lora_s") else v),
        params)  # fmt: skip

    def forward(params, x, p):
        return adapted.apply({"params": params}, x, p=p)

    def grads(params, x, p):
        trainable, frozen = rssbl_jax.partition(params, cfg)
        return jax.grad(lambda t: jnp.mean(forward(rssbl_jax.combine(t, frozen), x, p) ** 2))(trainable)

    def sweep(params, x, p):
        return jax.vmap(lambda q: forward(params, x, q))(p)  # 4 conditions, each for every example

    def sensitivity(params, x, p):
        return jax.jacfwd(lambda q: forward(params, x, q))(p[0])  # forward mode, shared p

    def merged(params, x, p):
        return _Net().apply({"params": rssbl_jax.merge(params, p[0], cfg)}, x)

    def quantised(params, x, p):
        from rssbl_jax import quantize

        model = rssbl_jax.inject(quantize.quantize_base(_Net(), "int8"), cfg)
        abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x, p=p))["params"]
        return model.apply({"params": quantize.quantize_params(params, abstract)}, x, p=p)

    cases = {"inject forward": forward, "grads w.r.t. adapters": grads, "vmap over p": sweep,
             "jacfwd w.r.t. p": sensitivity, "merge at p0": merged, "int8 base (qwix)": quantised}  # fmt: skip
    return cases, (params, x, p)


def agreement(device, precision: str) -> list[tuple[str, float, float]]:
    """Max abs and relative difference of each case between ``device`` and the CPU, at a matmul precision."""
    cases, args = _cases()
    cpu = jax.devices("cpu")[0]
    rows = []
    with jax.default_matmul_precision(precision):
        for name, fn in cases.items():
            want = jax.jit(fn)(*jax.device_put(args, cpu))
            got = jax.jit(fn)(*jax.device_put(args, device))
            want, got = jax.device_get(want), jax.device_get(got)
            diff = max(
                float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
            )
            scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(want))
            rows.append((name, diff, diff / scale))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--allow-cpu", action="store_true", help="run even without a GPU (tests)")
    args = parser.parse_args(argv)
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus and not args.allow_cpu:
        print(
            f"no GPU visible to jax (devices: {jax.devices()}); install jax[cuda12] or pass --allow-cpu",
            file=sys.stderr,
        )
        return 2
    device = gpus[0] if gpus else jax.devices("cpu")[0]
    emit = Lines()

    emit("## GPU (`bash benchmarks/gpu.sh`)")
    emit()
    emit(f"Device: {device.device_kind} ({device.platform}); jax {jax.__version__}. Date: {time.strftime('%Y-%m-%d')}.")
    emit()
    emit("### The library on the GPU against the CPU (same inputs, jitted on each)")
    emit()
    emit("| case | matmul precision | max abs Δ | max Δ / max |out| |")
    emit("|---|---|---:|---:|")
    worst = 0.0
    for precision in ("highest", "default"):
        for name, diff, rel in agreement(device, precision):
            emit(f"| {name} | {precision} | {diff:.2e} | {rel:.2e} |")
            if precision == "highest":
                worst = max(worst, rel)
    emit()
    emit(f"At `highest` the worst relative difference is {worst:.1e}: "
         f"{'agrees to float32 round-off' if worst < 1e-4 else 'LARGER than float32 round-off, investigate'}. "
         "`default` lets the GPU use TF32 for float32 matmuls (about 1e-3 relative).")  # fmt: skip
    if not args.check_only:
        from benchmarks import quantized, run

        emit()
        emit("### `benchmarks.run` on the GPU (quick mode; headings shifted down)")
        emit()
        text = run.main(["--no-write"] + (["--smoke"] if args.smoke else []))
        emit.lines.extend("##" + line if line.startswith("#") else line for line in text.splitlines())
        emit()
        text = quantized.main(["--no-write"] + (["--smoke"] if args.smoke else []))
        emit.lines.extend("#" + line if line.startswith("#") else line for line in text.splitlines())
    text = emit.text
    if gpus and not args.smoke:
        write_section("gpu", text)
    return 0 if worst < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
