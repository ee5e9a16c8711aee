"""End-to-end tests of the example trainers, each run as its own process.

Every trainer runs as `python -m examples.<name>.train` with tiny flags, as a
user would run it: absl flags are process-global (the trainers share flag
names), and XLA reads `--xla_force_host_platform_device_count` only at
start-up, so a subprocess per run is the honest way to test both.
"""

import functools
import glob
import json
import os
import re
import shutil
import tempfile

from absl.testing import absltest, parameterized

from hk_rnn_test.trainer_runs import (
  REPO,
  TINY_FLAGS,
  checkpoint_steps,
  run_trainer,
)

_STEPS, _HALF = 12, 6

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
_TRAINERS = [(name,) for name in TINY_FLAGS]

# The exit status of a run stopped by a signal (training.EXIT_PREEMPTED).
_EXIT_PREEMPTED = 75
# The trainers' own source files: the absl lines they log name one of them.
_TRAINER_FILES = frozenset(
  os.path.basename(path)
  for path in glob.glob(
    os.path.join(REPO, "examples", "**", "*.py"), recursive=True
  )
)
_ABSL_RECORD = re.compile(r"^[DIWEF]\d{4} \S+\s+\d+ ([^:\s]+):\d+\] ")


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
    *TINY_FLAGS[name],
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
      *TINY_FLAGS["addition"],
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
      *TINY_FLAGS["addition"],
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
      "addition", *TINY_FLAGS["addition"], f"--output_dir={parent}/run"
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
