"""The README runs and quotes only what the committed reports hold.

Its one Python example runs as written; the examples moved to docs/ are executed by tests/test_docs.py. Every
interval the README quotes (``1.22 [0.87, 1.72]``) and every error it quotes beside a report is copied verbatim from
a committed report under results/.
"""

import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
REPORTS = {path.relative_to(ROOT).as_posix(): path.read_text() for path in sorted(ROOT.glob("results/**/report.md"))}


def test_readme_has_one_example():
    assert len(BLOCKS) == 1, "the README keeps one example; move others to docs/ (tests/test_docs.py runs them)"
    assert "RSSBilinearLoRADense" in BLOCKS[0] and "freeze_base" in BLOCKS[0] and "merge" in BLOCKS[0]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), namespace)
    # What the example claims, against an independent float64 reference.
    start, params, merged = namespace["variables"]["params"], namespace["params"], namespace["merged"]
    assert all(np.array_equal(params[k], start[k]) for k in ("kernel", "bias")), "the base changed"
    assert any(not np.array_equal(params[k], start[k]) for k in params if k.startswith("lora_")), "nothing trained"
    x, p = (np.asarray(namespace[k], np.float64) for k in ("x", "p"))
    cfg = namespace["layer"].adapter_config
    f64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = x @ f64["lora_a"]  # [batch, tokens, r]
    gate = (p @ f64["lora_c"])[:, None, :]  # the linear gate C p, one condition per example
    shift = (p @ f64["lora_s"])[:, None, :]
    want = x @ f64["kernel"] + f64["bias"] + cfg.scale * ((h * gate + shift) @ f64["lora_b"])
    got = namespace["layer"].apply({"params": params}, namespace["x"], namespace["p"])
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4, atol=1e-4)
    at_p0 = x[0] @ np.asarray(merged["kernel"], np.float64) + np.asarray(merged["bias"], np.float64)
    np.testing.assert_allclose(at_p0, want[0], rtol=1e-4, atol=1e-4)  # the merged Dense at p0 = p[0]


def test_readme_states_the_test_command_ci_runs_first():
    ci = (ROOT / ".ci" / "run").read_text()
    steps = re.findall(r"^(?:step )?(make [\w-]+)\s*$", ci, re.M)
    assert steps[0] == "make test", steps
    assert {"make lint", "make test-slow", "make test-floor", "make docs"} <= set(steps), steps
    assert "```bash\nmake test\n```" in README


def quoted_intervals() -> list[str]:
    """Every ``ratio [low, high]`` the README quotes."""
    return re.findall(r"\d[\d.e+]* \[[\d.e+]+, [\d.e+]+\]", README)


def test_readme_quotes_results():
    assert len(quoted_intervals()) >= 5 and "results/" in README


@pytest.mark.parametrize("quoted", quoted_intervals())
def test_quoted_interval_is_in_a_committed_report(quoted):
    holders = [name for name, text in REPORTS.items() if quoted in text]
    assert holders, f"README.md quotes {quoted!r}, which no committed report under results/ contains"
    named = [name for name in holders if name in README]
    assert named, f"README.md quotes {quoted!r} from {holders} but names none of them"
    # A significance mark in the README is the report's own (Holm-corrected), and an unmarked quote is unmarked there.
    mark = re.search(re.escape(quoted) + r"\s*(\*\*[<>]1\*\*)?", README).group(1)
    marked = [name for name in named if f"{quoted} **" in REPORTS[name]]
    assert bool(mark) == bool(marked), f"README.md marks {quoted!r} as {mark!r}; marked in the reports: {marked}"
