"""The Colab notebooks run top to bottom in a real Jupyter kernel (nbclient), on tiny settings, and compute what
they claim.

Each notebook runs with ``RSSBL_NOTEBOOK_TINY=1`` in a kernel launched from this interpreter (a kernelspec made
in a temporary directory whose ``argv`` is ``sys.executable``, so the venv's packages are the ones used, on a
fresh clone too). The test appends one cell that prints the notebook's ``summary`` dict as JSON, and checks those
values.
"""

import json
import pathlib
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL = "rssbl-jax-test"
MARKER = "RSSBL_SUMMARY "


@pytest.fixture(scope="module")
def jupyter_dirs(tmp_path_factory):
    """A kernelspec running ``sys.executable -m ipykernel_launcher``, and private Jupyter/IPython directories."""
    root = tmp_path_factory.mktemp("jupyter")
    kernelspec.install(kernel_name=KERNEL, display_name="rssbl_jax tests", prefix=str(root))
    spec = json.loads((root / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable
    return root


def run_notebook(name: str, jupyter_dirs: pathlib.Path, monkeypatch, tmp_path, timeout: int = 240) -> tuple:
    """Execute ``colab/<name>`` in a fresh kernel; return the executed notebook and its ``summary``."""
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dirs / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter_dirs / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(jupyter_dirs / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("RSSBL_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("RSSBL_WORKDIR", str(tmp_path))
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel sees one CPU device, as a user does
    path = ROOT / "colab" / name
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    notebook.cells.append(nbformat.v4.new_code_cell(f"import json; print({MARKER!r} + json.dumps(summary))"))
    client = nbclient.NotebookClient(
        notebook, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    text = "".join(out.get("text", "") for out in notebook.cells[-1].outputs if out.output_type == "stream")
    summary = json.loads(text.split(MARKER, 1)[1])
    return notebook, summary


def images(notebook) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def test_quickstart(jupyter_dirs, monkeypatch, tmp_path):
    notebook, summary = run_notebook("quickstart.ipynb", jupyter_dirs, monkeypatch, tmp_path)
    assert summary["final_loss"] < 1e-2 * summary["first_loss"], summary
    # The learned gate is linear in p and the adapted output tracks the target, extrapolation included.
    assert summary["sweep_max_error"] < 0.1, summary
    assert summary["merge_max_diff"] < 1e-5, summary
    assert summary["base_unchanged"] is True
    assert images(notebook) >= 1


def test_adapt_a_model(jupyter_dirs, monkeypatch, tmp_path):
    notebook, summary = run_notebook("adapt_a_model.ipynb", jupyter_dirs, monkeypatch, tmp_path)
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
    assert (tmp_path / "sensor_adapters").is_dir()
    assert images(notebook) >= 2


def test_reproduce_results(jupyter_dirs, monkeypatch, tmp_path):
    notebook, summary = run_notebook("reproduce_results.ipynb", jupyter_dirs, monkeypatch, tmp_path)
    assert summary["config"] == "configs.notebook_tiny"
    methods = {row["method"]: row for row in summary["results"]}
    assert set(methods) == {"frozen", "lora", "rss"}
    assert methods["frozen"]["seen"] == pytest.approx(1.0)
    assert all(0.0 < row["seen"] < 10.0 for row in methods.values()), summary
    report = (tmp_path / "report.md").read_text()
    markdown = [
        out for cell in notebook.cells for out in cell.get("outputs", []) if "text/markdown" in out.get("data", {})
    ]
    assert markdown and "| method |" in markdown[0]["data"]["text/markdown"]
    assert f"{methods['rss']['seen']:.3g}" in report
    assert images(notebook) == len(list(tmp_path.glob("*.png"))) >= 2
