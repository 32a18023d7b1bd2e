"""Sphinx configuration of the documentation site.

``make docs`` builds it into ``build/docs/html`` with ``-W --keep-going -n``:
any warning (a broken link, a reference to nothing, a docstring numpydoc
rejects, a page missing from the navigation) fails the build, after
reporting them all.
"""

import pathlib
import sys
import warnings

DOCS = pathlib.Path(__file__).resolve().parent
REPOSITORY_ROOT = DOCS.parent
sys.path[:0] = [str(REPOSITORY_ROOT), str(DOCS / "_ext")]  # this checkout's package and tools/, then our extension

with warnings.catch_warnings():  # GluonTS's advice to install a faster JSON library, on import
    warnings.filterwarnings("ignore", message="Using `json`-module", category=UserWarning)
    import modavg_plugin
    import modavg_plugin.callbacks  # registers the AveragingCallback family

project = "modavg_plugin"
release = version = modavg_plugin.__version__
copyright = "the modavg_plugin authors"

extensions = [
    "sphinx.ext.apidoc",  # one page per module under api/, written at each build (not committed)
    "sphinx.ext.autodoc",
    "numpydoc",  # numpy-style docstrings, and checks of them (numpydoc_validation_checks)
    "myst_nb",  # Markdown pages (MyST) and the notebook (run at build time, cached)
    "registry_reference",  # the configuration reference and the demo's tables, from the code at build time
]

root_doc = "index"
exclude_patterns = [
    "_ext",
    "jupyter_execute",
    "**.ipynb_checkpoints",
    "api/modules.rst",
]  # apidoc always writes modules.rst

# Every cross-reference must resolve. The dependencies publish inventories we could link to,
# but fetching them needs the network; their names are left as plain text instead.
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(mxnet|numpy|gluonts|typing|collections|inspect|fnmatch|concurrent|threading|pathlib|os|ctypes)(\..*)?",
    ),
    (r"py:class", r"modavg_plugin\.registry\.T"),  # the TypeVar in Registrable's signatures
]

# apidoc + autodoc + numpydoc: the API reference
apidoc_modules = [
    {
        "path": str(REPOSITORY_ROOT / "modavg_plugin"),
        "destination": "api",
        "separate_modules": True,
        "module_first": True,
        "automodule_options": {"members", "show-inheritance"},
    }
]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True  # ``decay=0.9999`` as written, not a repr of a computed value
autodoc_inherit_docstrings = True
numpydoc_show_class_members = False  # members are documented by autodoc, not summarised again
numpydoc_attributes_as_param_list = False
# A docstring that describes an argument the function does not take (PR02), describes one with no
# text (PR07) or writes a malformed "name : type" line (PR10) fails the build.
numpydoc_validation_checks = {"PR02", "PR07", "PR10"}


def skip_reexported(app, what, name, obj, skip, options):
    """On a submodule's page, skip the classes ``modavg_plugin`` re-exports: the package's page documents them."""
    current = getattr(getattr(app.env, "current_document", None), "autodoc_module", "")
    reexported = name in modavg_plugin.__all__ and getattr(modavg_plugin, name, None) is obj
    if what == "module" and current not in ("", "modavg_plugin") and reexported and isinstance(obj, type):
        return True  # a class: its package-level entry also answers to modavg_plugin.module.Class (canonical)
    return None


def setup(app):
    app.connect("autodoc-skip-member", skip_reexported)


# MyST (Markdown pages) and myst-nb (the notebook)
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
# The notebook is run when the site is built, so its page shows its tables and figures: once, then from
# myst-nb's cache (build/docs/.jupyter_cache) until the notebook changes; in a temporary folder; an error fails the build.
nb_execution_mode = "cache"
nb_execution_cache_path = str(REPOSITORY_ROOT / "build" / "docs" / ".jupyter_cache")
nb_execution_in_temp = True
nb_execution_timeout = 600
nb_execution_raise_on_error = True

# HTML
html_theme = "furo"
html_title = f"modavg_plugin {release}"
html_static_path = []
html_show_sourcelink = False
smartquotes = False  # "exponential" stays as a config writes it, in headings too
