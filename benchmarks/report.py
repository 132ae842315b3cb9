"""Write one named section of BENCHMARKS.md, replacing its previous version and leaving everything else as it is."""

from __future__ import annotations

import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_section(name: str, text: str, path: pathlib.Path | None = None) -> None:
    """Put ``text`` between ``<!-- section: name -->`` markers at the end of BENCHMARKS.md (or where they already are).

    The markers sit after ``benchmarks.run``'s analysis marker, so ``python -m benchmarks.run`` keeps the section when
    it regenerates its own tables.
    """
    path = path or ROOT / "BENCHMARKS.md"
    begin, end = f"<!-- section: {name} -->", f"<!-- /section: {name} -->"
    old = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


class Lines:
    """The lines of a report, printed as they are added (progress on long runs); ``text`` joins them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def load_average() -> str:
    """``"<1-min load average> on <n> cores"``, measured now: how much else shared the cores during a timing."""
    return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
