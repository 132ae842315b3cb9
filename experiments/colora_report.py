"""The report of :mod:`experiments.colora`: ``report.md`` (tables) and ``curve.png`` (learning curves)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from experiments import stats


def _interval(errors: list[float]) -> stats.Interval:
    return stats.log_interval(np.asarray(errors, np.float64)[:, None])


def _fmt(i: stats.Interval) -> str:
    return f"{i.estimate:.3e} [{i.low:.2e}, {i.high:.2e}]"


def tables(summary: dict[str, Any]) -> str:
    """Markdown tables: error per method with its interval over seeds, paired ratio to CoLoRA, per-μ errors, cost."""
    config, data, methods = summary["config"], summary["data"], summary["methods"]
    ref = next((m for m in methods if m["method"] == "colora"), None)
    published = config["published_parameters"]
    stride = config.get("points_stride", 0)
    points = f"the stride-{stride} sub-grid (random offset)" if stride else (config["points_per_step"] or "all")
    lines = [
        f"# CoLoRA on {config['dataset']} ({config['split']} split)",
        "",
        f"Train μ {data['train_mus']}, test μ {data['test_mus']}; data {data['shape']} (μ, q, t, space). "
        f"{config['num_seeds']} seeds (initialisation and batches; the data and split are fixed, so intervals "
        f"run over seeds). {config['steps']} Adam steps at {config['learning_rate']} with cosine decay, "
        f"{config['snapshots_per_step']} snapshots × {points} points per step. "
        f"Published (CoLoRA's README; its notebooks: 100,000 steps, 15 batches of 27-30 snapshots × every point): "
        f"{config['published_error']:.2e} "
        f"at {published:,} parameters. Device: {summary['device']}; total {summary['seconds']:.0f} s.",
        "",
        "Test mean relative L2 error: geometric mean over seeds [95% interval]; ratio to CoLoRA's conditioning "
        "paired by seed (geometric mean [95% interval]); ratio to the published error. s/step: wall time per step "
        "(3 seeds at once) after the first, compiling, chunk; on a shared machine it moves with the load.",
        "",
        "| method | parameters | vs 5,451 | test error | ratio to colora | ratio to published | s/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        err = _interval(m["errors"])
        ratio = "—"
        if ref is not None and m is not ref:
            r = stats.paired_ratio(np.asarray(m["errors"])[:, None], np.asarray(ref["errors"])[:, None])
            ratio = f"{r.estimate:.3f} [{r.low:.3f}, {r.high:.3f}]"
        lines.append(
            f"| {m['method']} | {m['parameters']:,} | {m['parameters'] / published - 1:+.1%} | {_fmt(err)} | "
            f"{ratio} | {err.estimate / config['published_error']:.1f}× | {m['seconds_per_step']:.4f} |"
        )
    lines += ["", "Test relative L2 error per held-out μ (geometric mean over seeds):", ""]
    lines.append("| method | " + " | ".join(f"μ = {mu:g}" for mu in data["test_mus"]) + " | seeds (mean over μ) |")
    lines.append("|---|" + "---|" * len(data["test_mus"]) + "---|")
    for m in methods:
        per_mu = np.asarray(m["per_mu"])
        cells = [f"{np.exp(np.log(per_mu[:, j]).mean()):.3e}" for j in range(per_mu.shape[1])]
        seeds = ", ".join(f"{e:.2e}" for e in m["errors"])
        lines.append(f"| {m['method']} | " + " | ".join(cells) + f" | {seeds} |")
    lines += ["", "Data files (SHA-256):", ""]
    lines += [f"- `{name}` {digest}" for name, digest in sorted(data["sha256"].items())]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: pathlib.Path) -> None:
    """Learning curves: test error on a fixed subsample of grid points (mean over seeds) and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in summary["methods"]:
        steps = [c["step"] for c in m["curve"]]
        axes[0].plot(steps, [np.mean(c["test_error_subsample"]) for c in m["curve"]], label=m["method"])
        axes[1].plot(steps, [np.mean(c["train_loss"]) for c in m["curve"]], label=m["method"])
    published = summary["config"]["published_error"]
    axes[0].axhline(published, color="k", ls="--", lw=1, label=f"published {published:.2e} (100k steps)")
    axes[0].set_title("test mean relative L2 (subsampled points)")
    axes[1].set_title("training loss (relative L2, batch)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"CoLoRA {summary['config']['dataset']} ({summary['config']['split']} split)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(summary: dict[str, Any], workdir: pathlib.Path) -> None:
    """``report.md`` and ``curve.png`` in ``workdir``."""
    (workdir / "report.md").write_text(tables(summary))
    plot(summary, workdir / "curve.png")
