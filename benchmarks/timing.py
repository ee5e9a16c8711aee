"""Interleaved timing and XLA memory figures shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def time_interleaved(
  runners: Mapping[str, Callable[[], Any]],
  *,
  rounds: int,
  iters: int,
  log: Callable[[str], None] = lambda message: None,
) -> dict[str, dict[str, Any]]:
  """Median seconds per call of each runner, timed in rotating rounds.

  Every round times each runner once, in an order that rotates from round
  to round, after an untimed warm-up call; so slow phases of a shared,
  noisy machine fall on every contender alike. Each runner must block
  until its work is done.
  """
  samples = {name: [] for name in runners}
  order = list(runners)
  for round_index in range(rounds):
    shift = round_index % max(len(order), 1)
    for name in order[shift:] + order[:shift]:
      runners[name]()
      start = time.perf_counter()
      for _ in range(iters):
        runners[name]()
      samples[name].append((time.perf_counter() - start) / iters)
    log(f"  round {round_index + 1}/{rounds}")
  return {
    name: {
      "median_s": statistics.median(times),
      "min_s": min(times),
      "max_s": max(times),
      "samples_s": times,
    }
    for name, times in samples.items()
  }


def compiled_temp_bytes(compiled) -> int | None:
  """XLA's temporary buffer size of a compiled JAX computation, if known."""
  memory = compiled.memory_analysis()
  return None if memory is None else int(memory.temp_size_in_bytes)


def format_bytes(count: int | None) -> str:
  return "–" if count is None else f"{count / 2**20:.1f} MiB"
