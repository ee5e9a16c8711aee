r"""Long-stream soak: a million steps through one RNN, chunk by chunk.

Streams `--steps` steps through an `LSTMCell` and a `MinGRUCell` under
`hk_rnn.RNN`, in chunks of `--chunk` steps, each chunk starting from the
previous chunk's final carry (one jitted call per chunk, the carry passed as
`initial_carry`), with the default kernel backends. It checks, per cell:

* **memory**: the process's resident set (VmRSS) after each chunk; its growth
  from the end of the warm-up chunks (the first `--warmup` chunks, where
  compiling and allocator pools settle) to the highest value afterwards must
  stay under 5 %;
* **compilation**: the jitted chunk function compiles once, for the first
  chunk, and never again (its cache holds one entry at the end);
* **numbers**: a float64 numpy oracle runs the same cell equations over the
  same inputs in lockstep, from the same float32 parameters; every output
  of every chunk must agree with it within float32 rounding (|error| <=
  `ATOL` + `RTOL` * |oracle|), at the end as at the start;
* **latency**: the wall time of each chunk's call (to the outputs being
  ready), after the warm-up chunks: its 99th percentile at most twice its
  median.

Inputs are drawn per chunk from a generator seeded by the chunk's index, so a
run is reproducible. The oracle costs more than the stream itself.

The full soak (40 s on a busy 2-core machine; latency wants an idle one)::

    python -m benchmarks.soak --steps=1000000 --out=benchmarks/results/soak.json

A short check::

    python -m benchmarks.soak --steps=20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import hk_rnn

# float32 rounding, as the comparison with the float64 oracle allows it.
ATOL, RTOL = 2e-5, 2e-4
# The growth in resident memory allowed after the warm-up chunks.
MAX_MEMORY_GROWTH = 0.05
# The 99th percentile of chunk latency allowed, as a multiple of the median.
MAX_P99_OVER_MEDIAN = 2.0

CELLS = {"lstm": hk_rnn.LSTMCell, "min_gru": hk_rnn.MinGRUCell}


def resident_bytes() -> int:
  """This process's resident set size (Linux: VmRSS of /proc/self/status)."""
  with open("/proc/self/status", encoding="ascii") as status:
    for line in status:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("no VmRSS line in /proc/self/status")


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def oracle_chunk(kind: str, params: dict, carry, inputs: np.ndarray):
  """The cell's equations in float64 over `inputs (batch, time, in)`.

  LSTM: z = x W_i + h W_h + b = [z_i, z_f, z_g, z_o];
  c' = σ(z_f) c + σ(z_i) tanh(z_g); h' = σ(o) tanh(c').
  MinGRU: z = σ(x W_iz + b_z), h̃ = x W_ih + b_h, h' = (1 - z) h + z h̃.

  Returns the carry after the chunk and the outputs `(batch, time, F)`.
  """
  w_i = params["w_i"]
  b = params["b"]
  outputs = np.empty(
    (
      inputs.shape[0],
      inputs.shape[1],
      w_i.shape[1] // (4 if kind == "lstm" else 2),
    )
  )
  projected = inputs @ w_i + b  # (batch, time, blocks * F)
  if kind == "lstm":
    c, h = carry
    w_h = params["w_h"]
    for t in range(inputs.shape[1]):
      z = projected[:, t] + h @ w_h
      z_i, z_f, z_g, z_o = np.split(z, 4, axis=-1)
      c = _sigmoid(z_f) * c + _sigmoid(z_i) * np.tanh(z_g)
      h = _sigmoid(z_o) * np.tanh(c)
      outputs[:, t] = h
    return (c, h), outputs
  h = carry
  z_pre, candidate = np.split(projected, 2, axis=-1)
  z = _sigmoid(z_pre)
  for t in range(inputs.shape[1]):
    h = (1.0 - z[:, t]) * h + z[:, t] * candidate[:, t]
    outputs[:, t] = h
  return h, outputs


def soak(kind: str, args: argparse.Namespace) -> dict:
  """Streams `args.steps` steps through one cell; returns the figures."""
  batch, inputs_size, features, chunk = (
    args.batch,
    args.inputs,
    args.features,
    args.chunk,
  )
  num_chunks = args.steps // chunk

  def forward(x, carry):
    return hk_rnn.RNN(CELLS[kind](features, name="cell"))(
      x, initial_carry=carry
    )

  model = hk.without_apply_rng(hk.transform(forward))
  sample = jnp.zeros((batch, chunk, inputs_size), jnp.float32)
  params = model.init(jax.random.PRNGKey(args.seed), sample, None)
  carry = hk.transform(  # the cell's own initial carry (zeros)
    lambda: CELLS[kind](features, name="cell").initialize_carry(sample[:, 0])
  ).apply({}, None)
  step = jax.jit(model.apply)
  oracle_params = {
    name: np.asarray(value, np.float64)
    for name, value in params["cell"].items()
  }
  oracle_carry = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), carry)

  rss, seconds, worst, worst_relative = [], [], 0.0, 0.0
  last_error = 0.0
  for index in range(num_chunks):
    rng = np.random.default_rng([args.seed, index])
    x = rng.normal(size=(batch, chunk, inputs_size)).astype(np.float32)
    start = time.perf_counter()
    carry, outputs = step(params, x, carry)
    outputs = jax.block_until_ready(outputs)
    seconds.append(time.perf_counter() - start)
    oracle_carry, expected = oracle_chunk(
      kind, oracle_params, oracle_carry, x.astype(np.float64)
    )
    error = np.abs(np.asarray(outputs, np.float64) - expected)
    allowed = ATOL + RTOL * np.abs(expected)
    last_error = float(error.max())
    worst = max(worst, last_error)
    worst_relative = max(worst_relative, float((error / allowed).max()))
    rss.append(resident_bytes())
    if args.verbose and (index + 1) % max(1, num_chunks // 20) == 0:
      print(
        f"  {kind}: chunk {index + 1}/{num_chunks}, RSS "
        f"{rss[-1] / 2**20:.1f} MiB, max |error| {worst:.2e}",
        file=sys.stderr,
      )
  warmup = min(args.warmup, num_chunks - 1)
  settled = rss[warmup - 1] if warmup else rss[0]
  growth = (max(rss[warmup:]) - settled) / settled if num_chunks > 1 else 0.0
  timed = np.asarray(seconds[warmup:] or seconds)
  median, p99 = float(np.median(timed)), float(np.percentile(timed, 99))
  compiles = step._cache_size()  # noqa: SLF001 -- jit's own count
  result = {
    "cell": kind,
    "steps": num_chunks * chunk,
    "chunks": num_chunks,
    "rss_mib_after_warmup": settled / 2**20,
    "rss_mib_max_after_warmup": max(rss[warmup:] or rss) / 2**20,
    "rss_growth": growth,
    "compilations": compiles,
    "max_abs_error": worst,
    "last_chunk_max_abs_error": last_error,
    "max_error_over_allowed": worst_relative,
    "chunk_ms_median": 1e3 * median,
    "chunk_ms_p99": 1e3 * p99,
    "p99_over_median": p99 / median,
  }
  result["checks"] = {
    "memory_flat": growth < MAX_MEMORY_GROWTH,
    "compiled_once": compiles == 1,
    "matches_float64_oracle": worst_relative <= 1.0,
    "p99_within_2x_median": p99 <= MAX_P99_OVER_MEDIAN * median,
  }
  return result


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1_000_000)
  parser.add_argument("--chunk", type=int, default=1000)
  parser.add_argument("--cells", default="lstm,min_gru")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--inputs", type=int, default=8)
  parser.add_argument("--features", type=int, default=16)
  parser.add_argument(
    "--warmup",
    type=int,
    default=10,
    help="chunks before memory and latency are measured",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="write the figures here")
  parser.add_argument("--verbose", action="store_true")
  args = parser.parse_args(argv)
  if args.steps < args.chunk or args.chunk < 1:
    parser.error("--steps must be at least one --chunk of >= 1 step")
  for kind in args.cells.split(","):
    if kind not in CELLS:
      parser.error(f"--cells: {kind!r} is not one of {sorted(CELLS)}")
  return args


def main(argv=None) -> list[dict]:
  args = parse(argv)
  results = [soak(kind, args) for kind in args.cells.split(",")]
  for r in results:
    print(
      f"{r['cell']}: {r['steps']:,} steps in {r['chunks']} chunks; RSS "
      f"{r['rss_mib_after_warmup']:.1f} -> "
      f"{r['rss_mib_max_after_warmup']:.1f} MiB "
      f"({100 * r['rss_growth']:+.2f} %); {r['compilations']} compilation(s);"
      f" max |y - y64| {r['max_abs_error']:.2e} (last chunk "
      f"{r['last_chunk_max_abs_error']:.2e}, {r['max_error_over_allowed']:.2f}"
      f" of the float32 allowance); chunk median {r['chunk_ms_median']:.2f} "
      f"ms, p99 {r['chunk_ms_p99']:.2f} ms ({r['p99_over_median']:.2f}x); "
      + ", ".join(
        f"{name} {'ok' if ok else 'FAILED'}" for name, ok in r["checks"].items()
      )
    )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(
        {
          "machine": platform.platform(),
          "jax": jax.__version__,
          "args": vars(args),
          "results": results,
        },
        f,
        indent=2,
      )
  return results


if __name__ == "__main__":
  outcome = main()
  sys.exit(0 if all(all(r["checks"].values()) for r in outcome) else 1)
