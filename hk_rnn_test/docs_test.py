"""Runs the ``>>>`` examples of the documentation pages under docs/."""

import doctest
import os

from absl.testing import absltest, parameterized

DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
# The pages whose examples are written to run; every example on them must.
PAGES = ("naming.md",)


class DocsTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (page.removesuffix(".md"), page) for page in PAGES
  )
  def test_examples_run(self, page):
    result = doctest.testfile(
      os.path.join(DOCS, page),
      module_relative=False,
      optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
      verbose=False,
    )
    self.assertGreater(result.attempted, 0, f"{page} has no examples")
    self.assertEqual(result.failed, 0, f"{page}: see the failures above")


if __name__ == "__main__":
  absltest.main()
