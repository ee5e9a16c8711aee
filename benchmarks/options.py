r"""Measures what hk_rnn's memory and dropout options cost and save.

Two studies, each timing jitted training steps (forward and backward of
``loss = Σ outputs + Σ final carry``) of one model under several ``RNN``
settings, interleaved in one process, medians over rounds, with XLA's
compiled temporary memory:

* ``remat``: ``remat=None`` (fused kernel, and ``fused=False`` step path)
  against ``remat="step"`` and ``remat="chunked"``, on long sequences, one
  per row and packed (segments of 20 to 200 steps);
* ``dropout``: the two ways of getting the recurrent dropout mask into each
  step (``dropout_sampling="once"`` and ``"per_step"``) on the step path,
  and ``"once"`` with the fused kernel, for LSTM and GRU at a few sizes.

Run::

    python -m benchmarks.options --study=remat --out benchmarks/results
    python -m benchmarks.options --study=dropout --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import hk_rnn
from benchmarks import timing

CELLS = {"lstm": hk_rnn.LSTMCell, "gru": hk_rnn.GRUCell}


def training_step(
  cell: str,
  shape: tuple[int, int, int, int],
  rnn_options: dict,
  *,
  dropout: bool = False,
  packed: bool = False,
) -> tuple[Callable[[], object], int | None]:
  """A compiled training step and its temporary memory, ready to time.

  Rows hold one sequence of random length each, or with ``packed`` several
  sequences of 20 to 200 steps (segment ids) filling the row.
  """
  batch, time, inputs_size, features = shape
  cell_options = (
    dict(dropout_rate=0.1, recurrent_dropout_rate=0.25) if dropout else {}
  )

  def forward(inputs, mask):
    rnn = hk_rnn.RNN(CELLS[cell](features, **cell_options), **rnn_options)
    if packed:
      return rnn(inputs, mask, is_training=dropout)
    return rnn(inputs, seq_lengths=mask, is_training=dropout)

  model = hk.transform(forward)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.normal(size=(batch, time, inputs_size)), jnp.float32)
  if packed:
    mask = jnp.asarray(_packed_ids(rng, batch, time))
  else:
    mask = jnp.asarray(rng.integers(time // 2, time + 1, size=batch))
  key = jax.random.PRNGKey(0)
  params = model.init(key, inputs, mask)

  def loss(params, key, inputs, mask):
    carry, outputs = model.apply(params, key, inputs, mask)
    return jnp.sum(outputs) + sum(
      jnp.sum(leaf) for leaf in jax.tree.leaves(carry)
    )

  compiled = jax.jit(jax.grad(loss)).lower(params, key, inputs, mask).compile()
  return (
    lambda: jax.block_until_ready(compiled(params, key, inputs, mask)),
    timing.compiled_temp_bytes(compiled),
  )


def _packed_ids(rng, batch: int, time: int) -> np.ndarray:
  """Segment ids ``(batch, time)``: segments of 20 to 200 steps, no padding."""
  ids = np.zeros((batch, time), np.int32)
  for row in ids:
    start, segment = 0, 1
    while start < time:
      length = int(rng.integers(20, 201))
      row[start : start + length] = segment
      start, segment = start + length, segment + 1
  return ids


def remat_study(quick: bool):
  variants = {
    "no remat (fused)": {},
    "no remat (step path)": {"fused": False},
    'remat="step"': {"remat": "step"},
    'remat="chunked"': {"remat": "chunked"},
  }
  times = (100, 300) if quick else (1000, 10000)
  for time in times:
    yield "lstm", (16, time, 64, 128), variants, {}
  yield "lstm", (16, times[0], 64, 128), variants, {"packed": True}


def dropout_study(quick: bool):
  variants = {
    'sampling="once" (step path)': {"fused": False},
    'sampling="per_step" (step path)': {
      "fused": False,
      "dropout_sampling": "per_step",
    },
    'sampling="once" (fused)': {},
  }
  shapes = (
    [(8, 16, 16, 32)]
    if quick
    else [
      (32, 64, 128, 256),
      (16, 64, 64, 128),
      (64, 32, 256, 512),
    ]
  )
  for cell in ("lstm", "gru"):
    for shape in shapes:
      yield cell, shape, variants, {"dropout": True}


def run_study(study: str, rounds: int, iters: int, quick: bool, log):
  """Returns Markdown rows: one per variant per setting."""
  generate = {"remat": remat_study, "dropout": dropout_study}[study]
  lines = []
  for cell, shape, variants, step_options in generate(quick):
    title = (
      f"{cell.upper()} B={shape[0]} T={shape[1]} D={shape[2]} F={shape[3]}"
    )
    if step_options.get("packed"):
      title += ", packed rows"
    log(f"{title}: compiling {len(variants)} variants")
    runners, memory = {}, {}
    for name, options in variants.items():
      runners[name], memory[name] = training_step(
        cell, shape, options, **step_options
      )
    results = timing.time_interleaved(
      runners, rounds=rounds, iters=iters, log=log
    )
    baseline = next(iter(variants))
    for name, result in results.items():
      ratio = result["median_s"] / results[baseline]["median_s"]
      base_memory = memory[baseline]
      memory_ratio = (
        "–"
        if not memory[name] or not base_memory
        else f"{base_memory / memory[name]:.1f}×"
      )
      lines.append(
        f"| {title} | {name} | {result['median_s'] * 1e3:.1f} ms | "
        f"{ratio:.2f}× | {timing.format_bytes(memory[name])} | {memory_ratio} |"
      )
  header = [
    "| setting | variant | median step | time vs first | XLA temp memory "
    "| memory saved vs first |",
    "|---|---|---|---|---|---|",
  ]
  return header + lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--study", choices=("remat", "dropout"), required=True)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument(
    "--iters",
    type=int,
    default=None,
    help="steps per timed block (default: 1 for remat, 5 for dropout)",
  )
  parser.add_argument(
    "--quick", action="store_true", help="tiny shapes, to check the script runs"
  )
  parser.add_argument(
    "--out", default=None, help="folder for <study>.md (printed either way)"
  )
  args = parser.parse_args(argv)
  iters = args.iters or (1 if args.study == "remat" else 5)
  rows = run_study(args.study, args.rounds, iters, args.quick, print)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  meta = (
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
    f"load average {load:.1f} at the end; jax {jax.__version__}, "
    f"dm-haiku {hk.__version__}; {args.rounds} rounds × {iters} steps."
  )
  text = "\n".join([f"### `{args.study}` study", "", meta, "", *rows, ""])
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.study}.md"), "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
