"""Tests of the optional oneDNN LSTM path (``hk_rnn/_src/onednn.py``).

Against two references that do not use oneDNN: the fused JAX kernel (the
extension switched off) and a step-by-step loop of the LSTM equations
(``test_utils.reference_step``), values and gradients. Also: which calls
``lstm_sequence`` hands to oneDNN, the switch, ``vmap``, concurrency, and
the fallback when the extension is missing or broken. Skipped when the
extension is not built (``python setup.py build_ext --inplace``).
"""

import ctypes
import os
import tempfile
import threading
from unittest import mock

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn._src import fused, onednn
from hk_rnn_test import test_utils

_AVAILABLE = onednn.available()
_SKIP = absltest.skipUnless(
  _AVAILABLE, "the oneDNN extension is not built (docs/performance.md)"
)


def _make(steps, batch, inputs, features, seed=0, zero_carry=False):
  """Random float32 ``(x, w_i, w_h, b, (c, h))``, time-major."""
  rng = np.random.default_rng(seed)

  def normal(*shape, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

  width = 4 * features
  carry = (normal(batch, features, scale=0.5), normal(batch, features))
  if zero_carry:
    carry = tuple(jnp.zeros_like(part) for part in carry)
  return (
    normal(steps, batch, inputs),
    normal(inputs, width, scale=0.6),
    normal(features, width, scale=0.4),
    normal(width, scale=0.3),
    carry,
  )


def _through_onednn(x, w_i, w_h, b, carry):
  return onednn.lstm(x, w_i, w_h, b, carry)


def _through_fused(x, w_i, w_h, b, carry):
  return fused._sequence(  # noqa: SLF001 - the kernel oneDNN replaces
    fused._LSTM,  # noqa: SLF001
    1,
    x,
    w_i,
    w_h,
    b,
    None,
    tuple(carry),
    tuple(carry),
    None,
    None,
    None,
  )


def _through_steps(x, w_i, w_h, b, carry):
  params = {"w_i": w_i, "w_h": w_h, "b": b}
  outputs = []
  for t in range(x.shape[0]):
    carry, y = test_utils.reference_step("lstm", params, carry, x[t])
    outputs.append(y)
  return tuple(carry), jnp.stack(outputs)


def _results_and_grads(run, seed=1):
  """``run``'s results and its VJP of fixed random cotangents, jitted."""

  def both(*args):
    results, pullback = jax.vjp(run, *args)
    rng = np.random.default_rng(seed)
    cotangents = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), results
    )
    return results, pullback(cotangents)

  return jax.jit(both)


def _assert_close(actual, expected, atol=1e-5):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), atol=atol, rtol=1e-5
    ),
    actual,
    expected,
  )


def _runs_onednn(function, *args):
  """Whether ``function(*args)`` calls the extension (read from its jaxpr).

  A fresh wrapper each time: JAX caches traces by function, and the switch
  is read when tracing.
  """
  jaxpr = jax.make_jaxpr(lambda *a: function(*a))(*args)
  return "hk_rnn_lstm" in str(jaxpr)


class _Switch(parameterized.TestCase):
  """Leaves the switch as it found it."""

  def setUp(self):
    super().setUp()
    self.addCleanup(onednn.set_enabled, None)
    environment = mock.patch.dict(os.environ)
    environment.start()
    self.addCleanup(environment.stop)
    os.environ.pop(onednn.ENVIRONMENT_VARIABLE, None)


@_SKIP
class ValuesAndGradientsTest(_Switch):
  @parameterized.named_parameters(
    ("one_unit", 1, 1, 1, 1, False),
    ("small", 6, 4, 3, 5, False),
    ("zero_carry", 6, 4, 3, 5, True),
    ("wide", 9, 3, 16, 32, False),
    ("long_narrow", 40, 2, 2, 3, False),
  )
  def test_matches_the_fused_kernel_and_the_step_loop(
    self, steps, batch, inputs, features, zero_carry
  ):
    args = _make(steps, batch, inputs, features, zero_carry=zero_carry)
    actual = _results_and_grads(_through_onednn)(*args)
    _assert_close(actual, _results_and_grads(_through_fused)(*args))
    _assert_close(actual, _results_and_grads(_through_steps)(*args))

  def test_inference_without_jit_matches_the_step_loop(self):
    args = _make(5, 3, 4, 6)
    _assert_close(_through_onednn(*args), _through_steps(*args))

  def test_rnn_module_matches_the_step_path(self):
    """``RNN`` and ``Bidirectional`` without lengths: the default vs fused=False."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7, 4)), "float32")

    def build(fused_kernels):
      def forward(x):
        def layer(reverse):
          return hk_rnn.RNN(
            hk_rnn.LSTMCell(6), reverse=reverse, fused=fused_kernels
          )

        return hk_rnn.Bidirectional(layer(False), layer(True))(x)

      return hk.without_apply_rng(hk.transform(forward))

    model, reference = build(True), build(False)
    params = model.init(jax.random.key(0), x)
    self.assertTrue(_runs_onednn(model.apply, params, x))

    def loss(apply):
      return lambda p, x: sum(
        jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(apply(p, x))
      )

    actual = jax.jit(jax.value_and_grad(loss(model.apply), (0, 1)))(params, x)
    expected = jax.jit(jax.value_and_grad(loss(reference.apply), (0, 1)))(
      params, x
    )
    _assert_close(actual, expected)


@_SKIP
class DispatchTest(_Switch):
  """What ``lstm_sequence`` hands to oneDNN, and the switch."""

  def setUp(self):
    super().setUp()
    self.args = _make(4, 2, 3, 5)

  def _lstm_sequence(self, **kwargs):
    return lambda *args: fused.lstm_sequence(*args, **kwargs)

  def test_plain_float32_calls_run_onednn(self):
    self.assertTrue(_runs_onednn(self._lstm_sequence(), *self.args))
    self.assertTrue(
      _runs_onednn(
        jax.grad(lambda *a: jnp.sum(_through_onednn(*a)[1])), *self.args
      )
    )

  @parameterized.named_parameters(
    ("valid", {"valid": np.ones((4, 2), bool)}),
    ("reset", {"reset": np.zeros((4, 2), bool)}),
    ("recurrent_mask", {"recurrent_mask": np.ones((2, 5), np.float32)}),
  )
  def test_masks_take_the_fused_kernel(self, options):
    self.assertFalse(_runs_onednn(self._lstm_sequence(**options), *self.args))

  def test_other_dtypes_take_the_fused_kernel(self):
    x, w_i, w_h, b, carry = self.args
    for dtype in (jnp.bfloat16, jnp.float16):
      self.assertFalse(
        _runs_onednn(self._lstm_sequence(), x.astype(dtype), w_i, w_h, b, carry)
      )
    self.assertFalse(
      _runs_onednn(
        self._lstm_sequence(), x, w_i.astype(jnp.bfloat16), w_h, b, carry
      )
    )

  def test_the_switch(self):
    run = self._lstm_sequence()
    onednn.set_enabled(False)
    self.assertFalse(_runs_onednn(run, *self.args))
    onednn.set_enabled(True)
    self.assertTrue(_runs_onednn(run, *self.args))
    onednn.set_enabled(None)
    for value, expected in (("0", False), ("1", True), ("auto", True)):
      os.environ[onednn.ENVIRONMENT_VARIABLE] = value
      self.assertEqual(_runs_onednn(run, *self.args), expected, value)
    onednn.set_enabled(False)  # takes precedence over the variable
    self.assertFalse(_runs_onednn(run, *self.args))

  def test_both_settings_give_the_same_numbers(self):
    run = _results_and_grads(self._lstm_sequence())
    onednn.set_enabled(True)
    on = run(*self.args)
    onednn.set_enabled(False)
    run = _results_and_grads(self._lstm_sequence())
    _assert_close(on, run(*self.args))

  def test_bad_switch_values_raise(self):
    with self.assertRaisesRegex(ValueError, "set_enabled: enabled must be"):
      onednn.set_enabled("yes")
    os.environ[onednn.ENVIRONMENT_VARIABLE] = "maybe"
    with self.assertRaisesRegex(ValueError, "HK_RNN_ONEDNN must be"):
      fused.lstm_sequence(*self.args)


@_SKIP
class TransformationsTest(_Switch):
  def test_vmap_matches_a_loop(self):
    """A batched leading axis on everything, and on the inputs alone."""
    stacks = [_make(5, 2, 3, 4, seed=seed) for seed in range(3)]
    batched = jax.tree.map(lambda *leaves: jnp.stack(leaves), *stacks)
    run = _results_and_grads(_through_onednn)
    expected = [run(*args) for args in stacks]
    expected = jax.tree.map(lambda *leaves: jnp.stack(leaves), *expected)
    _assert_close(jax.jit(jax.vmap(run))(*batched), expected)

    x, w_i, w_h, b, carry = batched
    shared = (w_i[0], w_h[0], b[0])
    per_input = jax.jit(jax.vmap(run, in_axes=(0, None, None, None, 0)))(
      x, *shared, carry
    )
    reference = jax.vmap(
      _results_and_grads(_through_fused), in_axes=(0, None, None, None, 0)
    )(x, *shared, carry)
    _assert_close(per_input, reference)

  def test_concurrent_calls(self):
    """Calls XLA runs side by side in one program, and from many threads."""
    first, second = _make(8, 4, 6, 16, seed=3), _make(8, 4, 6, 16, seed=4)
    run = _results_and_grads(_through_onednn)
    expected = (run(*first), run(*second))

    @jax.jit
    def together(first, second, matrix):
      # Independent work XLA may schedule beside the custom calls.
      busy = jnp.tanh(matrix @ matrix) @ matrix
      return run(*first), run(*second), busy

    matrix = jnp.eye(256) * 0.5
    _assert_close(together(first, second, matrix)[:2], expected)

    results, errors = {}, []

    def worker(index):
      try:
        for _ in range(3):
          results[index] = run(*(first, second)[index % 2])
          jax.block_until_ready(results[index])
      except Exception as error:  # noqa: BLE001 - reported below
        errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    self.assertEqual(errors, [])
    for index, result in results.items():
      _assert_close(result, expected[index % 2])


class FallbackTest(_Switch):
  """A missing or broken build: one logged line, then the fused kernels."""

  def setUp(self):
    super().setUp()
    # A fresh load attempt, and the real state back afterwards.
    state = mock.patch.multiple(onednn, _library=None, _workspace_bytes={})
    state.start()
    self.addCleanup(state.stop)
    self.args = _make(4, 2, 3, 5)

  def _assert_falls_back(self, level):
    with self.assertLogs("absl", level) as logs:
      self.assertFalse(onednn.supports(*self.args))
      self.assertFalse(onednn.supports(*self.args))
      self.assertFalse(
        _runs_onednn(lambda *a: fused.lstm_sequence(*a), *self.args)
      )
    self.assertLen(logs.output, 1)
    self.assertIn("using the fused JAX kernels", logs.output[0])
    onednn.set_enabled(True)
    with self.assertRaisesRegex(RuntimeError, "HK_RNN_ONEDNN=1"):
      onednn.supports(*self.args)

  def test_missing_extension(self):
    with mock.patch.object(onednn, "library_path", return_value=None):
      self._assert_falls_back("INFO")

  def test_broken_extension(self):
    with tempfile.NamedTemporaryFile(suffix=".so") as file:
      file.write(b"not a shared library")
      file.flush()
      with mock.patch.object(onednn, "library_path", return_value=file.name):
        self._assert_falls_back("WARNING")

  def test_the_switch_off_never_loads(self):
    onednn.set_enabled(False)
    with mock.patch.object(ctypes, "CDLL") as load:
      self.assertFalse(onednn.supports(*self.args))
    load.assert_not_called()


if __name__ == "__main__":
  absltest.main()
