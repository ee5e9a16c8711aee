r"""Measures what hk_rnn's memory and dropout options cost and save.

Two studies, each timing jitted training steps (forward and backward of
``loss = Σ outputs + Σ final carry``) of one model under several ``RNN``
settings, with XLA's compiled temporary memory (``memory_analysis()``):

* ``remat``: ``remat=None`` (fused kernel, and ``fused=False`` step path)
  against ``remat="step"`` and ``remat="chunked"``, on long sequences, one
  per row and packed (segments of 20 to 200 steps);
* ``dropout``: the two ways of getting the recurrent dropout mask into each
  step (``dropout_sampling="once"`` and ``"per_step"``) on the step path,
  and ``"once"`` with the fused kernel, for LSTM and GRU at a few sizes.

The figures follow the project's method (``benchmarks/method.py``): each
variant of each setting runs in processes of its own, ``--processes`` (at
least 3) per variant in alternating order; inside a process a warm-up
block, then ``--rounds`` blocks of ``--iters`` steps, of which the process
reports the median time per step and the compiled step's temporary memory.
The table gives the median of the processes' medians and their spread,
with the CPU model and the load average before and after (and a warning
when the machine was busy). ``--busy`` keeps one spinning process beside
the benchmark.

Run (on an otherwise idle machine)::

    python -m benchmarks.options --study=remat --out benchmarks/results
    python -m benchmarks.options --study=dropout --out benchmarks/results

``--settings`` and ``--variants`` run a part of a study; ``--one=VARIANT``
with one ``--settings`` index runs one process of one variant and prints
its report as JSON on the last line (what the driver starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import numpy as np

from benchmarks import method


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
  import haiku as hk  # noqa: PLC0415 - only in the timed process
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import hk_rnn  # noqa: PLC0415

  cells = {"lstm": hk_rnn.LSTMCell, "gru": hk_rnn.GRUCell}
  batch, time, inputs_size, features = shape
  cell_options = (
    dict(dropout_rate=0.1, recurrent_dropout_rate=0.25) if dropout else {}
  )

  def forward(inputs, mask):
    rnn = hk_rnn.RNN(cells[cell](features, **cell_options), **rnn_options)
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
    method.compiled_temp_bytes(compiled),
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


def settings(study: str, quick: bool) -> list[tuple]:
  """The study's settings: ``(cell, shape, variants, step_options)`` each."""
  return list({"remat": remat_study, "dropout": dropout_study}[study](quick))


def _title(cell: str, shape, step_options: dict) -> str:
  title = f"{cell.upper()} B={shape[0]} T={shape[1]} D={shape[2]} F={shape[3]}"
  if step_options.get("packed"):
    title += ", packed rows"
  return title


def one_process(setting: tuple, variant: str, rounds: int, iters: int):
  """Times one variant of one setting in this process; prints its report."""
  cell, shape, variants, step_options = setting
  step, memory_bytes = training_step(
    cell, shape, variants[variant], **step_options
  )
  samples = method.time_blocks(step, rounds=rounds, iters=iters)
  method.print_report(samples, memory_bytes=memory_bytes)


def table_rows(measured: list[tuple[str, dict]]) -> list[str]:
  """Markdown rows: one per variant per setting, with the table's header.

  ``measured`` holds each setting's title and :func:`method.measure`'s
  results for its variants, the first of which the others are compared to.
  """
  lines = [
    "| setting | variant | median step | spread ms | time vs first "
    "| XLA temp memory | memory saved vs first |",
    "|---|---|---|---|---|---|---|",
  ]
  for title, results in measured:
    first = next(iter(results.values()))
    base_memory = first.get("memory_bytes")
    for name, result in results.items():
      memory = result.get("memory_bytes")
      ratio = result["median_s"] / first["median_s"]
      memory_ratio = (
        "–" if not memory or not base_memory else f"{base_memory / memory:.1f}×"
      )
      lines.append(
        f"| {title} | {name} | {result['median_s'] * 1e3:.1f} ms | "
        f"{method.format_spread(result)} | {ratio:.2f}× | "
        f"{method.format_bytes(memory)} | {memory_ratio} |"
      )
  return lines


def _indices(text: str | None, count: int, parser) -> list[int]:
  if text is None:
    return list(range(count))
  indices = [int(i) for i in text.split(",")]
  for index in indices:
    if not 0 <= index < count:
      parser.error(f"--settings: index {index} outside [0, {count - 1}]")
  return indices


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    epilog="Settings (--settings indices; --quick shrinks the shapes): "
    + "; ".join(
      f"{study}: "
      + ", ".join(
        f"{index} = {_title(cell, shape, step_options)}"
        for index, (cell, shape, _, step_options) in enumerate(
          settings(study, quick=False)
        )
      )
      for study in ("remat", "dropout")
    ),
  )
  parser.add_argument("--study", choices=("remat", "dropout"), required=True)
  method.add_arguments(parser)
  parser.add_argument(
    "--rounds", type=int, default=5, help="timed blocks per process"
  )
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
    "--settings",
    default=None,
    help="comma-separated indices of the study's settings (default: all)",
  )
  parser.add_argument(
    "--variants",
    default=None,
    help="comma-separated variant names (default: all)",
  )
  parser.add_argument("--one", help="run one process of this variant")
  parser.add_argument(
    "--out",
    default=None,
    help="folder for <study>.md/json (printed either way)",
  )
  args = parser.parse_args(argv)
  iters = args.iters or (1 if args.study == "remat" else 5)
  study = settings(args.study, args.quick)
  indices = _indices(args.settings, len(study), parser)
  if args.one is not None:
    if len(indices) != 1:
      parser.error("--one needs one --settings index")
    if args.one not in study[indices[0]][2]:
      parser.error(f"--one: unknown variant {args.one!r}")
    one_process(study[indices[0]], args.one, args.rounds, iters)
    return
  options = [f"--study={args.study}", f"--rounds={args.rounds}"]
  options += [f"--iters={iters}", *(["--quick"] if args.quick else [])]
  argv = sys.argv[1:] if argv is None else argv
  plan = []  # (setting index, title, variant names)
  for index in indices:
    cell, shape, variants, step_options = study[index]
    names = list(variants)
    if args.variants is not None:
      names = [n for n in args.variants.split(",") if n in variants]
      if not names:
        parser.error(
          f"--variants: none of {args.variants!r} is a variant of the "
          f"{args.study} study: {', '.join(variants)}"
        )
    plan.append((index, _title(cell, shape, step_options), names))
  measured = []
  with method.Session(
    "benchmarks.options", argv, processes=args.processes, busy=args.busy
  ) as session:
    for index, title, names in plan:
      session.log(f"{title}:")
      results = session.measure(
        {
          name: [*options, f"--settings={index}", f"--one={name}"]
          for name in names
        }
      )
      measured.append((title, results))
  versions = method.versions("jax", "jaxlib", "dm-haiku")
  lines = [
    f"### `{args.study}` study",
    "",
    f"- date: {session.date}",
    f"- versions: {versions}",
    *session.header(),
    f"- per process: a warm-up block, then {args.rounds} blocks of {iters} "
    "steps",
    "",
    "Medians of the per-process medians; `spread`: the lowest and highest "
    "process median.",
    "",
    *table_rows(measured),
    "",
  ]
  text = "\n".join(lines)
  print(text)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.study}.md"), "w") as f:
      f.write(text)
    with open(os.path.join(args.out, f"{args.study}.json"), "w") as f:
      json.dump(
        {"meta": session.meta(), "results": dict(measured)}, f, indent=1
      )
  return dict(measured)


if __name__ == "__main__":
  main()
