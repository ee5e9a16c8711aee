"""Installs hk_rnn: recurrent networks for JAX, as Haiku modules."""

import setuptools

EXTRAS = {
  # The runner (spread over every core with ``-n auto``), oracles the tests
  # compare against (skipped when absent), the linter and hypothesis (the
  # property-based tests).
  "test": [
    "pytest>=7",
    "pytest-xdist>=3",
    "torch>=2.0",
    "flax>=0.8",
    "keras>=3",
    "ruff>=0.5",
    "hypothesis>=6.0",
  ],
  # The example trainers.
  "examples": [
    "optax>=0.1.7",
    "orbax-checkpoint>=0.5",
    "tqdm>=4.60",
    "matplotlib>=3.5",
  ],
  # The side-by-side benchmarks.
  "bench": ["torch>=2.0", "flax>=0.8", "matplotlib>=3.5"],
  # The documentation site (docs/conf.py): Sphinx, Markdown pages, a theme.
  "docs": [
    "sphinx>=8",
    "myst-parser>=4",
    "furo>=2024.8",
    "sphinx-copybutton>=0.5",
  ],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setuptools.setup(
  name="hk_rnn",
  version="0.1.0",
  description="Mask-aware recurrent networks for JAX, as Haiku modules.",
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  packages=setuptools.find_packages(include=["hk_rnn", "hk_rnn.*"]),
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.4.30",
    "dm-haiku>=0.0.12",
    "numpy>=1.24",
    "absl-py>=1.0",
  ],
  extras_require=EXTRAS,
)
