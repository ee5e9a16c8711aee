r"""Compares SLSTMCell and MLSTMCell with NX-AI/xlstm's PyTorch code.

NX-AI/xlstm (https://github.com/NX-AI/xlstm) is not a dependency: point
``--xlstm_path`` at a checkout of it (the directory holding the ``xlstm``
package); it is imported only here, with PyTorch. The same weights run
through

* the sLSTM: NX-AI's ``sLSTMCell_vanilla`` (the reference "vanilla"
  backend, whose step is ``slstm_forward_pointwise``), fed ``x W_i`` as its
  gate inputs, against ``RNN(SLSTMCell)`` with ``fused=True`` (the fused
  kernel) and ``fused=False`` (the step);
* the mLSTM: a loop of NX-AI's ``recurrent_step_stabilized_simple``, with
  ``σ(x W_o + b_o)`` applied to its ``h̃``, against ``RNN(MLSTMCell)``'s
  step and chunkwise whole-sequence forms.

It prints the largest absolute differences (and relative ones) of the outputs and of each
carry array (``C`` is compared transposed: NX-AI stores ``k vᵀ``, we
``v kᵀ``), and of the gradients of ``Σ w·outputs`` with respect to every
parameter. All float32, on CPU.

Run::

    python -m benchmarks.xlstm_reference --xlstm_path /tmp/xlstm
"""

from __future__ import annotations

import argparse
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import hk_rnn


def _import_xlstm(path):
  """NX-AI's sLSTM cell and mLSTM step, from the checkout at ``path``."""
  if path:
    sys.path.insert(0, path)
  try:
    import torch
    from xlstm.blocks.mlstm.backends import recurrent_step_stabilized_simple
    from xlstm.blocks.slstm.cell import sLSTMCell_vanilla, sLSTMCellConfig
  except ImportError as error:
    raise SystemExit(
      "benchmarks.xlstm_reference needs PyTorch and a checkout of "
      f"NX-AI/xlstm (--xlstm_path): {error}"
    ) from error
  return (
    torch,
    sLSTMCell_vanilla,
    sLSTMCellConfig,
    recurrent_step_stabilized_simple,
  )


def _model(cell_class, features, heads, fused):
  def forward(x):
    return hk_rnn.RNN(cell_class(features, num_heads=heads), fused=fused)(x)

  return hk.without_apply_rng(hk.transform(forward))


def _ours(cell_class, params, x, features, heads, weights):
  """``{fused: (final, outputs, grads)}`` of hk_rnn, float32."""
  results = {}
  for fused in (True, False):
    model = _model(cell_class, features, heads, fused)

    def loss(params, model=model):
      final, outputs = model.apply(params, x)
      return jnp.sum(weights * outputs), (final, outputs)

    grads, (final, outputs) = jax.jit(jax.grad(loss, has_aux=True))(params)
    results[fused] = (final, outputs, grads)
  return results


def _report(name, differences):
  width = max(len(key) for key in differences)
  print(f"\n{name}: max |hk_rnn - NX-AI|, and relative to max |NX-AI|")
  for key, (value, scale) in differences.items():
    print(f"  {key:<{width}}  {value:9.3g}  {value / max(scale, 1e-30):9.3g}")


def _max_abs(a, b):
  """``(max |a - b|, max |b|)``."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))


def compare_slstm(xlstm, batch, time, inputs, features, heads, seed):
  torch, cell_class, config_class, _ = xlstm
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, time, inputs)).astype(np.float32)
  weights = rng.normal(size=(batch, time, features)).astype(np.float32)
  size = features // heads
  params = {
    "slstm_cell": {
      "w_i": (rng.normal(size=(inputs, 4 * features)) / np.sqrt(inputs)),
      "w_h": (rng.normal(size=(heads, size, 4 * size)) / np.sqrt(size)),
      "b": rng.normal(size=(4 * features,)),
    }
  }
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  ours = _ours(hk_rnn.SLSTMCell, params, x, features, heads, weights)

  config = config_class(
    hidden_size=features,
    num_heads=heads,
    backend="vanilla",
    dtype="float32",
    enable_automatic_mixed_precision=False,
    input_shape="BSGNH",
    output_shape="BSH",
  )
  cell = cell_class(config)
  p = params["slstm_cell"]
  w_i = torch.tensor(np.asarray(p["w_i"]), requires_grad=True)
  # Ours: w_h[k, r, g·d + c], b[g·F + k·d + c]; NX-AI's external layouts:
  # kernel (heads, d_in, gates, d_out), bias (heads, gates, d).
  with torch.no_grad():
    kernel = torch.tensor(np.asarray(p["w_h"]).reshape(heads, size, 4, size))
    bias = torch.tensor(np.asarray(p["b"]).reshape(4, heads, size)).permute(
      1, 0, 2
    )
    cell._recurrent_kernel_.copy_(cell._recurrent_kernel_ext2int(kernel))
    cell._bias_.copy_(cell._bias_ext2int(bias.contiguous()))
  gate_inputs = torch.tensor(x) @ w_i
  outputs, state = cell(gate_inputs)
  (torch.tensor(weights) * outputs).sum().backward()
  h, c, n, m = (s.detach().numpy() for s in state)
  kernel_grad = cell._recurrent_kernel_int2ext(cell._recurrent_kernel_.grad)
  theirs_grads = {
    "w_i": w_i.grad.numpy(),
    "w_h": kernel_grad.reshape(heads, size, 4 * size).numpy(),
    "b": cell._bias_int2ext(cell._bias_.grad)
    .permute(1, 0, 2)
    .reshape(-1)
    .numpy(),
  }
  for fused, label in ((True, "fused"), (False, "step")):
    final, out, grads = ours[fused]
    differences = {
      "outputs": _max_abs(out, outputs.detach().numpy()),
      "h": _max_abs(final[3], h),
      "c": _max_abs(final[0], c),
      "n": _max_abs(final[1], n),
      "m": _max_abs(final[2], m),
    }
    for key, value in theirs_grads.items():
      differences[f"d {key}"] = _max_abs(grads["slstm_cell"][key], value)
    _report(
      f"SLSTMCell ({label}) B={batch} T={time} F={features} H={heads}",
      differences,
    )


def compare_mlstm(xlstm, batch, time, inputs, features, heads, seed):
  torch, _, _, step = xlstm
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, time, inputs)).astype(np.float32)
  weights = rng.normal(size=(batch, time, features)).astype(np.float32)
  size = features // heads
  scale = 1 / np.sqrt(inputs)
  cell = {
    name: rng.normal(size=(inputs, features)) * scale
    for name in ("w_q", "w_k", "w_v", "w_o")
  }
  cell["b_o"] = rng.normal(size=(features,))
  cell["w_if"] = rng.normal(size=(inputs, 2 * heads)) * scale
  cell["b_if"] = np.concatenate(
    [rng.normal(size=heads), np.linspace(3, 6, heads)]
  )
  params = {
    "mlstm_cell": jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), cell)
  }
  ours = _ours(hk_rnn.MLSTMCell, params, x, features, heads, weights)

  torch_params = {
    k: torch.tensor(np.asarray(v), requires_grad=True)
    for k, v in params["mlstm_cell"].items()
  }
  xt = torch.tensor(x)

  def per_head(a):  # (B, F) -> (B, H, 1, d)
    return a.reshape(batch, heads, 1, size)

  c = torch.zeros(batch, heads, size, size)
  n = torch.zeros(batch, heads, size, 1)
  m = torch.zeros(batch, heads, 1, 1)
  outputs = []
  for t in range(time):
    xs = xt[:, t]
    gates = xs @ torch_params["w_if"] + torch_params["b_if"]
    h, (c, n, m) = step(
      c,
      n,
      m,
      per_head(xs @ torch_params["w_q"]),
      per_head(xs @ torch_params["w_k"]),
      per_head(xs @ torch_params["w_v"]),
      gates[:, :heads].reshape(batch, heads, 1, 1),
      gates[:, heads:].reshape(batch, heads, 1, 1),
    )
    gate = torch.sigmoid(xs @ torch_params["w_o"] + torch_params["b_o"])
    outputs.append(gate * h.reshape(batch, features))
  outputs = torch.stack(outputs, dim=1)
  (torch.tensor(weights) * outputs).sum().backward()
  theirs = {
    "C (transposed)": c.detach().transpose(-1, -2).numpy(),
    "n": n.detach()[..., 0].numpy(),
    "m": m.detach()[..., 0, 0].numpy(),
  }
  for fused, label in ((True, "chunkwise"), (False, "step")):
    final, out, grads = ours[fused]
    differences = {"outputs": _max_abs(out, outputs.detach().numpy())}
    for (key, value), leaf in zip(theirs.items(), final, strict=True):
      differences[key] = _max_abs(leaf, value)
    for key, value in torch_params.items():
      differences[f"d {key}"] = _max_abs(
        grads["mlstm_cell"][key], value.grad.numpy()
      )
    _report(
      f"MLSTMCell ({label}) B={batch} T={time} F={features} H={heads}",
      differences,
    )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--xlstm_path", default="", help="NX-AI/xlstm checkout")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--time", type=int, default=256)
  parser.add_argument("--inputs", type=int, default=16)
  parser.add_argument("--features", type=int, default=32)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  xlstm = _import_xlstm(args.xlstm_path)
  shape = (args.batch, args.time, args.inputs, args.features, args.heads)
  compare_slstm(xlstm, *shape, args.seed)
  compare_mlstm(xlstm, *shape, args.seed)


if __name__ == "__main__":
  main()
