"""Runs every Python example of the documentation's guides and the README.

Each page's ```python blocks run in page order in one namespace, as a
reader pasting them one after another would run them. A block of ``>>>``
lines runs as a doctest (what it prints must match, with pyproject.toml's
option flags); any other block runs as a script. Code that is not meant to
run is fenced as ```text (or ```bash for commands).
"""

import doctest
import glob
import importlib.util
import os
import re
import tempfile

from absl.testing import absltest, parameterized

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
# Frameworks a page may compare against (the migration guide); a block that
# imports one that is not installed is skipped, as the oracle tests are.
_OPTIONAL = ("torch", "flax", "keras")


def _missing_framework(code: str) -> str | None:
  for framework in _OPTIONAL:
    imported = re.search(rf"^(import|from) {framework}\b", code, re.M)
    if imported and importlib.util.find_spec(framework) is None:
      return framework
  return None


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


# The pages that hold Python examples.
_PAGES = [
  path
  for path in sorted(glob.glob(os.path.join(_REPO, "docs", "*.md")))
  + [os.path.join(_REPO, "README.md")]
  if _BLOCK.search(_read(path))
]


def python_blocks(text: str) -> list[tuple[int, str]]:
  """``(line, code)`` of each ```python block, ``line`` 1-based."""
  return [
    (text.count("\n", 0, match.start(1)) + 1, match.group(1))
    for match in _BLOCK.finditer(text)
  ]


def run_page(path: str) -> list[str]:
  """Runs a page's blocks; returns one report per failing block."""
  text = _read(path)
  name = os.path.relpath(path, _REPO)
  namespace = {"__name__": f"docs_{os.path.basename(path)[:-3]}"}
  failures = []
  for line, code in python_blocks(text):
    where = f"{name}:{line}"
    if _missing_framework(code):
      continue
    if code.lstrip().startswith(">>>"):
      test = doctest.DocTestParser().get_doctest(
        code, namespace, where, path, line - 1
      )
      report = []
      runner = doctest.DocTestRunner(optionflags=_FLAGS)
      runner.run(test, out=report.append, clear_globs=False)
      namespace.update(test.globs)  # DocTest runs in a copy of them
      if runner.failures:
        failures.append("".join(report))
    else:
      try:
        exec(compile(code, where, "exec"), namespace)  # noqa: S102
      except Exception as error:  # noqa: BLE001 - reported with its place
        failures.append(f"{where}: {type(error).__name__}: {error}")
  return failures


class BlocksTest(absltest.TestCase):
  def page(self, text: str) -> str:
    """A page holding ``text`` in a temporary folder, removed afterwards."""
    folder = tempfile.TemporaryDirectory()
    self.addCleanup(folder.cleanup)
    path = os.path.join(folder.name, "page.md")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    return path

  def test_finds_blocks_and_their_lines(self):
    text = "intro\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n>>> 1\n1\n```\n"
    self.assertEqual(python_blocks(text), [(3, "x = 1\n"), (9, ">>> 1\n1\n")])

  def test_a_wrong_output_or_an_error_is_reported(self):
    path = self.page(
      "```python\n>>> 1 + 1\n3\n```\n\n```python\nraise KeyError('k')\n```\n"
    )
    failures = run_page(path)
    self.assertLen(failures, 2)
    self.assertIn("Expected:\n    3\nGot:\n    2", failures[0])
    self.assertIn("KeyError", failures[1])

  def test_blocks_share_a_namespace(self):
    path = self.page(
      "```python\nx = 41\n```\n\n```python\n>>> x + 1\n42\n```\n"
    )
    self.assertEqual(run_page(path), [])


class PagesTest(parameterized.TestCase):
  def test_the_guides_have_examples(self):
    self.assertGreaterEqual(len(_PAGES), 8, _PAGES)

  def test_the_migration_guide_has_an_example_per_framework(self):
    text = _read(os.path.join(_REPO, "docs", "migrating.md"))
    sections = re.findall(r"^## (From .*)$", text, re.M)
    self.assertEqual(
      sections, ["From PyTorch", "From Flax", "From Haiku", "From Keras"]
    )
    for section in re.split(r"^## From ", text, flags=re.M)[1:]:
      self.assertTrue(python_blocks(section), section.splitlines()[0])

  @parameterized.named_parameters(
    (os.path.relpath(path, _REPO).replace("/", "_").replace(".", "_"), path)
    for path in _PAGES
  )
  def test_examples_run(self, path):
    failures = run_page(path)
    self.assertEmpty(failures, "\n".join(failures))


def _section(text: str, heading: str) -> str:
  """The text under the ``## heading`` that starts with ``heading``."""
  start = text.index(f"\n## {heading}")
  end = text.find("\n## ", start + 1)
  return text[start : None if end < 0 else end]


class DocsSayWhatTheCodeDoesTest(absltest.TestCase):
  """Statements in the guides and docstrings that went stale once."""

  def test_classifier_section_says_how_the_trainer_reads_states(self):
    trainer = _read(os.path.join(_REPO, "examples", "classifier", "train.py"))
    section = _section(
      _read(os.path.join(_REPO, "docs", "examples.md")), "Variable-length"
    )
    self.assertIn("max_segments=", trainer)
    self.assertNotIn("segment_sum", trainer)
    self.assertIn("max_segments", section)
    self.assertNotIn("segment_sum", section)

  def test_packing_round_trip_keeps_unpacking_out_of_the_step(self):
    section = _section(
      _read(os.path.join(_REPO, "docs", "packing.md")), "The round trip"
    )
    # The warning, and the training-loop form (which docs_test runs).
    self.assertRegex(section, r"traced and compiled again for each")
    self.assertRegex(section, r"keeps the placement of the batch it was")
    self.assertIn("segmentation_mask != 0", section)
    self.assertIn("def loss_fn(", section)

  def test_readme_states_the_measured_main_job_time(self):
    for page in ("README.md", os.path.join("docs", "examples.md")):
      text = " ".join(_read(os.path.join(_REPO, page)).split())
      self.assertNotIn("2–3½ minutes", text, page)
      self.assertIn("under a minute on an idle 2-core CPU", text, page)

  def test_public_docstrings_link_guides_and_name_no_private_code(self):
    import inspect

    import hk_rnn
    from hk_rnn import interop

    docstrings = []
    for module in (hk_rnn, interop):
      for name in module.__all__:
        value = getattr(module, name)
        docstrings.append((name, inspect.getdoc(value) or ""))
        if inspect.isclass(value):
          for member, attribute in vars(value).items():
            if callable(attribute) and (
              member in ("__init__", "__call__") or not member.startswith("_")
            ):
              docstrings.append((f"{name}.{member}", attribute.__doc__ or ""))
    for name, text in docstrings:
      self.assertNotRegex(text, r"_src\b|hk_rnn/_src", name)
      # A guide is a Sphinx link (:doc:`... </speed>`), not a path as text.
      self.assertNotRegex(text, r"(?<![</])\bdocs/\w+\.md", name)


if __name__ == "__main__":
  absltest.main()
