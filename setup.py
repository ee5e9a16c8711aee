"""Installs hk_rnn: recurrent networks for JAX, as Haiku modules.

The optional oneDNN extension (``csrc/onednn_lstm.cc``, LSTMs on CPU
through oneDNN's RNN primitive) builds only when its inputs are installed
in the running environment: jaxlib (the XLA FFI headers) and the
``onednn`` extra's headers and library. ``pip install -e ".[onednn]"``
installs them; ``python setup.py build_ext --inplace`` then builds it (see
docs/performance.md). Without them the package is pure Python.
"""

import importlib.util
import os
import sys

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
# Build inputs of the optional oneDNN extension (not in "all": 160 MB, and
# only useful with a C++ compiler). The newer PyPI ``onednn`` is a SYCL
# build whose CPU engine fails without a SYCL device.
EXTRAS["onednn"] = [
  "onednn-cpu-gomp>=2023.2,<2024",
  "onednn-devel-cpu-gomp>=2023.2,<2024",
]


def _onednn_extensions():
  """The oneDNN extension, or none when its build inputs are missing."""
  jaxlib = importlib.util.find_spec("jaxlib")
  include = os.path.join(sys.prefix, "include")
  library = os.path.join(sys.prefix, "lib")
  if jaxlib is None or not os.path.exists(
    os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")
  ):
    return []
  ffi_include = os.path.join(os.path.dirname(jaxlib.origin), "include")
  return [
    setuptools.Extension(
      "hk_rnn._src.kernels._onednn_lstm",
      sources=["csrc/onednn_lstm.cc"],
      language="c++",
      # -isystem: the XLA and oneDNN headers' own warnings are not ours.
      extra_compile_args=[
        "-std=c++17",
        "-O2",
        "-g0",
        "-fvisibility=hidden",
        "-fopenmp",
        f"-isystem{ffi_include}",
        f"-isystem{include}",
      ],
      library_dirs=[library],
      libraries=["dnnl"],
      # The wheel puts libdnnl.so.3 in the environment's lib folder, which
      # the dynamic loader does not search by default.
      extra_link_args=[f"-Wl,-rpath,{library}", "-s", "-fopenmp"],
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
  ext_modules=_onednn_extensions(),
)
