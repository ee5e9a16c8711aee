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

One process; rounds interleave the contenders (the order rotates each
round), each block starts with an untimed warm-up call, and the table gives
the median over rounds, each time's ratio to the fused GRU's, and XLA's
compiled temporary memory (``memory_analysis()``; none for PyTorch). The
notes under each table check the targets of issue 12 at T = 4096: MinGRU's
default path at most 1/3 of the fused GRU's time and at most 1/2 of its own
step path's.

Run (a few minutes on two cores)::

    python -m benchmarks.linear --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys

from benchmarks import run, timing

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
      Contender(cell, method, fused)
      for cell in ("min_gru", "min_lstm")
      for method, fused in (
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


def time_case(case, names, rounds, iters, log):
  """Median seconds and memory per contender for one case."""
  inputs, lengths = run.make_data(case)
  runners = {}
  for name in names:
    runner = _runner(CONTENDERS[name], case, inputs, lengths)
    if runner is None:
      continue
    runner.run()  # compile and first-call costs stay out of every block
    runners[name] = runner
  results = timing.time_interleaved(
    {name: runner.run for name, runner in runners.items()},
    rounds=rounds,
    iters=iters,
    log=lambda message: log(f"  {case.name}:{message}"),
  )
  for name, result in results.items():
    result["memory_bytes"] = runners[name].memory_bytes
  return results


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
    f"- machine: {meta['machine']}",
    f"- versions: {meta['versions']}",
    f"- load average (1, 5, 15 min) before: {meta['load_before']}, "
    f"after: {meta['load_after']}",
    f"- command: `{meta['command']}`",
    f"- rounds × iterations per block: {meta['rounds']} × {meta['iters']}",
    "",
    "Times are medians over interleaved rounds; `÷ GRU` is the time over "
    f"`{BASELINE}`'s in the same rounds. Memory: XLA's temporary buffers.",
  ]
  for case_name, by_name in results.items():
    case = cases[case_name]
    baseline = by_name.get(BASELINE)
    lines += [
      "",
      f"## B={case.batch}, T={case.time}, D={case.inputs}, F={case.features}",
      "",
      "| contender | median ms | spread ms | ÷ GRU | memory |",
      "|---|---:|---:|---:|---:|",
    ]
    for name, result in sorted(
      by_name.items(), key=lambda item: item[1]["median_s"]
    ):
      median = result["median_s"]
      ratio = (
        "–" if baseline is None else f"{median / baseline['median_s']:.3f}"
      )
      lines.append(
        f"| {name} | {median * 1e3:.1f} | {result['min_s'] * 1e3:.1f}–"
        f"{result['max_s'] * 1e3:.1f} | {ratio} | "
        f"{timing.format_bytes(result['memory_bytes'])} |"
      )
    targets = _targets(by_name)
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
  parser.add_argument(
    "--contenders",
    default=",".join(CONTENDERS),
    help=f"comma-separated, of: {', '.join(CONTENDERS)}",
  )
  parser.add_argument("--rounds", type=int, default=5)
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
  parser.add_argument("--out", default="runs/benchmarks", help="output folder")
  args = parser.parse_args(argv)
  names = args.contenders.split(",")
  for name in names:
    if name not in CONTENDERS:
      parser.error(
        f"--contenders: unknown contender {name!r}; known: "
        f"{', '.join(CONTENDERS)}"
      )
  times = [int(t) for t in args.times.split(",")]
  cases = {}
  for time in times:
    case = _case(time, args.tiny)
    cases[case.name] = case

  log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
  load_before = tuple(round(x, 2) for x in os.getloadavg())
  log(f"load average before: {load_before}")
  results = {}
  for name, case in cases.items():
    log(f"{name}: compiling and timing")
    iters = 1 if case.time >= 4096 else args.iters
    results[name] = time_case(case, names, args.rounds, iters, log)
  meta = {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "machine": f"{platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} cores, {platform.system()}",
    "versions": run._versions(),  # noqa: SLF001
    "load_before": load_before,
    "load_after": tuple(round(x, 2) for x in os.getloadavg()),
    "command": " ".join(
      ["python -m benchmarks.linear", *(argv or sys.argv[1:])]
    ),
    "rounds": args.rounds,
    "iters": f"{args.iters} (1 at T >= 4096)",
  }
  os.makedirs(args.out, exist_ok=True)
  table = markdown(results, cases, meta)
  with open(os.path.join(args.out, "linear.md"), "w") as file:
    file.write(table)
  with open(os.path.join(args.out, "linear.json"), "w") as file:
    json.dump({"meta": meta, "results": results}, file, indent=1)
  print(table)


if __name__ == "__main__":
  main()
