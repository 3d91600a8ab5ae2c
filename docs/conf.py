"""Sphinx configuration of mpshm's documentation.

Build it with::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The pages are Markdown (MyST); the API reference is generated from the
docstrings by autodoc. Nothing here needs the network.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # document this checkout, installed or not

import mpshm  # noqa: E402

project = "mpshm"
author = "the mpshm developers"
copyright = "the mpshm developers"
release = mpshm.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: anchors for headings down to level 3, so that [text](page.md#a-heading)
# links work on the site as they do on GitHub.
myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# autodoc: members in source order, type hints shown in the signature. docs/api.md
# says which members each entry documents (no default "members": a name re-exported
# by the package is documented once, under mpshm).
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"mpshm {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
