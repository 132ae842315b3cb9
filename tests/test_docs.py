"""The README example runs as written, the notebooks are committed clean, and every public name documents itself
with a runnable example (the examples themselves run as doctests: pytest's ``--doctest-modules`` over rssbl_jax/).
The notebooks are executed in a real kernel by tests/test_notebooks.py."""

import ast
import inspect
import json
import pathlib
import re
import types

import numpy as np
import pytest

import rssbl_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    params, merged = namespace["params"], namespace["merged"]
    before = namespace["variables"]["params"]
    np.testing.assert_array_equal(params["kernel"], before["kernel"])
    assert not np.array_equal(params["lora_b"], before["lora_b"])
    assert set(merged) == {"kernel", "bias"} and merged["kernel"].shape == (64, 256)


@pytest.mark.parametrize("path", sorted((ROOT / "colab").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_valid_json_with_cleared_outputs(path):
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "commit notebooks cleared"


def reexported_names() -> list[str]:
    """The names ``rssbl_jax/__init__.py`` re-exports (``from m import x as x``), read from its source."""
    tree = ast.parse((ROOT / "rssbl_jax" / "__init__.py").read_text())
    return [
        alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    ]


def public_objects() -> list[tuple[str, object]]:
    """Every re-exported function and class, and the public functions and classes of re-exported modules."""
    found = []
    for name in reexported_names():
        obj = getattr(rssbl_jax, name)
        found.append((name, obj))
        if isinstance(obj, types.ModuleType):
            for member, value in vars(obj).items():
                if not member.startswith("_") and getattr(value, "__module__", None) == obj.__name__:
                    if inspect.isclass(value) or inspect.isfunction(value):
                        found.append((f"{name}.{member}", value))
    return found


def test_public_api_names_are_found():
    names = dict(public_objects())
    assert len(names) >= 40
    for name in ("RSSBilinearLoRADense", "inject", "merge", "freeze_base", "save_adapters", "nnx.inject"):
        assert name in names


@pytest.mark.parametrize("name,obj", [pytest.param(name, obj, id=name) for name, obj in public_objects()])
def test_public_name_has_docstring_with_example(name, obj):
    doc = inspect.getdoc(obj) if not isinstance(obj, types.ModuleType) else obj.__doc__
    assert doc and len(doc.splitlines()[0]) > 10, f"{name} has no docstring"
    # Every public function, class and re-exported module carries a `>>>` example, run by --doctest-modules.
    assert ">>>" in (obj.__doc__ or ""), f"{name}'s docstring has no runnable `>>>` example"
