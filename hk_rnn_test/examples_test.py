"""End-to-end tests of the example trainers, each run as its own process.

Every trainer runs as `python -m examples.<name>.train` with tiny flags, as a
user would run it: absl flags are process-global (the trainers share flag
names), and XLA reads `--xla_force_host_platform_device_count` only at
start-up, so a subprocess per run is the honest way to test both.
"""

import atexit
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest, parameterized

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEPS, _HALF = 12, 6

# Flags small enough for a run of seconds; batch sizes divide by 8 devices.
# The classifier's task is made easy (a 1-symbol frame, 2 symbols, short
# sequences) so that its loss visibly falls within a dozen steps.
_TINY_FLAGS = {
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
# What runs after training (sampling, the packing benchmark) cannot change
# the losses; the reference run alone exercises it, to keep the others short.
_REFERENCE_FLAGS = {
  "char_lm": ["--sample_length=20"],
  "addition": [],
  "classifier": ["--benchmark_steps=2"],
}
_REFERENCE_FILES = {
  "char_lm": ["sample.txt"],
  "addition": [],
  "classifier": ["benchmark.json"],
}
_TRAINERS = [(name,) for name in _TINY_FLAGS]

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
# The exit status of a run stopped by a signal (training.EXIT_PREEMPTED).
_EXIT_PREEMPTED = 75
# The trainers' own source files: the absl lines they log name one of them.
_TRAINER_FILES = frozenset(
  os.path.basename(path)
  for path in glob.glob(
    os.path.join(_REPO, "examples", "**", "*.py"), recursive=True
  )
)
_ABSL_RECORD = re.compile(r"^[DIWEF]\d{4} \S+\s+\d+ ([^:\s]+):\d+\] ")


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
    PYTHONPATH=_REPO,
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
    cwd=_REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def train_losses(
  name, output_dir, *args, num_devices=None, expect_status=0, **kwargs
):
  """Trains with the tiny flags; returns {step: train loss} from the JSONL.

  With `stderr=True` among the keyword arguments, returns the losses and the
  process's stderr; other keyword arguments go to `run_trainer`.
  """
  with_stderr = kwargs.pop("stderr", False)
  process = run_trainer(
    name,
    *_TINY_FLAGS[name],
    f"--output_dir={output_dir}",
    f"--eval_every={_HALF}",
    "--log_every=1",
    *args,
    num_devices=num_devices,
    **kwargs,
  )
  if process.returncode != expect_status:
    raise AssertionError(
      f"{name} exited with {process.returncode}, not {expect_status}:\n"
      f"{process.stderr[-5000:]}"
    )
  # Read directly rather than through examples.common: under a bare `pytest`
  # the repo is not on sys.path, and site-packages may hold an `examples`.
  with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  losses = {}
  for record in records:
    if record["split"] == "train":
      assert record["step"] not in losses, f"step {record['step']} twice"
      losses[record["step"]] = record["loss"]
  return (losses, process.stderr) if with_stderr else losses


def checkpoint_steps(output_dir):
  """The steps of the checkpoints orbax would see, in order."""
  names = os.listdir(os.path.join(output_dir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def largest_file(step_dir):
  """The checkpoint's largest file (its biggest array chunks)."""
  files = glob.glob(os.path.join(step_dir, "**"), recursive=True)
  return max((f for f in files if os.path.isfile(f)), key=os.path.getsize)


def error_lines(stderr):
  """The trainer's own absl ERROR and WARNING lines, and what follows each.

  Lines that libraries log (matplotlib, JAX, orbax) are left out: the tests
  count what the trainer says, whatever else the machine prints.
  """
  lines, own = [], False
  for line in stderr.splitlines():
    record = _ABSL_RECORD.match(line)
    if record:
      own = line[0] in "EW" and record[1] in _TRAINER_FILES
    elif not line.startswith(" "):
      own = False
    if own and line.strip():
      lines.append(line)
  return lines


def assert_no_library_noise(test, stderr):
  """No warning from matplotlib's config folder (Bazel's unwritable home)."""
  test.assertNotIn("atplotlib", stderr)


class TrainerTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  @classmethod
  @functools.cache
  def _reference(cls, name):
    """The uninterrupted one-device run, shared by the tests that need it.

    It saves checkpoints at steps _HALF and _STEPS, for the tests of damaged
    checkpoints (which damage copies).
    """
    output_dir = os.path.join(cls._tmp.name, f"{name}_reference")
    losses = train_losses(
      name,
      output_dir,
      f"--num_steps={_STEPS}",
      f"--checkpoint_every={_HALF}",
      *_REFERENCE_FLAGS[name],
    )
    return output_dir, losses

  @parameterized.parameters(_TRAINERS)
  def test_loss_falls(self, name):
    output_dir, losses = self._reference(name)
    self.assertEqual(sorted(losses), list(range(1, _STEPS + 1)))
    first = sum(losses[s] for s in (1, 2, 3)) / 3
    last = sum(losses[s] for s in range(_STEPS - 2, _STEPS + 1)) / 3
    self.assertLess(last, 0.9 * first)
    for filename in ("curves.png", "config.json", *_REFERENCE_FILES[name]):
      self.assertTrue(os.path.exists(os.path.join(output_dir, filename)))

  @parameterized.parameters(_TRAINERS)
  def test_resume_continues_exactly(self, name):
    _, reference = self._reference(name)
    output_dir = os.path.join(tempfile.mkdtemp(dir=self._tmp.name), "run")
    first = train_losses(name, output_dir, f"--num_steps={_HALF}")
    self.assertEqual(sorted(first), list(range(1, _HALF + 1)))
    resumed = train_losses(
      name, output_dir, f"--num_steps={_STEPS}", "--resume"
    )
    # The metrics file holds each step once, and every loss is bit-identical.
    self.assertEqual(resumed, reference)

  def test_sigterm_saves_and_resume_continues_exactly(self):
    # The smallest trainer stands for all three: they share this loop.
    _, reference = self._reference("addition")
    output_dir = os.path.join(tempfile.mkdtemp(dir=self._tmp.name), "run")
    # The signal arrives while step 5 (counting from 1) is being prepared: that
    # step finishes and is saved, and the process exits with its own status.
    first, stderr = train_losses(
      "addition",
      output_dir,
      f"--num_steps={_STEPS}",
      sigterm_at_step="4",
      expect_status=_EXIT_PREEMPTED,
      stderr=True,
    )
    self.assertEqual(sorted(first), [1, 2, 3, 4, 5])
    self.assertEqual(checkpoint_steps(output_dir), [5])
    self.assertIn("SIGTERM: stopped after step 5", stderr)
    self.assertNotIn("Traceback", stderr)
    resumed = train_losses(
      "addition", output_dir, f"--num_steps={_STEPS}", "--resume"
    )
    self.assertEqual(resumed, reference)

  def test_resume_skips_damaged_checkpoints(self):
    reference_dir, reference = self._reference("addition")
    output_dir = os.path.join(tempfile.mkdtemp(dir=self._tmp.name), "run")
    shutil.copytree(reference_dir, output_dir)
    self.assertEqual(checkpoint_steps(output_dir), [_HALF, _STEPS])
    newest = os.path.join(output_dir, "checkpoints", str(_STEPS))
    truncated = largest_file(newest)
    size = os.path.getsize(truncated)
    with open(truncated, "r+b") as f:
      f.truncate(100)

    # What a kill during a save leaves: orbax writes a step into a temporary
    # folder and renames it when complete, and never lists the temporary one.
    partial = os.path.join(
      output_dir, "checkpoints", f"{_STEPS + 1}.orbax-checkpoint-tmp-0"
    )
    os.makedirs(os.path.join(partial, "default"))
    open(os.path.join(partial, "default", "_METADATA"), "w").close()

    resumed, stderr = train_losses(
      "addition",
      output_dir,
      f"--num_steps={_STEPS}",
      "--resume",
      stderr=True,
    )
    # One line names the step, the file and the fault, one the step resumed
    # from; the damaged checkpoint is kept, out of the way.
    assert_no_library_noise(self, stderr)
    lines = error_lines(stderr)
    self.assertLen(lines, 2, stderr)
    self.assertIn(f"checkpoint step {_STEPS} ", lines[0])
    self.assertIn(
      f"{os.path.relpath(truncated, newest)}: 100 bytes, {size} when it was "
      "written",
      lines[0],
    )
    self.assertIn(f"resumed from step {_HALF} instead", lines[1])
    self.assertTrue(
      os.path.isdir(os.path.join(output_dir, "checkpoints", "damaged", "12"))
    )
    self.assertEqual(resumed, reference)
    self.assertEqual(checkpoint_steps(output_dir), [_HALF, _STEPS])

    # A deleted file in one and a truncated one in the other: nothing to
    # resume from is one error, with both reasons, and a failing status.
    deleted = os.path.join(newest, "default", "_sharding")
    os.remove(deleted)
    with open(largest_file(os.path.join(newest, "..", str(_HALF))), "r+b") as f:
      f.truncate(100)
    process = run_trainer(
      "addition",
      *_TINY_FLAGS["addition"],
      f"--output_dir={output_dir}",
      f"--num_steps={_STEPS}",
      "--resume",
    )
    self.assertEqual(process.returncode, 1, process.stderr)
    self.assertNotIn("Traceback", process.stderr)
    assert_no_library_noise(self, process.stderr)
    lines = error_lines(process.stderr)
    self.assertLen(lines, 3, process.stderr)
    self.assertIn("no checkpoint in", lines[0])
    self.assertIn(
      f"checkpoint step {_STEPS} ({newest}) is damaged: "
      "default/_sharding: missing",
      lines[1],
    )
    self.assertIn(f"checkpoint step {_HALF} ", lines[2])
    self.assertIn("100 bytes", lines[2])

  def test_non_finite_loss_stops_at_its_step(self):
    # Steps of 1e38 overflow the parameters at once: step 2's loss is NaN.
    output_dir = tempfile.mkdtemp(dir=self._tmp.name)
    process = run_trainer(
      "addition",
      *_TINY_FLAGS["addition"],
      f"--output_dir={output_dir}",
      "--learning_rate=1e38",
      "--checkpoint_every=1",
      "--num_steps=3",
    )
    self.assertEqual(process.returncode, 1, process.stderr)
    self.assertNotIn("Traceback", process.stderr)
    assert_no_library_noise(self, process.stderr)
    lines = error_lines(process.stderr)
    self.assertLen(lines, 1, process.stderr)
    self.assertIn("step 2: the loss is nan", lines[0])
    self.assertIn("The newest checkpoint (step 1) precedes it", lines[0])
    # Step 1's checkpoint is kept, and nothing after it was saved.
    self.assertEqual(checkpoint_steps(output_dir), [1])

  def test_unwritable_output_dir_is_one_error(self):
    # A folder under a file cannot be made, not even by root.
    parent = os.path.join(tempfile.mkdtemp(dir=self._tmp.name), "a_file")
    open(parent, "w").close()
    process = run_trainer(
      "addition", *_TINY_FLAGS["addition"], f"--output_dir={parent}/run"
    )
    self.assertEqual(process.returncode, 1, process.stderr)
    self.assertNotIn("Traceback", process.stderr)
    assert_no_library_noise(self, process.stderr)
    lines = error_lines(process.stderr)
    self.assertLen(lines, 1, process.stderr)
    self.assertIn(f"--output_dir={parent}/run: cannot write there", lines[0])

  @parameterized.parameters(_TRAINERS)
  def test_eight_devices_match_one(self, name):
    _, reference = self._reference(name)
    output_dir = os.path.join(tempfile.mkdtemp(dir=self._tmp.name), "run")
    eight = train_losses(
      name, output_dir, f"--num_steps={_STEPS}", num_devices=8
    )
    self.assertEqual(sorted(eight), sorted(reference))
    for step, loss in reference.items():
      self.assertAlmostEqual(
        eight[step], loss, delta=1e-4 * abs(loss), msg=step
      )

  @parameterized.named_parameters(
    (
      "missing_text",
      "char_lm",
      ["--text_path=/no/such/file.txt"],
      "--text_path",
    ),
    (
      "batch_not_divisible",
      "addition",
      ["--batch_size=12", "--num_steps=1"],
      "divisible by the number of devices, 8",
    ),
    ("negative_steps", "classifier", ["--num_steps=-3"], "--num_steps"),
    (
      "nan_learning_rate",
      "addition",
      ["--learning_rate=nan"],
      "--learning_rate=nan: must be a finite number > 0",
    ),
  )
  def test_bad_flag_ends_with_one_clear_message(self, name, args, message):
    # absltest's create_tempdir needs parsed flags, which pytest never parses.
    output_dir = tempfile.mkdtemp(dir=self._tmp.name)
    process = run_trainer(
      name, f"--output_dir={output_dir}", *args, num_devices=8
    )
    self.assertNotEqual(process.returncode, 0)
    self.assertIn(message, process.stderr)
    self.assertNotIn("Traceback", process.stderr)


if __name__ == "__main__":
  absltest.main()
