r"""Times recurrent training steps of hk_rnn and its peers side by side.

Every contender installed (hk_rnn with its fused kernels, which on CPU run
an unmasked LSTM or GRU through oneDNN where the optional extension is
built, without that extension, ``hk_rnn_no_onednn``, and through oneDNN's
training primitives too, ``hk_rnn_onednn_training``; hk_rnn with ``fused=False``,
a plain ``hk.scan`` of the cell; in masked cases also
hk_rnn given no lengths, the cost of masking; Flax ``nn.RNN`` with
``LSTMCell``, ``OptimizedLSTMCell``, ``GRUCell`` or ``MGUCell``; Haiku
``hk.LSTM``/``hk.GRU`` with ``hk.dynamic_unroll``; PyTorch
``nn.LSTM``/``nn.GRU``, with ``pack_padded_sequence`` where rows have
lengths) runs the same case in one process. A training step is a jitted
forward and backward pass of
``loss = Σ outputs + Σ final carry`` with respect to the parameters;
inference is the forward pass alone. Rounds interleave the contenders (the
order rotates each round), each block starts with an untimed warm-up call,
and the table reports the median over rounds.

GFLOP/s counts the matrix products of a dense run of all ``T`` steps
(``2·B·T·(D+F)·G·F`` per direction forward, three times that for a training
step), also for masked cases, where some contenders skip padded steps.
Memory is XLA's compiled temporary buffer size for JAX contenders and, for
PyTorch, the peak resident set size during three steps above its level
before them, sampled in a fresh subprocess. The two are not the same
quantity: compare within a family.

Quick run (under two minutes on two cores)::

    python -m benchmarks.run --quick

Full run::

    python -m benchmarks.run --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks import timing

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
      "inference_lstm",
      "LSTM inference, batch 4",
      "lstm",
      batch=4,
      training=False,
    ),
  )
}
QUICK_CASES = ("lstm", "gru", "masked_bilstm")


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
      return apply(params, inputs, lengths)

  compiled = jax.jit(step).lower(params, inputs, lengths).compile()
  memory_bytes = timing.compiled_temp_bytes(compiled)
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


def _hk_rnn(
  use_fused: bool,
  masked: bool = True,
  onednn: bool | None = None,
  onednn_training: bool | None = None,
):
  """hk_rnn through its public API, fused kernels on or off.

  With ``masked=False`` the contender exists only for masked cases and runs
  the same model without the lengths: the cost of masking, timed in the
  same rounds. ``onednn`` and ``onednn_training`` set the optional oneDNN
  extension's switch (``hk_rnn._src.onednn.set_enabled``) while the step is
  traced; contenders that set them exist only where the extension is built
  and would run the case (an unmasked LSTM or GRU; a training step for
  ``onednn_training``), beside the default.
  """

  def runner(case: Case, inputs, lengths) -> Runner | None:
    import hk_rnn
    from hk_rnn._src import onednn as onednn_module

    if not masked:
      if not case.masked:
        return None
      case = dataclasses.replace(case, masked=False)
    switched = onednn is not None or onednn_training is not None
    if switched and (
      case.cell not in ("lstm", "gru")
      or case.masked
      or (onednn_training is not None and not case.training)
      or not onednn_module.available()
    ):
      return None
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
      return module(x, seq_lengths=n if case.masked else None)

    onednn_module.set_enabled(onednn, training=onednn_training)
    try:
      return _jax_runner(case, *_haiku_model(build), inputs, lengths)
    finally:
      onednn_module.set_enabled(None)

  return runner


# The case cell each Flax cell computes.
_FLAX_CELLS = {
  "LSTMCell": "lstm",
  "OptimizedLSTMCell": "lstm",
  "GRUCell": "gru",
  "MGUCell": "mgu",
}


def _flax(cell_name: str):
  def runner(case: Case, inputs, lengths) -> Runner | None:
    import flax.linen as nn
    import jax

    cell_class = getattr(nn, cell_name)
    if _FLAX_CELLS[cell_name] != case.cell:
      return None
    make = lambda: nn.RNN(cell_class(features=case.features))  # noqa: E731
    if case.bidirectional:
      module = nn.Bidirectional(make(), make(), return_carry=True)
    else:
      module = nn.RNN(cell_class(features=case.features), return_carry=True)

    def call(params, x, n):
      return module.apply(params, x, seq_lengths=n if case.masked else None)

    def init(x, n):
      return module.init(
        jax.random.key(0), x, seq_lengths=n if case.masked else None
      )

    return _jax_runner(case, init, call, inputs, lengths)

  return runner


def haiku_dynamic_unroll(case: Case, inputs, lengths) -> Runner | None:
  """``hk.LSTM``/``hk.GRU`` + ``hk.dynamic_unroll``: no masking support."""
  import haiku as hk
  import jax.numpy as jnp

  cores = {"lstm": hk.LSTM, "gru": hk.GRU}
  if case.masked or case.cell not in cores:
    return None

  def build(x, n):
    del n
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
  x = torch.from_numpy(inputs)
  n = torch.from_numpy(lengths).to(torch.int64)

  def forward():
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
    for parameter in module.parameters():
      parameter.grad = None
    outputs, state = forward()
    loss = outputs.sum() + sum(s.sum() for s in state)
    loss.backward()
    return loss

  return train


def torch_module(case: Case, inputs, lengths) -> Runner | None:
  if case.cell not in ("lstm", "gru"):  # PyTorch has no MGU
    return None
  return Runner(_torch_step(case, inputs, lengths))


def _torch_peak_rss_growth(case: Case, seed: int) -> int | None:
  """Peak RSS above the baseline over three steps, in a fresh process."""
  command = [
    sys.executable,
    "-m",
    "benchmarks.run",
    "--torch-memory-child",
    case.name,
    "--seed",
    str(seed),
    *(["--tiny"] if case == _tiny(CASES[case.name]) else []),
  ]
  try:
    result = subprocess.run(
      command, capture_output=True, text=True, check=True, timeout=600
    )
  except (subprocess.SubprocessError, OSError):
    return None
  return int(result.stdout.strip().splitlines()[-1])


def _tiny(case: Case) -> Case:
  """``case`` at smoke-test size."""
  return dataclasses.replace(case, batch=4, time=8, inputs=8, features=16)


def _resident_bytes() -> int:
  """This process's current resident set size (Linux ``/proc``)."""
  with open("/proc/self/statm") as file:
    return int(file.read().split()[1]) * resource.getpagesize()


def _torch_memory_child(case: Case, seed: int) -> None:
  """Prints the peak RSS above the pre-step baseline over three steps.

  ``ru_maxrss`` alone would also count transient peaks of importing torch
  and building the model, which can exceed a step's; a thread samples the
  current RSS instead, every 0.2 ms, while the steps run.
  """
  import threading

  step = _torch_step(case, *make_data(case, seed))
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
  print(peak[0] - baseline)


# --- Driver -----------------------------------------------------------------

CONTENDERS: dict[str, tuple[str, Callable[..., Runner | None]]] = {
  # The default: on CPU, unmasked LSTMs run oneDNN where the optional
  # extension is built (hk_rnn/_src/onednn.py).
  "hk_rnn": ("hk_rnn", _hk_rnn(True)),
  # The same with the extension off: the fused JAX kernels alone.
  "hk_rnn_no_onednn": ("hk_rnn", _hk_rnn(True, onednn=False)),
  # Training steps through oneDNN's backward primitive (the default runs
  # oneDNN for values only and the fused kernels' VJP under autodiff).
  "hk_rnn_onednn_training": ("hk_rnn", _hk_rnn(True, onednn_training=True)),
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


def _time_case(case, names, rounds, iters, seed, measure_memory, log):
  """Median seconds per step for each contender that supports ``case``.

  Cases longer than 64 steps run proportionally fewer steps per block (at
  least one), so that the long sequence does not dominate the run.
  """
  iters = max(1, round(iters * 64 / case.time))
  inputs, lengths = make_data(case, seed)
  runners = {}
  for name in names:
    family, build = CONTENDERS[name]
    if family != "hk_rnn" and not _installed(family):
      continue
    runner = build(case, inputs, lengths)
    if runner is None:
      continue
    if family == "torch" and measure_memory:
      runner.memory_bytes = _torch_peak_rss_growth(case, seed)
    runner.run()  # compile / first-call costs stay out of every block
    runners[name] = runner
  results = timing.time_interleaved(
    {name: runner.run for name, runner in runners.items()},
    rounds=rounds,
    iters=iters,
    log=lambda message: log(f"  {case.name}:{message}"),
  )
  for name, result in results.items():
    result["memory_bytes"] = runners[name].memory_bytes
  return results


def _markdown(results, cases, meta) -> str:
  lines = [
    "# hk_rnn benchmarks",
    "",
    f"- date: {meta['date']}",
    f"- machine: {meta['machine']}",
    f"- versions: {meta['versions']}",
    f"- load average (1, 5, 15 min) before: {meta['load_before']}, "
    f"after: {meta['load_after']}",
    f"- command: `{meta['command']}`",
    f"- rounds × iterations per block: {meta['rounds']} × {meta['iters']} "
    "(fewer iterations for T > 64)",
    "",
    "Times are medians over rounds; `hk_rnn ÷ peer` below 1 means hk_rnn is "
    "faster. Memory: XLA temporary buffers (JAX) or peak RSS above baseline "
    "(PyTorch).",
  ]
  for case_name, by_contender in results.items():
    case = cases[case_name]
    lead = by_contender.get(LEAD)
    lines += [
      "",
      f"## {case.title} (`{case_name}`: B={case.batch}, T={case.time}, "
      f"D={case.inputs}, F={case.features})",
      "",
      "| contender | median ms | spread ms | GFLOP/s | hk_rnn ÷ peer | memory |",
      "|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in sorted(
      by_contender.items(), key=lambda item: item[1]["median_s"]
    ):
      median = result["median_s"]
      ratio = "–" if lead is None else f"{lead['median_s'] / median:.2f}"
      lines.append(
        f"| {name} | {median * 1e3:.2f} | "
        f"{result['min_s'] * 1e3:.1f}–{result['max_s'] * 1e3:.1f} | "
        f"{case.gemm_flops / median / 1e9:.3g} | {ratio} | "
        f"{timing.format_bytes(result['memory_bytes'])} |"
      )
    unmasked = by_contender.get("hk_rnn_unmasked")
    if lead is not None and unmasked is not None:
      cost = lead["median_s"] / unmasked["median_s"] - 1
      lines += [
        "",
        f"Masking costs hk_rnn {cost:+.0%} over the same step without "
        "lengths (`hk_rnn ÷ hk_rnn_unmasked`, timed in the same rounds).",
      ]
  return "\n".join(lines) + "\n"


def _chart(results, cases, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(
    len(results),
    1,
    figsize=(7, 1.0 + 1.3 * sum(len(r) for r in results.values()) / 3),
  )
  axes = np.atleast_1d(axes)
  for axis, case_name in zip(axes, results, strict=True):
    by_contender = sorted(
      results[case_name].items(), key=lambda item: -item[1]["median_s"]
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
  import importlib.metadata

  found = []
  for package in ("jax", "jaxlib", "dm-haiku", "flax", "torch"):
    try:
      found.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      pass
  return ", ".join(found)


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
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--iters", type=int, default=3, help="steps per block")
  parser.add_argument(
    "--quick",
    action="store_true",
    help=f"cases {','.join(QUICK_CASES)}, 3 rounds of 2 steps",
  )
  parser.add_argument(
    "--tiny",
    action="store_true",
    help="shrink every case to B=4, T=8, D=8, F=16: a smoke test of the "
    "harness, not a measurement",
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--no-memory",
    action="store_true",
    help="skip PyTorch's memory subprocesses",
  )
  parser.add_argument("--out", default="runs/benchmarks", help="output folder")
  parser.add_argument("--torch-memory-child", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  cases = {
    name: _tiny(case) if args.tiny else case for name, case in CASES.items()
  }
  if args.torch_memory_child:
    _torch_memory_child(cases[args.torch_memory_child], args.seed)
    return
  case_names = args.cases.split(",")
  rounds, iters = args.rounds, args.iters
  if args.quick:
    case_names, rounds, iters = list(QUICK_CASES), 3, 2
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

  log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
  load_before = tuple(round(x, 2) for x in os.getloadavg())
  log(f"load average before: {load_before}")
  results = {}
  for name in case_names:
    log(f"{name}: compiling and timing")
    results[name] = _time_case(
      cases[name],
      contenders,
      rounds,
      iters,
      args.seed,
      not args.no_memory,
      log,
    )
  meta = {
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "machine": f"{platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} cores, {platform.system()}",
    "versions": _versions(),
    "load_before": load_before,
    "load_after": tuple(round(x, 2) for x in os.getloadavg()),
    "command": " ".join(["python -m benchmarks.run", *(argv or sys.argv[1:])]),
    "rounds": rounds,
    "iters": iters,
  }
  os.makedirs(args.out, exist_ok=True)
  table = _markdown(results, cases, meta)
  with open(os.path.join(args.out, "results.md"), "w") as file:
    file.write(table)
  with open(os.path.join(args.out, "results.json"), "w") as file:
    json.dump({"meta": meta, "results": results}, file, indent=1)
  _chart(results, cases, os.path.join(args.out, "chart.png"))
  print(table)


if __name__ == "__main__":
  main()
