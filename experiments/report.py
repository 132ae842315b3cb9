"""The report of ``train_and_evaluate``: Markdown tables (deterministic on CPU: no wall times) and PNG plots.

Errors are relative MSE (method / frozen base on the same rows). Every cell ``m ± h [med]`` is the mean over
data draws of the per-draw mean, the half-width of the 95% t-interval over the draws, and the median over all
draws × seeds. Paired ratios are geometric means of ``baseline / reference`` on the same draws and seeds with a
draw-level 95% interval (:mod:`experiments.stats`); their **>1** / **<1** marks are Holm–Bonferroni-corrected over
each table's family of comparisons (:func:`holm_ratios`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import scipy.stats  # noqa: E402

from experiments import stats  # noqa: E402
from experiments.tasks import BUILT_FOR_RSS  # noqa: E402

SPLITS = ("seen", "interpolation", "extrapolation")


def _cell(errors: Any) -> str:
    errors = np.asarray(errors, np.float64)
    mean, half = stats.draw_interval(errors)
    spread = f" ± {half:.2g}" if half == half else ""
    return f"{mean:.3g}{spread} [{stats.median(errors):.3g}]"


def _ratio(errors: Any, reference: Any, significant: bool | None = None) -> str:
    """``estimate [low, high]`` of the paired ratio, marked **>1** / **<1** when ``significant`` (``None``: when the
    uncorrected 95% interval excludes 1)."""
    r = stats.paired_ratio(np.asarray(errors), np.asarray(reference))
    if r.low != r.low:
        return f"{r.estimate:.3g}"
    if significant is None:
        significant = r.low > 1 or r.high < 1
    mark = (" **>1**" if r.estimate > 1 else " **<1**") if significant else ""
    return f"{r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}]{mark}"


def holm_ratios(pairs: list[tuple[Any, Any]], level: float = 0.05) -> list[str]:
    """Paired-ratio cells for a family of comparisons ``[(errors, reference), ...]``, marks Holm-corrected.

    Each pair's draw-level p-value (:func:`experiments.stats.paired_pvalue`) is adjusted with
    :func:`experiments.stats.holm` over the whole family; a cell is marked when its adjusted p-value is below
    ``level`` (family-wise error rate)."""
    pvalues = [stats.paired_pvalue(np.asarray(e), np.asarray(r)) for e, r in pairs]
    adjusted = stats.holm(pvalues) if pairs else np.zeros(0)
    return [_ratio(e, r, bool(a < level)) for (e, r), a in zip(pairs, adjusted, strict=True)]


def holm_equivalence(pairs: list[tuple[Any, Any]], margin: float = 0.10, level: float = 0.05) -> list[str]:
    """Equivalence cells for a family ``[(errors, reference), ...]``: the 90 % draw-level interval of the paired
    ratio, marked **≈** when the TOST p-value (:func:`experiments.stats.equivalence_pvalue`), Holm-adjusted over
    the family, is below ``level``: the ratio is shown to lie within ``[1/(1+margin), 1+margin]``."""
    pvalues = [stats.equivalence_pvalue(np.asarray(e), np.asarray(r), margin) for e, r in pairs]
    adjusted = stats.holm(pvalues) if pairs else np.zeros(0)
    cells = []
    for (e, r), a in zip(pairs, adjusted, strict=True):
        logs = np.log(np.asarray(e, np.float64) / np.asarray(r, np.float64)).mean(axis=1)
        half = scipy.stats.t.ppf(0.95, logs.shape[0] - 1) * logs.std(ddof=1) / np.sqrt(logs.shape[0])
        low, high = np.exp(logs.mean() - half), np.exp(logs.mean() + half)
        cells.append(f"[{low:.3g}, {high:.3g}]" + (" **≈**" if a < level else ""))
    return cells


def _label(task: str) -> str:
    base = task.split("+")[0]
    return f"{task} ({BUILT_FOR_RSS[base]})" if base in BUILT_FOR_RSS else task


def _spread(values: Any) -> str:
    v = np.asarray(values, np.float64)
    med = np.median(v)
    return f"{med:g} ({v.min():g}–{v.max():g})" if v.min() != v.max() else f"{med:g}"


def method_tables(results: list[dict[str, Any]], references: list[str]) -> list[str]:
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        lines += [
            f"### {_label(task)}",
            "",
            "Relative MSE: mean over draws ± 95% t-interval over draws [median over draws × seeds]. "
            "lr † = chosen at an edge of the grid.",
            "",
            "| method | rank | trainable | lr | seen | interpolation | extrapolation |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lr = f"{r['lr']:g}{' †' if r['lr_edge'] else ''}"
            cells = " | ".join(_cell(r["errors"][s]) for s in SPLITS)
            lines.append(f"| {r['method']} | {r['rank']} | {r['trainable']:,} | {lr} | {cells} |")
        by_name = {r["method"]: r for r in rows}
        for ref in references:
            if ref not in by_name:
                continue
            compared = [r for r in rows if r["method"] not in (ref, "frozen")]
            pairs = [(r["errors"][s], by_name[ref]["errors"][s]) for r in compared for s in SPLITS]
            lines += [
                "",
                f"Paired against `{ref}` on the same draws and seeds: geometric-mean ratio method / `{ref}` "
                "[95% interval over draws]; **>1**: the method is worse than "
                f"`{ref}`, **<1**: better, significant after a Holm–Bonferroni correction over this table's "
                f"{len(pairs)} comparisons (family-wise level 5%; uncorrected, a mark means the interval excludes 1).",
                "",
                "| method | seen | interpolation | extrapolation |",
                "|---|---:|---:|---:|",
            ]
            cells = holm_ratios(pairs)
            for i, r in enumerate(compared):
                lines.append(f"| {r['method']} | " + " | ".join(cells[3 * i : 3 * i + 3]) + " |")
        bins = [tuple(b[:2]) for b in rows[0]["extrapolation_by_distance"]]
        if bins:
            lines += ["", "Extrapolation by sup-distance from the training range (standardised units):", ""]
            lines.append("| method | " + " | ".join(f"({lo:g}, {hi:g}]" for lo, hi in bins) + " |")
            lines.append("|---|" + "---:|" * len(bins))
            for r in rows:
                cells = {tuple(b[:2]): _cell(b[2]) for b in r["extrapolation_by_distance"]}
                lines.append(f"| {r['method']} | " + " | ".join(cells.get(b, "–") for b in bins) + " |")
        lines.append("")
    return lines


def tuning_table(results: list[dict[str, Any]], config: ml_collections.ConfigDict) -> list[str]:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    edges = sum(r["lr_edge"] for r in results)
    lines = [
        "### Tuning",
        "",
        f"Learning-rate grid {list(config.learning_rates)}, chosen on draw 0 with {config.tune_seeds} seeds by "
        f"validation error; {config.steps} steps. Cell: chosen lr († at an edge of the grid) / flatness = "
        "training loss over the last 10% of steps ÷ the 10% window two windows earlier (1.00 = flat). "
        f"{edges} of {len(results)} (task, method) choices sit at an edge.",
        "",
        "| method | " + " | ".join(tasks) + " |",
        "|---|" + "---:|" * len(tasks),
    ]
    for method in dict.fromkeys(r["method"] for r in results):
        if method == "frozen":
            continue
        by = {r["task"]: r for r in results if r["method"] == method}
        cells = [f"{by[t]['lr']:g}{' †' if by[t]['lr_edge'] else ''} / {by[t]['flatness']:.2f}" if t in by else "–"
                 for t in tasks]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def rank_tables(results: list[dict[str, Any]], config: ml_collections.ConfigDict) -> list[str]:
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in results if "ranks" in r):
        rows = [r for r in results if r["task"] == task and "ranks" in r]
        lines += [
            f"### ΔW(p) over a {config.rank_grid}×{config.rank_grid} grid of p: {_label(task)}",
            "",
            "Per adapted layer, over every draw × seed: joint effective rank (max of the input and output spans "
            "of all ΔW(p) stacked) at 90% and 99% energy, the median single-p rank (99%), and the angle: the largest "
            "principal angle (degrees) between ΔW(p)'s own top-k input / output subspace at each corner of the range "
            "(k = min(r, its rank at 99%)) and the layer's joint top-r subspace, mean over the 4 corners "
            "(0: one fixed rank-r subspace for every p). Ranks: median (min–max) over draws × seeds; angles: median.",
            "",
            "| method | layer | joint 90% | joint 99% | single p 99% | angle in | angle out |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            for layer, v in r["ranks"].items():
                ang_in, ang_out = np.median(v["angle_in"]), np.median(v["angle_out"])
                lines.append(
                    f"| {r['method']} | {layer} | {_spread(v['joint90'])} | {_spread(v['joint99'])} | "
                    f"{_spread(v['single99'])} | {ang_in:.1f} | {ang_out:.1f} |"
                )
        lines.append("")
    return lines


def projection_tables(results: list[dict[str, Any]], reference: str) -> list[str]:
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in results if "projected" in r):
        rows = [r for r in results if r["task"] == task and "projected" in r]
        ref = next((r for r in results if r["task"] == task and r["method"] == reference), None)
        lines += [
            f"### Causal projection test: {_label(task)}",
            "",
            "Each model's ΔW(p) at every layer projected onto its own top-r joint subspace (input and output), "
            "biases b(p) kept. 'rebuilt' is the unprojected model rebuilt from W + ΔW(p) (a check: it must equal "
            f"the trained model's error). Ratios paired on draws × seeds; vs `{reference}` = method / `{reference}`; "
            "marks Holm–Bonferroni-corrected over every ratio of this table.",
            "",
            "| method | split | rebuilt | projected | projected / rebuilt | rebuilt vs ref | projected vs ref |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        keys = [(r, s) for r in rows for s in ("interpolation", "extrapolation")]
        pairs = []
        for r, s in keys:
            full, proj = r["rebuilt"][s], r["projected"][s]
            pairs.append((proj, full))
            if ref:
                pairs += [(full, ref["errors"][s]), (proj, ref["errors"][s])]
        marked = iter(holm_ratios(pairs))
        for r, s in keys:
            full, proj = r["rebuilt"][s], r["projected"][s]
            ratios = [next(marked)] + ([next(marked), next(marked)] if ref else ["–", "–"])
            cells = [_cell(full), _cell(proj), *ratios]
            lines.append(f"| {r['method']} | {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def pareto_table(pareto: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for task in dict.fromkeys(r["task"] for r in pareto):
        rows = sorted((r for r in pareto if r["task"] == task), key=lambda r: (r["method"], r["trainable"]))
        lines += [
            f"### Error vs trainable parameters: {_label(task)}",
            "",
            "Geometric mean over draws × seeds [95% interval over draws] of the relative MSE; each point tuned as "
            "above.",
            "",
            "| method | rank | trainable | lr | interpolation | extrapolation |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            cells = []
            for s in ("interpolation", "extrapolation"):
                g = stats.log_interval(np.asarray(r["errors"][s]))
                cells.append(f"{g.estimate:.3g} [{g.low:.3g}, {g.high:.3g}]")
            lr = f"{r['lr']:g}{' †' if r['lr_edge'] else ''}"
            lines.append(f"| {r['method']} | {r['rank']} | {r['trainable']:,} | {lr} | {' | '.join(cells)} |")
        lines.append("")
    return lines


def nuisance_table(nuisance: list[dict[str, Any]]) -> list[str]:
    if not nuisance:
        return []
    dims = sorted({r["nuisance_dims"] for r in nuisance})
    task = nuisance[0]["task"]
    lines = [
        f"### d_p sweep: 2 informative + nuisance dimensions ({task})",
        "",
        "Interpolation error, mean ± 95% t-interval over draws [median]; columns: number of nuisance dims "
        "(d_p = 2 + that).",
        "",
        "| method | " + " | ".join(f"+{d} (d_p={2 + d})" for d in dims) + " |",
        "|---|" + "---:|" * len(dims),
    ]
    for method in dict.fromkeys(r["method"] for r in nuisance):
        by = {r["nuisance_dims"]: r for r in nuisance if r["method"] == method}
        cells = [_cell(by[d]["errors"]["interpolation"]) + (" †" if by[d]["lr_edge"] else "") if d in by else "–"
                 for d in dims]  # fmt: skip
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def tables(summary: dict[str, Any], config: ml_collections.ConfigDict | None = None) -> str:
    """All Markdown tables of a summary."""
    references = list(config.references) if config is not None else ["rss"]
    lines = method_tables(summary["results"], references)
    if summary["results"] and config is not None:
        lines += tuning_table(summary["results"], config)
        lines += rank_tables(summary["results"], config)
    lines += projection_tables(summary["results"], references[0])
    lines += pareto_table(summary.get("pareto", []))
    lines += nuisance_table(summary.get("nuisance", []))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def plot_errors(results: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Interpolation and extrapolation errors per method and task, log scale, geometric mean with draw interval."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    fig, axes = plt.subplots(len(tasks), 1, figsize=(9, 3.2 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        rows = [r for r in results if r["task"] == task and r["method"] != "frozen"]
        for j, (s, color) in enumerate((("interpolation", "C0"), ("extrapolation", "C3"))):
            g = [stats.log_interval(np.asarray(r["errors"][s])) for r in rows]
            xs = np.arange(len(rows)) + (j - 0.5) * 0.3
            low = [max(x.estimate - x.low, 0) for x in g]
            high = [x.high - x.estimate for x in g]
            ax.errorbar(xs, [x.estimate for x in g], yerr=[low, high], fmt="o", color=color, ms=4, capsize=2, label=s)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=60, fontsize=7)
        ax.set(yscale="log", ylabel="relative MSE", title=_label(task))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(results: list[dict[str, Any]], task: str, steps: int, path: pathlib.Path) -> None:
    rows = [r for r in results if r["task"] == task and r["method"] != "frozen"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        xs = (np.arange(len(r["curve"])) + 0.5) * steps / len(r["curve"])
        ax.plot(xs, r["curve"], label=r["method"], lw=2.0 if r["method"].startswith("rss") else 1.0)
    ax.set(
        yscale="log", xlabel="step", ylabel="training MSE (mean over draws × seeds)", title=f"{task}: learning curves"
    )
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pareto(pareto: list[dict[str, Any]], path: pathlib.Path) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in pareto))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = [r for r in pareto if r["task"] == task]
        for i, family in enumerate(dict.fromkeys(r["method"] for r in rows)):
            pts = sorted((r["trainable"], stats.log_interval(np.asarray(r["errors"]["interpolation"])))
                         for r in rows if r["method"] == family)  # fmt: skip
            xs = [p[0] for p in pts]
            ys = [p[1].estimate for p in pts]
            yerr = [[max(p[1].estimate - p[1].low, 0) for p in pts], [p[1].high - p[1].estimate for p in pts]]
            ax.errorbar(xs, ys, yerr=yerr, marker="os^vD<>p*h"[i % 10], label=family, capsize=2, lw=1)
        ax.set(xscale="log", yscale="log", xlabel="trainable parameters", ylabel="relative MSE (interpolation)",
               title=_label(task))  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_summary(workdir: str | pathlib.Path) -> dict[str, Any]:
    """The summary of a finished run, read back from its ``metrics.jsonl`` (to re-render without retraining)."""
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {
        "results": [r for r in rows if r["kind"] == "method"],
        "pareto": [r for r in rows if r["kind"] == "pareto"],
        "nuisance": [r for r in rows if r["kind"] == "nuisance"],
        "seconds": float("nan"),
    }


def write(summary: dict[str, Any], config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """Write ``report.md`` and the plots into ``workdir``; returns the report's path."""
    workdir = pathlib.Path(workdir)
    images = []
    if summary["results"]:
        plot_errors(summary["results"], workdir / "errors.png")
        images.append("errors.png")
        curve_task = config.curve_task if config.curve_task in config.tasks else config.tasks[0]
        plot_curves(summary["results"], curve_task, config.steps, workdir / "learning_curves.png")
        images.append("learning_curves.png")
    if summary.get("pareto"):
        plot_pareto(summary["pareto"], workdir / "pareto.png")
        images.append("pareto.png")
    text = [
        "# Experiment report",
        "",
        f"Tasks {list(config.tasks)}; {config.num_draws} data draws × {config.num_seeds} seeds per method at the "
        f"learning rate chosen from {list(config.learning_rates)} ({config.tune_seeds} seeds on draw 0); "
        f"{config.steps} Adam steps, batch {config.batch_size}; rank {config.rank}, lora_alpha {config.lora_alpha}.",
        "",
        tables(summary, config),
        *[f"![{name}]({name})" for name in images],
        "",
    ]
    path = workdir / "report.md"
    path.write_text("\n".join(text))
    return path


# ------------------------------------------------------------------------------------------------ absolute errors


def base_mse(config: ml_collections.ConfigDict, task: str) -> dict[str, np.ndarray]:
    """The frozen base's absolute MSE ``{split: [draws]}`` on the draws ``train_and_evaluate`` builds for ``task``.

    The draws are rebuilt from the config's seed (the same keys, so the same bases, conditions and inputs), nothing
    is trained: a committed report's relative errors times these are its absolute errors."""
    import jax

    from experiments import tasks as tasks_lib
    from experiments import train as train_lib

    key = jax.random.fold_in(jax.random.key(config.seed), train_lib.zlib_hash(task))
    stacked = tasks_lib.make_draws(task, config, key)
    fn = jax.vmap(
        lambda b, sp: {s: train_lib._base_rows(stacked.widths, b, v, stacked.activation).mean() for s, v in sp.items()}
    )
    return {s: np.asarray(v, np.float64) for s, v in fn(stacked.base_params, stacked.splits).items()}


def absolute_tables(summary: dict[str, Any], config: ml_collections.ConfigDict) -> str:
    """Markdown: per task, the frozen base's absolute MSE per split and every method's absolute MSE (geometric mean
    over draws × seeds [95% interval over draws]) = its relative errors × the base's MSE of the same draw."""
    lines = ["# Absolute errors", "",
             "Absolute MSE (the task's output units squared) = relative MSE × the frozen base's MSE on the same draw "
             "and split; the base's MSE comes from the draws rebuilt from the config (`experiments.report.base_mse`). "
             "Geometric mean over draws × seeds [95% interval over draws].", ""]  # fmt: skip
    for task in dict.fromkeys(r["task"] for r in summary["results"]):
        base = base_mse(config, task)
        lines += [f"## {_label(task)}", "", "| method | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
        cells = [f"{base[s].mean():.4g} (per draw " + ", ".join(f"{v:.3g}" for v in base[s]) + ")" for s in SPLITS]
        lines.append("| frozen base (mean over draws) | " + " | ".join(cells) + " |")
        for r in summary["results"]:
            if r["task"] != task or r["method"] == "frozen":
                continue
            out = []
            for s in SPLITS:
                g = stats.log_interval(np.asarray(r["errors"][s], np.float64) * base[s][:, None])
                out.append(f"{g.estimate:.3g} [{g.low:.3g}, {g.high:.3g}]")
            lines.append(f"| {r['method']} | " + " | ".join(out) + " |")
        lines.append("")
    return "\n".join(lines)


def write_absolute(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> pathlib.Path:
    """``workdir/absolute.md`` from the run's ``metrics.jsonl`` and its config (no training)::

    python -c "from configs import default; from experiments import report; \\
        report.write_absolute('results/default', default.get_config())"
    """
    path = pathlib.Path(workdir) / "absolute.md"
    path.write_text(absolute_tables(load_summary(workdir), config))
    return path
