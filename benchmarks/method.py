"""The benchmark method: each contender in its own process, medians of medians.

Every figure the project publishes is taken this way:

* each contender runs in a fresh process of its own (OpenMP runtimes and
  XLA's thread pool in one process slow each other down);
* at least three processes per contender, started in alternating order
  (round ``r`` runs the contenders forwards when ``r`` is even, backwards
  when odd), so that slow phases of the machine fall on all of them;
* inside a process: a warm-up call, then rounds of timed calls; the process
  reports its median; the published figure is the median of the processes'
  medians, with their spread;
* each run records the CPU model (``lscpu``) and the load average before
  and after, and says so when it started on a busy machine (load ≥ 0.5 per
  core): benchmark only on an otherwise idle machine.

:func:`measure` runs the processes; each benchmark module supplies the
command of one process, which prints one JSON object on its last line of
standard output (at least ``{"median_s": ...}``).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

BUSY_LOAD_PER_CORE = 0.5


def cpu_model() -> str:
  """The CPU's model name as ``lscpu`` reports it, with the core count."""
  name = ""
  if shutil.which("lscpu"):
    result = subprocess.run(
      ["lscpu"], capture_output=True, text=True, check=False
    )
    for line in result.stdout.splitlines():
      if line.startswith("Model name:"):
        name = line.split(":", 1)[1].strip()
        break
  flags = ""
  try:
    with open("/proc/cpuinfo") as file:
      info = file.read()
    flags = (
      "AVX-512" if " avx512f" in info else "AVX2" if " avx2" in info else ""
    )
  except OSError:
    pass
  details = ", ".join(x for x in (flags, f"{os.cpu_count()} cores") if x)
  return f"{name or 'unknown CPU'} ({details})"


def load_average() -> tuple[float, float, float]:
  return tuple(round(x, 2) for x in os.getloadavg())


def busy_warning(load: Sequence[float]) -> str | None:
  """A warning when the 1-minute load is at least 0.5 per core."""
  cores = os.cpu_count() or 1
  if load[0] >= BUSY_LOAD_PER_CORE * cores:
    return (
      f"WARNING: the machine was busy when this run started (load "
      f"{load[0]} on {cores} cores): these figures are not comparable "
      "with idle ones"
    )
  return None


def summarize(samples: Sequence[float]) -> dict[str, float]:
  """Median, p99, min and max of one process's timed calls, in seconds."""
  ordered = sorted(samples)
  p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
  return {
    "median_s": statistics.median(ordered),
    "p99_s": p99,
    "min_s": ordered[0],
    "max_s": ordered[-1],
  }


def time_calls(
  run: Callable[[], Any], *, calls: int, warmup: int = 1
) -> list[float]:
  """Seconds of each of ``calls`` calls of ``run`` (which must block)."""
  for _ in range(warmup):
    run()
  samples = []
  for _ in range(calls):
    start = time.perf_counter()
    run()
    samples.append(time.perf_counter() - start)
  return samples


class BusyNeighbour:
  """A process spinning on one core beside the benchmark, while in use."""

  def __enter__(self) -> BusyNeighbour:
    self._process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._process.kill()
    self._process.wait()


def measure(
  commands: dict[str, list[str]],
  *,
  processes: int = 3,
  env: dict[str, str] | None = None,
  log: Callable[[str], None] = lambda message: None,
  timeout: float = 1200,
) -> dict[str, dict[str, Any]]:
  """Runs each contender's command ``processes`` times, alternating.

  Args:
    commands: contender name to the command of one process, which prints a
      JSON object with at least ``median_s`` on its last stdout line, or
      ``{"skipped": reason}``.
    processes: processes per contender (at least 3 for published figures).
    env: extra environment variables for every process.
    log: progress messages.
    timeout: seconds one process may take.

  Returns:
    For each contender that ran: ``median_s`` (median of the per-process
    medians), ``p99_s`` (median of the per-process p99s, where reported),
    ``process_medians_s`` and every process's full report; for a contender
    that skipped, ``{"skipped": reason}``.
  """
  names = list(commands)
  reports: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
  skipped: dict[str, str] = {}
  full_env = {**os.environ, **(env or {})}
  for round_index in range(processes):
    order = names if round_index % 2 == 0 else names[::-1]
    for name in order:
      if name in skipped:
        continue
      log(f"  {name}: process {round_index + 1}/{processes}")
      result = subprocess.run(
        commands[name],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
      )
      lines = result.stdout.strip().splitlines()
      if result.returncode != 0 or not lines:
        raise RuntimeError(
          f"benchmark process {name!r} failed ({result.returncode}): "
          f"{result.stderr[-2000:]}"
        )
      report = json.loads(lines[-1])
      if "skipped" in report:
        skipped[name] = report["skipped"]
        continue
      reports[name].append(report)
  summary: dict[str, dict[str, Any]] = {}
  for name in names:
    if name in skipped:
      summary[name] = {"skipped": skipped[name]}
      continue
    medians = [r["median_s"] for r in reports[name]]
    entry = {
      "median_s": statistics.median(medians),
      "process_medians_s": medians,
      "processes": reports[name],
    }
    p99s = [r["p99_s"] for r in reports[name] if "p99_s" in r]
    if p99s:
      entry["p99_s"] = statistics.median(p99s)
    for key in ("memory_bytes", "gflops"):
      values = [r[key] for r in reports[name] if r.get(key) is not None]
      if values:
        entry[key] = statistics.median(values)
    summary[name] = entry
  return summary


def header(command: str, load_before, load_after, processes: int) -> list[str]:
  """The Markdown lines every results file starts with."""
  lines = [
    f"- CPU: {cpu_model()}",
    f"- load average (1, 5, 15 min) before: {load_before}, after: {load_after}",
    f"- method: each contender in its own process, {processes} processes "
    "each in alternating order, median of the per-process medians "
    "(benchmarks/method.py)",
    f"- command: `{command}`",
  ]
  warning = busy_warning(load_before)
  if warning:
    lines.insert(0, f"- **{warning}**")
  return lines
