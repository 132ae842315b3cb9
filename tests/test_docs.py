"""The documentation holds: the README example and every code block of docs/ run as written, the site builds with
warnings as errors and documents every public name, the numbers it quotes are in the reports it names, the notebooks
are committed clean, and every public name documents itself with a runnable example (the examples themselves run as
doctests: pytest's ``--doctest-modules`` over rssbl_jax/). The notebooks are executed in a real kernel by
tests/test_notebooks.py."""

import ast
import inspect
import json
import pathlib
import pkgutil
import re
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------------------------
# The documentation site (docs/)

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
DOC_BLOCKS = [
    (page, index, block)
    for page in PAGES
    for index, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


def test_docs_execute_the_guides():
    """The examples moved out of the README are still executed (below): injection, NNX, sharding, checkpoints."""
    text = "\n".join(block for _, _, block in DOC_BLOCKS)
    for call in ("rssbl_jax.inject(", "rssbl_jax.nnx.inject(", "adapter_partition_specs", "save_adapters", "quantize"):
        assert call in text, call


@pytest.mark.slow  # 5-20 s a block, a minute in all: make test-slow runs them (the README's example runs above)
@pytest.mark.parametrize(
    "page,index,block", [pytest.param(*item, id=f"{item[0].relative_to(DOCS)}-{item[1]}") for item in DOC_BLOCKS]
)
def test_docs_code_block_runs(page, index, block):
    namespace: dict = {"__name__": f"docs_block_{index}"}
    exec(compile(block, f"{page.relative_to(ROOT)} block {index}", "exec"), namespace)


def test_api_reference_lists_every_module():
    """docs/api/index.rst renders each module of rssbl_jax/ from one line in its autosummary list."""
    listed = set(re.findall(r"^   (rssbl_jax\.\w+)$", (DOCS / "api" / "index.rst").read_text(), re.M))
    modules = {f"rssbl_jax.{m.name}" for m in pkgutil.iter_modules(rssbl_jax.__path__) if not m.name.startswith("_")}
    missing = sorted(modules - listed)
    assert not missing, "add to the autosummary list of docs/api/index.rst:\n" + "\n".join(f"   {m}" for m in missing)
    assert not listed - modules, f"docs/api/index.rst lists modules that do not exist: {sorted(listed - modules)}"


def documented_names() -> set[str]:
    """Every public function and class of every module of rssbl_jax/, by its defining module's qualified name."""
    names = set()
    for info in pkgutil.iter_modules(rssbl_jax.__path__):
        if info.name.startswith("_"):
            continue
        module = __import__(f"rssbl_jax.{info.name}", fromlist=["_"])
        for member, value in vars(module).items():
            if member.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                names.add(f"{module.__name__}.{value.__qualname__}")
    return names


@pytest.mark.slow  # ~20 s: a whole Sphinx build; make test-slow runs it
def test_docs_build_without_warnings_and_document_every_public_name(tmp_path):
    """`make docs`' command, warnings as errors; every public function and class is in the site's inventory."""
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees")]
    run = subprocess.run([*cmd, str(DOCS), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    from sphinx.util.inventory import InventoryFile

    with open(out / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda uri, base: uri)
    inventory = getattr(inventory, "data", inventory)  # a mapping {"py:function": {name: ...}} before Sphinx 8.2
    objects = {name for kind, entries in inventory.items() if kind.startswith("py:") for name in entries}
    missing = sorted(documented_names() - objects)
    assert not missing, f"public names missing from the API reference: {missing}"
    reexported = [getattr(rssbl_jax, name) for name in reexported_names()]
    api_page = (out / "api" / "index.html").read_text()
    for obj in reexported:  # each re-export is in the inventory and its row on the API page links to it
        module = isinstance(obj, types.ModuleType)
        target = obj.__name__ if module else f"{obj.__module__}.{obj.__qualname__}"
        assert target in objects, target
        assert f'#{"module-" if module else ""}{target}"' in api_page, f"no link to {target} on the API page"
    for page in ("index", "getting_started", "choosing", "results", "api/index"):
        assert (out / f"{page}.html").is_file(), page


QUOTED = [DOCS / "choosing.md", DOCS / "results.md"]


def quoted_numbers() -> list[tuple[str, str, str]]:
    """(page, number, report) for every table row of the evidence pages whose last cell names a committed report."""
    rows = []
    for page in QUOTED:
        for line in page.read_text().splitlines():
            match = re.match(r"^\|.*\|(.*)\|\s*(results/\S+)\s*\|$", line)
            if match:
                rows += [(page.name, number.strip(), match.group(2)) for number in match.group(1).split(" / ")]
    return rows


def test_evidence_pages_quote_numbers():
    assert len(quoted_numbers()) >= 20


@pytest.mark.parametrize("page,number,report", [pytest.param(*row, id="-".join(row[:2])) for row in quoted_numbers()])
def test_quoted_number_is_in_its_report(page, number, report):
    """A number on the evidence pages is copied verbatim from the committed report it names."""
    assert (ROOT / report).is_file(), f"{page} cites {report}, which is not committed"
    text = (ROOT / report).read_text()
    if number.endswith(NOT_SIGNIFICANT):  # the report prints it without a (Holm-corrected) significance mark
        bare = number.removesuffix(NOT_SIGNIFICANT)
        assert bare in text and f"{bare} **" not in text, f"{page}: {report} does not print {bare!r} unmarked"
        return
    assert number in text, f"{page} quotes {number!r}, which {report} does not contain"


NOT_SIGNIFICANT = " (excludes 1; not significant after Holm)"


# Words about how the work was organised, not about the method. "round" counts only in that sense ("the first
# round"), not as a timing round ("each round", "round by round") or "round-off".
ORGANISATIONAL = re.compile(
    r"\bthe seed\b(?!s)(?! ?-?\d)|\bissue[ -]\d+|\bsession\b|"
    r"\b(?:first|second|third|previous|this|next|last|earlier|later|that|one|the) round\b(?! by)|\bround \d+\b",
    re.I,
)
DOCUMENTS = [ROOT / name for name in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md", "RESULTS.md", "BENCHMARKS.md")]
MODULES = sorted((ROOT / "rssbl_jax").glob("*.py"))  # their docstrings are the API reference


@pytest.mark.parametrize("path", [*DOCUMENTS, *PAGES, *MODULES], ids=lambda p: str(p.relative_to(ROOT)))
def test_documentation_speaks_of_the_method(path):
    """No "the seed" (say "the original formulation"), "round", "issue N" or "session" in the documentation."""
    offending = [
        f"{path.name}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ORGANISATIONAL.search(line)
    ]
    assert not offending, "\n".join(offending)
