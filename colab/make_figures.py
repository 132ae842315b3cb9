"""Regenerate ``colab/figures/<notebook>-<n>.png``: each notebook's figures, for readers on GitHub.

    make figures        # = python -m colab.make_figures (from the repository root, in the dev venv)

Notebooks are committed with their outputs cleared (small diffs, no stale numbers, tests/test_docs.py checks it),
so GitHub's viewer shows no plots. Each notebook's header embeds these PNGs instead, by their
raw.githubusercontent.com address under the repository of pyproject.toml's ``[project.urls]``: that address works
in GitHub's notebook viewer and in Colab alike, where a path relative to the notebook does not resolve (Colab
opens the notebook alone). This script runs every notebook top to bottom at its full (non-test) settings in a
Jupyter kernel of this interpreter, and writes the image outputs in order.
"""

from __future__ import annotations

import base64
import pathlib
import re
import sys
import tempfile

from tests.test_notebooks import ROOT, execute, images, write_kernelspec

FIGURES = ROOT / "colab" / "figures"


def main() -> int:
    FIGURES.mkdir(exist_ok=True)
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        jupyter_dirs = write_kernelspec(pathlib.Path(tmp) / "jupyter", sys.executable)
        for path in sorted((ROOT / "colab").glob("*.ipynb")):
            workdir = pathlib.Path(tmp) / path.stem
            notebook, _ = execute(
                path.name, jupyter_dirs, workdir, path.parent, {"RSSBL_NOTEBOOK_TINY": "0"}, timeout=1800
            )
            for old in FIGURES.glob(f"{path.stem}-*.png"):
                old.unlink()
            pngs = images(notebook)
            for i, png in enumerate(pngs, start=1):
                (FIGURES / f"{path.stem}-{i}.png").write_bytes(base64.b64decode(png))
            embedded = set(re.findall(rf"colab/figures/({re.escape(path.stem)}-\d+\.png)", path.read_text()))
            written = {f"{path.stem}-{i}.png" for i in range(1, len(pngs) + 1)}
            print(f"{path.name}: wrote {len(pngs)} figures to {FIGURES.relative_to(ROOT)}/", flush=True)
            if embedded != written:
                print(f"  the header embeds {sorted(embedded)}, the notebook drew {sorted(written)}: update it")
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
