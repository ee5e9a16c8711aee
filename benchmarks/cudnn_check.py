"""Checks and times the cuDNN LSTM path against the scan kernel, on a GPU.

``python -m benchmarks.cudnn_check`` compares ``dispatch.lstm_sequence`` with
``allow_cudnn=True`` (cuDNN through ``jax.experimental.rnn``) and ``False``
(the scan kernel): outputs, final carry and the gradients of every argument,
on rows of random lengths including an empty one, then times a training
step of each. It refuses to run where cuDNN would not be used.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src.kernels import cudnn, dispatch


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.cudnn_check")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--time", type=int, default=64)
  parser.add_argument("--inputs", type=int, default=128)
  parser.add_argument("--features", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=5)
  args = parser.parse_args(argv)
  platform = cudnn._platform()  # noqa: SLF001
  if platform != "cuda":
    raise SystemExit(f"cuDNN needs a CUDA GPU; this is {platform}")

  b, t, d, f = args.batch, args.time, args.inputs, args.features
  keys = jax.random.split(jax.random.key(0), 6)
  inputs = jax.random.normal(keys[0], (t, b, d))
  w_i = jax.random.normal(keys[1], (d, 4 * f)) / np.sqrt(d)
  w_h = jax.random.normal(keys[2], (f, 4 * f)) / np.sqrt(f)
  bias = jax.random.normal(keys[3], (4 * f,)) * 0.1
  carry = tuple(jax.random.normal(k, (b, f)) * 0.5 for k in keys[4:6])
  lengths = np.random.default_rng(0).integers(0, t + 1, size=b)
  lengths[0], lengths[1] = t, 0
  valid = jnp.arange(t)[:, None] < jnp.asarray(lengths)[None, :]

  def run(allow_cudnn):
    def loss(inputs, w_i, w_h, bias, carry):
      (c, h), outputs = dispatch.lstm_sequence(
        inputs, w_i, w_h, bias, carry, valid=valid, allow_cudnn=allow_cudnn
      )
      weights = jnp.cos(jnp.arange(outputs.size)).reshape(outputs.shape)
      return jnp.sum(outputs * weights) + jnp.sum(jnp.sin(c) + jnp.cos(h))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))

  arguments = (inputs, w_i, w_h, bias, carry)
  steps = {"cudnn": run(True), "scan": run(False)}
  results = {name: step(*arguments) for name, step in steps.items()}
  worst = 0.0
  for a, e in zip(
    jax.tree.leaves(results["cudnn"]),
    jax.tree.leaves(results["scan"]),
    strict=True,
  ):
    scale = float(jnp.max(jnp.abs(e))) + 1e-6
    worst = max(worst, float(jnp.max(jnp.abs(a - e))) / scale)
  print(f"largest difference relative to each array's scale: {worst:.2e}")
  print("(cuDNN may use TF32 matmuls: expect ~1e-3, not 1e-6)")

  times = {name: [] for name in steps}
  for _ in range(args.rounds):
    for name, step in steps.items():
      jax.block_until_ready(step(*arguments))
      start = time.perf_counter()
      for _ in range(5):
        jax.block_until_ready(step(*arguments))
      times[name].append((time.perf_counter() - start) / 5)
  for name, samples in times.items():
    print(f"{name}: {statistics.median(samples) * 1e3:.3f} ms per step")


if __name__ == "__main__":
  main()
