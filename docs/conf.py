"""Sphinx configuration: the Markdown pages of docs/ (MyST) plus the API reference (autodoc).

Build (as .ci/run does; any warning fails)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import sys

# autodoc imports distexec from this checkout, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "distexec"
author = "distexec developers"
copyright = "distexec developers"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# `[text](page.md#a-heading)` links: anchors for headings down to ####.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

try:
    import furo  # noqa: F401
    html_theme = "furo"
except ImportError:  # the docs still build with Sphinx's own theme
    html_theme = "alabaster"
html_title = "distexec"
