"""Runs of the example trainers as their own processes, for the tests.

``run_trainer`` starts ``python -m examples.<name>.train`` as a user would
(on CPU, with a home folder it cannot write, as under Bazel's sandbox);
``TINY_FLAGS`` make each trainer's run last seconds; ``checkpoint_steps``
reads which steps a run saved. examples_test, multiprocess_test and
adding_problem_example_test share them.
"""

import atexit
import functools
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flags small enough for a run of seconds; batch sizes divide by 8 devices.
# The classifier's task is made easy (a 1-symbol frame, 2 symbols, short
# sequences) so that its loss visibly falls within a dozen steps.
TINY_FLAGS = {
  "char_lm": [
    "--max_chars=40000",
    "--eval_chars=4096",
    "--batch_size=8",
    "--seq_length=16",
    "--hidden_size=32",
    "--embed_size=16",
    "--sample_length=0",
  ],
  "addition": [
    "--learning_rate=1e-2",
    "--batch_size=16",
    "--hidden_size=32",
    "--embed_size=8",
    "--eval_size=64",
  ],
  "classifier": [
    "--packing",
    "--learning_rate=3e-2",
    "--frame=1",
    "--num_symbols=2",
    "--median_length=4",
    "--max_length=16",
    "--batch_size=8",
    "--hidden_size=16",
    "--embed_size=8",
    "--eval_size=64",
    "--benchmark_steps=0",
  ],
}

# Runs a trainer as `-m` would, but sends the process SIGTERM (as a cluster
# scheduler does) while it prepares the batch of a given step: the signal
# arrives in the middle of the loop at a known step, whatever the machine's
# speed. argv: trainer name, step, then the trainer's flags.
_SIGTERM_AT_STEP = """
import os, runpy, signal, sys
from examples.common import training
name, at_step = sys.argv[1], int(sys.argv[2])
train = training.train
def signalling_train(**kwargs):
  batch_fn = kwargs.pop("batch_fn")
  def signalling_batch_fn(step):
    if step == at_step:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch_fn(step)
  return train(batch_fn=signalling_batch_fn, **kwargs)
training.train = signalling_train
sys.argv = [sys.argv[0], *sys.argv[3:]]
runpy.run_module(f"examples.{name}.train", run_name="__main__")
"""


@functools.cache
def _unwritable_home():
  """A home folder nothing can create, not even root: it sits under a file.

  Bazel's sandbox gives tests a home they cannot write; every trainer run
  gets one like it, so that what a library logs there shows here too.
  """
  handle, path = tempfile.mkstemp(prefix="hk_rnn_examples_test_")
  os.close(handle)
  atexit.register(os.remove, path)
  return os.path.join(path, "home")


def run_trainer(name, *args, num_devices=None, sigterm_at_step=None):
  """Runs a trainer to completion; returns the finished process.

  The runs share the persistent compilation cache that conftest.py sets up
  (a third of a tiny run is compiling); a cached program is the same
  program, so losses stay bit-identical.
  """
  env = dict(
    os.environ,
    PYTHONPATH=REPO,
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=os.environ.get(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(tempfile.gettempdir(), "hk_rnn_jax_cache"),
    ),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  env.pop("XLA_FLAGS", None)
  for variable in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
    env.pop(variable, None)
  env["HOME"] = _unwritable_home()
  if num_devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  command = [sys.executable, "-m", f"examples.{name}.train"]
  if sigterm_at_step is not None:
    command = [sys.executable, "-c", _SIGTERM_AT_STEP, name, sigterm_at_step]
  return subprocess.run(
    [*command, *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def checkpoint_steps(output_dir):
  """The steps of the checkpoints orbax would see, in order."""
  names = os.listdir(os.path.join(output_dir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())
