r"""Real tokens per second of a bidirectional LSTM on long-tailed lengths.

One set of sequences (log-normal lengths, median ``--median``, clipped to
``[1, --max_length]``) is run by every contender in one process, a jitted
(or eager, for PyTorch) training step: forward and backward of
``loss = Σ outputs + Σ carries`` with respect to the parameters.

* ``hk_rnn_packed``: ``pack_sequences`` into rows of ``--row_length``,
  ``Bidirectional(..., max_segments=packed.max_segments)``: every
  sequence's carry in both directions comes back (and enters the loss);
* ``hk_rnn_packed_last_carry``: the same rows without ``max_segments``:
  what the per-segment carries cost;
* ``hk_rnn_padded``: one sequence per row, padded to the longest, with
  ``seq_lengths``;
* ``torch_packed``: ``nn.LSTM(bidirectional=True)`` through
  ``pack_padded_sequence(enforce_sorted=False)``;
* ``torch_padded``: the same module on the padded batch (its oneDNN path,
  computing the padding too);
* ``flax_padded``: ``nn.Bidirectional`` of ``nn.RNN(OptimizedLSTMCell)``
  with ``seq_lengths``.

Throughput counts real (non-padding) steps only. Rounds interleave the
contenders (``benchmarks/timing.py``); the table gives medians. Packing time
is ``pack_sequences``' own, per batch, on the host.

    python -m benchmarks.packing                  # 128 and 512 sequences
    python -m benchmarks.packing --out benchmarks/results
    python -m benchmarks.packing --pack_only 100000 --row_length 512

``--pack_only N`` times ``pack_sequences`` alone on N sequences of the same
length mix (CPU seconds, median of 5, scalar and 8 features per step): the
host-side cost of packing a data pipeline's batches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from benchmarks import timing


def draw_lengths(count, median, max_length, seed):
  rng = np.random.default_rng(seed)
  lengths = rng.lognormal(np.log(median), 1.0, count)
  return np.clip(np.round(lengths), 1, max_length).astype(np.int64)


def draw_sequences(lengths, inputs, seed):
  rng = np.random.default_rng(seed + 1)
  return [rng.normal(size=(n, inputs)).astype(np.float32) for n in lengths]


def padded_batch(sequences):
  lengths = np.array([len(s) for s in sequences], np.int32)
  batch = np.zeros((len(sequences), lengths.max(), sequences[0].shape[1]))
  for index, sequence in enumerate(sequences):
    batch[index, : len(sequence)] = sequence
  return batch.astype(np.float32), lengths


def _sum_all(tree):
  import jax
  import jax.numpy as jnp

  return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(tree))


def _jitted_grad(loss, params, *args):
  """``run()`` of a compiled ``grad(loss)``, and its XLA temporaries."""
  import jax

  compiled = jax.jit(jax.grad(loss)).lower(params, *args).compile()
  return (
    lambda: jax.block_until_ready(compiled(params, *args)),
    timing.compiled_temp_bytes(compiled),
  )


def hk_rnn_contenders(sequences, features, row_length):
  import haiku as hk
  import jax
  import jax.numpy as jnp

  import hk_rnn

  def bidirectional():
    return hk_rnn.Bidirectional(
      hk_rnn.RNN(hk_rnn.LSTMCell(features, name="forward")),
      hk_rnn.RNN(hk_rnn.LSTMCell(features, name="backward")),
    )

  model = hk.without_apply_rng(
    hk.transform(lambda x, mask, **options: bidirectional()(x, mask, **options))
  )
  start = time.perf_counter()
  packed = hk_rnn.pack_sequences(sequences, row_length)
  packing_s = time.perf_counter() - start
  inputs = jnp.asarray(packed.inputs)
  mask = jnp.asarray(packed.segmentation_mask)
  params = model.init(jax.random.key(0), inputs, mask)

  def packed_loss(max_segments):
    def loss(params, inputs, mask):
      carries, outputs = model.apply(
        params, inputs, mask, max_segments=max_segments
      )
      return jnp.sum(outputs) + _sum_all(carries)

    return loss

  padded, lengths = padded_batch(sequences)

  def padded_loss(params, inputs, lengths):
    carries, outputs = model.apply(params, inputs, None, seq_lengths=lengths)
    return jnp.sum(outputs) + _sum_all(carries)

  runners = {
    "hk_rnn_packed": _jitted_grad(
      packed_loss(packed.max_segments), params, inputs, mask
    ),
    "hk_rnn_packed_last_carry": _jitted_grad(
      packed_loss(None), params, inputs, mask
    ),
    "hk_rnn_padded": _jitted_grad(
      padded_loss, params, jnp.asarray(padded), jnp.asarray(lengths)
    ),
  }
  layout = {
    "packed_rows": packed.num_rows,
    "packed_max_segments": packed.max_segments,
    "packed_fill": packed.fill,
    "padded_shape": list(padded.shape[:2]),
    "packing_ms": 1e3 * packing_s,
  }
  return runners, layout


def flax_contender(sequences, features):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  padded, lengths = padded_batch(sequences)
  make = lambda: nn.RNN(nn.OptimizedLSTMCell(features))  # noqa: E731
  module = nn.Bidirectional(make(), make(), return_carry=True)
  inputs, lengths = jnp.asarray(padded), jnp.asarray(lengths)
  params = module.init(jax.random.key(0), inputs, seq_lengths=lengths)

  def loss(params, inputs, lengths):
    carries, outputs = module.apply(params, inputs, seq_lengths=lengths)
    return jnp.sum(outputs) + _sum_all(carries)

  return {"flax_padded": _jitted_grad(loss, params, inputs, lengths)}


def torch_contenders(sequences, features):
  import torch
  from torch.nn.utils import rnn as torch_rnn

  torch.manual_seed(0)
  padded, lengths = padded_batch(sequences)
  module = torch.nn.LSTM(
    padded.shape[-1], features, batch_first=True, bidirectional=True
  )
  x = torch.from_numpy(padded)
  n = torch.from_numpy(lengths).to(torch.int64)

  def step(packed: bool) -> Callable[[], None]:
    def run():
      for parameter in module.parameters():
        parameter.grad = None
      if packed:
        outputs, (h, c) = module(
          torch_rnn.pack_padded_sequence(
            x, n, batch_first=True, enforce_sorted=False
          )
        )
        outputs, _ = torch_rnn.pad_packed_sequence(outputs, batch_first=True)
      else:
        outputs, (h, c) = module(x)
      (outputs.sum() + h.sum() + c.sum()).backward()

    return run

  return {
    "torch_packed": (step(True), None),
    "torch_padded": (step(False), None),
  }


def time_packing(count, args) -> str:
  """``pack_sequences``' CPU time on ``count`` sequences, as a table."""
  import hk_rnn

  lengths = draw_lengths(count, args.median, args.max_length, args.seed)
  lines = [
    f"`pack_sequences` of {count} sequences (log-normal lengths, median "
    f"{args.median:g}, clipped to [1, {args.max_length}]) into rows of "
    f"{args.row_length}; CPU seconds, median of 5:",
    "",
    "| features per step | CPU s | rows | fill |",
    "|---|---|---|---|",
  ]
  for features in ((), (8,)):
    sequences = [np.ones((n, *features), np.float32) for n in lengths]
    seconds = []
    for _ in range(5):
      start = time.process_time()
      packed = hk_rnn.pack_sequences(sequences, args.row_length)
      seconds.append(time.process_time() - start)
    lines.append(
      f"| {features[0] if features else 'scalar'} | "
      f"{statistics.median(seconds):.3f} | {packed.num_rows} | "
      f"{100 * packed.fill:.1f}% |"
    )
  return "\n".join(lines)


def run_size(count, args, log) -> dict:
  lengths = draw_lengths(count, args.median, args.max_length, args.seed)
  sequences = draw_sequences(lengths, args.inputs, args.seed)
  runners, layout = hk_rnn_contenders(sequences, args.features, args.row_length)
  try:
    runners.update(flax_contender(sequences, args.features))
  except ImportError:
    log("flax not installed: skipped")
  try:
    runners.update(torch_contenders(sequences, args.features))
  except ImportError:
    log("torch not installed: skipped")
  packing_ms = []
  for _ in range(5):
    start = time.perf_counter()
    import hk_rnn

    hk_rnn.pack_sequences(sequences, args.row_length)
    packing_ms.append(1e3 * (time.perf_counter() - start))
  layout["packing_ms"] = statistics.median(packing_ms)
  timed = timing.time_interleaved(
    {name: run for name, (run, _) in runners.items()},
    rounds=args.rounds,
    iters=args.iters,
    log=log,
  )
  tokens = int(lengths.sum())
  results = {}
  for name, figures in timed.items():
    results[name] = {
      "median_s": figures["median_s"],
      "min_s": figures["min_s"],
      "max_s": figures["max_s"],
      "tokens_per_s": tokens / figures["median_s"],
      "memory_bytes": runners[name][1],
    }
  return {
    "sequences": count,
    "real_tokens": tokens,
    **layout,
    "results": results,
  }


def markdown(runs, meta) -> str:
  lines = [
    "# Packed vs padded: bidirectional LSTM training step",
    "",
    meta,
    "",
  ]
  for run in runs:
    results = run["results"]
    packed = results["hk_rnn_packed"]["tokens_per_s"]
    torch_best = max(
      (
        results[n]["tokens_per_s"]
        for n in ("torch_packed", "torch_padded")
        if n in results
      ),
      default=None,
    )
    lines += [
      f"## {run['sequences']} sequences, {run['real_tokens']} real tokens",
      "",
      f"Packed: {run['packed_rows']} rows of the row length, "
      f"{run['packed_max_segments']} segment slots, "
      f"{100 * run['packed_fill']:.0f}% of steps real; padded: "
      f"{run['padded_shape'][0]} rows of {run['padded_shape'][1]}. "
      f"`pack_sequences` took {run['packing_ms']:.1f} ms.",
      "",
      "| contender | step (median) | real tokens/s | hk_rnn packed ÷ it | XLA temp |",
      "|---|---|---|---|---|",
    ]
    for name, figures in results.items():
      lines.append(
        f"| {name} | {1e3 * figures['median_s']:.1f} ms | "
        f"{figures['tokens_per_s'] / 1e3:.1f} k | "
        f"{packed / figures['tokens_per_s']:.2f}× | "
        f"{timing.format_bytes(figures['memory_bytes'])} |"
      )
    cost = (
      results["hk_rnn_packed"]["median_s"]
      / results["hk_rnn_packed_last_carry"]["median_s"]
      - 1
    )
    lines += [
      "",
      f"Per-segment carries cost {100 * cost:+.1f}% of the packed step's time "
      f"(XLA temporaries "
      f"{timing.format_bytes(results['hk_rnn_packed']['memory_bytes'])} vs "
      f"{timing.format_bytes(results['hk_rnn_packed_last_carry']['memory_bytes'])}).",
    ]
    if torch_best:
      lines.append(
        f"hk_rnn packed: {packed / results['hk_rnn_padded']['tokens_per_s']:.2f}× "
        f"hk_rnn padded, {packed / torch_best:.2f}× PyTorch's faster layout."
      )
    lines.append("")
  return "\n".join(lines)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512])
  parser.add_argument("--median", type=float, default=24.0)
  parser.add_argument("--max_length", type=int, default=256)
  parser.add_argument("--row_length", type=int, default=256)
  parser.add_argument("--inputs", type=int, default=64)
  parser.add_argument("--features", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--iters", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--out", default=None, help="folder for packing.{md,json}"
  )
  parser.add_argument(
    "--pack_only",
    type=int,
    default=None,
    metavar="N",
    help="only time pack_sequences on N sequences",
  )
  args = parser.parse_args(argv)
  if args.pack_only:
    print(time_packing(args.pack_only, args))
    return
  log = lambda message: print(message, flush=True)  # noqa: E731
  runs = []
  for count in args.sizes:
    log(f"{count} sequences")
    runs.append(run_size(count, args, log))
  load = os.getloadavg()
  meta = (
    f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
    f"{os.cpu_count()} cores, load average {load[0]:.1f}/{load[1]:.1f}/"
    f"{load[2]:.1f}; inputs {args.inputs}, hidden {args.features}, lengths "
    f"log-normal (median {args.median:g}, σ 1) clipped to [1, "
    f"{args.max_length}], rows of {args.row_length}; {args.rounds} "
    "interleaved rounds, medians."
  )
  text = markdown(runs, meta)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "packing.md"), "w") as f:
      f.write(text)
    with open(os.path.join(args.out, "packing.json"), "w") as f:
      json.dump({"meta": meta, "runs": runs}, f, indent=2)


if __name__ == "__main__":
  main()
