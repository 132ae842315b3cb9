"""The report of ``train_and_evaluate``: a Markdown file of tables and PNG plots."""

from __future__ import annotations

import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402


def _cell(value: tuple[float, float]) -> str:
    mean, half = value
    return f"{mean:.3g} ± {half:.2g}" if half == half else f"{mean:.3g}"


def tables(summary: dict[str, Any]) -> str:
    """Markdown tables: errors per task and method, extrapolation by distance, conditions count."""
    lines: list[str] = []
    results = summary["results"]
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        lines += [
            f"### {task}",
            "",
            "Relative MSE (method / frozen base on the same rows; mean ± 95% CI over seeds). "
            "Ranks: effective rank (99% energy) of the first layer's ΔW(p): median single p; all p stacked "
            "(input span / output span).",
            "",
            "| method | trainable | lr | seen | interpolation | extrapolation | ms/step/run | rank ΔW(p) "
            "| stacked in/out |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['method']} | {r['trainable']:,} | {r['lr']:g} | {_cell(r['seen'])} | "
                f"{_cell(r['interpolation'])} | {_cell(r['extrapolation'])} | {r['train_ms_per_step']:.3f} | "
                f"{r['rank_single']:g} | {r['rank_stacked_in']}/{r['rank_stacked_out']} |"
            )
        bins = [tuple(b[:2]) for b in rows[0]["extrapolation_by_distance"]]
        if bins:
            lines += ["", "Extrapolation by sup-distance from the training range (standardised units):", ""]
            lines.append("| method | " + " | ".join(f"({lo:g}, {hi:g}]" for lo, hi in bins) + " |")
            lines.append("|---|" + "---:|" * len(bins))
            for r in rows:
                cells = {tuple(b[:2]): _cell((b[2], b[3])) for b in r["extrapolation_by_distance"]}
                lines.append(f"| {r['method']} | " + " | ".join(cells.get(b, "–") for b in bins) + " |")
        lines.append("")
    if summary["conditions"]:
        cond = summary["conditions"]
        counts = sorted({c["conditions"] for c in cond})
        lines += [
            f"### Held-out (interpolation) error vs number of training conditions ({cond[0]['task']})",
            "",
            "| method | " + " | ".join(str(c) for c in counts) + " |",
            "|---|" + "---:|" * len(counts),
        ]
        for method in dict.fromkeys(c["method"] for c in cond):
            by = {c["conditions"]: _cell(c["interpolation"]) for c in cond if c["method"] == method}
            lines.append(f"| {method} | " + " | ".join(by.get(c, "–") for c in counts) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_error_vs_p(summary: dict[str, Any], task: str, path: pathlib.Path) -> None:
    rows = [r for r in summary["results"] if r["task"] == task]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rows[0]["sweep_p"], rows[0]["sweep_base"], "k--", label="frozen base")
    for r in rows:
        if r["method"] != "frozen":
            ax.plot(r["sweep_p"], r["sweep_error"], label=r["method"], lw=2.5 if r["method"] == "rss" else 1.0)
    inside = [p for p, ok in zip(rows[0]["sweep_p"], rows[0]["sweep_in_range"], strict=True) if ok]
    ax.axvspan(min(inside), max(inside), color="0.92", zorder=-1, label="training range")
    name = rows[0].get("sweep_name", "first operating parameter")
    ax.set(yscale="log", xlabel=f"{name} (other parameters nominal)", ylabel="MSE", title=f"{task}: error vs p")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_conditions(summary: dict[str, Any], path: pathlib.Path) -> None:
    cond = summary["conditions"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in dict.fromkeys(c["method"] for c in cond):
        pts = sorted((c["conditions"], *c["interpolation"]) for c in cond if c["method"] == method)
        xs, ys, hs = zip(*pts, strict=True)
        ax.errorbar(xs, ys, yerr=[h if h == h else 0 for h in hs], label=method, marker="o", capsize=3)
    ax.set(xscale="log", yscale="log", xlabel="training conditions", ylabel="relative MSE (held-out p)")
    ax.set_title(f"{cond[0]['task']}: error vs number of conditions", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranks(summary: dict[str, Any], path: pathlib.Path) -> None:
    results = summary["results"]
    tasks = list(dict.fromkeys(r["task"] for r in results))
    cols = min(3, len(tasks))
    rows_n = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.8 * rows_n), squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks, strict=False):
        rows = [r for r in results if r["task"] == task and r["method"] != "frozen"]
        names = [r["method"] for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["rank_single"] for r in rows], 0.4, label="single p (median)")
        ax.bar([x + 0.2 for x in xs], [max(r["rank_stacked_in"], r["rank_stacked_out"]) for r in rows], 0.4,
               label="stacked over p")  # fmt: skip
        ax.set_xticks(list(xs), names, rotation=70, fontsize=7)
        ax.set(title=task, ylabel="effective rank of ΔW(p) (99% energy)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_summary(workdir: str | pathlib.Path) -> dict[str, Any]:
    """The summary of a finished run, read back from its ``metrics.jsonl`` (to re-render without retraining)."""
    import json

    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {
        "results": [r for r in rows if r["kind"] == "method"],
        "conditions": [r for r in rows if r["kind"] == "conditions"],
        "seconds": float("nan"),
    }


def write(summary: dict[str, Any], config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """Write ``report.md`` and the plots into ``workdir``; returns the report's path."""
    workdir = pathlib.Path(workdir)
    images = []
    for task in dict.fromkeys(r["task"] for r in summary["results"]):
        name = f"error_vs_p_{task}.png"
        plot_error_vs_p(summary, task, workdir / name)
        images.append(name)
    plot_ranks(summary, workdir / "effective_rank.png")
    images.append("effective_rank.png")
    if summary["conditions"]:
        plot_conditions(summary, workdir / "error_vs_conditions.png")
        images.append("error_vs_conditions.png")
    text = [
        "# Experiment report",
        "",
        f"{len(config.tasks)} tasks × {len(config.methods)} methods × {config.num_seeds} seeds × "
        f"{len(config.learning_rates)} learning rates, {config.steps} steps each; {summary['seconds']:.0f} s.",
        "",
        tables(summary),
        *[f"![{name}]({name})" for name in images],
        "",
    ]
    path = workdir / "report.md"
    path.write_text("\n".join(text))
    return path
