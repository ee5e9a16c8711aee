"""Runs the `>>>` examples in a package's docstrings under Bazel, as pytest does.

`bazel test //hk_rnn:doctest` runs this with the package directory as its
argument. pytest collects the docstring examples with the same configuration
(`pyproject.toml`: option flags, import mode) as the pytest run outside
Bazel, so an example passes or fails the same way in both.
"""

import os
import sys

import pytest

# pytest's exit status when it collected nothing.
_NO_TESTS_COLLECTED = 5


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(f"usage: {argv[0]} PACKAGE_DIR...", file=sys.stderr)
    return 2
  status = pytest.main(
    [
      "-c",
      "pyproject.toml",
      "--doctest-modules",
      # Runfiles are not the source tree: write no .pytest_cache there.
      "-p",
      "no:cacheprovider",
      # Bazel's XML report: one <testcase> per docstring.
      "--junitxml",
      os.environ.get("XML_OUTPUT_FILE", os.devnull),
      *argv[1:],
    ]
  )
  if status == _NO_TESTS_COLLECTED:
    # A doctest target that finds nothing would pass forever unnoticed.
    print(
      f"pytest_doctest: no docstring examples found under {argv[1:]}",
      file=sys.stderr,
    )
  return int(status)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
