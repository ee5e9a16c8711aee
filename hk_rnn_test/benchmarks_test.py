"""Smoke test of the benchmark harness at tiny sizes (no timing claims)."""

import os
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from benchmarks import (
  griffin,
  linear,
  method,
  options,
  packing,
  run,
  soak,
  xlstm,
)


class BenchmarkHarnessTest(absltest.TestCase):
  def assert_one_process_per_contender(self, results, processes=1):
    """Every contender ran ``processes`` processes of its own, started with
    a command naming it; no two shared a process or ran in this one
    (contenders that skipped ran one process, which reported no time)."""
    pids = []
    for name, result in results.items():
      if "skipped" in result:
        continue
      self.assertTrue(any(name in arg for arg in result["command"]), result)
      self.assertLen(result["processes"], processes)
      pids += [report["pid"] for report in result["processes"]]
    self.assertLen(set(pids), len(pids))
    self.assertNotIn(os.getpid(), pids)

  def test_tiny_xlstm_run_times_each_contender_in_its_own_process(self):
    with tempfile.TemporaryDirectory() as out:
      results = xlstm.main(
        [
          "--tiny",
          "--processes=1",
          "--calls=1",
          "--contenders=slstm_fused,lstm_fused",
          f"--out={out}",
        ]
      )
      self.assertEqual(set(results), {"slstm_fused", "lstm_fused"})
      self.assert_one_process_per_contender(results)
      with open(os.path.join(out, "xlstm.md")) as file:
        self.assertIn("- slstm_fused / lstm_fused = ", file.read())
      self.assertTrue(os.path.exists(os.path.join(out, "xlstm.json")))

  def test_tiny_soak_streams_without_recompiling_and_matches_float64(self):
    with tempfile.TemporaryDirectory() as out:
      path = os.path.join(out, "soak.json")
      results = soak.main(
        ["--steps=600", "--chunk=100", "--warmup=2", f"--out={path}"]
      )
      self.assertTrue(os.path.exists(path))
    self.assertEqual([r["cell"] for r in results], ["lstm", "min_gru"])
    for result in results:
      self.assertEqual(result["steps"], 600)
      # Memory and latency at this size are noise; these two are not.
      self.assertTrue(result["checks"]["compiled_once"], result)
      self.assertTrue(result["checks"]["matches_float64_oracle"], result)

  def test_tiny_run_writes_table_json_and_chart(self):
    with tempfile.TemporaryDirectory() as out:
      results = run.main(
        [
          "--tiny",
          "--cases=masked_bilstm,inference_lstm",
          "--contenders=hk_rnn,hk_rnn_unmasked",
          "--processes=1",
          "--rounds=1",
          "--iters=1",
          "--calls=3",
          f"--out={out}",
        ]
      )
      with open(os.path.join(out, "results.md")) as file:
        table = file.read()
      for name in ("hk_rnn", "hk_rnn_unmasked"):
        self.assertIn(f"| {name} |", table)
      self.assertIn("Masking costs hk_rnn", table)
      self.assertIn("p99 ms", table)  # the inference case's tail
      self.assertIn("- CPU: ", table)
      self.assertIn("each contender in its own process", table)
      for name in ("results.json", "chart.png"):
        self.assertTrue(os.path.exists(os.path.join(out, name)))
    for by_contender in results.values():
      self.assert_one_process_per_contender(by_contender)

  def test_unmasked_contender_runs_only_in_masked_cases(self):
    case = run._tiny(run.CASES["lstm"])
    build = run.CONTENDERS["hk_rnn_unmasked"][1]
    self.assertEqual(build(case, *run.make_data(case)), "only for masked cases")

  def test_tiny_mgu_case_runs_against_flax_only(self):
    case = run._tiny(run.CASES["mgu"])
    data = run.make_data(case)
    for name in ("torch", "haiku_unroll", "flax_lstm"):
      self.assertIsInstance(run.CONTENDERS[name][1](case, *data), str)
    for name in ("hk_rnn", "flax_mgu"):
      run.CONTENDERS[name][1](case, *data).run()

  def test_processes_alternate_and_report_the_median_of_medians(self):
    script = (
      "import json, sys; open(sys.argv[2], 'a').write(sys.argv[1]); "
      "print(json.dumps({'median_s': float(sys.argv[3]), 'p99_s': 1.0}))"
    )
    with tempfile.TemporaryDirectory() as folder:
      log = os.path.join(folder, "order")

      def command(name, seconds):
        return [sys.executable, "-c", script, name, log, str(seconds)]

      results = method.measure(
        {"a": command("a", 0.5), "b": command("b", 2.0)}, processes=3
      )
      with open(log) as file:
        self.assertEqual(file.read(), "abbaab")
    self.assertEqual(results["a"]["median_s"], 0.5)
    self.assertEqual(results["b"]["process_medians_s"], [2.0] * 3)
    self.assertEqual(results["b"]["p99_s"], 1.0)

  def test_a_busy_start_is_flagged(self):
    cores = os.cpu_count()
    self.assertIsNone(method.busy_warning((0.49 * cores, 0, 0)))
    self.assertIn("busy", method.busy_warning((0.5 * cores, 0, 0)))

  def test_a_busy_session_spins_a_neighbour_while_open_and_says_so(self):
    with method.Session(
      "benchmarks.x", ["--busy"], processes=3, busy=True, log=lambda _: None
    ) as session:
      self.assertTrue(session.neighbour.running)
    self.assertFalse(session.neighbour.running)
    header = "\n".join(session.header())
    self.assertIn("one busy process beside the benchmark", header)
    self.assertIn("`python -m benchmarks.x --busy`", header)
    self.assertIn("3 processes each in alternating order", header)
    self.assertEqual(session.meta()["busy"], True)

  def test_fewer_than_one_process_is_an_error_naming_the_flag(self):
    for harness, argv in (
      (linear, []),
      (packing, []),
      (options, ["--study=remat"]),
      (griffin, []),
    ):
      with self.assertRaises(SystemExit):
        harness.main([*argv, "--processes=0"])

  def test_remat_study_packed_rows_fill_every_row(self):
    ids = options._packed_ids(np.random.default_rng(0), 3, 500)
    self.assertTrue(np.all(ids > 0))
    self.assertTrue(np.all(np.diff(ids, axis=1) >= 0))
    step, memory = options.training_step(
      "lstm", (2, 50, 3, 4), {"remat": "chunked"}, packed=True
    )
    step()
    self.assertGreater(memory, 0)

  def test_tiny_options_study_times_each_variant_in_its_own_process(self):
    variants = 'sampling="once" (step path),sampling="once" (fused)'
    with tempfile.TemporaryDirectory() as out:
      results = options.main(
        [
          "--study=dropout",
          "--quick",
          "--settings=0",
          f"--variants={variants}",
          "--processes=1",
          "--rounds=1",
          "--iters=1",
          f"--out={out}",
        ]
      )
      with open(os.path.join(out, "dropout.md")) as file:
        table = file.read()
      self.assertTrue(os.path.exists(os.path.join(out, "dropout.json")))
    ((title, by_variant),) = results.items()
    self.assertEqual(list(by_variant), variants.split(","))
    self.assert_one_process_per_contender(by_variant)
    for name in by_variant:
      self.assertIn(f"| {title} | {name} |", table)
      self.assertGreater(by_variant[name]["memory_bytes"], 0)
    self.assertIn("each contender in its own process", table)
    self.assertIn("- CPU: ", table)

  def test_options_rejects_an_unknown_variant(self):
    with self.assertRaises(SystemExit):
      options.main(["--study=dropout", "--quick", "--variants=nope"])

  def test_tiny_packing_run_writes_its_table(self):
    with tempfile.TemporaryDirectory() as out:
      runs = packing.main(
        [
          "--sizes=6",
          "--max_length=8",
          "--row_length=8",
          "--median=3",
          "--inputs=3",
          "--features=4",
          "--contenders=hk_rnn_packed,hk_rnn_packed_last_carry,torch_packed",
          "--processes=1",
          "--rounds=1",
          f"--out={out}",
        ]
      )
      with open(os.path.join(out, "packing.md")) as file:
        table = file.read()
      self.assertTrue(os.path.exists(os.path.join(out, "packing.json")))
    (run,) = runs
    self.assert_one_process_per_contender(run["results"])
    for name in ("hk_rnn_packed", "hk_rnn_packed_last_carry", "torch_packed"):
      self.assertIn(f"| {name} |", table)
      self.assertGreater(run["results"][name]["tokens_per_s"], 0)
    self.assertIn("Per-segment carries cost", table)
    self.assertIn("each contender in its own process", table)

  def test_packing_time_alone(self):
    options = packing.argparse.Namespace(
      median=3, max_length=8, row_length=8, seed=0
    )
    table = packing.time_packing(50, options)
    self.assertIn("| scalar |", table)
    self.assertIn("| 8 |", table)

  def test_tiny_linear_run_checks_the_targets(self):
    with tempfile.TemporaryDirectory() as out:
      results = linear.main(
        [
          "--tiny",
          "--times=8",
          "--contenders=min_gru_default,hk_rnn_gru_fused",
          "--processes=1",
          "--rounds=1",
          "--iters=1",
          f"--out={out}",
        ]
      )
      with open(os.path.join(out, "linear.md")) as file:
        table = file.read()
      self.assertTrue(os.path.exists(os.path.join(out, "linear.json")))
    self.assert_one_process_per_contender(results["t8"])
    self.assertIn("| min_gru_default |", table)
    self.assertIn("| hk_rnn_gru_fused | ", table)
    self.assertIn("MinGRU default ÷ hk_rnn_gru_fused:", table)
    self.assertIn("each contender in its own process", table)

  def test_tiny_griffin_run_in_separate_processes(self):
    with tempfile.TemporaryDirectory() as out:
      results = griffin.main(
        [
          "--tiny",
          "--contenders=griffin,gru",
          "--processes=1",
          "--calls=1",
          f"--out={out}",
        ]
      )
      with open(os.path.join(out, "griffin.md")) as file:
        table = file.read()
      self.assertIn("| griffin |", table)
      self.assertIn("| gru | ", table)
      self.assertIn("griffin ÷ gru:", table)
      self.assertIn("CPU:", table)
    self.assert_one_process_per_contender(results)
    report = griffin.one_process("rglru", 2, 16, 8, calls=1)
    self.assertGreater(report["median_s"], 0)

  def test_unknown_case_is_an_error_naming_the_flag(self):
    with self.assertRaises(SystemExit):
      run.main(["--cases=nope"])


if __name__ == "__main__":
  absltest.main()
