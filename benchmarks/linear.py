r"""Times the parallel-in-time cells against the fused GRU and LSTM.

A training step (jitted forward and backward of
``loss = Σ outputs + Σ final carry`` with respect to the parameters, as in
``benchmarks/run.py``) at B = 16, D = F = 256 and T in {256, 1024, 4096},
for:

* ``MinGRUCell`` and ``MinLSTMCell`` under ``RNN``: the default path
  (``scan_method="auto"``), each form forced (``sequential``, ``chunked``,
  ``associative``), and ``fused=False`` (``hk.scan`` of the cell's step);
* hk_rnn's ``GRUCell`` and ``LSTMCell`` with their fused kernels;
* PyTorch's ``nn.GRU`` when installed.

The figures follow the project's method (``benchmarks/method.py``): each
contender runs in processes of its own, ``--processes`` (at least 3) per
contender in alternating order; inside a process a warm-up block, then
``--rounds`` blocks of ``--iters`` steps (one at T ≥ 4096), of which the
process reports the median time per step. The table gives the median of
the processes' medians, their spread, each time's ratio to the fused GRU's,
and the memory: XLA's compiled temporary buffers (``memory_analysis()``)
for JAX, the peak resident set growth over three steps for PyTorch; with
the CPU model and the load average before and after (and a warning when the
machine was busy). ``--busy`` keeps one spinning process beside the
benchmark. The notes under each table check the targets of issue 12 at
T = 4096: MinGRU's default path at most 1/3 of the fused GRU's time and at
most 1/2 of its own step path's.

Run (on an otherwise idle machine)::

    python -m benchmarks.linear --out benchmarks/results

``--one=NAME`` (with one ``--times`` value) runs one process of one
contender and prints its report as JSON on the last line (what the driver
starts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from benchmarks import method, run

FORMS = ("sequential", "chunked", "associative")


@dataclasses.dataclass(frozen=True)
class Contender:
  """One timed model: a cell under ``RNN``, or PyTorch's GRU."""

  cell: str  # "min_gru", "min_lstm", "gru", "lstm" or "torch_gru"
  scan_method: str = "auto"
  fused: bool = True

  @property
  def name(self) -> str:
    if self.cell in ("gru", "lstm"):
      return f"hk_rnn_{self.cell}_fused"
    if self.cell == "torch_gru":
      return self.cell
    if not self.fused:
      return f"{self.cell}_step"
    return f"{self.cell}_{'default' if self.scan_method == 'auto' else self.scan_method}"


CONTENDERS = {
  contender.name: contender
  for contender in (
    *(
      Contender(cell, scan, fused)
      for cell in ("min_gru", "min_lstm")
      for scan, fused in (
        ("auto", True),
        *((form, True) for form in FORMS),
        ("auto", False),
      )
    ),
    Contender("gru"),
    Contender("lstm"),
    Contender("torch_gru"),
  )
}
BASELINE = "hk_rnn_gru_fused"


def _case(time: int, tiny: bool) -> run.Case:
  case = run.Case(
    f"t{time}", f"T={time}", "gru", batch=16, time=time, inputs=256,
    features=256,
  )  # fmt: skip
  return run._tiny(case) if tiny else case  # noqa: SLF001


def _runner(contender: Contender, case: run.Case, inputs, lengths):
  """A ready-to-time training step, or None where a package is missing."""
  if contender.cell == "torch_gru":
    if not run._installed("torch"):  # noqa: SLF001
      return None
    return run.torch_module(case, inputs, lengths)
  import hk_rnn

  def build(x, n):
    del n
    if contender.cell in ("gru", "lstm"):
      cell_class = {"gru": hk_rnn.GRUCell, "lstm": hk_rnn.LSTMCell}
      cell = cell_class[contender.cell](case.features)
    else:
      cell_class = {
        "min_gru": hk_rnn.MinGRUCell,
        "min_lstm": hk_rnn.MinLSTMCell,
      }
      cell = cell_class[contender.cell](
        case.features, scan_method=contender.scan_method
      )
    return hk_rnn.RNN(cell, fused=contender.fused)(x)

  return run._jax_runner(  # noqa: SLF001
    case,
    *run._haiku_model(build),  # noqa: SLF001
    inputs,
    lengths,
  )


def one_process(name: str, case: run.Case, rounds: int, iters: int) -> None:
  """Times contender ``name`` on ``case`` in this process; prints its report."""
  runner = _runner(CONTENDERS[name], case, *run.make_data(case))
  if runner is None:
    method.print_skip("torch is not installed")
    return
  if case.time >= 4096:
    iters = 1
  samples = method.time_blocks(runner.run, rounds=rounds, iters=iters)
  method.print_report(samples, memory_bytes=runner.memory_bytes)


def _targets(by_name) -> list[str]:
  """The issue's two targets, checked on one case's results."""
  lines = []
  default = by_name.get("min_gru_default")
  for other, bound, label in (
    (BASELINE, 1 / 3, "the fused GRU's"),
    ("min_gru_step", 1 / 2, "its own step path's"),
  ):
    if default is None or other not in by_name:
      continue
    ratio = default["median_s"] / by_name[other]["median_s"]
    verdict = "met" if ratio <= bound else "missed"
    lines.append(
      f"- MinGRU default ÷ {other}: {ratio:.3f} (target ≤ {bound:.2f}, "
      f"{label} time): {verdict}."
    )
  return lines


def markdown(results, cases, meta) -> str:
  lines = [
    "# Parallel-in-time cells: training-step benchmark",
    "",
    f"- date: {meta['date']}",
    f"- versions: {meta['versions']}",
    *meta["header"],
    f"- per process: a warm-up block, then {meta['rounds']} blocks of "
    f"{meta['iters']} steps (1 at T >= 4096)",
    "",
    "Times are medians of the per-process medians; `spread` is the range of "
    f"the per-process medians; `÷ GRU` is the time over `{BASELINE}`'s. "
    "Memory: XLA's temporary buffers (JAX) or peak RSS above baseline "
    "(PyTorch).",
  ]
  for case_name, by_name in results.items():
    case = cases[case_name]
    timed = {n: r for n, r in by_name.items() if "median_s" in r}
    baseline = timed.get(BASELINE)
    lines += [
      "",
      f"## B={case.batch}, T={case.time}, D={case.inputs}, F={case.features}",
      "",
      "| contender | median ms | spread ms | ÷ GRU | memory |",
      "|---|---:|---:|---:|---:|",
    ]
    for name, result in sorted(
      timed.items(), key=lambda item: item[1]["median_s"]
    ):
      median = result["median_s"]
      ratio = (
        "–" if baseline is None else f"{median / baseline['median_s']:.3f}"
      )
      lines.append(
        f"| {name} | {median * 1e3:.1f} | {method.format_spread(result)} | "
        f"{ratio} | {method.format_bytes(result.get('memory_bytes'))} |"
      )
    skipped = [
      f"{n} ({r['skipped']})" for n, r in by_name.items() if n not in timed
    ]
    if skipped:
      lines += ["", f"Skipped: {', '.join(skipped)}."]
    targets = _targets(timed)
    if targets:
      lines += ["", *targets]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.linear",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--times", default="256,1024,4096", help="comma-separated lengths T"
  )
  method.add_arguments(parser, CONTENDERS)
  parser.add_argument(
    "--rounds", type=int, default=5, help="timed blocks per process"
  )
  parser.add_argument(
    "--iters",
    type=int,
    default=2,
    help="steps per block (one at T >= 4096)",
  )
  parser.add_argument(
    "--tiny",
    action="store_true",
    help="B=4, T=8, D=8, F=16 whatever --times says: a smoke test",
  )
  parser.add_argument("--one", help="run one process of this contender")
  parser.add_argument("--out", default="runs/benchmarks", help="output folder")
  args = parser.parse_args(argv)
  names = method.chosen(parser, args.one or args.contenders, CONTENDERS)
  cases = {}
  for time in (int(t) for t in args.times.split(",")):
    case = _case(time, args.tiny)
    cases[case.name] = case
  if args.one:
    if len(cases) != 1:
      parser.error(f"--one needs one --times value, got {args.times!r}")
    one_process(args.one, *cases.values(), args.rounds, args.iters)
    return
  options = [f"--rounds={args.rounds}", f"--iters={args.iters}"]
  options += ["--tiny"] if args.tiny else []
  argv = sys.argv[1:] if argv is None else argv
  with method.Session(
    "benchmarks.linear", argv, processes=args.processes, busy=args.busy
  ) as session:
    results = {}
    for case_name, case in cases.items():
      session.log(f"{case_name}:")
      results[case_name] = session.measure(
        {
          name: [f"--one={name}", f"--times={case.time}", *options]
          for name in names
        }
      )
  meta = {
    **session.meta(),
    "versions": method.versions("jax", "jaxlib", "dm-haiku", "torch"),
    "header": session.header(),
    "rounds": args.rounds,
    "iters": args.iters,
  }
  os.makedirs(args.out, exist_ok=True)
  table = markdown(results, cases, meta)
  with open(os.path.join(args.out, "linear.md"), "w") as file:
    file.write(table)
  with open(os.path.join(args.out, "linear.json"), "w") as file:
    json.dump({"meta": meta, "results": results}, file, indent=1)
  print(table)
  return results


if __name__ == "__main__":
  main()
