"""The side-by-side comparison of two reports' paired ratios (experiments.robustness)."""

from experiments import robustness


def _report(cells):
    rows = "\n".join(f"| {m} | {a} | {b} | {c} |" for m, (a, b, c) in cells.items())
    return (
        "# Experiment report\n\n### pendulum_corner\n\ntext\n\n"
        "Paired against `rss` on the same draws and seeds: ratios.\n\n"
        "| method | seen | interpolation | extrapolation |\n|---|---:|---:|---:|\n" + rows + "\n\nmore\n\n### Tuning\n"
    )


def test_compare_pairs_methods_and_counts_agreement():
    a = _report({"lora": ("2 [1, 3]", "1.2 [0.9, 1.6]", "1.5 [1.1, 2] **>1**"),
                 "rss_affine": ("0.1 [0.05, 0.2]", "0.02 [0.01, 0.04] **<1**", "0.3 [0.1, 0.9]")})  # fmt: skip
    b = _report({"lora": ("2 [1, 3]", "0.9 [0.5, 1.6]", "1.4 [1.1, 2] **>1**"),
                 "rss_affine": ("0.1 [0.05, 0.2]", "0.03 [0.01, 0.06] **<1**", "0.4 [0.1, 1.2]")})  # fmt: skip
    tables = robustness.ratio_tables(a, "pendulum_corner")
    assert tables["rss"]["lora"]["extrapolation"] == "1.5 [1.1, 2] **>1**"
    text = robustness.compare(a, b, "pendulum_corner", ("tanh", "gelu"))
    assert "| lora | 1.2 [0.9, 1.6] | 0.9 [0.5, 1.6] | no | yes |" in text
    assert "| rss_affine | 0.02 [0.01, 0.04] **<1** | 0.03 [0.01, 0.06] **<1** | yes | yes |" in text
    assert "3 of 4 ratios agree" in text
