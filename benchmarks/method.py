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

A harness has two halves, both here once:

* the process of one contender times its step with :func:`time_blocks`
  (or :func:`time_calls`) and prints its report with :func:`print_report`
  (or :func:`print_skip` where it cannot run);
* the driver adds the method's flags (:func:`add_arguments`: ``--processes``,
  ``--busy``) and runs the contenders' processes in a :class:`Session`,
  which records the machine and the load and writes the results header.
"""

from __future__ import annotations

import argparse
import datetime
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


def time_blocks(
  run: Callable[[], Any], *, rounds: int, iters: int, warmup: int = 1
) -> list[float]:
  """Seconds per call of ``run``: ``rounds`` samples, each the mean of a
  block of ``iters`` calls, after ``warmup`` untimed blocks."""

  def block():
    for _ in range(iters):
      run()

  return [s / iters for s in time_calls(block, calls=rounds, warmup=warmup)]


def report(samples: Sequence[float], **figures: Any) -> dict[str, Any]:
  """One process's report: :func:`summarize` of ``samples``, the extra
  ``figures`` (such as ``memory_bytes``) and this process's id, by which a
  run shows that every contender had processes of its own."""
  return {**summarize(samples), **figures, "pid": os.getpid()}


def print_report(samples: Sequence[float], **figures: Any) -> None:
  """Prints :func:`report` as the JSON line :func:`measure` reads."""
  print(json.dumps(report(samples, **figures)), flush=True)


def print_skip(reason: str) -> None:
  """Prints the report of a contender that cannot run here, and why."""
  print(json.dumps({"skipped": reason}), flush=True)


def compiled_temp_bytes(compiled) -> int | None:
  """XLA's temporary buffer size of a compiled JAX computation, if known."""
  memory = compiled.memory_analysis()
  return None if memory is None else int(memory.temp_size_in_bytes)


def format_bytes(count: int | None) -> str:
  return "–" if count is None else f"{count / 2**20:.1f} MiB"


def format_spread(result: dict[str, Any], digits: int = 1) -> str:
  """The lowest and highest per-process median of a result, in ms."""
  medians = result["process_medians_s"]
  return f"{min(medians) * 1e3:.{digits}f}–{max(medians) * 1e3:.{digits}f}"


class BusyNeighbour:
  """A process spinning on one core beside the benchmark, while in use."""

  def __enter__(self) -> BusyNeighbour:
    self._process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._process.kill()
    self._process.wait()

  @property
  def running(self) -> bool:
    return self._process.poll() is None


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
    ``process_medians_s``, every process's full report and the
    ``command``; for a contender that skipped, ``{"skipped": reason}``.
  """
  names = list(commands)
  reports: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
  skipped: dict[str, str] = {}
  # ``python -m benchmarks.x`` finds the modules this process found.
  path = os.pathsep.join(p for p in sys.path if p)
  full_env = {**os.environ, "PYTHONPATH": path, **(env or {})}
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
      "command": commands[name],
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


def header(
  command: str, load_before, load_after, processes: int, busy: bool = False
) -> list[str]:
  """The Markdown lines every results file starts with."""
  lines = [
    f"- CPU: {cpu_model()}",
    f"- load average (1, 5, 15 min) before: {load_before}, after: {load_after}",
    f"- method: each contender in its own process, {processes} processes "
    "each in alternating order, median of the per-process medians "
    "(benchmarks/method.py)",
    f"- command: `{command}`",
  ]
  if busy:
    lines.append("- one busy process beside the benchmark (`--busy`)")
  warning = busy_warning(load_before)
  if warning:
    lines.insert(0, f"- **{warning}**")
  return lines


def versions(*packages: str) -> str:
  """``"package version, ..."`` of those of ``packages`` installed."""
  import importlib.metadata  # noqa: PLC0415

  found = []
  for package in packages:
    try:
      found.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


def _at_least_one(text: str) -> int:
  try:
    count = int(text)
  except ValueError:
    count = 0
  if count < 1:
    raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
  return count


def add_arguments(parser, contenders: Sequence[str] = ()) -> None:
  """The method's flags: ``--processes`` and ``--busy``, and with
  ``contenders``, ``--contenders`` (a comma-separated choice of them, all
  by default; :func:`chosen` reads it)."""
  if contenders:
    parser.add_argument(
      "--contenders",
      default=",".join(contenders),
      help=f"comma-separated, of: {', '.join(contenders)}",
    )
  parser.add_argument(
    "--processes",
    type=_at_least_one,
    default=3,
    help="processes per contender, in alternating order (at least 3 for "
    "published figures)",
  )
  parser.add_argument(
    "--busy",
    action="store_true",
    help="keep one spinning process beside the benchmark",
  )


def chosen(parser, names: str, contenders: Sequence[str]) -> list[str]:
  """The contenders named in ``names`` (comma-separated); a parser error
  naming the flag and the known ones for any other name."""
  chosen_names = names.split(",")
  for name in chosen_names:
    if name not in contenders:
      parser.error(
        f"--contenders: unknown contender {name!r}; known: "
        f"{', '.join(contenders)}"
      )
  return chosen_names


def _log_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


class Session:
  """One driver run: each contender's processes, the machine and the load.

  Entering records the CPU and the load (and warns when the machine is
  busy) and, with ``busy``, starts a :class:`BusyNeighbour`; leaving
  records the load after. ``module`` is the harness, which
  ``python -m module *args`` runs for one process of one contender.

  Example::

    with method.Session("benchmarks.x", argv, processes=3) as session:
      results = session.measure({"a": ["--one=a"], "b": ["--one=b"]})
    lines = session.header()
  """

  def __init__(
    self,
    module: str,
    argv: Sequence[str],
    *,
    processes: int,
    busy: bool = False,
    log: Callable[[str], None] = _log_to_stderr,
  ):
    if processes < 1:
      raise ValueError(f"processes must be at least 1, got {processes}")
    self.module = module
    self.command = " ".join([f"python -m {module}", *argv])
    self.processes = processes
    self.busy = busy
    self.log = log
    self.neighbour: BusyNeighbour | None = None

  def __enter__(self) -> Session:
    self.date = datetime.datetime.now().isoformat(timespec="seconds")
    self.load_before = load_average()
    self.load_after = None
    self.log(f"CPU: {cpu_model()}; load average before: {self.load_before}")
    warning = busy_warning(self.load_before)
    if warning:
      self.log(warning)
    if self.busy:
      self.neighbour = BusyNeighbour().__enter__()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    if self.neighbour is not None:
      self.neighbour.__exit__(*exc_info)
    self.load_after = load_average()

  def measure(self, arguments: dict[str, list[str]]) -> dict[str, Any]:
    """:func:`measure` of ``python -m module *arguments[name]`` per name."""
    return measure(
      {
        name: [sys.executable, "-m", self.module, *args]
        for name, args in arguments.items()
      },
      processes=self.processes,
      log=self.log,
    )

  def header(self) -> list[str]:
    """:func:`header`'s lines for this run (after it ended)."""
    return header(
      self.command,
      self.load_before,
      self.load_after,
      self.processes,
      self.busy,
    )

  def meta(self) -> dict[str, Any]:
    """What a results JSON file records of this run."""
    return {
      "date": self.date,
      "cpu": cpu_model(),
      "load_before": self.load_before,
      "load_after": self.load_after,
      "command": self.command,
      "processes": self.processes,
      "busy": self.busy,
    }
