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
          "--contenders=hk_rnn,hk_rnn_step,hk_rnn_unmasked,flax_lstm",
          "--rounds=1",
          "--iters=1",
          "--no-memory",
          f"--out={out}",
        ]
      )
      with open(os.path.join(out, "results.md")) as file:
        table = file.read()
      for name in ("hk_rnn", "hk_rnn_step", "hk_rnn_unmasked", "flax_lstm"):
        self.assertIn(f"| {name} |", table)
      self.assertIn("Masking costs hk_rnn", table)
      for name in ("results.json", "chart.png"):
        self.assertTrue(os.path.exists(os.path.join(out, name)))

  def test_unmasked_contender_runs_only_in_masked_cases(self):
    case = run._tiny(run.CASES["lstm"])
    build = run.CONTENDERS["hk_rnn_unmasked"][1]
    self.assertIsNone(build(case, *run.make_data(case)))

  def test_unknown_case_is_an_error_naming_the_flag(self):
    with self.assertRaises(SystemExit):
      run.main(["--cases=nope"])


if __name__ == "__main__":
  absltest.main()
