"""End-to-end tests of the example trainers, each run as its own process.

Every trainer runs as `python -m examples.<name>.train` with tiny flags, as a
user would run it: absl flags are process-global (the trainers share flag
names), and XLA reads `--xla_force_host_platform_device_count` only at
start-up, so a subprocess per run is the honest way to test both.
"""

import functools
import json
import os
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


def run_trainer(name, *args, num_devices=None):
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
  if num_devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return subprocess.run(
    [sys.executable, "-m", f"examples.{name}.train", *args],
    cwd=_REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )


def train_losses(name, output_dir, *args, num_devices=None):
  """Trains with the tiny flags; returns {step: train loss} from the JSONL."""
  process = run_trainer(
    name,
    *_TINY_FLAGS[name],
    f"--output_dir={output_dir}",
    f"--eval_every={_HALF}",
    "--log_every=1",
    *args,
    num_devices=num_devices,
  )
  if process.returncode:
    raise AssertionError(f"{name} failed:\n{process.stderr[-5000:]}")
  # Read directly rather than through examples.common: under a bare `pytest`
  # the repo is not on sys.path, and site-packages may hold an `examples`.
  with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  losses = {}
  for record in records:
    if record["split"] == "train":
      assert record["step"] not in losses, f"step {record['step']} twice"
      losses[record["step"]] = record["loss"]
  return losses


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
    """The uninterrupted one-device run, shared by the tests that need it."""
    output_dir = os.path.join(cls._tmp.name, f"{name}_reference")
    losses = train_losses(
      name, output_dir, f"--num_steps={_STEPS}", *_REFERENCE_FLAGS[name]
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
