"""The README runs and quotes only what the committed reports hold.

Its one Python example runs as written; the examples moved to docs/ are executed by tests/test_docs.py. Every
interval the README quotes (``1.22 [0.87, 1.72]``) and every error it quotes beside a report is copied verbatim from
a committed report under results/.
"""

import pathlib
import re

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
