"""Sphinx configuration of hk_rnn's documentation site.

Build it (offline) from the repository root:

    venv/bin/pip install -q -e ".[docs]" -c constraints.txt
    venv/bin/sphinx-build -E -W --keep-going -b html docs docs/_build/html

(``-E`` rereads every page, so that warnings of unchanged pages, errors
under ``-W``, are not hidden by an earlier build.)

The API reference is generated on every build from ``hk_rnn.__all__`` and
from the ``__all__`` of each public submodule (``hk_rnn.interop`` and any
later one): one page per public name under ``docs/api/`` (written by
:func:`write_api_pages`, git-ignored), so a name added to ``__all__`` appears
without editing the docs. Guides are the Markdown pages beside this file;
one that no toctree lists is appended to the index's "Guides" toctree.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import re
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
API = os.path.join(DOCS, "api")
sys.path.insert(0, ROOT)

import haiku as hk  # noqa: E402
from docutils import nodes  # noqa: E402
from sphinx.ext.autodoc import preserve_defaults  # noqa: E402
from sphinx.util.inspect import stringify_signature  # noqa: E402

import hk_rnn  # noqa: E402

project = "hk_rnn"
author = "the hk_rnn authors"
copyright = "the hk_rnn authors"  # noqa: A001 - Sphinx's name
release = version = hk_rnn.__version__

extensions = [
  "myst_parser",
  "sphinx_copybutton",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
# Every reference must resolve: a misspelt :class:, :func: or page link is a
# warning, and the build (``-W``) fails on it. Names from other libraries
# are not documented here and are not checked (there is no network for
# their inventories).
nitpicky = True
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|jaxlib|haiku|hk|numpy|np|jnp|optax|torch|flax|keras)\b.*"),
  (r"py:.*", r"(typing|collections\.abc|types)\..*"),
  # Private helpers in signatures (``DropoutMasks``); public names are
  # resolved through ``hk_rnn`` by :func:`resolve_private_reference`.
  (r"py:.*", r"hk_rnn\._src\..*"),
  # Type aliases of the private modules (``Array``, ``Carry``, ...).
  (
    r"py:.*",
    r"(Array|Carry|PyTree|Initializer|Layer|Shape|DType|Any|Callable)",
  ),
]

# MyST: ``$...$`` math and ```{math}``` blocks in the guides, heading anchors
# for links such as ``padding.md#reverse``.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# autodoc: signatures from ``__init__``, the class and ``__init__`` docstrings
# together (the equations, then the arguments), members in source order.
autoclass_content = "both"
autodoc_member_order = "bysource"
# Types go in the argument list, keeping signatures to names and defaults.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# MathJax is read from its CDN by the browser; HK_RNN_DOCS_MATHJAX points the
# pages at a local copy instead (to read them with no network).
if os.environ.get("HK_RNN_DOCS_MATHJAX"):
  mathjax_path = os.environ["HK_RNN_DOCS_MATHJAX"]

# The copy button copies the code of a ``>>>`` example without its prompts
# or its printed output, ready to paste.
copybutton_prompt_text = r">>> |\.\.\. "
copybutton_prompt_is_regexp = True
copybutton_exclude = ".linenos, .gp, .go"

html_theme = "furo"
html_title = f"hk_rnn {release}"
html_static_path = ["_static"]
html_css_files = ["hk_rnn.css"]
html_show_sourcelink = False
pygments_style = "friendly"
pygments_dark_style = "monokai"


# --- The API reference, from ``__all__`` --------------------------------

GROUPS = (
  ("Cells", "One step of a recurrent network, and the base class."),
  ("Layers", "Modules that run a cell over whole sequences."),
  ("Haiku cores", "``hk.RNNCore`` modules, for Haiku's own unrolls."),
  ("Functions", "Pure functions on sequences, masks and batches."),
  ("Data types", "What the functions above return and take."),
)


def public_modules() -> list[tuple[str, object]]:
  """``hk_rnn`` and each of its public submodules that has ``__all__``."""
  modules = [("hk_rnn", hk_rnn)]
  for info in pkgutil.iter_modules(hk_rnn.__path__):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"hk_rnn.{info.name}")
    if hasattr(module, "__all__"):
      modules.append((module.__name__, module))
  return modules


def documented_names(module) -> list[str]:
  """``module.__all__`` less submodules, which get sections of their own."""
  return [
    name
    for name in module.__all__
    if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
  ]


def group_of(value: object) -> str:
  if inspect.isclass(value):
    if issubclass(value, hk_rnn.RNNCellBase):
      return "Cells"
    if issubclass(value, hk.RNNCore):
      return "Haiku cores"
    if issubclass(value, hk.Module):
      return "Layers"
    return "Data types"
  if inspect.isfunction(value) or inspect.isbuiltin(value):
    return "Functions"
  return "Data types"


def page_text(module_name: str, name: str, value: object) -> str:
  """The reST of one name's page: its title, then autodoc's entry."""
  full = f"{module_name}.{name}"
  lines = [full, "=" * len(full), "", f".. currentmodule:: {module_name}", ""]
  if inspect.isclass(value):
    lines.append(f".. autoclass:: {name}")
    # Members a user calls: the step or the call, and those inherited from
    # hk_rnn's own bases (not hk.Module's).
    lines.append("   :special-members: __call__")
    lines.append("   :inherited-members: Module")
  elif callable(value):
    lines.append(f".. autofunction:: {name}")
  else:
    lines.append(f".. autodata:: {name}")
  return "\n".join(lines) + "\n"


def index_text(modules: list[tuple[str, object]]) -> str:
  """The reST of the reference's index: a summary table per group."""
  lines = [
    "API reference",
    "=============",
    "",
    "Every public name, generated from the docstrings. ``import hk_rnn`` "
    "gives all of ``hk_rnn.*``"
    + "".join(
      f"; ``import {module_name}`` gives ``{module_name}.*``"
      for module_name, _ in modules[1:]
    )
    + ". Modules are used inside ``hk.transform``, as any Haiku module is.",
    "",
  ]
  pages = []
  for module_name, module in modules:
    names = documented_names(module)
    if module_name != "hk_rnn":
      title = f"``{module_name}``"
      lines += [title, "-" * len(title), ""]
      doc = inspect.getdoc(module) or ""
      if doc:
        lines += [doc.split("\n\n")[0], ""]
      groups = [(None, names)]
    else:
      groups = [
        (
          (title, blurb),
          [n for n in names if group_of(getattr(module, n)) == title],
        )
        for title, blurb in GROUPS
      ]
    for group, members in groups:
      if not members:
        continue
      if group is not None:
        title, blurb = group
        lines += [title, "-" * len(title), "", blurb, ""]
      lines += [f".. currentmodule:: {module_name}", ""]
      lines += [".. autosummary::", "   :nosignatures:", ""]
      lines += [f"   {name}" for name in members]
      lines.append("")
      pages += [f"{module_name}.{name}" for name in members]
  lines += [".. toctree::", "   :hidden:", ""]
  lines += [f"   {page}" for page in pages]
  return "\n".join(lines) + "\n"


def write_api_pages(app=None) -> None:
  """Writes ``docs/api/``: the index and one page per public name.

  Files are rewritten only when their text changes (so incremental builds
  stay incremental) and pages of names no longer public are removed.
  """
  del app
  os.makedirs(API, exist_ok=True)
  modules = public_modules()
  wanted = {"index.rst": index_text(modules)}
  for module_name, module in modules:
    for name in documented_names(module):
      wanted[f"{module_name}.{name}.rst"] = page_text(
        module_name, name, getattr(module, name)
      )
  for file_name in os.listdir(API):
    if file_name not in wanted:
      os.remove(os.path.join(API, file_name))
  for file_name, text in wanted.items():
    path = os.path.join(API, file_name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        if f.read() == text:
          continue
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)


# --- Guides that no toctree lists yet -----------------------------------

_TOCTREE = re.compile(r"^```\{toctree\}\n(.*?)^```", re.M | re.S)


def unlisted_guides() -> list[str]:
  """Top-level pages that no page's toctree lists, in name order."""
  listed = {"index"}
  for file_name in os.listdir(DOCS):
    if file_name.endswith(".md"):
      with open(os.path.join(DOCS, file_name), encoding="utf-8") as f:
        for block in _TOCTREE.findall(f.read()):
          listed.update(
            line.strip() for line in block.splitlines() if line.strip()
          )
  return sorted(
    name[: -len(".md")]
    for name in os.listdir(DOCS)
    if name.endswith(".md") and name[: -len(".md")] not in listed
  )


def add_unlisted_guides(app, docname, source) -> None:
  """Appends unlisted pages to the index's "Guides" toctree."""
  del app
  if docname != "index":
    return
  extra = unlisted_guides()
  if extra:
    marker = ":caption: Guides\n"
    head, found, tail = source[0].partition(marker)
    if found:
      body, fence, rest = tail.partition("```")
      source[0] = head + found + body + "\n".join(extra) + "\n" + fence + rest


# --- Private names in signatures and bases ------------------------------


def public_name(target: str) -> str | None:
  """``hk_rnn.X`` for a private path or module alias that ends in ``X``.

  Type hints spell classes as the private modules see them
  (``rnn_lib.RNN``, ``hk_rnn._src.cells.RNNCellBase``); the reference
  documents them under their public name.
  """
  name = target.rsplit(".", 1)[-1]
  if target != f"hk_rnn.{name}" and name in hk_rnn.__all__:
    return f"hk_rnn.{name}"
  return None


def resolve_private_reference(app, env, node, contnode):
  """Resolves ``py`` references to private paths through the public name."""
  if node.get("refdomain") != "py":
    return None
  target = public_name(node.get("reftarget", ""))
  if target is None:
    return None
  # Show the public name too: ``RNNCellBase``, not ``cells_lib.RNNCellBase``.
  if contnode.astext() == node.get("reftarget"):
    contnode = contnode.deepcopy()
    contnode.children = [nodes.Text(target.removeprefix("hk_rnn."))]
  domain = env.domains["py"]
  return domain.resolve_xref(
    env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
  )


def public_bases(app, name, obj, options, bases) -> None:
  """Shows a class's nearest public ancestors, not private helpers."""
  del app, name, obj, options
  public = []
  for base in bases:
    while base.__module__.startswith("hk_rnn") and (
      base.__name__ not in hk_rnn.__all__
    ):
      base = base.__bases__[0]
    if base.__module__ != "abc" and base not in public:
      public.append(base)
  bases[:] = public


def module_signature(app, what, name, obj, options, signature, annotation):
  """A Haiku module's signature from its ``__init__``, defaults as written.

  Haiku's metaclass gives every module a ``__signature__`` whose defaults
  are the values' reprs (``<PjitFunction of <function sigmoid ...>>``);
  this shows ``gate_fn=jax.nn.sigmoid`` instead.
  """
  del what, name, options
  if not (inspect.isclass(obj) and issubclass(obj, hk.Module)):
    return None
  init = obj.__init__
  preserve_defaults.update_defvalue(app, init, False)
  parameters = list(inspect.signature(init).parameters.values())[1:]
  show = app.config.autodoc_typehints not in ("description", "none")
  text = stringify_signature(
    inspect.Signature(parameters),
    show_annotation=show,
    show_return_annotation=False,
    unqualified_typehints=True,
  )
  return text, annotation


# Haiku's own docstring of ``hk.Module.__init__``, which a class without an
# ``__init__`` docstring would otherwise inherit into its page.
_MODULE_INIT_DOC = inspect.getdoc(hk.Module.__init__).splitlines()[0]


def drop_haiku_init_doc(app, what, name, obj, options, lines) -> None:
  del app, name, obj, options
  if what == "class" and lines and lines[0] == _MODULE_INIT_DOC:
    lines.clear()


def setup(app):
  app.connect("autodoc-process-signature", module_signature)
  app.connect("autodoc-process-docstring", drop_haiku_init_doc)
  app.connect("builder-inited", write_api_pages)
  app.connect("source-read", add_unlisted_guides)
  app.connect("missing-reference", resolve_private_reference)
  app.connect("autodoc-process-bases", public_bases)
