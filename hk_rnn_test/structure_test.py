"""The source tree's own rules, read from the files with ``ast``.

* No two modules under ``hk_rnn/`` define the same private name at module
  level (a ``_function``, ``_Class`` or ``_CONSTANT``): one name, one place,
  so that a search for a helper finds the one it means.
* No test file imports another test file: code two tests share lives in a
  helper module of its own (``test_utils.py``, ``interop_helpers.py``, ...).
"""

import ast
import collections
import os

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TESTS = os.path.join(_ROOT, "hk_rnn_test")


def _python_files(directory: str) -> list[str]:
  """Every ``.py`` file under ``directory``, as paths from the repository."""
  found = []
  for parent, _, names in os.walk(directory):
    found += [
      os.path.relpath(os.path.join(parent, name), _ROOT)
      for name in names
      if name.endswith(".py")
    ]
  return sorted(found)


def _parse(path: str) -> ast.Module:
  with open(os.path.join(_ROOT, path), encoding="utf-8") as file:
    return ast.parse(file.read(), filename=path)


def _bound_names(target: ast.expr) -> list[str]:
  """The names an assignment target binds (``a``, ``a, b``, ``(a, *b)``)."""
  if isinstance(target, ast.Name):
    return [target.id]
  if isinstance(target, (ast.Tuple, ast.List)):
    return [name for item in target.elts for name in _bound_names(item)]
  if isinstance(target, ast.Starred):
    return _bound_names(target.value)
  return []


def module_private_names(tree: ast.Module) -> set[str]:
  """The private names a module defines at module level.

  Functions, classes and assignments at the top level, or inside a
  top-level ``if``/``try``/``with`` (still module level); not imports, and
  not dunder names (``__all__``, ``__version__``).
  """
  names = set()
  statements = list(tree.body)
  while statements:
    statement = statements.pop()
    if isinstance(
      statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    ):
      names.add(statement.name)
    elif isinstance(statement, ast.Assign):
      for target in statement.targets:
        names.update(_bound_names(target))
    elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
      names.update(_bound_names(statement.target))
    elif isinstance(statement, (ast.If, ast.With, ast.Try)):
      for field in ("body", "orelse", "finalbody"):
        statements += getattr(statement, field, [])
      for handler in getattr(statement, "handlers", []):
        statements += handler.body
  return {
    name
    for name in names
    if name.startswith("_")
    and not (name.startswith("__") and name.endswith("__"))
  }


def private_name_collisions() -> dict[str, tuple[str, ...]]:
  """Each private name that more than one ``hk_rnn/`` module defines."""
  modules = collections.defaultdict(list)
  for path in _python_files(os.path.join(_ROOT, "hk_rnn")):
    for name in module_private_names(_parse(path)):
      modules[name].append(path)
  return {
    name: tuple(sorted(paths))
    for name, paths in sorted(modules.items())
    if len(paths) > 1
  }


def imported_test_modules(tree: ast.Module) -> list[str]:
  """The test modules (``hk_rnn_test/*_test.py``) that a module imports.

  Imports in strings that parse as Python count too: a script a test runs
  in a subprocess (``python -c``) imports as the test would.
  """

  def is_test(name):
    last = name.rsplit(".", 1)[-1]
    return last.endswith("_test") and os.path.isfile(
      os.path.join(_TESTS, f"{last}.py")
    )

  imported = []
  for node in ast.walk(tree):
    if (
      isinstance(node, ast.Constant)
      and isinstance(node.value, str)
      and "import" in node.value
    ):
      try:
        imported += imported_test_modules(ast.parse(node.value))
      except SyntaxError:
        pass  # prose, not a script
    elif isinstance(node, ast.Import):
      imported += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      imported.append(base)
      imported += [f"{base}.{alias.name}".lstrip(".") for alias in node.names]
  return sorted({name for name in imported if is_test(name)})


class StructureTest(absltest.TestCase):
  def test_reads_the_library_and_the_tests(self):
    # Under Bazel the files come from the runfiles: an empty walk would
    # pass every check below.
    library = _python_files(os.path.join(_ROOT, "hk_rnn"))
    self.assertContainsSubset(
      ["hk_rnn/__init__.py", "hk_rnn/interop.py"], library
    )
    self.assertGreater(len(library), 10)
    self.assertIn("hk_rnn_test/structure_test.py", _python_files(_TESTS))

  def test_no_private_name_is_defined_in_two_modules(self):
    collisions = private_name_collisions()
    self.assertEmpty(
      collisions,
      "private names defined in more than one module under hk_rnn/ (rename "
      "one, or move the helper to one module and import it from there): "
      + "; ".join(
        f"{name} in {', '.join(paths)}" for name, paths in collisions.items()
      ),
    )

  def test_collision_finder_sees_every_kind_of_definition(self):
    tree = ast.parse(
      "import os as _os\n"
      "_A = 1\n"
      "_b: int = 2\n"
      "_c, (_d, *_e) = 1, (2, 3)\n"
      "def _f(): _inner = 1\n"
      "class _G:\n"
      "  _attribute = 1\n"
      "if True:\n"
      "  _h = 1\n"
      "try:\n"
      "  import _i\n"
      "except ImportError:\n"
      "  _i = None\n"
      "__all__ = ()\n"
      "public = 1\n"
    )
    self.assertEqual(
      module_private_names(tree),
      {"_A", "_b", "_c", "_d", "_e", "_f", "_G", "_h", "_i"},
    )

  def test_test_import_finder_sees_every_form(self):
    tree = ast.parse(
      "import hk_rnn_test.examples_test\n"
      "from hk_rnn_test import rnn_test, test_utils\n"
      "from hk_rnn_test.dropout_test import FEATURES\n"
      "from hk_rnn_test.rnn_helpers import FEATURES\n"
      "import hk_rnn_test\n"
      "def f():\n"
      "  import cells_test\n"
      "script = 'from hk_rnn_test.fused_test import f\\nf()\\n'\n"
      "prose = 'this does not import anything'\n"
    )
    self.assertEqual(
      imported_test_modules(tree),
      [
        "cells_test",
        "hk_rnn_test.dropout_test",
        "hk_rnn_test.examples_test",
        "hk_rnn_test.fused_test",
        "hk_rnn_test.rnn_test",
      ],
    )

  def test_no_test_file_imports_another(self):
    offenders = {}
    this_file = os.path.relpath(os.path.abspath(__file__), _ROOT)
    for path in _python_files(_TESTS):
      # This file's own samples, above, are imports in strings.
      if path.endswith("_test.py") and path != this_file:
        imported = imported_test_modules(_parse(path))
        if imported:
          offenders[path] = imported
    self.assertEmpty(
      offenders,
      "test files that import test modules (move the shared code into a "
      f"helper module of its own, such as test_utils.py): {offenders}",
    )


if __name__ == "__main__":
  absltest.main()
