"""Smoke test of the adding-problem trainer and its plot, run as processes.

A separate file from examples_test.py, whose resume and multi-device checks
every trainer there runs: this one only checks that a tiny run learns,
records its training seconds, and that the comparison plot reads the runs.
"""

import json
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest

from hk_rnn_test.trainer_runs import REPO, TINY_FLAGS, run_trainer

_ADDING_PROBLEM_FLAGS = [
  "--num_steps=12",
  "--eval_every=6",
  "--log_every=1",
  "--batch_size=16",
  "--seq_length=24",
  "--hidden_size=8",
  "--num_layers=1",
  "--eval_size=32",
  "--learning_rate=3e-2",
]


class AddingProblemTest(absltest.TestCase):
  def test_min_gru_run_learns_and_plots(self):
    with tempfile.TemporaryDirectory() as tmp:
      run_dir = os.path.join(tmp, "run")
      process = run_trainer(
        "adding_problem", *_ADDING_PROBLEM_FLAGS, f"--output_dir={run_dir}"
      )
      self.assertEqual(process.returncode, 0, process.stderr[-5000:])
      with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
      train = [r["loss"] for r in records if r["split"] == "train"]
      evals = [r for r in records if r["split"] == "eval"]
      self.assertLen(train, 12)
      self.assertLess(sum(train[-3:]), 0.9 * sum(train[:3]))
      self.assertEqual([r["step"] for r in evals], [0, 6, 12])
      seconds = [r["train_seconds"] for r in evals]
      self.assertEqual(seconds, sorted(seconds))
      self.assertIn("min_gru: held-out MSE", process.stderr)

      png = os.path.join(tmp, "curve.png")
      plot = subprocess.run(
        [
          sys.executable,
          "-m",
          "examples.adding_problem.plot",
          run_dir,
          f"--out={png}",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
      )
      self.assertEqual(plot.returncode, 0, plot.stderr[-5000:])
      self.assertTrue(os.path.exists(png))

  def test_griffin_and_min_gru_in_residual_blocks_run(self):
    for cell in ("griffin", "min_gru"):
      with tempfile.TemporaryDirectory() as tmp:
        process = run_trainer(
          "adding_problem",
          *_ADDING_PROBLEM_FLAGS,
          f"--cell={cell}",
          "--block",
          "--num_steps=4",
          f"--output_dir={tmp}",
        )
        self.assertEqual(process.returncode, 0, process.stderr[-5000:])
        self.assertIn(f"{cell}: held-out MSE", process.stderr)

  def test_char_lm_griffin_blocks_run(self):
    with tempfile.TemporaryDirectory() as tmp:
      process = run_trainer(
        "char_lm",
        *TINY_FLAGS["char_lm"],
        "--cell=griffin",
        "--num_steps=4",
        "--eval_every=2",
        "--sample_length=8",
        f"--output_dir={tmp}",
      )
      self.assertEqual(process.returncode, 0, process.stderr[-5000:])
      self.assertIn("Held-out", process.stderr)
      self.assertTrue(os.path.exists(os.path.join(tmp, "sample.txt")))


if __name__ == "__main__":
  absltest.main()
