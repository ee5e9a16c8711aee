"""Tests of the compiled CPU kernels (``hk_rnn/_src/kernels/compiled.py``).

Values and gradients of every supported call (masks and lengths, NaN in the
padding, packed rows with resets and a separate reset carry, per-step
carries, recurrent dropout masks) against the XLA engine
(``hk_rnn._src.kernels.xla``), which is tested against independent references
elsewhere, and plain calls against PyTorch's ``nn.LSTM``/``nn.GRU``. Also
``jit``, ``vmap``, second derivatives, odd sizes (F not a multiple of the
SIMD width, B = 1, T = 1, T = 0), the AVX2 build on an AVX-512 machine, the
thread count not changing a bit, and refusals. Skipped when the extension
is not built (``python setup.py build_ext --inplace``).
"""

import functools
import importlib.util
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from hk_rnn._src.kernels import compiled
from hk_rnn_test import compiled_parity as parity

_SKIP = absltest.skipUnless(
  compiled.available(), "the compiled CPU kernels are not built"
)


@_SKIP
class CompiledKernelTest(parameterized.TestCase):
  @parameterized.product(kind=("lstm", "gru"), case=tuple(parity.CASES))
  def test_matches_engine(self, kind, case):
    parity.check_parity(kind, case)

  @parameterized.parameters("lstm", "gru")
  def test_nan_padding_reaches_nothing(self, kind):
    args = parity.random_arguments(kind)
    clean = parity.loss_and_gradients(
      kind, parity.kernel(kind), "everything", args
    )
    dirty = parity.loss_and_gradients(
      kind, parity.kernel(kind), "everything", args, nan_padding=True
    )
    results, gradients = dirty
    _, valid = args[0], args[6]
    for leaf in jax.tree.leaves(results) + jax.tree.leaves(gradients[1:]):
      self.assertTrue(bool(jnp.all(jnp.isfinite(leaf))))
    d_x = gradients[0]
    self.assertTrue(bool(jnp.all(jnp.where(valid[..., None], True, d_x == 0))))
    parity.assert_trees_close(
      (results, gradients[1:]), (clean[0], clean[1][1:]), 0
    )

  @parameterized.parameters(
    ("lstm", 1, 1, 3, 5),
    ("gru", 1, 1, 3, 5),
    ("lstm", 4, 1, 2, 16),
    ("gru", 3, 2, 2, 33),
  )
  def test_odd_sizes(self, kind, steps, batch, inputs, features):
    parity.check_parity(
      kind,
      "everything",
      steps=steps,
      batch=batch,
      inputs=inputs,
      features=features,
      seed=1,
    )

  @parameterized.parameters("lstm", "gru")
  def test_no_steps(self, kind):
    # The engine cannot run T = 0; the kernel returns the initial carry.
    x, w_i, w_h, biases, carry, *_ = parity.random_arguments(kind, steps=0)

    def loss(carry):
      final, outputs = parity.kernel(kind)(x, w_i, w_h, *biases, carry)
      self.assertEqual(outputs.shape, (0, parity.B, parity.F))
      return sum(jnp.sum(2 * f) for f in jax.tree.leaves(final)), final

    d_carry, final = jax.jit(jax.grad(loss, has_aux=True))(carry)
    parity.assert_trees_close(final, carry, 0)
    parity.assert_trees_close(
      d_carry, jax.tree.map(lambda a: 2 + 0 * a, carry), 0
    )

  @parameterized.parameters("lstm", "gru")
  def test_second_derivative_is_the_engines(self, kind):
    x, w_i, w_h, biases, carry, _, valid, reset, mask = parity.random_arguments(
      kind
    )

    def outer(fn, w_h):
      def loss(w_h):
        results = fn(
          x,
          w_i,
          w_h,
          *biases,
          carry,
          valid=valid,
          reset=reset,
          recurrent_mask=mask,
        )
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(results))

      return jnp.sum(jnp.tanh(jax.grad(loss)(w_h)))

    got = jax.jit(jax.grad(functools.partial(outer, parity.kernel(kind))))(w_h)
    want = jax.jit(jax.grad(functools.partial(outer, parity.engine(kind))))(w_h)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  @parameterized.parameters("lstm", "gru")
  def test_vmap(self, kind):
    x, w_i, w_h, biases, carry, _, valid, _, _ = parity.random_arguments(kind)
    xs = jnp.stack([x, 2 * x])

    def run(x):
      return parity.kernel(kind)(x, w_i, w_h, *biases, carry, valid=valid)

    batched = jax.jit(jax.vmap(run))(xs)
    for index in range(2):
      row = jax.tree.map(lambda a, i=index: a[i], batched)
      parity.assert_trees_close(row, run(xs[index]), 0)

  @parameterized.parameters("lstm", "gru")
  def test_thread_count_changes_no_bit(self, kind):
    args = parity.random_arguments(kind, steps=9, batch=7, features=70, seed=2)
    kernel = parity.kernel(kind)
    # Fresh functions: the variable is read by each call of the handler.
    with mock.patch.dict(os.environ, {"HK_RNN_COMPILED_THREADS": "1"}):
      alone = parity.loss_and_gradients(kind, kernel, "everything", args)
    together = parity.loss_and_gradients(kind, kernel, "everything", args)
    parity.assert_trees_close(alone, together, 0)

  def test_avx2_build_matches(self):
    if compiled.lanes() != 16:
      self.skipTest("AVX2 is this machine's own path")
    script = (
      "from hk_rnn._src.kernels import compiled\n"
      "from hk_rnn_test.compiled_parity import check_parity\n"
      "assert compiled.lanes() == 8, compiled.lanes()\n"
      "for kind in ('lstm', 'gru'):\n"
      "  check_parity(kind, 'everything')\n"
    )
    environment = dict(os.environ, HK_RNN_COMPILED_ISA="avx2")
    subprocess.run(
      [sys.executable, "-c", script], check=True, env=environment, timeout=300
    )

  @parameterized.parameters("lstm", "gru")
  def test_matches_pytorch(self, kind):
    if importlib.util.find_spec("torch") is None:
      self.skipTest("torch is not installed")
    import torch

    x, w_i, w_h, biases, carry, *_ = parity.random_arguments(kind, features=9)
    features = w_h.shape[0]
    module = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(
      x.shape[-1], features
    )
    with torch.no_grad():
      module.weight_ih_l0.copy_(torch.tensor(np.asarray(w_i).T))
      module.weight_hh_l0.copy_(torch.tensor(np.asarray(w_h).T))
      module.bias_ih_l0.copy_(torch.tensor(np.asarray(biases[0])))
      hidden_bias = biases[1] if kind == "gru" else jnp.zeros_like(biases[0])
      module.bias_hh_l0.copy_(torch.tensor(np.asarray(hidden_bias)))
    inputs = torch.tensor(np.asarray(x), requires_grad=True)
    if kind == "lstm":
      c, h = (torch.tensor(np.asarray(a))[None] for a in carry)
      outputs, (h_n, c_n) = module(inputs, (h, c))
      finals = (c_n[0], h_n[0])
    else:
      outputs, h_n = module(inputs, torch.tensor(np.asarray(carry))[None])
      finals = (h_n[0],)
    (outputs.sum() + sum(f.sum() for f in finals)).backward()

    def loss(x, w_h):
      final, y = parity.kernel(kind)(x, w_i, w_h, *biases, carry)
      return jnp.sum(y) + sum(jnp.sum(f) for f in jax.tree.leaves(final))

    (d_x, d_w_h) = jax.grad(loss, argnums=(0, 1))(x, w_h)
    tolerance = {"rtol": 1e-4, "atol": 1e-5}
    final, y = parity.kernel(kind)(x, w_i, w_h, *biases, carry)
    np.testing.assert_allclose(y, outputs.detach().numpy(), **tolerance)
    for ours, theirs in zip(jax.tree.leaves(final), finals, strict=True):
      np.testing.assert_allclose(ours, theirs.detach().numpy(), **tolerance)
    np.testing.assert_allclose(d_x, inputs.grad.numpy(), **tolerance)
    np.testing.assert_allclose(
      d_w_h, module.weight_hh_l0.grad.numpy().T, **tolerance
    )


class RefusalTest(absltest.TestCase):
  def test_reasons(self):
    x, w_i, w_h, biases, carry, *_ = parity.random_arguments("lstm")
    reason = compiled.refusal("lstm", x, w_i, w_h, biases, carry)
    if not compiled.available():
      self.assertIsNotNone(reason)
      return
    self.assertIsNone(reason)
    self.assertIn(
      "float16",
      compiled.refusal("lstm", x.astype(jnp.float16), w_i, w_h, biases, carry),
    )
    self.assertIn("mgu", compiled.refusal("mgu", x, w_i, w_h, biases, carry))
    with self.assertRaisesRegex(ValueError, "float16"):
      compiled.lstm(x, w_i.astype(jnp.float16), w_h, biases[0], carry)
    with self.assertRaisesRegex(ValueError, "must have shape"):
      compiled.lstm(x, w_i, w_h[1:], biases[0], carry)


if __name__ == "__main__":
  absltest.main()
