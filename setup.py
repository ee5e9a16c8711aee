"""Installs hk_rnn: recurrent networks for JAX, as Haiku modules.

The optional compiled CPU kernels (``csrc/cpu_rnn.cc``: LSTM and GRU
sequences on XLA's thread pool, hk_rnn/_src/kernels/compiled.py) build when
jaxlib, whose XLA FFI headers they include, is installed in the running
environment and a C++17 compiler is present: ``python setup.py build_ext
--inplace``. They need no other library; a failed build is a warning, and
the XLA engine runs instead.
Without it the package is pure Python.
"""

import importlib.util
import os

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


def _cpu_kernel_extensions():
  """The compiled CPU kernels, or none when jaxlib's headers are missing."""
  jaxlib = importlib.util.find_spec("jaxlib")
  if jaxlib is None:
    return []
  ffi_include = os.path.join(os.path.dirname(jaxlib.origin), "include")
  if not os.path.exists(os.path.join(ffi_include, "xla", "ffi", "api")):
    return []
  return [
    setuptools.Extension(
      "hk_rnn._src.kernels._cpu_rnn",
      sources=["csrc/cpu_rnn.cc"],
      language="c++",
      # The SIMD code is compiled for AVX-512 and for AVX2 through function
      # attributes and picked at run time: no -march here. -ffp-contract:
      # multiply-adds become FMAs (ISO C++ mode would forbid it).
      extra_compile_args=[
        "-std=c++17",
        "-O3",
        "-g0",
        "-ffp-contract=fast",
        "-fvisibility=hidden",
        "-Wno-psabi",
        f"-isystem{ffi_include}",
      ],
      extra_link_args=["-s"],
      optional=True,
    )
  ]


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
  ext_modules=_cpu_kernel_extensions(),
)
