r"""The compiled CPU kernels against the XLA engine and PyTorch, one process each.

Cases (time-major, T=64, D=128, F=256, float32), each a realistic model: a
dense ``tanh`` layer before the RNN and a loss over its outputs and final
carry after it, ``loss = mean(y²) + mean(final carry)``:

* ``lstm_train``, ``gru_train``: B=32, a jitted gradient of the loss in
  every parameter (PyTorch: ``backward()`` on ``nn.Linear`` + ``nn.LSTM``
  / ``nn.GRU``);
* ``lstm_infer``: B=4, the loss alone (PyTorch under ``no_grad``), 1,000
  calls, median and p99.

Contenders: ``compiled`` (``hk_rnn/_src/kernels/compiled.py``), ``xla`` (the
XLA engine, ``hk_rnn._src.kernels.xla``) and ``torch``. Each (case, contender) runs
in ``--processes`` fresh processes, in alternating order, and the figure is
the median of the per-process medians. The CPU model and the load average
before and after are printed; a start at load >= 0.5 per core is flagged.
``--busy`` keeps one ``while True: pass`` process running beside every
measurement (the "one busy process" condition).

  python benchmarks/compiled.py                      # everything, idle
  python benchmarks/compiled.py --busy --cases lstm_infer
  python benchmarks/compiled.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

STEPS, INPUTS, FEATURES = 64, 128, 256
CASES = {
  "lstm_train": ("lstm", 32, True, 40),
  "gru_train": ("gru", 32, True, 40),
  "lstm_infer": ("lstm", 4, False, 1000),
}
CONTENDERS = ("compiled", "xla", "torch")


def _jax_step(contender, kind, batch, train):
  import jax
  import jax.numpy as jnp

  from hk_rnn._src.kernels import compiled, xla
  from hk_rnn._src.kernels import gates as gate_math

  gates = 4 if kind == "lstm" else 3
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {
    "w_in": jax.random.normal(keys[0], (INPUTS, INPUTS)) / INPUTS**0.5,
    "w_i": jax.random.normal(keys[1], (INPUTS, gates * FEATURES)) * 0.05,
    "w_h": jax.random.normal(keys[2], (FEATURES, gates * FEATURES)) * 0.05,
    "b": jnp.zeros(gates * FEATURES),
  }
  x = jax.random.normal(keys[3], (STEPS, batch, INPUTS))
  zeros = jnp.zeros((batch, FEATURES))
  if contender == "compiled":
    if not compiled.available():
      raise SystemExit("the compiled kernels are not built")
    lstm, gru = compiled.lstm, compiled.gru
  else:
    lstm = lambda *a: xla.lstm(*a, a[-1])  # noqa: E731
    gru = lambda *a: xla.single_carry(gate_math.GRU, *a, a[-1])  # noqa: E731

  def loss(params, x):
    hidden = jnp.tanh(jnp.dot(x, params["w_in"]))
    if kind == "lstm":
      final, y = lstm(
        hidden, params["w_i"], params["w_h"], params["b"], (zeros, zeros)
      )
    else:
      b = params["b"]
      final, y = gru(hidden, params["w_i"], params["w_h"], b, b, zeros)
    carry = sum(jnp.mean(f) for f in jax.tree.leaves(final))
    return jnp.mean(y * y) + carry

  fn = jax.jit(jax.grad(loss) if train else loss)
  return lambda: jax.block_until_ready(fn(params, x))


def _torch_step(kind, batch, train):
  import torch

  torch.manual_seed(0)
  dense = torch.nn.Linear(INPUTS, INPUTS)
  rnn = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(INPUTS, FEATURES)
  x = torch.randn(STEPS, batch, INPUTS)

  def loss():
    y, final = rnn(torch.tanh(dense(x)))
    finals = final if isinstance(final, tuple) else (final,)
    return (y * y).mean() + sum(f.mean() for f in finals)

  if not train:

    def infer():
      with torch.no_grad():
        return loss().item()

    return infer

  def step():
    dense.zero_grad(set_to_none=True)
    rnn.zero_grad(set_to_none=True)
    loss().backward()

  return step


def _worker(contender, case):
  kind, batch, train, calls = CASES[case]
  if contender == "torch":
    step = _torch_step(kind, batch, train)
  else:
    step = _jax_step(contender, kind, batch, train)
  for _ in range(5):
    step()
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  times.sort()
  print(
    json.dumps(
      {
        "median_ms": 1e3 * statistics.median(times),
        "p99_ms": 1e3 * times[min(len(times) - 1, int(0.99 * len(times)))],
      }
    )
  )


def _environment():
  """This checkout first on the workers' path (its hk_rnn, its extension)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.environ.get("PYTHONPATH", "")
  return dict(
    os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, path]))
  )


def _cpu_model():
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  except OSError:
    return "unknown"
  for line in out.splitlines():
    if line.startswith("Model name:"):
      return line.split(":", 1)[1].strip()
  return "unknown"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", nargs="+", default=list(CASES))
  parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS))
  parser.add_argument("--processes", type=int, default=3)
  parser.add_argument("--busy", action="store_true")
  parser.add_argument("--json")
  parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker(*args.worker)
    return
  cores = os.cpu_count() or 1
  load = os.getloadavg()[0]
  print(f"CPU: {_cpu_model()}, {cores} cores; load before: {load:.2f}")
  if load >= 0.5 * cores:
    print("WARNING: the machine is not idle; these figures are not comparable")
  busy = None
  if args.busy:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
  results = {}
  try:
    for case in args.cases:
      per_process = {c: [] for c in args.contenders}
      for round_ in range(args.processes):
        order = args.contenders[round_ % len(args.contenders) :]
        order += args.contenders[: round_ % len(args.contenders)]
        for contender in order:
          out = subprocess.run(
            [sys.executable, __file__, "--worker", contender, case],
            capture_output=True,
            text=True,
            check=True,
            env=_environment(),
          ).stdout
          per_process[contender].append(json.loads(out.splitlines()[-1]))
      results[case] = {}
      for contender, runs in per_process.items():
        median = statistics.median(r["median_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        results[case][contender] = {"median_ms": median, "p99_ms": p99}
      reference = results[case].get("torch", {}).get("median_ms")
      for contender, figures in results[case].items():
        ratio = (
          f" ({figures['median_ms'] / reference:.2f}x torch)"
          if reference
          else ""
        )
        print(
          f"{case:11s} {contender:9s} median {figures['median_ms']:7.2f} ms"
          f"  p99 {figures['p99_ms']:7.2f} ms{ratio}"
        )
  finally:
    if busy is not None:
      busy.kill()
  print(f"load after: {os.getloadavg()[0]:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "cpu": _cpu_model(),
          "busy": args.busy,
          "load_before": load,
          "results": results,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  main()
