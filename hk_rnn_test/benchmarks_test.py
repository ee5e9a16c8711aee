"""Smoke test of the benchmark harness at tiny sizes (no timing claims)."""

import os
import tempfile

from absl.testing import absltest

from benchmarks import run


class BenchmarkHarnessTest(absltest.TestCase):
  def test_tiny_run_writes_table_json_and_chart(self):
    with tempfile.TemporaryDirectory() as out:
      run.main(
        [
          "--tiny",
          "--cases=masked_bilstm",
          "--contenders=hk_rnn,hk_rnn_step,flax_lstm",
          "--rounds=1",
          "--iters=1",
          "--no-memory",
          f"--out={out}",
        ]
      )
      with open(os.path.join(out, "results.md")) as file:
        table = file.read()
      for name in ("hk_rnn", "hk_rnn_step", "flax_lstm"):
        self.assertIn(f"| {name} |", table)
      for name in ("results.json", "chart.png"):
        self.assertTrue(os.path.exists(os.path.join(out, name)))

  def test_unknown_case_is_an_error_naming_the_flag(self):
    with self.assertRaises(SystemExit):
      run.main(["--cases=nope"])


if __name__ == "__main__":
  absltest.main()
