"""Sphinx configuration for the mailspool documentation."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

project = "mailspool"
author = "the mailspool developers"
copyright = "2026, the mailspool developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
