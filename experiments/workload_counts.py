r"""Error against the number of training conditions on the workloads: KS and the battery, independent draws.

    python -m experiments.workload_counts --config configs/workload_counts.py --workdir results/workload_counts \
        --config.workloads="('ks',)" --config.run_draws="(0,)"     # one workload, one draw: one part

(the parts, their commands and times: ``configs/workload_counts.py`` and RESULTS.md). The pendulum's sweep is
:mod:`experiments.condition_count`; this is the same question on the pretrained transformer surrogates.

Design:

1. **Draws.** Draw ``d`` is the workload study's draw ``d`` (:func:`experiments.workloads.load_workload`): its
   re-pretrained base, its held-out conditions, its extrapolated ones and its evaluation trajectories. Its
   training conditions are new: the first ``max(counts)`` points of a scrambled Sobol sequence over the training
   box, seeded by the draw's data seed, each with as many trajectories (KS) or load profiles (battery) as the
   workload study's training conditions have (:func:`experiments.physics_data.condition_set`, cached).
2. **Counts.** ``K`` conditions are the first ``K`` of that sequence: the sets are nested and space-filling at
   every ``K``; each condition brings the same number of trajectories, so the training set grows with ``K``.
   Every count trains on the same trajectory split.
3. **Training.** :func:`experiments.workloads.run_method` with ``counts``: the runs of every count and seed of a
   method train at once (one compiled step), for the same number of steps and batch size as the workload study,
   at the learning rate named in the config before the run (the rate the workload study chose at 16 conditions
   on most draws). ``p`` is centred at the nominal condition for every method, with the workload study's scale.
4. **Evaluation.** The held-out and extrapolated sets of the draw, and ``train``: the first ``min(counts)``
   training conditions (which every count has), on their validation trajectories.
5. **Statistics** (:mod:`experiments.stats`): errors form ``[draws, seeds]`` arrays per count; geometric means,
   intervals over draws, paired ratios with Holm–Bonferroni marks over each table
   (:func:`experiments.condition_count.ratio_table`).

Records: ``<workload>_draw<d>.jsonl`` (one per method); ``report.md`` and one plot per workload are rebuilt from
every record in the workdir after each part (``--config.part=render`` only rebuilds them).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from experiments import condition_count, physics_data, stats, workload_study, workloads

SETS = ("train", "heldout", "extrapolated")


def sweep_workload(
    name: str, config: ml_collections.ConfigDict, data_dir: str | None = None, draw: int = 0
) -> workloads.Workload:
    """Draw ``draw`` of workload ``name`` with its training set replaced by ``max(config.counts)`` Sobol
    conditions (nested, space-filling); its ``train`` evaluation set is the first ``min(config.counts)`` of them."""
    work = workloads.load_workload(name, config, data_dir, draw=draw)
    data = work.pretrain_config.data
    conditions = physics_data.sobol_conditions(data.box, max(config.counts), data.seed)
    train = physics_data.condition_set(data, "condition_count", conditions, data_dir, config.get("progress", False))
    x, y, w, c = workloads.examples(name, train)
    seen = {k: v[: min(config.counts)] for k, v in train.items()}
    return dataclasses.replace(work, x=x, y=y, w=w, conditions=c, sets=dict(work.sets, train=seen))


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, data_dir: str | None = None) -> float:
    """Train the config's workloads and draws (``config.run_draws``) into ``workdir``; rebuild the report."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    counts = [int(k) for k in config.counts]
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.draws = 1
    part = config.get("part", "main")
    if part not in ("main", "lr_check", "render"):
        raise ValueError(f"unknown part {part!r}; expected 'main', 'lr_check' or 'render'.")
    for name in config.workloads if part == "lr_check" else ():
        lr_check(name, config, sub, workdir, data_dir)
    for name in config.workloads if part == "main" else ():
        for draw in config.run_draws:
            t = time.perf_counter()
            work = sweep_workload(name, sub, data_dir, draw)
            load_s = time.perf_counter() - t
            records = []
            for method in config.methods:
                if method == "frozen":
                    record = workloads.run_method(work, method, "all", sub, seed=draw)
                else:
                    lr = float(config.learning_rate[method])
                    record = workloads.run_method(work, method, "all", sub, draw, [lr] * len(counts), counts)
                record |= {"draw": draw, "counts": counts, "data_and_base_s": load_s}
                records.append(record)
                if config.get("progress", False):
                    print(f"{name} draw {draw} {method}: {record['seconds']:.0f} s", flush=True)
            workload_study._write(workdir / f"{name}_draw{draw}.jsonl", records)
    seconds = time.perf_counter() - start
    write_report(workdir)
    return seconds


def lr_check(name: str, config: ml_collections.ConfigDict, sub: ml_collections.ConfigDict,
             workdir: pathlib.Path, data_dir: str | None = None) -> None:  # fmt: skip
    """Is the fixed rate still the best at the extreme counts? On the first draw of ``config.run_draws``, every
    trained method at each count of ``config.lr_check_counts`` with the rates ``lr / f, lr, lr · f``
    (``f = config.lr_check_factor``), one run each; the validation loss (the count's own training conditions,
    validation trajectories) picks among them. Writes ``<workload>_lr_check.jsonl``."""
    draw = config.run_draws[0]
    t = time.perf_counter()
    work = sweep_workload(name, sub, data_dir, draw)
    load_s = time.perf_counter() - t
    one = ml_collections.ConfigDict(sub.to_dict())
    one.seeds = 1
    records = []
    for method in (m for m in config.methods if m != "frozen"):
        lr, factor = float(config.learning_rate[method]), float(config.lr_check_factor)
        for count in config.lr_check_counts:
            k = int(count)
            record = workloads.run_method(work, method, "all", one, draw, [lr / factor, lr, lr * factor], [k] * 3)
            # with one count, validation runs on that count's own conditions (min of the counts)
            record |= {"draw": draw, "count": k, "fixed_lr": lr, "part": "lr_check", "data_and_base_s": load_s}
            records.append(record)
            if config.get("progress", False):
                print(f"{name} lr check K={k} {method}: {record['seconds']:.0f} s", flush=True)
    workload_study._write(workdir / f"{name}_lr_check.jsonl", records)


def lr_check_table(records: list[dict], metric: str) -> list[str]:
    """Per method and count: final validation loss and held-out error at ``lr / f, lr, lr · f`` (one run each)."""
    lines = ["| method | K | rates | final validation loss | held-out error | lowest validation loss at |",
             "|---|---:|---|---|---|---:|"]  # fmt: skip
    for r in records:
        lrs = [run[2] for run in r["runs"]]
        val = [curve[-1] for curve in r["val_curve"]["by_run"]]
        held = workload_study.errors([r], r["method"], "heldout", metric)[0]
        best = lrs[int(np.nanargmin(val))]
        fixed = " (the fixed rate)" if abs(best - r["fixed_lr"]) < 1e-12 else ""
        lines.append(f"| {r['method']} | {r['count']} | " + ", ".join(f"{v:g}" for v in lrs) + " | "
                     + ", ".join(f"{v:.4g}" for v in val) + " | " + ", ".join(f"{v:.4g}" for v in held)
                     + f" | {best:g}{fixed} |")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------------ report


def read(workdir: str | pathlib.Path) -> dict[str, list[dict]]:
    """``{workload: records}`` from the workdir's ``<workload>_draw<d>.jsonl`` files."""
    out: dict[str, list[dict]] = {}
    for path in sorted(pathlib.Path(workdir).glob("*_draw*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["workload"], []).append(r)
    return out


def rows(records: list[dict], metric: str) -> list[dict[str, Any]]:
    """The records as :mod:`experiments.condition_count` report rows: one per ``(count, method)`` with
    ``errors[set]`` a ``[draws, seeds]`` list (each run's error averaged over the set's conditions)."""
    draws = sorted({r["draw"] for r in records})
    counts = next(r["counts"] for r in records)
    out = []
    for method in dict.fromkeys(r["method"] for r in records):
        per_draw = sorted((r for r in records if r["method"] == method), key=lambda r: r["draw"])
        if [r["draw"] for r in per_draw] != draws:
            raise ValueError(f"{method}: records for draws {[r['draw'] for r in per_draw]}, expected {draws}.")
        for i, count in enumerate(counts):
            errors = {}
            for s in SETS:
                per_run = [workload_study.errors([r], method, s, metric) for r in per_draw]  # [1, runs] each
                if method == "frozen":  # one run per draw, the same base at every count
                    errors[s] = [e[0, :1].tolist() for e in per_run]
                else:
                    errors[s] = [e[0].reshape(len(counts), -1)[i].tolist() for e in per_run]
            lr = per_draw[0]["lr"][0] if per_draw[0]["lr"] else 0.0
            out.append({"task": metric, "count": count, "method": method, "errors": errors, "lr": lr,
                        "lr_edge": False})  # fmt: skip
    return out


def gain_table(table_rows: list[dict[str, Any]], split: str) -> list[str]:
    """Per method: error at the largest count / error at the smallest (paired over draws and seeds)."""
    by = {(r["count"], r["method"]): r for r in table_rows}
    counts = sorted({c for c, _ in by})
    lines = [f"| method | K = {counts[-1]} / K = {counts[0]} |", "|---|---:|"]
    for m in dict.fromkeys(m for _, m in by):
        if m == "frozen":
            continue
        hi, lo = (np.asarray(by[(k, m)]["errors"][split], np.float64) for k in (counts[-1], counts[0]))
        r = stats.paired_ratio(hi, lo)
        lines.append(f"| {m} | {r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}] |")
    return lines


def cost_lines(records: list[dict]) -> list[str]:
    lines = ["| method | trainable | lr | ms/step/run | validation loss at the last point / the one before |",
             "|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in (r for r in records if r["draw"] == min(x["draw"] for x in records) and r["method"] != "frozen"):
        curve = np.asarray(r["val_curve"]["by_run"], np.float64) if r.get("val_curve") else None
        tail = f"{np.mean(curve[:, -1] / curve[:, -2]):.3f}" if curve is not None and curve.shape[1] > 1 else "–"
        lines.append(f"| {r['method']} | {r['trainable']} | {r['lr'][0]:g} | {r['step_ms_per_run']:.1f} | {tail} |")
    return lines


def write_report(workdir: str | pathlib.Path) -> pathlib.Path:
    """``report.md`` and ``<workload>.png`` from every record in ``workdir``."""
    workdir = pathlib.Path(workdir)
    out = ["# Error against the number of training conditions on the workloads", "",
           "Cells: geometric mean over draws × seeds [95 % t-interval over draws]. Ratios: paired over the same "
           "draws and seeds; **>1** / **<1** significant after a Holm–Bonferroni correction over the table.",
           ""]  # fmt: skip
    for name, records in read(workdir).items():
        draws = sorted({r["draw"] for r in records})
        trained = next(r for r in records if r["method"] != "frozen")
        counts = trained["counts"]
        seeds = len(trained["runs"]) // len(counts)
        minutes = (sum(r["seconds"] for r in records) + sum(
            next(r["data_and_base_s"] for r in records if r["draw"] == d) for d in draws)) / 60  # fmt: skip
        out += [f"## {name}", "", f"Draws {draws} × {seeds} seeds per count; K in {counts}; {trained['steps']} steps "
                f"of batch {trained['batch']} at every K; anchor `{trained.get('anchor', 'none')}`; training and "
                f"evaluation {minutes:.1f} min (sum over records, data and bases included).", ""]  # fmt: skip
        for metric in workloads.METRICS[name]:
            table_rows = rows(records, metric)
            methods = list(dict.fromkeys(r["method"] for r in table_rows))
            for s in SETS:
                label = "the first training conditions (every K has them)" if s == "train" else f"{s} conditions"
                out += [f"### {metric} at {label}", "", *condition_count.error_table(table_rows, metric, s), ""]
                if s == "train":
                    continue
                for ref in ("rss", "rss_affine"):
                    out += [f"### {metric}, {s}: paired ratio method / `{ref}`", "",
                            *condition_count.ratio_table(table_rows, metric, s, ref,
                                                         [m for m in methods if m != "frozen"]), ""]  # fmt: skip
                out += [f"### {metric}, {s}: what more conditions buy", "", *gain_table(table_rows, s), ""]
        out += ["### Rates, cost and the end of training (first draw)", "", *cost_lines(records), ""]
        check = workdir / f"{name}_lr_check.jsonl"
        if check.exists():
            checked = [json.loads(line) for line in check.read_text().splitlines()]
            out += [f"### Learning-rate check at the extreme counts (draw {checked[0]['draw']}, one run per rate)", "",
                    "Validation on the count's own training conditions (validation trajectories); held-out error "
                    f"in {workloads.METRICS[name][0]}.", "", *lr_check_table(checked, workloads.METRICS[name][0]),
                    ""]  # fmt: skip
        first = workloads.METRICS[name][0]
        condition_count.plot(rows(records, first), first, workdir / f"{name}.png", splits=("heldout", "extrapolated"),
                             ylabel=first, unity=False)  # fmt: skip
        out += [f"![{name}]({name}.png)", ""]
    path = workdir / "report.md"
    path.write_text("\n".join(out))
    return path


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - command line
    workloads.command_line(run, "configs/workload_counts.py", "results/workload_counts", argv)


if __name__ == "__main__":  # pragma: no cover
    main()
