"""Error against the number of training conditions: where a low-rank inductive bias would show.

The claim behind conditioning inside the rank space is that the update ``B diag(g(p)) A`` keeps one fixed rank-r
subspace for every condition, and so needs fewer conditions to generalise than conditioning that moves the
update's subspace with ``p`` (output-space FiLM, a hypernetwork) or that trains every weight. This study measures
it: every method of ``config.methods`` is trained on ``K`` conditions for each ``K`` of ``config.counts`` and
evaluated at held-out conditions inside the range (interpolation) and outside it (extrapolation).

Design (one draw redraws everything that is not the method):

* A draw pretrains its own base (:func:`experiments.tasks.make_task`) and draws its own conditions: a scrambled
  Sobol sequence of ``max(counts)`` training conditions (``K`` conditions are its first ``K`` points, so the sets
  are nested within a draw and space-filling at every ``K``), ``n_test_conditions`` held-out and as many
  extrapolated conditions (physically valid ones only: :func:`experiments.tasks.pendulum_damped`), and all inputs.
* Each training condition carries ``points_per_condition`` samples, so the training set grows with ``K``.
* With ``config.centre`` every method sees ``p - p_nominal`` (the base's own condition at 0), the same input for
  every method, so the linear gate ``C p`` is silent exactly where the base is right.
* For each ``(K, method)`` the learning rate is chosen from ``config.learning_rates`` on draw 0 by validation error
  (fresh inputs at the training conditions), then every draw × seed trains at that rate for ``config.steps``
  Adam steps (:func:`experiments.train.run_method`); a pick at an edge of the grid is flagged.
* Intervals and paired ratios run over draws (:mod:`experiments.stats`); significance marks are Holm-corrected
  over each table's family of comparisons.

Outputs in ``workdir``: ``metrics.jsonl`` (one row per ``(task, K, method)``), ``report.md`` (deterministic on
CPU), ``timing.json`` and one plot per task. ``--render`` re-renders the report from ``metrics.jsonl``::

    python -m experiments.condition_count --config configs/condition_count_pendulum.py \\
        --workdir results/condition_count/pendulum
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.ticker
import ml_collections
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import report, stats, train  # noqa: E402
from experiments.tasks import Split, Task, make_draws  # noqa: E402

SPLITS = ("interpolation", "extrapolation")


def centred(task: Task) -> Task:
    """The task with every condition shifted by the nominal one: ``p - p_nominal`` (the base's condition at 0)."""
    nominal = task.nominal

    def shift(split: Split) -> Split:
        return split._replace(p=split.p - jnp.expand_dims(nominal, -2))

    splits = {name: shift(s) for name, s in task.splits.items()}
    return task._replace(train=shift(task.train), splits=splits, nominal=jnp.zeros_like(nominal))


def with_count(stacked: Task, count: int) -> Task:
    """The stacked draws restricted to their first ``count`` training conditions (training, validation, seen rows).

    Rows come in blocks of ``per_condition`` per condition, so the first ``count * per_condition`` rows of a split
    at the training conditions are exactly its first ``count`` conditions."""
    rows = count * stacked.per_condition
    available = stacked.train.x.shape[1]
    if rows > available:
        raise ValueError(f"count={count} needs {rows} rows; the draws have {available} (train_conditions too small).")

    def head(split: Split) -> Split:
        return Split(*(a[:, :rows] for a in split))

    splits = dict(stacked.splits)
    for name in ("validation", "seen"):
        splits[name] = head(splits[name])
    return stacked._replace(train=head(stacked.train), splits=splits)


def base_mse(stacked: Task) -> dict[str, np.ndarray]:
    """Absolute MSE of each draw's frozen base on every split: ``{split: [draws]}``."""
    fn = jax.jit(
        jax.vmap(
            lambda b, sp: {s: train._base_rows(stacked.widths, b, v, stacked.activation).mean() for s, v in sp.items()}
        )
    )
    return {s: np.asarray(v, np.float64) for s, v in fn(stacked.base_params, stacked.splits).items()}


def _variant(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.condition_design = "sobol"
    sub.train_conditions = max(config.counts)
    return sub


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Train every ``(task, K, method)`` of ``config``; write ``metrics.jsonl``, ``timing.json`` and the report."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    key = jax.random.key(config.seed)
    sub = _variant(config)
    rows: list[dict[str, Any]] = []
    timing: dict[str, float] = {}
    start = time.perf_counter()
    with open(workdir / "metrics.jsonl", "w") as metrics:
        for task_name in config.tasks:
            t0 = time.perf_counter()
            stacked = make_draws(task_name, sub, jax.random.fold_in(key, train.zlib_hash(task_name)))
            if config.centre:
                stacked = centred(stacked)
            base = base_mse(stacked)
            timing[f"data {task_name}"] = time.perf_counter() - t0
            for count in config.counts:
                task = with_count(stacked, count)
                for method in config.methods:
                    t0 = time.perf_counter()
                    k = jax.random.fold_in(key, train.zlib_hash(f"{task_name} {count} {method}"))
                    row = train.run_method(task, method, sub, k, analyse=False)
                    timing[f"{task_name} {count} {method}"] = time.perf_counter() - t0
                    row.pop("curve", None)
                    row["count"] = count
                    row["base_mse"] = {s: base[s].tolist() for s in ("seen", *SPLITS)}
                    rows.append(row)
                    metrics.write(json.dumps({"kind": "condition_count", **row}) + "\n")
                    metrics.flush()
                    if config.progress:
                        rel = stats.log_interval(np.asarray(row["errors"]["interpolation"])).estimate
                        print(f"{task_name} K={count} {method}: interpolation {rel:.3g} "
                              f"({timing[f'{task_name} {count} {method}']:.0f} s)", flush=True)  # fmt: skip
    seconds = time.perf_counter() - start
    (workdir / "timing.json").write_text(
        json.dumps({"total_seconds": seconds, "process_cpu_seconds": time.process_time(), **timing}, indent=1) + "\n"
    )
    write(rows, config, workdir)
    return rows


def load(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The rows of a finished sweep, read back from its ``metrics.jsonl``."""
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "condition_count"]


# ------------------------------------------------------------------------------------------------ report


def _geo(errors: Any) -> str:
    g = stats.log_interval(np.asarray(errors, np.float64))
    if g.low != g.low:
        return f"{g.estimate:.3g}"
    return f"{g.estimate:.3g} [{g.low:.3g}, {g.high:.3g}]"


def _by(rows: list[dict[str, Any]], task: str) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["count"], r["method"]): r for r in rows if r["task"] == task}


def error_table(rows: list[dict[str, Any]], task: str, split: str, absolute: bool = False) -> list[str]:
    """Methods × counts: geometric mean over draws × seeds [95% interval over draws] of the relative (or absolute)
    MSE on ``split``; † marks a learning rate chosen at an edge of the grid."""
    by = _by(rows, task)
    counts = sorted({c for c, _ in by})
    methods = list(dict.fromkeys(m for _, m in by))
    lines = ["| method | " + " | ".join(f"K = {c}" for c in counts) + " |", "|---|" + "---:|" * len(counts)]
    for m in methods:
        cells = []
        for c in counts:
            r = by.get((c, m))
            if r is None:
                cells.append("–")
                continue
            errors = np.asarray(r["errors"][split], np.float64)
            if absolute:
                errors = errors * np.asarray(r["base_mse"][split], np.float64)[:, None]
            cells.append(_geo(errors) + (" †" if r["lr_edge"] else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def ratio_table(rows: list[dict[str, Any]], task: str, split: str, reference: str,
                methods: list[str]) -> list[str]:  # fmt: skip
    """Paired ratios method / ``reference`` at every count, marks Holm-corrected over the whole table."""
    by = _by(rows, task)
    counts = sorted({c for c, _ in by})
    cells: dict[tuple[str, int], stats.Interval] = {}
    pvalues: dict[tuple[str, int], float] = {}
    for m in methods:
        for c in counts:
            if (c, m) in by and (c, reference) in by and m != reference:
                a, b = np.asarray(by[(c, m)]["errors"][split]), np.asarray(by[(c, reference)]["errors"][split])
                cells[(m, c)] = stats.paired_ratio(a, b)
                pvalues[(m, c)] = stats.paired_pvalue(a, b)
    keys = list(pvalues)
    adjusted = dict(zip(keys, stats.holm([pvalues[k] for k in keys]), strict=True))
    lines = ["| method | " + " | ".join(f"K = {c}" for c in counts) + " |", "|---|" + "---:|" * len(counts)]
    for m in methods:
        if m == reference:
            continue
        out = []
        for c in counts:
            if (m, c) not in cells:
                out.append("–")
                continue
            r = cells[(m, c)]
            mark = ""
            if adjusted[(m, c)] < 0.05:
                mark = " **>1**" if r.estimate > 1 else " **<1**"
            out.append(f"{r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}]{mark}")
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    return lines


def tuning_table(rows: list[dict[str, Any]], task: str) -> list[str]:
    by = _by(rows, task)
    counts = sorted({c for c, _ in by})
    methods = list(dict.fromkeys(m for _, m in by))
    lines = ["| method | " + " | ".join(f"K = {c}" for c in counts) + " |", "|---|" + "---:|" * len(counts)]
    for m in methods:
        cells = []
        for c in counts:
            r = by.get((c, m))
            cells.append("–" if r is None else f"{r['lr']:g}{' †' if r['lr_edge'] else ''} / {r['flatness']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def tables(rows: list[dict[str, Any]], config: ml_collections.ConfigDict) -> str:
    """The report's Markdown tables for every task of ``rows``."""
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by = _by(rows, task)
        counts = sorted({c for c, _ in by})
        methods = list(dict.fromkeys(m for _, m in by))
        first = by[(counts[0], methods[0])]
        lines += [f"## {task}", "", "Absolute MSE of the frozen base (mean over draws, per draw in brackets):", ""]
        for s in ("seen", *SPLITS):
            per = np.asarray(first["base_mse"][s])
            lines.append(f"- {s}: {per.mean():.4g} [" + ", ".join(f"{v:.3g}" for v in per) + "]")
        edges = sum(r["lr_edge"] for r in by.values())
        for s in SPLITS:
            lines += ["", f"### {s}: relative MSE (method / frozen base on the same rows)", "",
                      "Geometric mean over draws × seeds [95% t-interval over draws]; † the learning rate was chosen "
                      "at an edge of the grid.", "", *error_table(rows, task, s)]  # fmt: skip
            lines += ["", f"### {s}: absolute MSE", "", *error_table(rows, task, s, absolute=True)]
            for ref in config.references:
                if not any(m == ref for _, m in by):
                    continue
                lines += ["", f"### {s}: paired ratio method / `{ref}`", "",
                          f"Geometric mean over draws × seeds of method / `{ref}` on the same draws and seeds [95% "
                          "t-interval over draws]. **>1** / **<1**: significant after a Holm–Bonferroni correction "
                          f"over this table's {sum(1 for m in methods if m != ref) * len(counts)} comparisons "
                          "(family-wise level 5%).", "",
                          *ratio_table(rows, task, s, ref, methods)]  # fmt: skip
        lines += ["", "### Tuning", "",
                  f"Cell: learning rate chosen from {list(config.learning_rates)} († at an edge) / flatness = "
                  "training loss over the last 10% of steps ÷ the 10% window two windows earlier. "
                  f"{edges} of {len(by)} picks sit at an edge.", "", *tuning_table(rows, task), ""]  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], task: str, path: pathlib.Path, splits: tuple[str, ...] = SPLITS,
         ylabel: str = "relative MSE (method / frozen base)", unity: bool = True) -> None:  # fmt: skip
    """Error against K (log-log), one panel per split (interpolation and extrapolation), draw-level intervals;
    ``unity`` draws the frozen base's level of a relative error."""
    by = _by(rows, task)
    counts = sorted({c for c, _ in by})
    methods = list(dict.fromkeys(m for _, m in by))
    fig, axes = plt.subplots(1, len(splits), figsize=(12, 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, s in zip(axes, splits, strict=True):
        for i, m in enumerate(methods):
            pts = [(c, stats.log_interval(np.asarray(by[(c, m)]["errors"][s]))) for c in counts if (c, m) in by]
            xs = np.array([c for c, _ in pts]) * (1 + 0.025 * (i - len(methods) / 2))
            ys = [g.estimate for _, g in pts]
            yerr = [[max(g.estimate - g.low, 0) for _, g in pts], [g.high - g.estimate for _, g in pts]]
            style = "-" if m.startswith("rss") else "--"
            ax.errorbar(xs, ys, yerr=yerr, fmt=style, marker="os^vD<>p*h"[i % 10], ms=4, capsize=2, lw=1.2,
                        label=m)  # fmt: skip
        if unity:
            ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="training conditions K", title=f"{task}: {s}")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(counts, [str(c) for c in counts])
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def budget_tables(rows: list[dict[str, Any]], earlier: list[dict[str, Any]], task: str) -> list[str]:
    """This sweep against ``earlier``, the same sweep (base, conditions, inputs, seeds) at a smaller budget: per split,
    method and count, the paired ratio this / earlier (draw-level interval, Holm over the table), ``✓`` when every
    draw's ratio (:func:`experiments.stats.per_draw_ratio`) is within :data:`experiments.stats.CONVERGED` of 1 (the
    criterion), and then the TOST test of the ratio within that margin (90 % interval, **≈** when shown after Holm
    over the table)."""
    now, then = _by(rows, task), _by(earlier, task)
    cells = [k for k in now if k in then]
    for k in cells:
        if not np.allclose(now[k]["base_mse"]["interpolation"], then[k]["base_mse"]["interpolation"], rtol=1e-6):
            raise ValueError(
                f"{task} K={k[0]} {k[1]}: the frozen bases differ between the budgets: not the same sweep."
            )
    counts = sorted({c for c, _ in cells})
    methods = list(dict.fromkeys(m for _, m in cells))
    header = ["| method | " + " | ".join(f"K = {c}" for c in counts) + " |", "|---|" + "---:|" * len(counts)]
    out: list[str] = []
    for split in SPLITS:
        pairs = [(now[(c, m)]["errors"][split], then[(c, m)]["errors"][split]) for m in methods for c in counts]
        ratios = report.holm_ratios(pairs)
        met = [bool(np.all(np.abs(stats.per_draw_ratio(a, b) - 1) < stats.CONVERGED)) for a, b in pairs]
        ratios = [r + (" ✓" if ok else "") for r, ok in zip(ratios, met, strict=True)]
        tost = report.holm_equivalence(pairs, stats.CONVERGED)
        k = len(counts)
        out += [f"{split}, this budget / the earlier one ({sum(met)} of {len(met)} cells meet the criterion, ✓):",
                "", *header, *(f"| {m} | " + " | ".join(ratios[i * k : (i + 1) * k]) + " |"
                                for i, m in enumerate(methods)), "",
                f"{split}, equivalence of the two budgets within ±{stats.CONVERGED:.0%} (TOST):", "", *header,
                *(f"| {m} | " + " | ".join(tost[i * k : (i + 1) * k]) + " |" for i, m in enumerate(methods)),
                ""]  # fmt: skip
    return out


def write(rows: list[dict[str, Any]], config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """``report.md`` and one ``<task>.png`` per task in ``workdir``; returns the report's path."""
    workdir = pathlib.Path(workdir)
    images = []
    for task in dict.fromkeys(r["task"] for r in rows):
        plot(rows, task, workdir / f"{task}.png")
        images.append(f"{task}.png")
    header = [
        "# Error against the number of training conditions",
        "",
        f"Tasks {list(config.tasks)}; K in {list(config.counts)} training conditions (the first K of a scrambled "
        f"Sobol sequence per draw), {config.points_per_condition} samples per condition; "
        f"{config.n_test_conditions} held-out and {config.n_test_conditions} extrapolated conditions per draw"
        + (" (physically valid only)" if config.physical_extrapolation else "")
        + f"; p {'centred at the nominal condition' if config.centre else 'as standardised'} for every method. "
        f"{config.num_draws} independent draws (base, conditions, inputs) × {config.num_seeds} seeds; learning rate "
        f"per (K, method) from {list(config.learning_rates)} ({config.tune_seeds} seeds on draw 0, by validation "
        f"error); {config.steps} Adam steps (cosine decay), batch {config.batch_size}; rank {config.rank}, "
        f"lora_alpha {config.lora_alpha}. Methods ({config.get('methods_note', 'named in the config before the run')})"
        f": {list(config.methods)}.",
        "",
    ]
    text = [*header, tables(rows, config), "", *[f"![{n}]({n})" for n in images], ""]
    if config.get("compare_with"):
        earlier = load(config.compare_with)
        for task in dict.fromkeys(r["task"] for r in rows):
            text += [f"## {task}: against the same sweep at a smaller budget (`{config.compare_with}`)", "",
                     *budget_tables(rows, earlier, task)]  # fmt: skip
    path = workdir / "report.md"
    path.write_text("\n".join(text))
    return path


def lr_check_report(workdir: str | pathlib.Path, reference: str = "rss_affine") -> pathlib.Path:
    """``report.md`` of the learning-rate diagnostic: ``workdir/lr<rate>/metrics.jsonl``, one rate per run.

    Per split and count, every method's error at every rate; then each method at two picks of its rate: the one
    with the lowest error at the training conditions (the sweeps' criterion; here on the ``seen`` split of every
    draw, the sweeps used draw 0's validation samples) and the one with the lowest held-out (interpolation) error
    (an oracle), with paired ratios against ``reference`` at the two methods' own picks, Holm-corrected over each
    table.
    """
    workdir = pathlib.Path(workdir)
    runs = {float(d.name[2:]): load(d) for d in workdir.glob("lr*") if (d / "metrics.jsonl").exists()}
    lrs = sorted(runs)
    rec = {(r["method"], r["count"], lr): r for lr in lrs for r in runs[lr]}
    methods = list(dict.fromkeys(r["method"] for lr in lrs for r in runs[lr]))
    counts = sorted({r["count"] for lr in lrs for r in runs[lr]})
    trainable = {r["method"]: r.get("trainable") for lr in lrs for r in runs[lr]}

    def geo(m: str, c: int, lr: float, split: str) -> float:
        return stats.log_interval(np.asarray(rec[(m, c, lr)]["errors"][split], np.float64)).estimate

    out = ["# Learning-rate diagnostic: error at every rate", "",
           f"Rates {lrs}, one run per rate (every draw × seed); geometric mean over draws × seeds [95 % interval "
           "over draws] of the relative MSE.", ""]  # fmt: skip
    if None not in trainable.values():
        out += ["Trainable parameters: " + ", ".join(f"`{m}` {trainable[m]:,}" for m in methods) + ".", ""]
    for split in ("interpolation", "extrapolation"):
        for c in counts:
            out += [
                f"## {split}, K = {c}",
                "",
                "| lr | " + " | ".join(methods) + " |",
                "|---|" + "---:|" * len(methods),
            ]
            for lr in lrs:
                cells = [_geo(rec[(m, c, lr)]["errors"][split]) for m in methods]
                out.append(f"| {lr:g} | " + " | ".join(cells) + " |")
            out.append("")
    picks = {
        "error at the training conditions (the sweeps' criterion)": lambda m, c: min(
            lrs, key=lambda lr: geo(m, c, lr, "seen")
        ),
        "held-out (interpolation) error (an oracle)": lambda m, c: min(
            lrs, key=lambda lr: geo(m, c, lr, "interpolation")
        ),
    }
    for title, pick in picks.items():
        chosen = {(m, c): pick(m, c) for m in methods for c in counts}
        out += [f"## Each method at the rate with the lowest {title}", "",
                "Rates: " + "; ".join(f"K = {c}: " + ", ".join(f"`{m}` {chosen[(m, c)]:g}" for m in methods)
                                      for c in counts) + ".", ""]  # fmt: skip
        others = [m for m in methods if m != reference]
        for split in ("interpolation", "extrapolation"):
            at_pick = {(m, c): rec[(m, c, lr)]["errors"][split] for (m, c), lr in chosen.items()}
            cells = report.holm_ratios([(at_pick[(m, c)], at_pick[(reference, c)]) for m in others for c in counts])
            header = "| method | " + " | ".join(f"K = {c}" for c in counts) + " |"
            out += [f"{split}, paired ratio method / `{reference}`:", "", header, "|---|" + "---:|" * len(counts)]
            for i, m in enumerate(others):
                out.append(f"| {m} | " + " | ".join(cells[i * len(counts) : (i + 1) * len(counts)]) + " |")
            out.append("")
    path = workdir / "report.md"
    path.write_text("\n".join(out))
    return path


def main(argv: list[str]) -> None:
    del argv
    from absl import flags

    config, workdir = _CONFIG.value, flags.FLAGS.workdir
    if flags.FLAGS.lr_report:
        path = lr_check_report(workdir, config.references[0])
    elif flags.FLAGS.render:
        path = write(load(workdir), config, workdir)
    else:
        run(config, workdir)
        path = pathlib.Path(workdir) / "report.md"
    print(f"report: {path}")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", "configs/condition_count_pendulum.py", "A config file.")
    flags.DEFINE_string("workdir", "results/condition_count/pendulum", "Where metrics, report and plots go.")
    flags.DEFINE_bool("render", False, "Re-render report.md and the plots from workdir/metrics.jsonl, no training.")
    flags.DEFINE_bool(
        "lr_report", False, "Write report.md over workdir/lr*/ (the learning-rate diagnostic), no training."
    )
    app.run(main)
