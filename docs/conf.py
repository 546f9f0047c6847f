"""Sphinx configuration of the se_jax documentation.

Build from the repository root, with the docs extra installed
(``pip install -e ".[experiments,docs]"``; ``experiments/setup.sh`` does it):

  .venv/bin/python -m sphinx -E -W --keep-going -j auto -b html docs docs/_build/html

``-E`` reads every page again, so every notebook page is executed on every
build (nothing is cached between builds); ``-W`` turns every warning into an
error; ``-j auto`` executes the notebook pages in parallel, one process per
core. With ``nitpicky`` below, a cross-reference that does not resolve (an
API name, a page, a heading) is a warning. There is no network access: no
intersphinx, and links to other sites are not checked. tests/test_docs.py
runs this build.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
import shutil
import sys
import tempfile

from docutils import nodes
from sphinx.domains.python import PyXRefRole

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
# The notebooks import `experiments` from the repository root, and run on
# the CPU whatever the machine has. Their kernels inherit this environment.
sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p])
os.environ["JAX_PLATFORMS"] = "cpu"
# The notebooks build the same small networks, and on the CPU XLA compiles
# each initialiser of an eagerly built network as a program of its own, in
# about a second. A compilation cache of this build's own (new at each
# build, removed at its end) lets the kernels share those programs.
_JAX_CACHE = tempfile.mkdtemp(prefix="se_jax-docs-jax-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import se_jax  # noqa: E402

project = "se_jax"
author = "The se_jax developers"
copyright = "2026, The se_jax developers"
release = version = se_jax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
nitpicky = True

# Pages: MyST Markdown; pages with a jupytext header are notebooks, executed
# on every build; an error in a cell, or output on stderr, fails the build.
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_timeout = 600
nb_output_stderr = "warn"
nb_merge_streams = True

# API reference: Google-style docstrings, signatures with their types.
autodoc_default_options = {
    "members": True,
    "undoc-members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# A class's "Attributes:" section describes its fields (dataclass and
# NamedTuple fields), which are then not listed again as members.
napoleon_use_ivar = True

html_theme = "furo"
html_title = f"se_jax {release}"
html_static_path: list[str] = []

# Types of other packages in signatures: there are no local inventories of
# their documentation, so they are not links. Every se_jax name must
# resolve.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|nnx|numpy|np|jnp|optax|ml_collections|"
               r"torch|orbax|typing|collections|types|dataclasses)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Sequence|Mapping|NamedTuple|ArrayLike|"
               r"ClassVar|Array|ndarray|dtype|DTypeLike|Module|Rngs)"),
    (r"py:.*", r"(int|float|str|bool|bytes|dict|list|tuple|set|type|object|"
               r"None|callable|Ellipsis|ValueError|TypeError|ImportError|"
               r"KeyError|NotImplementedError|RuntimeError|FileNotFoundError|"
               r"FloatingPointError|OSError|Exception|ValueError / TypeError)"),
]

# ------------------------------------------------------------------ API names

# The public modules of se_jax (every module whose name has no part that
# starts with "_"); each one's public names are those of its __all__.
# tests/test_docs.py checks that every one is in the built inventory.
PUBLIC_MODULES = sorted(
    ["se_jax"] + [m.name for m in pkgutil.walk_packages(se_jax.__path__,
                                                         "se_jax.")
                  if not any(p.startswith("_") for p in m.name.split("."))])


def public_names() -> list[tuple[str, str, object]]:
  """(module, name, object) of every public name."""
  out = []
  for modname in PUBLIC_MODULES:
    module = importlib.import_module(modname)
    for name in module.__all__:
      out.append((modname, name, getattr(module, name)))
  return out


def _add_reexports(app, env):
  """Makes each re-exported name (``se_jax.squeeze``, ``se_jax.models.create``)
  an inventory entry and link target of its own, pointing at the entry of
  the module that defines it, so that it is documented once."""
  domain = env.domains["py"]
  by_id = {}
  for modname, name, obj in public_names():
    entry = domain.objects.get(f"{modname}.{name}")
    if entry is not None and not entry.aliased:
      by_id.setdefault(id(obj), entry)
  for modname, name, obj in public_names():
    full = f"{modname}.{name}"
    if full in domain.objects:
      continue
    entry = by_id.get(id(obj))
    if entry is not None:
      domain.objects[full] = entry._replace(aliased=True)


class _LooseRole(PyXRefRole):
  """The default role (single backticks) in docstrings: a link where the
  text names a documented object, else the text as code. Docstrings use
  single backticks for both argument names and API names."""

  def result_nodes(self, document, env, node, is_ref):
    node["se_jax_loose"] = True
    return super().result_nodes(document, env, node, is_ref)


def _resolve_loose(app, env, node, contnode):
  if node.get("se_jax_loose"):
    return contnode
  return None


def _field_names() -> frozenset[str]:
  names = set()
  for _, _, obj in public_names():
    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
      names.update(f.name for f in dataclasses.fields(obj))
    elif isinstance(obj, type) and issubclass(obj, tuple):
      names.update(getattr(obj, "_fields", ()))
  return frozenset(names)


def _skip_fields(app, what, name, obj, skip, options):
  """Skips the fields of dataclasses and NamedTuples: their class's
  docstring describes them ("Attributes:")."""
  if what == "class" and name in _FIELDS and not callable(obj) \
      and not isinstance(obj, property):
    return True
  return None


_CODE = re.compile(r"(``.+?``|`[^`]+`)")
_STAR = re.compile(r"(?<![\w*\\])\*(?=\w)")


def _plain(line: str) -> str:
  """`line` with ``*`` before a word and ``|`` outside code escaped: in the
  docstrings they are text (``(N, *spatial, C)``, ``|gate - 1|``), never rST
  emphasis or substitutions."""
  parts = _CODE.split(line)
  for i in range(0, len(parts), 2):
    parts[i] = _STAR.sub(r"\\*", parts[i]).replace("|", r"\|")
  return "".join(parts)


def _escape_text(app, what, name, obj, options, lines):
  """Escapes the docstring's prose (not its doctests or literal blocks).
  A value's docstring that is its built-in type's (a tuple's, a dict's) is
  not the value's own, and is dropped."""
  if what in ("data", "attribute") and type(obj).__module__ == "builtins" \
      and type(obj).__doc__ \
      and "\n".join(lines).strip() == inspect.cleandoc(type(obj).__doc__):
    lines[:] = []
    return
  literal_indent = None
  doctest = False
  for i, line in enumerate(lines):
    stripped = line.lstrip()
    indent = len(line) - len(stripped)
    if literal_indent is not None:
      if stripped and indent <= literal_indent:
        literal_indent = None
      else:
        continue
    if doctest:
      if not stripped:
        doctest = False
      continue
    if stripped.startswith(">>>"):
      doctest = True
      continue
    lines[i] = _plain(line)
    if line.rstrip().endswith("::"):
      literal_indent = indent


_RAW = "se_jax_raw_docstring"


def _keep_raw(app, what, name, obj, options, lines):
  # Napoleon reads an attribute docstring "X: Y" as type X; these are prose.
  if what in ("data", "attribute"):
    app.env.temp_data[_RAW] = list(lines)


def _restore_raw(app, what, name, obj, options, lines):
  raw = app.env.temp_data.pop(_RAW, None)
  if raw is not None and what in ("data", "attribute"):
    lines[:] = raw


def setup(app):
  global _FIELDS
  _FIELDS = _field_names()
  app.connect("autodoc-skip-member", _skip_fields)
  app.connect("autodoc-process-docstring", _escape_text, priority=50)
  app.connect("autodoc-process-docstring", _keep_raw, priority=100)
  app.connect("autodoc-process-docstring", _restore_raw, priority=900)
  app.add_role("se_jax_loose", _LooseRole())
  app.config.default_role = "se_jax_loose"
  app.connect("env-updated", _add_reexports)
  # After every domain has tried, before the missing-reference warning.
  app.connect("missing-reference", _resolve_loose, priority=900)
  app.connect("build-finished",
              lambda app, exc: shutil.rmtree(_JAX_CACHE, ignore_errors=True))
  return {"parallel_read_safe": True, "parallel_write_safe": True}
