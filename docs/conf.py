"""Sphinx configuration: API reference from the docstrings (Google style) and the tutorial.

Built by tests/test_docs.py with warnings as errors (``sphinx-build -W``), so a docstring that
does not render breaks the test suite.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

project = "fedjax_lab"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
# The markdown pages (design, install, threat model) are read on GitHub; Sphinx builds the
# reStructuredText ones.
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "*.md"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# NamedTuple "Attributes:" sections become fields, not a second description of each attribute.
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True}
html_theme = "alabaster"
