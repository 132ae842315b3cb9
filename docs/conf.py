"""Sphinx configuration of the rssbl_jax documentation site: the API from the docstrings, guides in Markdown.

Build it with ``make docs`` (``python -m sphinx -W --keep-going -b html docs docs/_build/html``); the test suite
builds it with warnings as errors (tests/test_docs.py).
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import re
import shutil
import sys
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document the checkout this file sits in, installed or not

import rssbl_jax  # noqa: E402

project = "rssbl_jax"
author = "rssbl_jax contributors"
copyright = "rssbl_jax contributors"  # noqa: A001 (Sphinx's name)
release = version = rssbl_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# The docstrings are Google style (Args / Returns / Raises) with `.. math::` blocks and `>>>` examples.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a class's Attributes section as fields, not a second description of each attribute
# Returns sections are prose ("``step(state, batch) -> (state, metrics)`` with ..."), not "type: description":
# render them as written instead of splitting the first line at a colon.
napoleon_custom_sections = ["Returns"]
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = True  # writes docs/api/generated/<module>.rst from _templates/module.rst

html_theme = "alabaster"
html_title = f"rssbl_jax {release}"
html_theme_options = {"description": "RSSBilinearLoRA for JAX/Flax", "fixed_sidebar": True}


class ReExports(SphinxDirective):
    """``.. reexports::`` — a table of every name ``rssbl_jax/__init__.py`` re-exports, linked to where it is defined.

    The list is read from the package's source, so a new re-export appears without editing the documentation.
    """

    def run(self) -> list[nodes.Node]:
        tree = ast.parse((ROOT / "rssbl_jax" / "__init__.py").read_text())
        names = [a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names]
        lines = [".. list-table::", "   :header-rows: 1", "   :widths: 25 75", "", "   * - name", "     - what"]
        for name in names:
            obj = getattr(rssbl_jax, name)
            if isinstance(obj, types.ModuleType):
                target = f":py:mod:`{obj.__name__}`"
            else:
                target = f":py:obj:`{obj.__module__}.{obj.__qualname__}`"
            doc = inspect.getdoc(obj) or ""
            lines += [f"   * - ``rssbl_jax.{name}``", f"     - {target}: {doc.splitlines()[0] if doc else ''}"]
        container = nodes.container()
        self.state.nested_parse(StringList(lines, source="reexports"), self.content_offset, container)
        return container.children


# A literal followed directly by a letter (``QArray``s) reads well in plain text but is not reStructuredText; an
# escaped space joins them without changing what is rendered.
_LITERAL_THEN_LETTER = re.compile(r"(``[^`]+``)([A-Za-z]?)")


def _plain_text_plurals(app, what, name, obj, options, lines):
    del app, what, name, obj, options
    join = lambda m: m.group(1) + ("\\ " + m.group(2) if m.group(2) else "")  # noqa: E731
    lines[:] = [_LITERAL_THEN_LETTER.sub(join, line) for line in lines]


def _remove_stale_pages(app):
    """Start from no generated module pages, so a module dropped from the list leaves no orphan page behind."""
    shutil.rmtree(pathlib.Path(app.srcdir) / "api" / "generated", ignore_errors=True)


def setup(app):
    app.connect("builder-inited", _remove_stale_pages, priority=100)  # before autosummary writes the pages
    app.add_directive("reexports", ReExports)
    app.connect("autodoc-process-docstring", _plain_text_plurals)
