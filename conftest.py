"""pytest set-up shared by every test file.

Most of the suite's time is XLA compiling small programs, many of them the
same program traced again by another test. A persistent compilation cache
(keyed by the program, so never stale) lets each be compiled once per
machine; set JAX_COMPILATION_CACHE_DIR to choose where it lives.
"""

import os
import tempfile

import jax

jax.config.update(
  "jax_compilation_cache_dir",
  os.environ.get(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "hk_rnn_jax_cache"),
  ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
