r"""Times the xLSTM cells: the sLSTM against the fused LSTM, the mLSTM's forms.

Two comparisons, each a jitted training step (forward and backward of
``loss = Σ outputs + Σ final carry`` with respect to the parameters, inputs
with ``D = F``):

* ``SLSTMCell`` (its fused kernel) against ``LSTMCell`` (its fused kernel)
  at B = 32, T = 64, width 256; target: at most 1.5 times the LSTM's time;
* ``MLSTMCell``'s chunkwise whole-sequence form (``RNN(fused=True)``)
  against its step form (``fused=False``) at T = 2048 (B = 8, F = 128,
  4 heads); target: at most half the step form's time.

The figures follow the project's method (``benchmarks/method.py``): each
contender in processes of its own (``--processes`` per contender, in
alternating order), each process timing ``--calls`` calls after a warm-up
and reporting their median; the table gives the median of the per-process
medians and their spread, with the CPU model and the load average.

Run (about a minute on two idle cores)::

    python -m benchmarks.xlstm --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from benchmarks import method


@dataclasses.dataclass(frozen=True)
class Contender:
  name: str
  cell: str  # "lstm", "slstm" or "mlstm"
  batch: int
  time: int
  features: int
  heads: int = 1
  fused: bool = True


CONTENDERS = {
  c.name: c
  for c in (
    Contender("lstm_fused", "lstm", 32, 64, 256),
    Contender("slstm_fused", "slstm", 32, 64, 256),
    Contender("mlstm_chunkwise", "mlstm", 8, 2048, 128, heads=4),
    Contender("mlstm_step", "mlstm", 8, 2048, 128, heads=4, fused=False),
  )
}
# (contender, baseline, target ratio of their times)
TARGETS = (
  ("slstm_fused", "lstm_fused", 1.5),
  ("mlstm_chunkwise", "mlstm_step", 0.5),
)


def _tiny(contender: Contender) -> Contender:
  return dataclasses.replace(
    contender, batch=2, time=min(contender.time, 16), features=8
  )


def training_step(contender: Contender):
  """A jitted ``step()`` of the contender's training step, compiled."""
  import haiku as hk
  import jax
  import jax.numpy as jnp
  import numpy as np

  import hk_rnn

  def make_cell():
    if contender.cell == "lstm":
      return hk_rnn.LSTMCell(contender.features)
    if contender.cell == "slstm":
      return hk_rnn.SLSTMCell(contender.features, num_heads=contender.heads)
    return hk_rnn.MLSTMCell(contender.features, num_heads=contender.heads)

  def forward(x):
    return hk_rnn.RNN(make_cell(), fused=contender.fused)(x)

  model = hk.without_apply_rng(hk.transform(forward))
  shape = (contender.batch, contender.time, contender.features)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)

  def loss(params):
    final, outputs = model.apply(params, x)
    return jnp.sum(outputs) + sum(
      jnp.sum(leaf) for leaf in jax.tree.leaves(final)
    )

  grad = jax.jit(jax.grad(loss))

  def step():
    return jax.block_until_ready(grad(params))

  return step


def _child(name: str, calls: int, tiny: bool) -> None:
  """Times one contender in this process; prints its report as JSON."""
  contender = CONTENDERS[name]
  if tiny:
    contender = _tiny(contender)
  step = training_step(contender)
  method.print_report(method.time_calls(step, calls=calls, warmup=2))


def _table(results: dict, meta: dict) -> str:
  lines = [
    *meta["header"],
    "",
    "Training step (forward and backward), median of the per-process "
    "medians, [min, max] of those medians.",
    "",
    "| contender | B | T | F | H | median | per-process medians |",
    "|---|---|---|---|---|---|---|",
  ]
  for name, result in results.items():
    c = meta["contenders"][name]
    medians = result["process_medians_s"]
    lines.append(
      f"| {name} | {c['batch']} | {c['time']} | {c['features']} | "
      f"{c['heads']} | {result['median_s'] * 1e3:.1f} ms | "
      f"[{min(medians) * 1e3:.1f}, {max(medians) * 1e3:.1f}] ms |"
    )
  lines.append("")
  for name, baseline, target in TARGETS:
    if name in results and baseline in results:
      ratio = results[name]["median_s"] / results[baseline]["median_s"]
      verdict = "met" if ratio <= target else "NOT met"
      lines.append(
        f"- {name} / {baseline} = {ratio:.2f} (target <= {target}: {verdict})"
      )
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  method.add_arguments(parser, tuple(CONTENDERS))
  parser.add_argument("--calls", type=int, default=10)
  parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
  parser.add_argument("--out", default="", help="directory for xlstm.md/json")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _child(args.child, args.calls, args.tiny)
    return None
  names = method.chosen(parser, args.contenders, tuple(CONTENDERS))
  options = [f"--calls={args.calls}", *(["--tiny"] if args.tiny else [])]
  argv = sys.argv[1:] if argv is None else argv
  with method.Session(
    "benchmarks.xlstm", argv, processes=args.processes, busy=args.busy
  ) as session:
    results = session.measure(
      {name: [f"--child={name}", *options] for name in names}
    )
  meta = {
    **session.meta(),
    "versions": method.versions("jax", "jaxlib", "dm-haiku"),
    "header": session.header(),
    "calls": args.calls,
    "contenders": {
      name: dataclasses.asdict(
        _tiny(CONTENDERS[name]) if args.tiny else CONTENDERS[name]
      )
      for name in names
    },
  }
  table = _table(results, meta)
  print(table)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "xlstm.md"), "w") as file:
      file.write(table)
    with open(os.path.join(args.out, "xlstm.json"), "w") as file:
      json.dump({"meta": meta, "results": results}, file, indent=1)
  return results


if __name__ == "__main__":
  main()
