"""Sphinx configuration of the pqsk documentation.

Build the site from the repository root with ``bash doc/build.sh`` (see
``doc/README.md``).  The package is imported from the repository itself, so
the compiled kernels must exist: ``python setup.py build_ext --inplace`` or
``pip install -e .``.
"""

import sys
from pathlib import Path

DOC_DIR = Path(__file__).resolve().parent
ROOT = DOC_DIR.parent

# Import pqsk from this checkout, and the site's own extensions from _ext/.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOC_DIR / "_ext"))

import pqsk  # noqa: E402

# -- Project -----------------------------------------------------------------

project = "pqsk"
author = "the pqsk developers"
copyright = "the pqsk developers"
release = pqsk.__version__
version = ".".join(release.split(".")[:2])

# -- Extensions --------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
    "benchmark_results",
]

# Only reStructuredText pages are documents; Markdown is read solely through
# the benchmark page's includes.
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "README.md",
    "_benchmark_results",
    "**.ipynb_checkpoints",
]

# No network in CI: never fetch other projects' inventories.
intersphinx_mapping = {}

# Code in ``double backquotes`` is Python unless said otherwise.
default_role = "literal"
highlight_language = "python3"
pygments_style = "sphinx"

# -- autodoc / autosummary / numpydoc -----------------------------------------

autosummary_generate = True
autodoc_typehints = "none"
# "fit()" rather than "IVFPQNeighbors.fit()" in the page contents.
toc_object_entries_show_parents = "hide"

# The class template lists methods itself (see _templates/autosummary).
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- sphinx-gallery ------------------------------------------------------------

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    # Run every example, not only plot_*.py (and never a package marker).
    "filename_pattern": r"\.py$",
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": True,
    "within_subsection_order": "FileNameSortKey",
    "doc_module": ("pqsk",),
    "backreferences_dir": "generated/backreferences",
    "remove_config_comments": True,
    "min_reported_time": 1,
    "show_memory": False,
}

# -- HTML ----------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"pqsk {release}"
html_static_path = []
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_context = {"default_mode": "light"}

# -- Benchmark page (doc/_ext/benchmark_results.py) ----------------------------

benchmark_results_source = str(ROOT / "benchmarks" / "results")
benchmark_results_dir = "_benchmark_results"


# -- Completion stamp ------------------------------------------------------------
# An example that calls sys.exit() ends the whole Sphinx process, with exit
# status 0 when it exits with 0, before the site is written.  build.sh
# deletes this stamp first and fails unless the build reached its end.

BUILD_STAMP = ".build-complete"


def _write_build_stamp(app, exception):
    if exception is None:
        (Path(app.outdir) / BUILD_STAMP).write_text("ok\n", encoding="utf-8")


def setup(app):
    app.connect("build-finished", _write_build_stamp)
