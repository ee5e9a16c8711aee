r"""Real tokens per second of a bidirectional LSTM on long-tailed lengths.

One set of sequences (log-normal lengths, median ``--median``, clipped to
``[1, --max_length]``) is run by every contender, a jitted (or eager, for
PyTorch) training step: forward and backward of
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

Throughput counts real (non-padding) steps only. The figures follow the
project's method (``benchmarks/method.py``): each contender runs in
processes of its own, ``--processes`` (at least 3) per contender in
alternating order; inside a process a warm-up block, then ``--rounds``
blocks of ``--iters`` steps, of which the process reports the median time
per step and, for JAX, XLA's compiled temporary memory. The table gives the
median of the processes' medians and their spread, with the CPU model and
the load average before and after (and a warning when the machine was
busy); ``--busy`` keeps one spinning process beside the benchmark. Packing
time is ``pack_sequences``' own, per batch, on the host (the driver's,
median of 5).

    python -m benchmarks.packing                  # 128 and 512 sequences
    python -m benchmarks.packing --out benchmarks/results
    python -m benchmarks.packing --pack_only 100000 --row_length 512

``--pack_only N`` times ``pack_sequences`` alone on N sequences of the same
length mix (CPU seconds, median of 5, scalar and 8 features per step): the
host-side cost of packing a data pipeline's batches. ``--one=NAME`` (with
one ``--sizes`` value) runs one process of one contender and prints its
report as JSON on the last line (what the driver starts).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from benchmarks import method

CONTENDERS = (
  "hk_rnn_packed",
  "hk_rnn_packed_last_carry",
  "hk_rnn_padded",
  "flax_padded",
  "torch_packed",
  "torch_padded",
)


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
    method.compiled_temp_bytes(compiled),
  )


def hk_rnn_contender(name, sequences, features, row_length):
  """``(run, XLA temporaries)`` of one of the ``hk_rnn_*`` contenders."""
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
  packed = hk_rnn.pack_sequences(sequences, row_length)
  inputs = jnp.asarray(packed.inputs)
  mask = jnp.asarray(packed.segmentation_mask)
  params = model.init(jax.random.key(0), inputs, mask)
  if name == "hk_rnn_padded":
    padded, lengths = padded_batch(sequences)

    def padded_loss(params, inputs, lengths):
      carries, outputs = model.apply(params, inputs, None, seq_lengths=lengths)
      return jnp.sum(outputs) + _sum_all(carries)

    return _jitted_grad(
      padded_loss, params, jnp.asarray(padded), jnp.asarray(lengths)
    )
  max_segments = packed.max_segments if name == "hk_rnn_packed" else None

  def packed_loss(params, inputs, mask):
    carries, outputs = model.apply(
      params, inputs, mask, max_segments=max_segments
    )
    return jnp.sum(outputs) + _sum_all(carries)

  return _jitted_grad(packed_loss, params, inputs, mask)


def layout(sequences, row_length) -> dict:
  """The packed and the padded batch's shapes, and ``pack_sequences``' time
  (median of 5, milliseconds)."""
  import hk_rnn

  packing_ms = []
  for _ in range(5):
    start = time.perf_counter()
    packed = hk_rnn.pack_sequences(sequences, row_length)
    packing_ms.append(1e3 * (time.perf_counter() - start))
  return {
    "packed_rows": packed.num_rows,
    "packed_max_segments": packed.max_segments,
    "packed_fill": packed.fill,
    "padded_shape": [len(sequences), max(len(s) for s in sequences)],
    "packing_ms": statistics.median(packing_ms),
  }


def flax_contender(sequences, features):
  """``(run, XLA temporaries)`` of ``flax_padded``."""
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

  return _jitted_grad(loss, params, inputs, lengths)


def torch_contender(name, sequences, features):
  """``(run, None)`` of ``torch_packed`` or ``torch_padded``."""
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

  return step(name == "torch_packed"), None


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


def one_process(name: str, count: int, args) -> None:
  """Times contender ``name`` on ``count`` sequences; prints its report."""
  lengths = draw_lengths(count, args.median, args.max_length, args.seed)
  sequences = draw_sequences(lengths, args.inputs, args.seed)
  if name.startswith("hk_rnn"):
    run, memory_bytes = hk_rnn_contender(
      name, sequences, args.features, args.row_length
    )
  else:
    peer = "flax" if name == "flax_padded" else "torch"
    if importlib.util.find_spec(peer) is None:
      method.print_skip(f"{peer} is not installed")
      return
    if peer == "flax":
      run, memory_bytes = flax_contender(sequences, args.features)
    else:
      run, memory_bytes = torch_contender(name, sequences, args.features)
  samples = method.time_blocks(run, rounds=args.rounds, iters=args.iters)
  method.print_report(samples, memory_bytes=memory_bytes)


def _summary(count, args, results) -> dict:
  """One size's layout, tokens and results, with tokens per second."""
  lengths = draw_lengths(count, args.median, args.max_length, args.seed)
  tokens = int(lengths.sum())
  for result in results.values():
    if "median_s" in result:
      result["tokens_per_s"] = tokens / result["median_s"]
  return {
    "sequences": count,
    "real_tokens": tokens,
    **layout(draw_sequences(lengths, args.inputs, args.seed), args.row_length),
    "results": results,
  }


def markdown(runs, header) -> str:
  lines = [
    "# Packed vs padded: bidirectional LSTM training step",
    "",
    *header,
    "",
    "Step: median of the per-process medians; `spread`: the lowest and "
    "highest process median.",
    "",
  ]
  for run in runs:
    results = {n: r for n, r in run["results"].items() if "median_s" in r}
    packed = results.get("hk_rnn_packed")
    lines += [
      f"## {run['sequences']} sequences, {run['real_tokens']} real tokens",
      "",
      f"Packed: {run['packed_rows']} rows of the row length, "
      f"{run['packed_max_segments']} segment slots, "
      f"{100 * run['packed_fill']:.0f}% of steps real; padded: "
      f"{run['padded_shape'][0]} rows of {run['padded_shape'][1]}. "
      f"`pack_sequences` took {run['packing_ms']:.1f} ms.",
      "",
      "| contender | step (median) | spread ms | real tokens/s "
      "| hk_rnn packed ÷ it | XLA temp |",
      "|---|---|---|---|---|---|",
    ]
    for name, figures in results.items():
      ratio = (
        "–"
        if packed is None
        else f"{packed['tokens_per_s'] / figures['tokens_per_s']:.2f}×"
      )
      lines.append(
        f"| {name} | {1e3 * figures['median_s']:.1f} ms | "
        f"{method.format_spread(figures)} | "
        f"{figures['tokens_per_s'] / 1e3:.1f} k | {ratio} | "
        f"{method.format_bytes(figures.get('memory_bytes'))} |"
      )
    skipped = [
      f"{n} ({r['skipped']})"
      for n, r in run["results"].items()
      if "skipped" in r
    ]
    lines.append("")
    if skipped:
      lines.append(f"Skipped: {', '.join(skipped)}.")
    last_carry = results.get("hk_rnn_packed_last_carry")
    if packed is not None and last_carry is not None:
      cost = packed["median_s"] / last_carry["median_s"] - 1
      lines.append(
        f"Per-segment carries cost {100 * cost:+.1f}% of the packed step's "
        "time (XLA temporaries "
        f"{method.format_bytes(packed.get('memory_bytes'))} vs "
        f"{method.format_bytes(last_carry.get('memory_bytes'))})."
      )
    torch_best = max(
      (
        results[n]["tokens_per_s"]
        for n in ("torch_packed", "torch_padded")
        if n in results
      ),
      default=None,
    )
    if packed is not None and torch_best and "hk_rnn_padded" in results:
      lines.append(
        f"hk_rnn packed: "
        f"{packed['tokens_per_s'] / results['hk_rnn_padded']['tokens_per_s']:.2f}× "
        f"hk_rnn padded, {packed['tokens_per_s'] / torch_best:.2f}× PyTorch's "
        "faster layout."
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
  method.add_arguments(parser, CONTENDERS)
  parser.add_argument(
    "--rounds", type=int, default=5, help="timed blocks per process"
  )
  parser.add_argument("--iters", type=int, default=1, help="steps per block")
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
  parser.add_argument("--one", help="run one process of this contender")
  args = parser.parse_args(argv)
  if args.pack_only:
    print(time_packing(args.pack_only, args))
    return
  names = method.chosen(parser, args.one or args.contenders, CONTENDERS)
  if args.one:
    if len(args.sizes) != 1:
      parser.error(f"--one needs one --sizes value, got {args.sizes}")
    one_process(args.one, args.sizes[0], args)
    return
  options = [
    f"--{flag}={getattr(args, flag)}"
    for flag in (
      "median", "max_length", "row_length", "inputs", "features", "rounds",
      "iters", "seed",
    )
  ]  # fmt: skip
  argv = sys.argv[1:] if argv is None else argv
  runs = []
  with method.Session(
    "benchmarks.packing", argv, processes=args.processes, busy=args.busy
  ) as session:
    for count in args.sizes:
      session.log(f"{count} sequences:")
      results = session.measure(
        {
          name: [f"--one={name}", f"--sizes={count}", *options]
          for name in names
        }
      )
      runs.append(_summary(count, args, results))
  header = [
    f"- date: {session.date}",
    "- versions: "
    + method.versions("jax", "jaxlib", "dm-haiku", "flax", "torch"),
    *session.header(),
    f"- inputs {args.inputs}, hidden {args.features}, lengths log-normal "
    f"(median {args.median:g}, σ 1) clipped to [1, {args.max_length}], rows "
    f"of {args.row_length}",
    f"- per process: a warm-up block, then {args.rounds} blocks of "
    f"{args.iters} steps",
  ]
  text = markdown(runs, header)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "packing.md"), "w") as f:
      f.write(text)
    with open(os.path.join(args.out, "packing.json"), "w") as f:
      json.dump({"meta": session.meta(), "runs": runs}, f, indent=2)
  return runs


if __name__ == "__main__":
  main()
