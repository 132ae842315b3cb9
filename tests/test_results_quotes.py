"""RESULTS.md quotes only what the committed reports hold: every ``ratio [low, high]`` it prints (line breaks
included) is copied verbatim from a report under results/, and a significance mark beside it is the report's own."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = re.sub(r"\s+", " ", (ROOT / "RESULTS.md").read_text())
REPORTS = {
    path.relative_to(ROOT).as_posix(): re.sub(r"\s+", " ", path.read_text())
    for path in sorted(ROOT.glob("results/**/*.md"))
}
INTERVAL = r"\d[\d.e+-]* \[[\d.e+-]+, [\d.e+-]+\]"


def quoted(text: str = RESULTS) -> list[str]:
    return list(dict.fromkeys(re.findall(INTERVAL, text)))


def problems(interval: str, text: str = RESULTS) -> list[str]:
    """What is wrong with one quoted interval: absent from every report, or marked where no report marks it."""
    holders = [name for name, report in REPORTS.items() if interval in report]
    if not holders:
        return [f"{interval!r} is in no committed report under results/"]
    marks = set(re.findall(re.escape(interval) + r" (\*\*[<>]1\*\*)", text))
    reported = {m for report in REPORTS.values() for m in re.findall(re.escape(interval) + r" (\*\*[<>]1\*\*)", report)}
    return [f"{interval!r} marked {sorted(marks - reported)}; the reports do not"] if marks - reported else []


def test_results_quote_intervals():
    assert len(quoted()) >= 100


@pytest.mark.parametrize("interval", quoted())
def test_quoted_interval_is_in_a_committed_report(interval):
    assert not problems(interval)


def test_the_check_catches_a_changed_digit_and_an_invented_mark():
    changed = RESULTS.replace("53.8 [30, 96.6]", "53.8 [30, 96.7]")
    assert any(problems(q, changed) for q in quoted(changed))
    marked = RESULTS.replace("1.65 [0.32, 8.54]", "1.65 [0.32, 8.54] **>1**", 1)  # unmarked in every report
    assert problems("1.65 [0.32, 8.54]", marked)
