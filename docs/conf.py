"""Sphinx configuration of lit_mofo's documentation.

Build (what CI runs; warnings are errors, every reference to a lit_mofo name must resolve):

    sphinx-build -W --keep-going -n -b html docs docs/_build/html

Serve while editing (rebuilds on save; offline): ``sphinx-autobuild docs docs/_build/html``.

The API reference is generated from the docstrings: one page per public module of :data:`API_MODULES`, written to
``docs/api/`` when the build starts (the folder is generated, not edited). A module of the list that does not exist
in this checkout is left out of the index, so the list may name a module before it lands.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout's lit_mofo, also without an editable install

import lit_mofo  # noqa: E402

project = "lit_mofo"
author = "lit_mofo developers"
copyright = "lit_mofo developers"
release = lit_mofo.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# ---- Markdown pages ----------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3  # `[text](page.md#a-heading)` links resolve, and a broken anchor is a warning
suppress_warnings: list[str] = []

# ---- the API reference -------------------------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_inherit_docstrings = False  # an override without a docstring is not documented with Lightning's
autodoc_preserve_defaults = True  # show `fraction=0.15`, not an evaluated repr of a constant
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Every reference to a lit_mofo name must resolve (-n); references to other projects (torch, Lightning, transformers,
# the standard library) are left unresolved because the build runs offline (CI cannot fetch intersphinx
# inventories), so they are not warned about.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!~?lit_mofo\b).*")]

# ---- the site ------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"lit_mofo {release}"
html_static_path: list[str] = []

# Links to other sites are checked only on request (CI has no network): LIT_MOFO_LINKCHECK_EXTERNAL=1 with
# `sphinx-build -b linkcheck docs docs/_build/linkcheck`. Without it linkcheck checks the links to local files.
if not os.environ.get("LIT_MOFO_LINKCHECK_EXTERNAL"):
    linkcheck_ignore = [r"https?://.*"]
linkcheck_timeout = 15

# The public modules, in the order of the API index, each with the line the index shows.
API_MODULES: dict[str, str] = {
    "lit_mofo": "the top-level names: the optimizer, the callbacks, the snapshot, continual learning",
    "lit_mofo.optim": "MoFO, the functional step and the ``configure_optimizers`` helpers",
    "lit_mofo.callbacks": "MoFOCallback, HalfFineTuning, ForgettingMonitor, ParameterDrift, L2ToPretrained, "
    "TaskVectorScaling",
    "lit_mofo.probes": "what ForgettingMonitor measures",
    "lit_mofo.continual": "continual fine-tuning: stages, the driving callback, the accuracy-matrix figures",
    "lit_mofo.task_vectors": "WiSE-FT and LiNeS edits of a task vector, Pareto selection",
    "lit_mofo.report": "the end-of-fit report",
    "lit_mofo.modules": "CausalLMModule",
    "lit_mofo.data": "InstructionDataModule and ResumableDataLoader",
    "lit_mofo.scenario": "the embedded forgetting scenario",
    "lit_mofo.params": "the parameter vocabulary: selecting parameters by role, kind or regex",
    "lit_mofo.blocks": "model layouts: blocks, roles and the layout table",
    "lit_mofo.snapshot": "the shared pre-trained snapshot θ₀",
    "lit_mofo.strategy": "the StrategyAdapter: what callbacks need to know about the Trainer's strategy",
    "lit_mofo.dtensor": "DTensor facts shared by the optimizer and the strategy adapter",
    "lit_mofo.adapters": "effective weights of PEFT (LoRA) models",
    "lit_mofo.checkpoints": "crash-safe checkpoints and the newest complete one of a run",
    "lit_mofo.cli": "the ``lit-mofo`` command",
    "lit_mofo.loggers": "loggers the CLI configures",
    "lit_mofo.progress": "progress bars the CLI configures",
    "lit_mofo.notices": "hiding the notices that are not about the run",
}


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _module_page(module: str) -> str:
    title = f"``{module}``"
    lines = [title, "=" * len(title), "", f".. automodule:: {module}"]
    if module == "lit_mofo":
        # The top-level names are documented where they are defined (lit_mofo.optim, lit_mofo.callbacks, ...); this
        # page lists them, linked there.
        lines += ["   :no-members:", "", "Top-level names", "---------------", "", ".. autosummary::", ""]
        lines += [f"   {name}" for name in lit_mofo.__all__ if not name.startswith("_")]
    return "\n".join(lines) + "\n"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:  # unchanged files keep sphinx-autobuild from looping
        path.write_text(text)


def generate_api_pages(app: Sphinx) -> None:
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    present = [module for module in API_MODULES if _exists(module)]
    for module in present:
        _write_if_changed(api / f"{module}.rst", _module_page(module))
    for stale in api.glob("*.rst"):
        if stale.stem not in present and stale.name != "index.rst":
            stale.unlink()
    index = [
        "API reference",
        "=============",
        "",
        "Generated from the docstrings, one page per public module.",
        "",
        *[f"- :mod:`{module}`: {API_MODULES[module]}" for module in present],
        "",
        ".. toctree::",
        "   :hidden:",
        "",
        *[f"   {module}" for module in present],
    ]
    _write_if_changed(api / "index.rst", "\n".join(index) + "\n")


# ---- references to a name by another of its paths ------------------------------------------------------------------
# Docstrings name an object by its public path (lit_mofo.MoFO) or where it is defined
# (lit_mofo.callbacks.mofo_callback.MoFOCallback); each is documented once, on its public module's page. A reference
# that does not resolve as written is resolved through the object it imports to; a module that has no page of its
# own (lit_mofo.optim._cpu) links to the page of the package that documents it.


def _import(path: str) -> Any:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(path)


def _documented(env: BuildEnvironment) -> dict[int, str]:
    cache = getattr(env, "_lit_mofo_documented", None)
    if cache is None:
        cache = {}
        for name, entry in env.get_domain("py").objects.items():
            if entry.objtype in ("class", "function", "method", "exception", "module", "property"):
                try:
                    cache.setdefault(id(_import(name)), name)
                except (ImportError, AttributeError):
                    pass
        env._lit_mofo_documented = cache  # type: ignore[attr-defined]
    return cache


def resolve_alias(app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element) -> Any:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith("lit_mofo"):
        return None
    documented = _documented(env)
    objects = env.get_domain("py").objects
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):  # the longest prefix that imports to a documented object, then the rest
        try:
            obj = _import(".".join(parts[:cut]))
        except (ImportError, AttributeError):
            continue
        if id(obj) not in documented:
            continue
        candidate = ".".join([documented[id(obj)], *parts[cut:]])
        if candidate in objects:
            break
        return None
    else:
        return None
    if candidate == target:
        return None
    node = node.deepcopy()
    node["reftarget"] = candidate
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], candidate, node, contnode
    )


def resolve_undocumented(app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element) -> Any:
    """A reference to a lit_mofo name that exists but has no entry of its own (a module without a page such as
    ``lit_mofo.optim._cpu``, a constant, a private helper class) links to the page of the nearest documented module
    or class that holds it. A name that does not import (a typo, a renamed object) stays a warning."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    if not target.startswith("lit_mofo."):
        return None
    try:
        _import(target)
    except (ImportError, AttributeError):
        return None
    documented = _documented(env)
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            holder = _import(".".join(parts[:cut]))
        except (ImportError, AttributeError):
            continue
        if id(holder) in documented:
            name = documented[id(holder)]
            reftype = "mod" if env.get_domain("py").objects[name].objtype == "module" else "obj"
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, reftype, name, node, contnode)
    return None


def setup(app: Sphinx) -> dict[str, Any]:
    from pygments.lexers.data import JsonLexer

    app.add_lexer("jsonl", JsonLexer)  # the data formats' examples: one JSON object a line
    app.connect("builder-inited", generate_api_pages)
    app.connect("missing-reference", resolve_alias)
    app.connect("missing-reference", resolve_undocumented)
    return {"parallel_read_safe": True}
