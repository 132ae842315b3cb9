"""How the headline ratios move under a protocol change that should not matter: two reports side by side.

    python -m experiments.robustness results/default/report.md results/robustness_gelu/report.md \
        --task pendulum_corner --labels tanh,gelu > results/robustness_gelu/comparison.md

Reads the paired-ratio tables (``Paired against `ref` ...``) of one task from two reports of
:func:`experiments.report.write` and prints, per reference and split, each method's ratio in both, with its marks
(Holm-corrected in each report), and whether the two agree on the side of 1 and on significance.
"""

from __future__ import annotations

import argparse
import re

SPLITS = ("seen", "interpolation", "extrapolation")


def ratio_tables(text: str, task: str) -> dict[str, dict[str, dict[str, str]]]:
    """``{reference: {method: {split: cell}}}`` of the task's paired-ratio tables in a report."""
    section = text.split(f"### {task}", 1)[1].split("\n### ", 1)[0]
    out: dict[str, dict[str, dict[str, str]]] = {}
    for block in section.split("Paired against `")[1:]:
        reference = block.split("`", 1)[0]
        rows = [line for line in block.split("\n\n", 2)[1].splitlines() if line.startswith("| ")][1:]
        out[reference] = {}
        for line in rows:
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[reference][cells[0]] = dict(zip(SPLITS, cells[1:], strict=True))
    return out


def _side(cell: str) -> tuple[str, bool]:
    """(">1" or "<1" by the estimate, significant after Holm) of a ratio cell."""
    estimate = float(re.match(r"[\d.e+-]+", cell).group(0))
    return (">1" if estimate > 1 else "<1"), "**" in cell


def compare(a: str, b: str, task: str, labels: tuple[str, str]) -> str:
    """A markdown table of every ratio of ``task`` in reports ``a`` and ``b``."""
    ta, tb = ratio_tables(a, task), ratio_tables(b, task)
    legend = "Same side: both estimates on the same side of 1; same mark: significant after Holm in both or neither."
    lines = [f"# {task}: paired ratios, {labels[0]} against {labels[1]}", "", legend, ""]
    agree = total = 0
    for reference in ta:
        for split in ("interpolation", "extrapolation"):
            head = f"| method | {labels[0]} | {labels[1]} | same side | same mark |"
            lines += [f"## method / `{reference}`, {split}", "", head, "|---|---|---|---|---|"]
            for method, cells in ta[reference].items():
                if method not in tb.get(reference, {}):
                    continue
                x, y = cells[split], tb[reference][method][split]
                (sa, ma), (sb, mb) = _side(x), _side(y)
                total += 1
                agree += sa == sb and ma == mb
                side, mark = "yes" if sa == sb else "no", "yes" if ma == mb else "no"
                lines.append(f"| {method} | {x} | {y} | {side} | {mark} |")
            lines.append("")
    lines.insert(4, f"{agree} of {total} ratios agree on both the side of 1 and the mark.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--task", default="pendulum_corner")
    parser.add_argument("--labels", default="a,b")
    args = parser.parse_args(argv)
    with open(args.a) as fa, open(args.b) as fb:
        print(compare(fa.read(), fb.read(), args.task, tuple(args.labels.split(",", 1))))


if __name__ == "__main__":
    main()
