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


def quoted() -> list[str]:
    return list(dict.fromkeys(re.findall(INTERVAL, RESULTS)))


def test_results_quote_intervals():
    assert len(quoted()) >= 100


@pytest.mark.parametrize("interval", quoted())
def test_quoted_interval_is_in_a_committed_report(interval):
    holders = [name for name, text in REPORTS.items() if interval in text]
    assert holders, f"RESULTS.md quotes {interval!r}, which no committed report under results/ contains"
    # a Holm mark printed beside the quote must be a mark some report prints beside the same interval
    marks = set(re.findall(re.escape(interval) + r" (\*\*[<>]1\*\*)", RESULTS))
    reported = {m for text in REPORTS.values() for m in re.findall(re.escape(interval) + r" (\*\*[<>]1\*\*)", text)}
    assert marks <= reported, f"RESULTS.md marks {interval!r} {marks}; the reports mark it {reported or 'nowhere'}"


def test_the_check_catches_a_changed_digit():
    changed = "53.8 [30, 96.7]"  # the decision table's 53.8 [30, 96.6] with one digit moved
    assert not any(changed in text for text in REPORTS.values())
