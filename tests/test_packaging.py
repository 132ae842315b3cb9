"""Packaging facts that are easy to let drift: one repository URL, declared imports, the version, py.typed.

The repository's public location is written once, in pyproject.toml's ``[project.urls]``; the README's and the
notebooks' links and the notebooks' default install source are copies, checked here against it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import pathlib
import re
import sys
import tomllib

import pytest

import rssbl_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPOSITORY = PYPROJECT["project"]["urls"]["Repository"]
OWNER_REPO = REPOSITORY.removeprefix("https://github.com/")
# Links that name a GitHub repository: each must name this one.
LINKS = r"https://(?:colab\.research\.google\.com/github|raw\.githubusercontent\.com|github\.com)/[^)\s\"'`]+"
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
README = (ROOT / "README.md").read_text()
LOCAL = {"rssbl_jax", "experiments", "benchmarks", "tests", "configs"}


def colab_link(name: str) -> str:
    return f"https://colab.research.google.com/github/{OWNER_REPO}/blob/main/colab/{name}"


def notebook_text(path: pathlib.Path) -> tuple[list[dict], str]:
    cells = json.loads(path.read_text())["cells"]
    return cells, "\n".join("".join(cell["source"]) for cell in cells)


def test_repository_url_is_a_github_repository():
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", REPOSITORY), REPOSITORY


def test_readme_links_every_notebook_to_colab_at_the_repository():
    assert len(NOTEBOOKS) >= 3
    for path in NOTEBOOKS:
        assert colab_link(path.name) in README, path.name
    for link in re.findall(LINKS, README):
        assert OWNER_REPO in link, link


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_installs_from_the_repository_and_links_to_colab(path):
    cells, text = notebook_text(path)
    assert colab_link(path.name) in "".join(cells[0]["source"])  # the badge is in the header
    first_code = "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])
    assert f'os.environ.get("RSSBL_JAX_SOURCE", "git+{REPOSITORY}")' in first_code
    assert "%pip install" in first_code and "spec.origin is None" in first_code
    for link in re.findall(
        r"https://(?:colab\.research\.google\.com/github|raw\.githubusercontent\.com)/[^)\s\"]+", text
    ):
        assert OWNER_REPO in link, link
    for figure in re.findall(r"colab/figures/[\w.-]+\.png", text):  # figures embedded for readers
        assert (ROOT / figure).is_file(), figure


def pip_upgrade_cases() -> list:
    """Every notebook; one not yet in ``UPGRADES_PIP`` is a strict xfail, so fixing it fails until it is added."""
    from tests.test_notebook_install import UPGRADES_PIP

    pending = pytest.mark.xfail(strict=True, reason="its install cell does not upgrade pip yet")
    return [pytest.param(p, id=p.name, marks=() if p.name in UPGRADES_PIP else pending) for p in NOTEBOOKS]


@pytest.mark.parametrize("path", pip_upgrade_cases())
def test_notebook_install_cell_upgrades_pip_first(path):
    """The pip of a fresh Python 3.11 venv (23.2.1) rejects ``name @ git+file:///...``; the cell upgrades pip first."""
    cells, _ = notebook_text(path)
    first_code = "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])
    upgrade = first_code.find("%pip install --quiet --upgrade pip")
    assert 0 <= upgrade < first_code.find('%pip install --quiet "{REQUIREMENT}"'), first_code


def test_demo_extra_covers_what_the_demo_imports():
    """`make demo` installs the core and the `demo` extra only: experiments/demo.py and configs/demo.py need no more."""
    providers = importlib.metadata.packages_distributions()
    project = PYPROJECT["project"]
    allowed = {normalise(re.match(r"[\w.-]+", r).group(0)) for r in project["dependencies"]}
    allowed |= {normalise(re.match(r"[\w.-]+", r).group(0)) for r in project["optional-dependencies"]["demo"]}
    found = set()
    for path in (ROOT / "experiments" / "demo.py", ROOT / "configs" / "demo.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    for module in sorted(found - set(sys.stdlib_module_names) - LOCAL - {"__future__"}):
        distributions = {normalise(d) for d in providers.get(module, [module])}
        assert distributions & allowed, f"experiments/demo.py imports {module}, which the demo extra does not bring"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: \$\(VENV\)/\.installed-demo$", makefile, re.M), "make demo installs only .[demo]"


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and "Apache License" in text and "Version 2.0" in text
    assert "END OF TERMS AND CONDITIONS" in text and PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_version_is_single_sourced():
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "rssbl_jax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", rssbl_jax.__version__)


def test_py_typed_ships():
    assert (ROOT / "rssbl_jax" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["rssbl_jax"]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, set[str]]:
    """Distribution names each part of the project may import: the core, plus each extra (transitively)."""
    project = PYPROJECT["project"]

    def names(requirements: list[str]) -> set[str]:
        return {normalise(re.match(r"[\w.-]+", req).group(0)) for req in requirements}

    extras = {key: names(value) for key, value in project["optional-dependencies"].items()}
    for key in extras:  # rssbl_jax[plot] inside an extra brings that extra
        for req in project["optional-dependencies"][key]:
            if req.startswith("rssbl_jax["):
                for inner in req[len("rssbl_jax[") : -1].split(","):
                    extras[key] |= extras[inner]
    core = names(project["dependencies"])
    return {
        # optional library features, imported lazily when used: rssbl_jax.quantize (qwix), analysis.plot_response
        "rssbl_jax": core | extras["quantize"] | extras["plot"],
        "experiments": core | extras["experiments"],
        "configs": core | extras["experiments"],
        "benchmarks": core | extras["bench"],
        "tests": core | extras["test"],
    }


def imported_top_level(folder: pathlib.Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - LOCAL - {"__future__"}


@pytest.mark.parametrize("folder", ["rssbl_jax", "experiments", "configs", "benchmarks", "tests"])
def test_every_imported_package_is_declared(folder):
    providers = importlib.metadata.packages_distributions()
    allowed = declared()[folder]
    for module in sorted(imported_top_level(ROOT / folder)):
        distributions = {normalise(d) for d in providers.get(module, [module])}
        assert distributions & allowed, (
            f"{folder}/ imports {module} ({distributions}) but pyproject does not declare it"
        )


def test_floor_pins_are_pyprojects_lower_bounds():
    """`make test-floor` installs exactly the lower bounds pyproject.toml states for the core dependencies."""
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    pins = dict(re.findall(r"([\w-]+)==([\w.]+)", re.search(r"^FLOOR_PINS := (.*)$", makefile, re.M).group(1)))
    pins = {normalise(name): version for name, version in pins.items()}
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, floor = re.match(r"([\w.-]+)>=([\w.]+)", requirement).groups()
        assert pins[normalise(name)].startswith(floor), (requirement, pins.get(normalise(name)))


# Declared distributions that no file imports by name, with the reason they are declared anyway.
USED_WITHOUT_IMPORT = {
    "jaxlib": "jax's compiled backend, never imported directly",
    "ipykernel": "tests/test_notebooks.py starts it as the notebooks' Jupyter kernel",
    "pytest": "the test runner",
    "nbclient": "tests/test_notebooks.py imports it through pytest.importorskip",
    "nbformat": "tests/test_notebooks.py imports it through pytest.importorskip",
    "ruff": "`make lint`",
    "gcp-storage-emulator": "tests/test_gcs.py starts it as a subprocess (`python -m gcp_storage_emulator`)",
    "gcsfs": "etils.epath opens gs:// paths through it",
    "sphinx": "`make docs` runs it",
    "myst-parser": "docs/conf.py loads it as a Sphinx extension",
}


@pytest.mark.parametrize("section", ["core", *sorted(PYPROJECT["project"]["optional-dependencies"])])
def test_every_declared_package_is_used(section):
    """The converse of the check above: nothing is declared that no file imports (or a stated reason keeps)."""
    project = PYPROJECT["project"]
    requirements = project["dependencies"] if section == "core" else project["optional-dependencies"][section]
    providers = importlib.metadata.packages_distributions()
    imported = set()
    for folder in ("rssbl_jax", "experiments", "configs", "benchmarks", "tests", "colab", "docs"):
        for module in imported_top_level(ROOT / folder):
            imported |= {normalise(d) for d in providers.get(module, [module])}
    for requirement in requirements:
        name = normalise(re.match(r"[\w.-]+", requirement).group(0))
        if name == "rssbl-jax":
            continue  # rssbl_jax[extra] brings another extra, checked on its own
        assert name in imported or name in USED_WITHOUT_IMPORT, (
            f"pyproject declares {requirement!r} ({section}) but nothing imports it"
        )
