r"""Times Griffin's cells against the fused GRU: one training step each.

The step is the jitted gradient of ``Σ outputs + Σ final carry`` with
respect to the parameters, for ``RNN(cell)`` over inputs ``(B, T, D)``
with ``D = F = width``, at B = 8, T = 4096, width 256 by default, for:

* ``griffin``: ``GriffinCell(width)`` (``lru_width = width``, one head,
  ``conv_width = 4``): dense layers, convolution and one linear scan;
* ``rglru``: ``RGLRUCell(width)`` (one head);
* ``min_gru``: ``MinGRUCell(width)``, for reference;
* ``gru``: ``GRUCell(width)`` with its fused kernel (whatever backend
  ``HK_RNN_KERNELS`` picks: ``auto`` by default), the baseline.

The method: each contender runs in a process of its own, ``--processes``
(at least 3) per contender, started in alternating order (forwards in even
rounds, backwards in odd ones); inside a process a warm-up call, then
``--calls`` timed calls, of which the process reports the median; the
table gives the median of the processes' medians, their spread, and each
one's ratio to the GRU's. The run records the CPU model and the load
average before and after, and warns when the machine was busy. The target
of issue 23: ``griffin`` and ``rglru`` at most 1/3 of ``gru``'s time.

Run (on an otherwise idle machine; several minutes on two cores)::

    python -m benchmarks.griffin --out benchmarks/results

``--one=NAME`` runs one process of one contender and prints its report as
JSON on the last line (what the driver starts).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

CONTENDERS = ("griffin", "rglru", "min_gru", "gru")
BASELINE = "gru"
TARGET = 1 / 3
BUSY_LOAD_PER_CORE = 0.5


def training_step(name: str, batch: int, length: int, width: int):
  """A ready-to-call, blocking training step of contender ``name``, and
  XLA's temporary memory for it in bytes (None where unknown)."""
  import haiku as hk  # noqa: PLC0415 - only in the timed process
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import hk_rnn  # noqa: PLC0415

  def make_cell():
    if name == "griffin":
      return hk_rnn.GriffinCell(width)
    if name == "rglru":
      return hk_rnn.RGLRUCell(width)
    if name == "min_gru":
      return hk_rnn.MinGRUCell(width)
    return hk_rnn.GRUCell(width)

  model = hk.without_apply_rng(
    hk.transform(lambda x: hk_rnn.RNN(make_cell())(x))
  )
  inputs = jax.random.normal(jax.random.key(1), (batch, length, width))
  params = jax.jit(model.init)(jax.random.key(0), inputs)

  def loss(params, inputs):
    final, outputs = model.apply(params, inputs)
    return jnp.sum(outputs) + sum(
      jnp.sum(jnp.real(leaf)) for leaf in jax.tree.leaves(final)
    )

  grad = jax.jit(jax.grad(loss))
  compiled = grad.lower(params, inputs).compile()
  memory = compiled.memory_analysis()
  memory_bytes = None if memory is None else int(memory.temp_size_in_bytes)

  def step():
    jax.block_until_ready(compiled(params, inputs))

  return step, memory_bytes


def one_process(name: str, batch: int, length: int, width: int, calls: int):
  """Times ``calls`` steps after a warm-up; the report of one process."""
  step, memory_bytes = training_step(name, batch, length, width)
  step()
  samples = []
  for _ in range(calls):
    start = time.perf_counter()
    step()
    samples.append(time.perf_counter() - start)
  return {
    "median_s": statistics.median(samples),
    "min_s": min(samples),
    "max_s": max(samples),
    "samples_s": samples,
    "memory_bytes": memory_bytes,
  }


def cpu_model() -> str:
  """The CPU's model name as ``lscpu`` reports it, and the core count."""
  name = "unknown CPU"
  if shutil.which("lscpu"):
    listing = subprocess.run(
      ["lscpu"], capture_output=True, text=True, check=False
    ).stdout
    for line in listing.splitlines():
      if line.startswith("Model name:"):
        name = line.split(":", 1)[1].strip()
  return f"{name}, {os.cpu_count()} cores, {platform.system()}"


def load_average() -> tuple[float, ...]:
  return tuple(round(x, 2) for x in os.getloadavg())


def measure(commands: dict[str, list[str]], processes: int, log):
  """Each contender's command ``processes`` times, in alternating order;
  per contender the median of its processes' medians and their spread.

  The shape of the project's shared method (``benchmarks/method.py``'s
  ``measure``, where it exists): switching to it changes only this call.
  """
  reports = {name: [] for name in commands}
  names = list(commands)
  for round_index in range(processes):
    for name in names if round_index % 2 == 0 else names[::-1]:
      log(f"  {name}: process {round_index + 1}/{processes}")
      result = subprocess.run(
        commands[name], capture_output=True, text=True, check=True
      )
      reports[name].append(json.loads(result.stdout.strip().splitlines()[-1]))
  summary = {}
  for name, runs in reports.items():
    medians = [run["median_s"] for run in runs]
    summary[name] = {
      "median_s": statistics.median(medians),
      "process_medians_s": medians,
      "memory_bytes": runs[0]["memory_bytes"],
      "reports": runs,
    }
  return summary


def markdown(results, meta) -> str:
  baseline = results.get(BASELINE)
  lines = [
    "# Griffin's cells: training-step benchmark",
    "",
    f"- date: {meta['date']}",
    f"- CPU: {meta['cpu']}",
    f"- versions: {meta['versions']}",
    f"- kernels: HK_RNN_KERNELS={meta['kernels']}",
    f"- load average (1, 5, 15 min) before: {meta['load_before']}, "
    f"after: {meta['load_after']}",
    f"- command: `{meta['command']}`",
    f"- {meta['processes']} processes per contender, alternating order; "
    f"{meta['calls']} timed calls per process after a warm-up",
    "",
  ]
  if meta.get("warning"):
    lines += [f"**{meta['warning']}**", ""]
  lines += [
    f"B={meta['batch']}, T={meta['time']}, width={meta['width']}. Median "
    "of the processes' medians; spread: the lowest and highest process "
    "median. Memory: XLA's temporary buffers.",
    "",
    "| contender | median ms | spread ms | ÷ GRU | memory |",
    "|---|---:|---:|---:|---:|",
  ]
  for name, result in sorted(results.items(), key=lambda x: x[1]["median_s"]):
    ratio = (
      "–"
      if baseline is None
      else f"{result['median_s'] / baseline['median_s']:.3f}"
    )
    memory = result["memory_bytes"]
    lines.append(
      f"| {name} | {result['median_s'] * 1e3:.1f} | "
      f"{min(result['process_medians_s']) * 1e3:.1f}–"
      f"{max(result['process_medians_s']) * 1e3:.1f} | {ratio} | "
      f"{'–' if memory is None else f'{memory / 2**20:.1f} MiB'} |"
    )
  if baseline is not None:
    lines.append("")
    for name in ("griffin", "rglru"):
      if name in results:
        ratio = results[name]["median_s"] / baseline["median_s"]
        verdict = "met" if ratio <= TARGET else "missed"
        lines.append(
          f"- {name} ÷ {BASELINE}: {ratio:.3f} (target ≤ {TARGET:.2f}): "
          f"{verdict}."
        )
  return "\n".join(lines) + "\n"


def _versions() -> str:
  from importlib import metadata  # noqa: PLC0415

  return ", ".join(
    f"{package} {metadata.version(package)}"
    for package in ("jax", "jaxlib", "dm-haiku")
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.griffin",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--time", type=int, default=4096)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument(
    "--contenders",
    default=",".join(CONTENDERS),
    help=f"comma-separated, of: {', '.join(CONTENDERS)}",
  )
  parser.add_argument("--processes", type=int, default=3)
  parser.add_argument("--calls", type=int, default=5)
  parser.add_argument(
    "--tiny", action="store_true", help="B=2, T=16, width=8: a smoke test"
  )
  parser.add_argument("--one", help="run one process of this contender")
  parser.add_argument("--out", default="runs/benchmarks", help="output folder")
  args = parser.parse_args(argv)
  if args.tiny:
    args.batch, args.time, args.width = 2, 16, 8
  sizes = (args.batch, args.time, args.width)
  if args.one is not None:
    if args.one not in CONTENDERS:
      parser.error(f"--one: unknown contender {args.one!r}")
    print(json.dumps(one_process(args.one, *sizes, args.calls)))
    return
  names = args.contenders.split(",")
  for name in names:
    if name not in CONTENDERS:
      parser.error(
        f"--contenders: unknown contender {name!r}; known: "
        f"{', '.join(CONTENDERS)}"
      )
  if args.processes < 1:
    parser.error(f"--processes must be at least 1, got {args.processes}")

  def log(message):
    print(message, file=sys.stderr, flush=True)

  load_before = load_average()
  warning = None
  if load_before[0] >= BUSY_LOAD_PER_CORE * (os.cpu_count() or 1):
    warning = (
      f"WARNING: the machine was busy when this run started (load "
      f"{load_before[0]} on {os.cpu_count()} cores): these figures are not "
      "comparable with idle ones"
    )
    log(warning)
  one = [
    sys.executable,
    "-m",
    "benchmarks.griffin",
    f"--batch={args.batch}",
    f"--time={args.time}",
    f"--width={args.width}",
    f"--calls={args.calls}",
  ]
  results = measure(
    {name: [*one, f"--one={name}"] for name in names}, args.processes, log
  )
  meta = {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "cpu": cpu_model(),
    "versions": _versions(),
    "kernels": os.environ.get("HK_RNN_KERNELS", "auto"),
    "load_before": load_before,
    "load_after": load_average(),
    "warning": warning,
    "command": " ".join(
      ["python -m benchmarks.griffin", *(argv or sys.argv[1:])]
    ),
    "processes": args.processes,
    "calls": args.calls,
    "batch": args.batch,
    "time": args.time,
    "width": args.width,
  }
  os.makedirs(args.out, exist_ok=True)
  table = markdown(results, meta)
  with open(os.path.join(args.out, "griffin.md"), "w") as file:
    file.write(table)
  with open(os.path.join(args.out, "griffin.json"), "w") as file:
    json.dump({"meta": meta, "results": results}, file, indent=1)
  print(table)


if __name__ == "__main__":
  main()
