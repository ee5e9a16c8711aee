r"""Times recurrent training and inference steps of hk_rnn and its peers.

Contenders: hk_rnn with its default kernels (``hk_rnn``: ``auto``, see
``hk_rnn.explain``), with the XLA kernels alone (``hk_rnn_xla``), with the
compiled CPU kernels wherever they apply (``hk_rnn_compiled``, where
built), stepping the cell in ``hk.scan`` (``hk_rnn_step``) and, in masked
cases, given no lengths (``hk_rnn_unmasked``: the cost of masking); Flax
``nn.RNN`` with ``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell`` or
``MGUCell``; Haiku ``hk.LSTM``/``hk.GRU`` with ``hk.dynamic_unroll``; PyTorch
``nn.LSTM``/``nn.GRU``, with ``pack_padded_sequence`` where rows have
lengths.

Every model is a realistic one: a dense input layer (``D → D``) before the
recurrent layer and a loss over its outputs and final carry after it. A
training step is a jitted forward and backward pass with respect to every
parameter; inference is the forward pass alone, timed call by call (median
and p99 over ``--calls`` calls).

The method is :mod:`benchmarks.method`'s: each contender in its own
process, ``--processes`` processes each in alternating order, the median of
the per-process medians, the CPU model and the load recorded. Run it on an
otherwise idle machine; ``--busy`` keeps one spinning process beside the
benchmark, to see how each contender copes with a busy neighbour.

GFLOP/s counts the matrix products of a dense run of all ``T`` steps
(``2·B·T·(D+F)·G·F`` per direction forward, three times that for a training
step), also for masked cases, where some contenders skip padded steps.
Memory is XLA's compiled temporary buffer size for JAX contenders and, for
PyTorch, the peak resident set size during three steps above its level
before them. The two are not the same quantity: compare within a family.

Quick run (a few minutes on two cores)::

    python -m benchmarks.run --quick

Full run::

    python -m benchmarks.run --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import method

# Fewer threads than cores makes every contender slower in the same way;
# leave each library's default (one thread per core).


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark configuration (batch-major inputs ``(B, T, D)``)."""

  name: str
  title: str
  cell: str  # "lstm", "gru" or "mgu"
  batch: int = 32
  time: int = 64
  inputs: int = 128
  features: int = 256
  masked: bool = False
  bidirectional: bool = False
  training: bool = True

  @property
  def blocks(self) -> int:
    return {"lstm": 4, "gru": 3, "mgu": 2}[self.cell]

  @property
  def gemm_flops(self) -> float:
    forward = (
      2 * self.batch * self.time * (self.inputs + self.features)
      * self.blocks * self.features
    )  # fmt: skip
    directions = 2 if self.bidirectional else 1
    return forward * directions * (3 if self.training else 1)


CASES = {
  case.name: case
  for case in (
    Case("lstm", "LSTM training step", "lstm"),
    Case("gru", "GRU training step", "gru"),
    Case("mgu", "MGU training step", "mgu"),
    Case("masked_lstm", "LSTM, random lengths", "lstm", masked=True),
    Case(
      "masked_bilstm",
      "Bidirectional LSTM, random lengths",
      "lstm",
      masked=True,
      bidirectional=True,
    ),
    Case("long_lstm", "LSTM, T=1000", "lstm", time=1000),
    Case(
      "forward_lstm",
      "LSTM forward pass (inference), batch 32",
      "lstm",
      training=False,
    ),
    Case(
      "inference_lstm",
      "LSTM inference, batch 4",
      "lstm",
      batch=4,
      training=False,
    ),
  )
}
QUICK_CASES = ("lstm", "gru", "inference_lstm", "masked_bilstm")


def make_data(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Inputs ``(B, T, D)`` float32, zero past each row's length, and lengths."""
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(case.batch, case.time, case.inputs))
  if case.masked:
    lengths = rng.integers(case.time // 4, case.time + 1, size=case.batch)
    lengths[0] = case.time  # the longest row sets the padded length
  else:
    lengths = np.full(case.batch, case.time)
  steps = np.arange(case.time)[None, :, None]
  inputs = np.where(steps < lengths[:, None, None], inputs, 0.0)
  return inputs.astype(np.float32), lengths.astype(np.int32)


@dataclasses.dataclass
class Runner:
  """A ready-to-time step: ``run()`` blocks until the step has finished."""

  run: Callable[[], Any]
  memory_bytes: int | None = None


# --- JAX contenders ---------------------------------------------------------


def _carry_loss(carry, outputs):
  import jax
  import jax.numpy as jnp

  total = jnp.sum(outputs)
  for leaf in jax.tree.leaves(carry):
    total = total + jnp.sum(leaf)
  return total


def _jax_runner(case, init, apply, inputs, lengths) -> Runner:
  """Jits ``loss(params)`` (training) or ``apply(params)`` (inference)."""
  import jax

  params = init(inputs, lengths)

  if case.training:

    def step(params, inputs, lengths):
      return jax.grad(lambda p: _carry_loss(*apply(p, inputs, lengths)))(params)
  else:

    def step(params, inputs, lengths):
      return _carry_loss(*apply(params, inputs, lengths))

  compiled = jax.jit(step).lower(params, inputs, lengths).compile()
  memory_bytes = method.compiled_temp_bytes(compiled)
  return Runner(
    lambda: jax.block_until_ready(compiled(params, inputs, lengths)),
    memory_bytes,
  )


def _haiku_model(build):
  """``(init, apply)`` of a Haiku function ``build(inputs, lengths)``."""
  import haiku as hk
  import jax

  model = hk.without_apply_rng(hk.transform(build))
  return (
    lambda x, n: model.init(jax.random.key(0), x, n),
    model.apply,
  )


def _dense_then(case, x, layer):
  """A Haiku dense input layer, then ``layer`` on its outputs."""
  import haiku as hk

  return layer(hk.Linear(case.inputs, name="input_layer")(x))


def _hk_rnn(use_fused: bool, masked: bool = True, kernels: str | None = None):
  """hk_rnn through its public API, fused kernels on or off.

  With ``masked=False`` the contender exists only for masked cases and runs
  the same model without the lengths: the cost of masking. ``kernels`` sets
  ``hk_rnn.use_kernels`` while the step is traced; the ``compiled``
  contender skips where the compiled kernels are not built.
  """

  def runner(case: Case, inputs, lengths) -> Runner | str:
    import hk_rnn
    from hk_rnn._src.kernels import compiled

    if not masked:
      if not case.masked:
        return "only for masked cases"
      case = dataclasses.replace(case, masked=False)
    if kernels == "compiled" and not compiled.available():
      return "the compiled kernels are not built"
    cell_class = {
      "lstm": hk_rnn.LSTMCell,
      "gru": hk_rnn.GRUCell,
      "mgu": hk_rnn.MGUCell,
    }[case.cell]

    def build(x, n):
      def layer():
        return hk_rnn.RNN(cell_class(case.features), fused=use_fused)

      module = layer()
      if case.bidirectional:
        module = hk_rnn.Bidirectional(module, layer())
      lengths = n if case.masked else None
      return _dense_then(case, x, lambda h: module(h, seq_lengths=lengths))

    with hk_rnn.use_kernels(kernels):
      return _jax_runner(case, *_haiku_model(build), inputs, lengths)

  return runner


# The case cell each Flax cell computes.
_FLAX_CELLS = {
  "LSTMCell": "lstm",
  "OptimizedLSTMCell": "lstm",
  "GRUCell": "gru",
  "MGUCell": "mgu",
}


def _flax(cell_name: str):
  def runner(case: Case, inputs, lengths) -> Runner | str:
    import flax.linen as nn
    import jax

    cell_class = getattr(nn, cell_name)
    if _FLAX_CELLS[cell_name] != case.cell:
      return f"computes a {_FLAX_CELLS[cell_name]}"

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x, seq_lengths=None):
        def layer():
          return nn.RNN(cell_class(features=case.features))

        if case.bidirectional:
          recurrent = nn.Bidirectional(layer(), layer(), return_carry=True)
        else:
          recurrent = nn.RNN(
            cell_class(features=case.features), return_carry=True
          )
        return recurrent(nn.Dense(case.inputs)(x), seq_lengths=seq_lengths)

    module = Model()

    def call(params, x, n):
      return module.apply(params, x, seq_lengths=n if case.masked else None)

    def init(x, n):
      return module.init(
        jax.random.key(0), x, seq_lengths=n if case.masked else None
      )

    return _jax_runner(case, init, call, inputs, lengths)

  return runner


def haiku_dynamic_unroll(case: Case, inputs, lengths) -> Runner | str:
  """``hk.LSTM``/``hk.GRU`` + ``hk.dynamic_unroll``: no masking support."""
  import haiku as hk
  import jax.numpy as jnp

  cores = {"lstm": hk.LSTM, "gru": hk.GRU}
  if case.masked or case.cell not in cores:
    return "no masks, LSTM and GRU only"

  def build(x, n):
    del n
    x = hk.Linear(case.inputs, name="input_layer")(x)
    core = cores[case.cell](case.features)
    outputs, state = hk.dynamic_unroll(
      core, jnp.swapaxes(x, 0, 1), core.initial_state(x.shape[0])
    )
    return state, outputs

  return _jax_runner(case, *_haiku_model(build), inputs, lengths)


# --- PyTorch ----------------------------------------------------------------


def _torch_step(case: Case, inputs, lengths):
  """A closure running one PyTorch step of ``case``."""
  import torch
  from torch.nn.utils import rnn as torch_rnn

  torch.manual_seed(0)
  module_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[case.cell]
  module = module_class(
    case.inputs,
    case.features,
    batch_first=True,
    bidirectional=case.bidirectional,
  )
  input_layer = torch.nn.Linear(case.inputs, case.inputs)
  raw = torch.from_numpy(inputs)
  n = torch.from_numpy(lengths).to(torch.int64)

  def forward():
    x = input_layer(raw)
    if case.masked:
      packed = torch_rnn.pack_padded_sequence(
        x, n, batch_first=True, enforce_sorted=False
      )
      outputs, state = module(packed)
      outputs, _ = torch_rnn.pad_packed_sequence(
        outputs, batch_first=True, total_length=case.time
      )
    else:
      outputs, state = module(x)
    return outputs, state if isinstance(state, tuple) else (state,)

  if not case.training:

    def infer():
      with torch.inference_mode():
        return forward()

    return infer

  def train():
    for parameter in (*module.parameters(), *input_layer.parameters()):
      parameter.grad = None
    outputs, state = forward()
    loss = outputs.sum() + sum(s.sum() for s in state)
    loss.backward()
    return loss

  return train


def torch_module(case: Case, inputs, lengths) -> Runner | str:
  if case.cell not in ("lstm", "gru"):
    return "PyTorch has no MGU"
  step = _torch_step(case, inputs, lengths)
  return Runner(step, _torch_peak_rss_growth(step) if case.training else None)


def _torch_peak_rss_growth(step) -> int:
  """Peak RSS above the pre-step baseline over three steps of ``step``.

  ``ru_maxrss`` alone would also count transient peaks of importing torch
  and building the model, which can exceed a step's; a thread samples the
  current RSS instead, every 0.2 ms, while the steps run.
  """
  import threading

  step()  # first-call allocations (caches, thread pools) are not per step
  baseline = _resident_bytes()
  peak, running = [baseline], [True]

  def sample():
    while running[0]:
      peak[0] = max(peak[0], _resident_bytes())
      time.sleep(0.0002)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  for _ in range(3):
    step()
  running[0] = False
  sampler.join()
  return peak[0] - baseline


def _tiny(case: Case) -> Case:
  """``case`` at smoke-test size."""
  return dataclasses.replace(case, batch=4, time=8, inputs=8, features=16)


def _resident_bytes() -> int:
  """This process's current resident set size (Linux ``/proc``)."""
  with open("/proc/self/statm") as file:
    return int(file.read().split()[1]) * resource.getpagesize()


# --- Driver -----------------------------------------------------------------

CONTENDERS: dict[str, tuple[str, Callable[..., Runner | str]]] = {
  # The default kernels (``auto``; ``hk_rnn.explain`` says what they chose).
  "hk_rnn": ("hk_rnn", _hk_rnn(True)),
  # Only the XLA fused kernels (``HK_RNN_KERNELS=xla``).
  "hk_rnn_xla": ("hk_rnn", _hk_rnn(True, kernels="xla")),
  # The compiled CPU kernels wherever they apply (where built).
  "hk_rnn_compiled": ("hk_rnn", _hk_rnn(True, kernels="compiled")),
  # The same modules stepping the cell in hk.scan (``RNN(fused=False)``).
  "hk_rnn_step": ("hk_rnn", _hk_rnn(False)),
  # Masked cases only: the same model given no lengths.
  "hk_rnn_unmasked": ("hk_rnn", _hk_rnn(True, masked=False)),
  "flax_lstm": ("flax", _flax("LSTMCell")),
  "flax_optimized_lstm": ("flax", _flax("OptimizedLSTMCell")),
  "flax_gru": ("flax", _flax("GRUCell")),
  "flax_mgu": ("flax", _flax("MGUCell")),
  "haiku_unroll": ("haiku", haiku_dynamic_unroll),
  "torch": ("torch", torch_module),
}
LEAD = "hk_rnn"


def _installed(package: str) -> bool:
  import importlib.util

  return importlib.util.find_spec(package) is not None


def _child(case: Case, name: str, rounds: int, iters: int, calls: int, seed):
  """One process's measurement of one contender: a JSON line on stdout.

  Training: ``rounds`` samples, each the mean of ``iters`` steps; inference:
  ``calls`` single calls (for the p99).
  """
  family, build = CONTENDERS[name]
  if family != "hk_rnn" and not _installed(family):
    method.print_skip(f"{family} is not installed")
    return
  runner = build(case, *make_data(case, seed))
  if isinstance(runner, str):
    method.print_skip(runner)
    return
  if case.training:
    iters = max(1, round(iters * 64 / case.time))
    samples = method.time_blocks(runner.run, rounds=rounds, iters=iters)
  else:
    samples = method.time_calls(runner.run, calls=calls, warmup=3)
  method.print_report(
    samples,
    memory_bytes=runner.memory_bytes,
    gflops=case.gemm_flops / method.summarize(samples)["median_s"] / 1e9,
  )


def _markdown(results, cases, meta) -> str:
  lines = [
    "# hk_rnn benchmarks",
    "",
    f"- date: {meta['date']}",
    f"- versions: {meta['versions']}",
    *meta["header"],
    f"- per process: {meta['rounds']} samples of {meta['iters']} training "
    f"steps (fewer for T > 64), or {meta['calls']} inference calls",
    "",
    "Times are medians of the per-process medians; `hk_rnn ÷ peer` below 1 "
    "means hk_rnn is faster; `spread` is the range of the per-process "
    "medians. Memory: XLA temporary buffers (JAX) or peak RSS above baseline "
    "(PyTorch).",
  ]  # fmt: skip
  for case_name, by_contender in results.items():
    case = cases[case_name]
    timed = {n: r for n, r in by_contender.items() if "median_s" in r}
    lead = timed.get(LEAD)
    p99 = "" if case.training else " p99 ms |"
    lines += [
      "",
      f"## {case.title} (`{case_name}`: B={case.batch}, T={case.time}, "
      f"D={case.inputs}, F={case.features})",
      "",
      f"| contender | median ms |{p99} spread ms | GFLOP/s | hk_rnn ÷ peer "
      "| memory |",
      "|---|---:|" + ("---:|" if p99 else "") + "---:|---:|---:|---:|",
    ]
    for name, result in sorted(timed.items(), key=lambda i: i[1]["median_s"]):
      median = result["median_s"]
      ratio = "–" if lead is None else f"{lead['median_s'] / median:.2f}"
      spread = result["process_medians_s"]
      tail = "" if case.training else f" {result['p99_s'] * 1e3:.2f} |"
      lines.append(
        f"| {name} | {median * 1e3:.2f} |{tail} "
        f"{min(spread) * 1e3:.1f}–{max(spread) * 1e3:.1f} | "
        f"{case.gemm_flops / median / 1e9:.3g} | {ratio} | "
        f"{method.format_bytes(result.get('memory_bytes'))} |"
      )
    unmasked = timed.get("hk_rnn_unmasked")
    if lead is not None and unmasked is not None:
      cost = lead["median_s"] / unmasked["median_s"] - 1
      lines += [
        "",
        f"Masking costs hk_rnn {cost:+.0%} over the same step without "
        "lengths (`hk_rnn ÷ hk_rnn_unmasked`).",
      ]
  return "\n".join(lines) + "\n"


def _chart(results, cases, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  timed = {
    case: {n: r for n, r in by.items() if "median_s" in r}
    for case, by in results.items()
  }
  figure, axes = plt.subplots(
    len(timed),
    1,
    figsize=(7, 1.0 + 1.3 * sum(len(r) for r in timed.values()) / 3),
  )
  axes = np.atleast_1d(axes)
  for axis, case_name in zip(axes, timed, strict=True):
    by_contender = sorted(
      timed[case_name].items(), key=lambda item: -item[1]["median_s"]
    )
    names = [name for name, _ in by_contender]
    medians = [result["median_s"] * 1e3 for _, result in by_contender]
    colors = ["tab:red" if name == LEAD else "tab:gray" for name in names]
    axis.barh(names, medians, color=colors)
    axis.set_title(cases[case_name].title, fontsize=9)
    axis.set_xlabel("median ms per step", fontsize=8)
    axis.tick_params(labelsize=8)
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def _versions() -> str:
  return method.versions("jax", "jaxlib", "dm-haiku", "flax", "torch")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.run",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="Cases: "
    + ", ".join(f"{name} ({case.title})" for name, case in CASES.items()),
  )
  parser.add_argument(
    "--cases",
    default=",".join(CASES),
    help="comma-separated case names (default: all)",
  )
  parser.add_argument(
    "--contenders",
    default=",".join(CONTENDERS),
    help="comma-separated contender names (default: every one installed)",
  )
  method.add_arguments(parser)
  parser.add_argument("--rounds", type=int, default=7, help="samples/process")
  parser.add_argument("--iters", type=int, default=3, help="steps per sample")
  parser.add_argument(
    "--calls", type=int, default=1000, help="inference calls per process"
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help=f"cases {','.join(QUICK_CASES)}, 3 processes of 3 samples of 2 "
    "steps, 200 inference calls",
  )
  parser.add_argument(
    "--tiny",
    action="store_true",
    help="shrink every case to B=4, T=8, D=8, F=16: a smoke test of the "
    "harness, not a measurement",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="runs/benchmarks", help="output folder")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  cases = {
    name: _tiny(case) if args.tiny else case for name, case in CASES.items()
  }
  case_names = args.cases.split(",")
  rounds, iters, calls = args.rounds, args.iters, args.calls
  if args.quick:
    case_names, rounds, iters, calls = list(QUICK_CASES), 3, 2, 200
  if args.child:
    case_name, contender = args.child
    _child(cases[case_name], contender, rounds, iters, calls, args.seed)
    return
  contenders = args.contenders.split(",")
  for name in case_names:
    if name not in CASES:
      parser.error(f"--cases: unknown case {name!r}; known: {', '.join(CASES)}")
  for name in contenders:
    if name not in CONTENDERS:
      parser.error(
        f"--contenders: unknown contender {name!r}; "
        f"known: {', '.join(CONTENDERS)}"
      )

  options = [
    *(["--tiny"] if args.tiny else []),
    f"--rounds={rounds}",
    f"--iters={iters}",
    f"--calls={calls}",
    f"--seed={args.seed}",
  ]
  results = {}
  argv = sys.argv[1:] if argv is None else argv
  with method.Session(
    "benchmarks.run", argv, processes=args.processes, busy=args.busy
  ) as session:
    for name in case_names:
      session.log(f"{name}:")
      results[name] = session.measure(
        {
          contender: ["--child", name, contender, *options]
          for contender in contenders
        }
      )
  meta = {
    **session.meta(),
    "versions": _versions(),
    "header": session.header(),
    "rounds": rounds,
    "iters": iters,
    "calls": calls,
  }
  os.makedirs(args.out, exist_ok=True)
  table = _markdown(results, cases, meta)
  with open(os.path.join(args.out, "results.md"), "w") as file:
    file.write(table)
  with open(os.path.join(args.out, "results.json"), "w") as file:
    json.dump({"meta": meta, "results": results}, file, indent=1)
  _chart(results, cases, os.path.join(args.out, "chart.png"))
  print(table)
  return results


if __name__ == "__main__":
  main()
