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

The figures follow the project's method (``benchmarks/method.py``): each
contender runs in processes of its own, ``--processes`` (at least 3) per
contender in alternating order; inside a process a warm-up call, then
``--calls`` timed calls, of which the process reports the median; the
table gives the median of the processes' medians, their spread, and each
one's ratio to the GRU's, with the CPU model and the load average before
and after (and a warning when the machine was busy). The target
of issue 23: ``griffin`` and ``rglru`` at most 1/3 of ``gru``'s time.

Run (on an otherwise idle machine; several minutes on two cores)::

    python -m benchmarks.griffin --out benchmarks/results

``--one=NAME`` runs one process of one contender and prints its report as
JSON on the last line (what the driver starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks import method

CONTENDERS = ("griffin", "rglru", "min_gru", "gru")
BASELINE = "gru"
TARGET = 1 / 3


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
  samples = method.time_calls(step, calls=calls)
  return method.report(samples, memory_bytes=memory_bytes)


def markdown(results, meta) -> str:
  baseline = results.get(BASELINE)
  lines = [
    "# Griffin's cells: training-step benchmark",
    "",
    f"- date: {meta['date']}",
    f"- versions: {meta['versions']}",
    f"- kernels: HK_RNN_KERNELS={meta['kernels']}",
    *meta["header"],
    f"- {meta['calls']} timed calls per process after a warm-up",
    "",
  ]
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
    memory = result.get("memory_bytes")
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
  return method.versions("jax", "jaxlib", "dm-haiku")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.griffin",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--time", type=int, default=4096)
  parser.add_argument("--width", type=int, default=256)
  method.add_arguments(parser, CONTENDERS)
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
  names = method.chosen(parser, args.contenders, CONTENDERS)
  one = [
    f"--batch={args.batch}",
    f"--time={args.time}",
    f"--width={args.width}",
    f"--calls={args.calls}",
  ]
  argv = sys.argv[1:] if argv is None else argv
  with method.Session(
    "benchmarks.griffin", argv, processes=args.processes, busy=args.busy
  ) as session:
    results = session.measure({name: [*one, f"--one={name}"] for name in names})
  meta = {
    **session.meta(),
    "versions": _versions(),
    "kernels": os.environ.get("HK_RNN_KERNELS", "auto"),
    "header": session.header(),
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
  return results


if __name__ == "__main__":
  main()
