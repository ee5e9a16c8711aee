"""Runs the code of docs/migrating.md, block by block, as a user would.

Each ```python block of the page is a whole program that checks its own
results (``np.testing.assert_allclose`` against the other framework); a
block is skipped when the framework it imports is not installed.
"""

import importlib.util
import os
import re

from absl.testing import absltest, parameterized

PAGE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  "docs",
  "migrating.md",
)
FRAMEWORKS = ("torch", "flax", "keras")


def _blocks():
  """``(section title, code)`` of every python block, in page order."""
  with open(PAGE, encoding="utf-8") as page:
    text = page.read()
  blocks, section = [], None
  for part in re.split(
    r"(^## [^\n]*$|^```python\n.*?^```$)", text, flags=re.M | re.S
  ):
    if part.startswith("## "):
      section = part[3:].strip()
    elif part.startswith("```python"):
      blocks.append((section, part[len("```python\n") : -len("```")]))
  return blocks


class MigratingGuideTest(parameterized.TestCase):
  def test_every_section_has_an_example(self):
    sections = [section for section, _ in _blocks()]
    self.assertEqual(
      sections, ["From PyTorch", "From Flax", "From Haiku", "From Keras"]
    )

  @parameterized.named_parameters(
    (section.replace(" ", "_").lower(), code) for section, code in _blocks()
  )
  def test_example_runs(self, code):
    for framework in FRAMEWORKS:
      if re.search(rf"^import {framework}\b", code, re.M) and (
        importlib.util.find_spec(framework) is None
      ):
        self.skipTest(f"needs {framework}")
    exec(compile(code, PAGE, "exec"), {"__name__": "__migrating__"})


if __name__ == "__main__":
  absltest.main()
