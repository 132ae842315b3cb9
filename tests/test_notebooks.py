"""The Colab notebooks run top to bottom in a real Jupyter kernel (nbclient), on tiny settings, and compute what
they claim.

Each notebook runs with ``RSSBL_NOTEBOOK_TINY=1`` in a kernel launched from this interpreter (a kernelspec made
in a temporary directory whose ``argv`` is ``sys.executable``, so the venv's packages are the ones used, on a
fresh clone too): the install cell finds ``rssbl_jax`` installed and installs nothing. The test appends one cell
that prints the notebook's ``summary`` dict as JSON, and checks those values. tests/test_notebook_install.py runs
the same notebooks and checks through their own install cell, in a fresh virtual environment.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = "rssbl-jax-test"
MARKER = "RSSBL_SUMMARY "
NOTEBOOKS = ("quickstart.ipynb", "adapt_a_model.ipynb", "reproduce_results.ipynb")


def write_kernelspec(root: pathlib.Path, python: str, name: str = KERNEL) -> pathlib.Path:
    """A kernelspec running ``python -m ipykernel_launcher`` under ``root/share/jupyter/kernels/name``."""
    folder = root / "share" / "jupyter" / "kernels" / name
    folder.mkdir(parents=True, exist_ok=True)
    argv = [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (folder / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": name, "language": "python"}))
    return root


@pytest.fixture(scope="module")
def jupyter_dirs(tmp_path_factory):
    """A kernelspec running ``sys.executable -m ipykernel_launcher``, and private Jupyter/IPython directories."""
    return write_kernelspec(tmp_path_factory.mktemp("jupyter"), sys.executable)


def execute(
    name: str, jupyter_dirs: pathlib.Path, workdir: pathlib.Path, cwd: pathlib.Path, env: dict, timeout: int = 240
):
    """Execute ``colab/<name>`` in a fresh kernel started in ``cwd``; return the notebook and its ``summary``.

    ``env`` is added to this process's environment for the kernel (nbclient starts the kernel with it).
    """
    saved = dict(os.environ)
    os.environ.update({
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_PATH": str(jupyter_dirs / "share" / "jupyter"),
        "JUPYTER_RUNTIME_DIR": str(jupyter_dirs / "runtime"),
        "IPYTHONDIR": str(jupyter_dirs / "ipython"),
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "RSSBL_NOTEBOOK_TINY": "1",
        "RSSBL_WORKDIR": str(workdir),
        **env,
    })  # fmt: skip
    os.environ.pop("XLA_FLAGS", None)  # the kernel sees one CPU device, as a user does
    try:
        notebook = nbformat.read(ROOT / "colab" / name, as_version=4)
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
        notebook.cells.append(nbformat.v4.new_code_cell(f"import json; print({MARKER!r} + json.dumps(summary))"))
        client = nbclient.NotebookClient(
            notebook, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}
        )
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    text = "".join(out.get("text", "") for out in notebook.cells[-1].outputs if out.output_type == "stream")
    summary = json.loads(text.split(MARKER, 1)[1])
    return notebook, summary


def images(notebook) -> list[bytes]:
    """The PNG outputs of the executed notebook, in order (base64, as nbformat stores them)."""
    return [
        out["data"]["image/png"]
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]


def stream_text(notebook) -> str:
    return "".join(out.get("text", "") for cell in notebook.cells for out in cell.get("outputs", []))


def check_quickstart(notebook, summary, workdir):
    del workdir
    assert summary["final_loss"] < 1e-2 * summary["first_loss"], summary
    # The learned gate is linear in p and the adapted output tracks the target, extrapolation included.
    assert summary["sweep_max_error"] < 0.1, summary
    assert summary["merge_max_diff"] < 1e-5, summary
    assert summary["base_unchanged"] is True
    # The same training through rssbl_jax.train with a metrics hook: read every 50 steps, bit for bit the loop's.
    assert summary["loop_steps"] == list(range(50, 401, 50)), summary
    assert summary["loop_max_diff"] < 1e-6, summary
    assert summary["loop_losses"][-1] == pytest.approx(summary["final_loss"], rel=1e-6)
    assert summary["tensorboard_files"] == 1, summary
    assert len(images(notebook)) >= 1


def check_adapt_a_model(notebook, summary, workdir):
    # Pretraining fitted the nominal condition. The cross-talk is odd in p, so LoRA (which cannot see p) stays near
    # the base, while RSSBilinearLoRA removes most of the error, on held-out readings and along the sweep.
    assert summary["pretrain_mse"] < 0.05 * summary["base_mse"], summary
    assert 0.5 * summary["base_mse"] < summary["lora_mse"] < 1.05 * summary["base_mse"], summary
    assert summary["rss_mse"] < 0.1 * summary["lora_mse"], summary
    assert summary["rss_in_range"] < 0.1 * summary["lora_in_range"], summary
    # Checkpoint round trip, merge into the unmodified model, NNX twin: exact up to float32 round-off.
    assert summary["restored_max_diff"] == 0.0, summary
    assert summary["merge_max_diff"] < 1e-5, summary
    assert summary["nnx_max_diff"] < 1e-5 and summary["nnx_merge_max_diff"] < 1e-5, summary
    assert (workdir / "sensor_adapters").is_dir()
    assert len(images(notebook)) >= 2


def check_reproduce_results(notebook, summary, workdir):
    assert summary["config"] == "configs.notebook_tiny"
    methods = {row["method"]: row for row in summary["results"]}
    assert set(methods) == {"frozen", "lora", "rss"}
    assert methods["frozen"]["seen"] == pytest.approx(1.0)
    assert all(0.0 < row["seen"] < 10.0 for row in methods.values()), summary
    report = (workdir / "report.md").read_text()
    markdown = [
        out for cell in notebook.cells for out in cell.get("outputs", []) if "text/markdown" in out.get("data", {})
    ]
    assert markdown and "| method |" in markdown[0]["data"]["text/markdown"]
    assert f"{methods['rss']['seen']:.3g}" in report
    assert len(images(notebook)) == len(list(workdir.glob("*.png"))) >= 2


CHECKS = {
    "quickstart.ipynb": check_quickstart,
    "adapt_a_model.ipynb": check_adapt_a_model,
    "reproduce_results.ipynb": check_reproduce_results,
}


# every notebook runs in the slow suite (make test-slow): quickstart ~12 s, the other two 25-35 s each
@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook(name, jupyter_dirs, tmp_path):
    # Started in colab/, as Jupyter starts a notebook opened from a checkout; rssbl_jax is installed in this venv.
    notebook, summary = execute(name, jupyter_dirs, tmp_path, ROOT / "colab", {})
    assert "is installed at" in stream_text(notebook)  # the install cell found it and installed nothing
    CHECKS[name](notebook, summary, tmp_path)
