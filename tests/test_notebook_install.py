"""Every notebook installs itself: executed through its own install cell in a fresh virtual environment.

What a user on a fresh runtime gets, and what CI (a clean clone) sees: a new venv with only a Jupyter kernel in it
(no rssbl_jax, no jax), a working directory outside the repository that holds a clone in a folder named
``rssbl_jax`` (an empty namespace package to ``find_spec``), and ``RSSBL_JAX_SOURCE``
pointed at a local git URL (``git+file://``) of a repository holding exactly this working tree, committed or not.
The notebook's first code cell must ``%pip install`` the package with its extras from there; then the same
checks as tests/test_notebooks.py apply. pip's cache (``~/.cache/pip``) makes reruns cheaper; the first run
downloads jax and the rest. Slow (minutes per notebook): ``make test-slow``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from tests.test_notebooks import CHECKS, NOTEBOOKS, ROOT, execute, write_kernelspec

pytestmark = pytest.mark.slow

# Notebooks whose install cell upgrades pip before installing from a git URL (tests/test_packaging.py checks it).
UPGRADES_PIP = {"adapt_a_model.ipynb", "quickstart.ipynb", "reproduce_results.ipynb"}


def git(*args: str, cwd: pathlib.Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def source_url(tmp_path_factory) -> str:
    """``git+file://`` URL of a repository whose one commit is this working tree (tracked and untracked files)."""
    # a clean clone (CI, a developer) has both; anything else is a broken setup, not a reason to pass quietly
    assert shutil.which("git") is not None and (ROOT / ".git").exists(), "this test needs git and a git checkout"
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    repo = tmp_path_factory.mktemp("source") / "repo"
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git("init", "-q", "-b", "main", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "snapshot of the working tree", cwd=repo)
    return f"git+{repo.as_uri()}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_installs_itself(name, source_url, tmp_path):
    start = time.perf_counter()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # The runtime: a Jupyter kernel, nothing else, and the pip that `venv` bundles (Python 3.11's 23.2 rejects
    # `name @ git+file:///...` requirements): the notebook's install cell upgrades pip itself. A notebook whose cell
    # does not yet do that gets a current pip here.
    subprocess.run([python, "-m", "pip", "install", "--quiet", "ipykernel"], check=True)
    if name not in UPGRADES_PIP:
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('jax'))"], text=True,
                           capture_output=True, check=True)  # fmt: skip
    assert probe.stdout.strip() == "None"
    jupyter_dirs = write_kernelspec(tmp_path / "jupyter", python)

    cwd = tmp_path / "work"  # outside the repository, with a clone named rssbl_jax in it
    cwd.mkdir()
    git("clone", "-q", source_url.removeprefix("git+"), "rssbl_jax", cwd=cwd)
    workdir = tmp_path / "outputs"
    env = {"RSSBL_JAX_SOURCE": source_url, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    saved = {key: os.environ.pop(key) for key in ("PYTHONPATH", "VIRTUAL_ENV") if key in os.environ}
    try:
        notebook, summary = execute(name, jupyter_dirs, workdir, cwd, env, timeout=900)
    finally:
        os.environ.update(saved)
    # pip installed it into the fresh venv, from the source (reproduce_results: from its clone of the source).
    probe = "import importlib.metadata as m; print(m.distribution('rssbl_jax').read_text('direct_url.json'))"
    run = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    direct_url = json.loads(run.stdout)
    expected = (cwd / "rssbl_jax-src").as_uri() if name == "reproduce_results.ipynb" else source_url[4:]
    assert direct_url["url"] == expected, direct_url
    install_output = "".join(out.get("text", "") for out in notebook.cells[2].outputs)  # the first code cell
    assert "is installed at" not in install_output, install_output
    CHECKS[name](notebook, summary, workdir)
    print(f"{name}: fresh venv + install + run in {time.perf_counter() - start:.0f} s")
