"""The fast paths, measured with ``benchmarks.run``'s own functions, repeated to show the spread.

    python -m benchmarks.fast_paths              # writes the "Fast paths" section of BENCHMARKS.md
    python -m benchmarks.fast_paths --repeats 1 --rounds 5 --no-write

Item 1 (forward and train step at x [32, 128, 1024], r = 16, d_p = 8), item 2 (merged vs nn.Dense) and item 3 (vmap
over K = 256 conditions of x [4, 64, 1024], and of x [8, 128, 1024]) of ``benchmarks.run``, each run ``--repeats``
times. Every repeat interleaves its candidates round by round and carries an A/A control (the frozen Dense timed
twice), so the spread of the control across repeats is the noise of the machine at the time.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from benchmarks import run
from benchmarks.report import Lines, load_average, write_section


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        shape, sweep_shape, big_sweep, k = (2, 16, 32, 4, 3), (2, 8, 32, 4, 3), (2, 16, 32, 4, 3), 8
    else:
        shape, sweep_shape, big_sweep, k = (32, 128, 1024, 16, 8), (4, 64, 1024, 16, 8), (8, 128, 1024, 16, 8), 256
    rows = {name: [] for name in ("A/A control / Dense", "forward rss / Dense", "forward lora_ours / Dense",
                                  "step rss / lora_ours", "step rss / min(nnx.LoRALinear, qwix)",
                                  "merged / nn.Dense", f"sweep K={k}: vmap / separate",
                                  f"sweep K={k}: write floor / separate", f"sweep K={k}: vmap / write floor",
                                  f"sweep K={k} (4x tokens): vmap / separate",
                                  f"sweep K={k} (4x tokens): write floor / separate",
                                  f"sweep K={k} (4x tokens): vmap / write floor")}  # fmt: skip
    for _ in range(args.repeats):
        layers = run.bench_layers(*shape, args.rounds)
        f, s = layers["forward"], layers["step"]
        rows["A/A control / Dense"].append(f["dense (A/A control)"] / f["dense"])
        rows["forward rss / Dense"].append(f["rss"] / f["dense"])
        rows["forward lora_ours / Dense"].append(f["lora_ours"] / f["dense"])
        rows["step rss / lora_ours"].append(s["rss"] / s["lora_ours"])
        rows["step rss / min(nnx.LoRALinear, qwix)"].append(
            s["rss"] / min(s["nnx.LoRALinear"], s.get("qwix LoRA", np.inf))
        )
        merged = run.bench_merged(*shape, args.rounds)
        rows["merged / nn.Dense"].append(merged["merged"] / merged["nn.Dense"])
        for label, sh, rounds in ((f"sweep K={k}", sweep_shape, max(3, args.rounds // 3)),
                                  (f"sweep K={k} (4x tokens)", big_sweep, 3)):  # fmt: skip
            sw = run.bench_sweep(*sh, k, rounds)
            rows[f"{label}: vmap / separate"].append(sw["vmap over p"] / sw["separate calls"])
            rows[f"{label}: write floor / separate"].append(sw["write floor"] / sw["separate calls"])
            rows[f"{label}: vmap / write floor"].append(sw["vmap over p"] / sw["write floor"])
    targets = {"A/A control / Dense": "1 (noise)", "forward rss / Dense": "≤ 1.15", "step rss / lora_ours": "≤ 1.05",
               "step rss / min(nnx.LoRALinear, qwix)": "≤ 0.7", "merged / nn.Dense": "≤ 1.02",
               f"sweep K={k}: vmap / separate": "≤ 0.15"}  # fmt: skip
    emit = Lines()

    emit("## Fast paths (`benchmarks/fast_paths.py`)")
    emit()
    emit(f"Command: `python -m benchmarks.fast_paths --repeats {args.repeats} --rounds {args.rounds}`. Machine: "
         f"{run.machine()}. Date: {time.strftime('%Y-%m-%d %H:%M')}.")  # fmt: skip
    emit()
    emit(f"Load average (1 min) when the measurements ended: {load_average()} (other jobs on the")
    emit("machine stretch absolute times; ratios are of candidates interleaved round by round in one process). The A/A")
    emit("row is the noise; each cell is min / median / max over the repeats.")
    emit()
    emit("| figure | min | median | max | target |")
    emit("|---|---:|---:|---:|---|")
    for name, values in rows.items():
        v = np.asarray(values)
        emit(f"| {name} | {v.min():.3f} | {np.median(v):.3f} | {v.max():.3f} | {targets.get(name, '')} |")
    text = emit.text
    if not args.no_write and not args.smoke:
        write_section("fast_paths", text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
