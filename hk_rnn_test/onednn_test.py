"""Tests of the compiled CPU backend, oneDNN (``hk_rnn/_src/kernels/onednn.py``).

Against two references that do not use oneDNN: the XLA kernel and a step-by-step loop of the LSTM equations
(``test_utils.reference_step``), values and gradients. Also: which calls
``lstm_sequence`` hands to oneDNN, the kernel mode, ``vmap``, concurrency, and
the fallback when the extension is missing or broken. Skipped when the
extension is not built (``python setup.py build_ext --inplace``).
"""

import ctypes
import importlib.util
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
from hk_rnn._src.kernels import dispatch, gates, onednn, xla
from hk_rnn_test import test_utils

_AVAILABLE = onednn.available()
_HAS_TORCH = importlib.util.find_spec("torch") is not None
_SKIP = absltest.skipUnless(
  _AVAILABLE, "the oneDNN extension is not built (docs/performance.md)"
)


def _make(steps, batch, inputs, features, seed=0, zero_carry=False):
  """Random float32 LSTM arguments ``(x, w_i, w_h, b, (c, h))``, time-major."""
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


def _make_gru(steps, batch, inputs, features, seed=0):
  """Random float32 GRU arguments ``(x, w_i, w_h, b_i, b_h, h)``."""
  rng = np.random.default_rng(seed)

  def normal(*shape, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

  width = 3 * features
  return (
    normal(steps, batch, inputs),
    normal(inputs, width, scale=0.6),
    normal(features, width, scale=0.4),
    normal(width, scale=0.3),
    normal(width, scale=0.3),
    normal(batch, features),
  )


def _gru_through_onednn(*args):
  return onednn.gru(*args)


def _gru_through_fused(x, w_i, w_h, b_i, b_h, h):
  return xla.single_carry(gates.GRU, x, w_i, w_h, b_i, b_h, h, h)


def _gru_through_steps(x, w_i, w_h, b_i, b_h, h):
  params = {"w_i": w_i, "w_h": w_h, "b_i": b_i, "b_h": b_h}
  outputs = []
  for t in range(x.shape[0]):
    h, y = test_utils.reference_step("gru", params, h, x[t])
    outputs.append(y)
  return h, jnp.stack(outputs)


def _through_onednn(x, w_i, w_h, b, carry):
  """oneDNN for the values and, under autodiff, its training primitives."""
  return onednn.lstm(x, w_i, w_h, b, carry)


def _through_dispatch(x, w_i, w_h, b, carry):
  """What ``lstm_sequence`` runs by default."""
  return dispatch.lstm_sequence(x, w_i, w_h, b, carry)


def _through_fused(x, w_i, w_h, b, carry):
  return xla.lstm(x, w_i, w_h, b, carry, carry)


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


def _runs_onednn(function, *args, target="hk_rnn_"):
  """Whether ``function(*args)`` calls the extension (read from its jaxpr).

  ``target`` is a prefix of the custom calls looked for. A fresh wrapper
  each time: JAX caches traces by function, and the switch is read when
  tracing.
  """
  jaxpr = jax.make_jaxpr(lambda *a: function(*a))(*args)
  return target in str(jaxpr)


class _Switch(parameterized.TestCase):
  """Runs in ``compiled`` mode; leaves the mode as it found it."""

  def setUp(self):
    super().setUp()
    self.addCleanup(hk_rnn.use_kernels, None)
    self.addCleanup(onednn.set_training, None)
    environment = mock.patch.dict(os.environ)
    environment.start()
    self.addCleanup(environment.stop)
    for variable in ("HK_RNN_KERNELS", "HK_RNN_ONEDNN"):
      os.environ.pop(variable, None)
    # ``auto`` never chooses oneDNN (see the module's docstring).
    hk_rnn.use_kernels("compiled")
    os.environ.pop(onednn.TRAINING_VARIABLE, None)
    os.environ.pop(onednn.THREADS_VARIABLE, None)


@_SKIP
class ValuesAndGradientsTest(_Switch):
  @parameterized.named_parameters(
    ("one_unit", 1, 1, 1, 1, False),
    ("small", 6, 4, 3, 5, False),
    ("zero_carry", 6, 4, 3, 5, True),
    ("wide", 4, 3, 16, 32, False),
  )
  def test_matches_the_fused_kernel_and_the_step_loop(
    self, steps, batch, inputs, features, zero_carry
  ):
    args = _make(steps, batch, inputs, features, zero_carry=zero_carry)
    actual = _results_and_grads(_through_onednn)(*args)
    _assert_close(actual, _results_and_grads(_through_fused)(*args))
    _assert_close(actual, _results_and_grads(_through_steps)(*args))
    # The default: oneDNN's values, the fused kernel's VJP.
    _assert_close(_results_and_grads(_through_dispatch)(*args), actual)

  def test_long_sequence_matches_the_fused_kernel(self):
    """50 steps: against the scan only (a step loop that long compiles slowly)."""
    args = _make(50, 2, 2, 3, seed=7)
    _assert_close(
      _results_and_grads(_through_onednn)(*args),
      _results_and_grads(_through_fused)(*args),
    )

  @parameterized.named_parameters(
    ("one_unit", 1, 1, 1, 1),
    ("small", 5, 4, 3, 5),
    ("wide", 3, 3, 16, 32),
  )
  def test_gru_matches_the_fused_kernel_and_the_step_loop(
    self, steps, batch, inputs, features
  ):
    args = _make_gru(steps, batch, inputs, features)
    actual = _results_and_grads(_gru_through_onednn)(*args)
    _assert_close(actual, _results_and_grads(_gru_through_fused)(*args))
    _assert_close(actual, _results_and_grads(_gru_through_steps)(*args))
    dispatched = _results_and_grads(lambda *a: dispatch.gru_sequence(*a))
    _assert_close(dispatched(*args), actual)

  @absltest.skipUnless(_HAS_TORCH, "PyTorch is not installed")
  def test_matches_pytorch(self):
    """``torch.nn.LSTM`` (oneDNN's primitive too, but its own build) as oracle."""
    import torch

    x, w_i, w_h, b, (c, h) = _make(7, 3, 4, 6, seed=5)
    module = torch.nn.LSTM(4, 6)
    with torch.no_grad():
      module.weight_ih_l0.copy_(torch.tensor(np.array(w_i.T)))
      module.weight_hh_l0.copy_(torch.tensor(np.array(w_h.T)))
      module.bias_ih_l0.copy_(torch.tensor(np.array(b)))
      module.bias_hh_l0.zero_()
    tx = torch.tensor(np.array(x), requires_grad=True)
    initial = tuple(torch.tensor(np.array(a))[None] for a in (h, c))
    y, (h_n, c_n) = module(tx, initial)
    (y.sum() + (2 * h_n).sum() + (3 * c_n).sum()).backward()

    def loss(x, w_i, w_h, b):
      (c_n, h_n), y = _through_onednn(x, w_i, w_h, b, (c, h))
      return jnp.sum(y) + jnp.sum(2 * h_n) + jnp.sum(3 * c_n), (y, c_n, h_n)

    (_, values), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    )(x, w_i, w_h, b)
    expected_values = (y, c_n[0], h_n[0])
    expected_grads = (
      tx.grad,
      module.weight_ih_l0.grad.T,
      module.weight_hh_l0.grad.T,
      module.bias_ih_l0.grad,
    )
    _assert_close(
      (values, grads),
      jax.tree.map(
        lambda t: t.detach().numpy(), (expected_values, expected_grads)
      ),
    )

  @absltest.skipUnless(_HAS_TORCH, "PyTorch is not installed")
  def test_gru_matches_pytorch(self):
    """``torch.nn.GRU``: gate blocks r, z, n, ``b_hn`` inside ``r ⊙ (...)``."""
    import torch

    x, w_i, w_h, b_i, b_h, h = _make_gru(7, 3, 4, 6, seed=6)
    module = torch.nn.GRU(4, 6)
    with torch.no_grad():
      for name, value in (
        ("weight_ih_l0", w_i.T),
        ("weight_hh_l0", w_h.T),
        ("bias_ih_l0", b_i),
        ("bias_hh_l0", b_h),
      ):
        getattr(module, name).copy_(torch.tensor(np.array(value)))
    tx = torch.tensor(np.array(x), requires_grad=True)
    y, h_n = module(tx, torch.tensor(np.array(h))[None])
    (y.sum() + (2 * h_n).sum()).backward()

    def loss(x, w_i, w_h, b_i, b_h):
      h_n, y = _gru_through_onednn(x, w_i, w_h, b_i, b_h, h)
      return jnp.sum(y) + jnp.sum(2 * h_n), (y, h_n)

    (_, values), grads = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    )(x, w_i, w_h, b_i, b_h)
    expected = (
      (y, h_n[0]),
      (
        tx.grad,
        module.weight_ih_l0.grad.T,
        module.weight_hh_l0.grad.T,
        module.bias_ih_l0.grad,
        module.bias_hh_l0.grad,
      ),
    )
    _assert_close(
      (values, grads), jax.tree.map(lambda t: t.detach().numpy(), expected)
    )

  def test_inference_without_jit_matches_the_step_loop(self):
    args = _make(5, 3, 4, 6)
    _assert_close(_through_onednn(*args), _through_steps(*args))

  @parameterized.parameters("lstm", "gru")
  def test_rnn_module_matches_the_step_path(self, kind):
    """``Bidirectional`` without lengths: the default vs ``fused=False``."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(3, 7, 4)), "float32")

    def build(fused_kernels):
      def forward(x):
        def layer(reverse):
          cell = test_utils.CELLS[kind](6)
          return hk_rnn.RNN(cell, reverse=reverse, fused=fused_kernels)

        return hk_rnn.Bidirectional(layer(False), layer(True))(x)

      return hk.without_apply_rng(hk.transform(forward))

    model, reference = build(True), build(False)
    params = model.init(jax.random.key(0), x)
    self.assertTrue(_runs_onednn(model.apply, params, x))

    def loss(apply):
      return lambda p, x: sum(
        jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(apply(p, x))
      )

    expected = jax.value_and_grad(loss(reference.apply), (0, 1))(params, x)
    for training in (False, True):
      onednn.set_training(training)
      actual = jax.value_and_grad(loss(model.apply), (0, 1))(params, x)
      _assert_close(actual, expected)


@_SKIP
class DispatchTest(_Switch):
  """What ``lstm_sequence`` hands to oneDNN, and the switch."""

  def setUp(self):
    super().setUp()
    self.args = _make(4, 2, 3, 5)

  def _lstm_sequence(self, **kwargs):
    return lambda *args: dispatch.lstm_sequence(*args, **kwargs)

  def test_plain_float32_calls_run_onednn(self):
    self.assertTrue(_runs_onednn(self._lstm_sequence(), *self.args))
    gru_args = _make_gru(4, 2, 3, 5)
    self.assertTrue(
      _runs_onednn(lambda *a: dispatch.gru_sequence(*a), *gru_args)
    )
    self.assertTrue(
      _runs_onednn(
        jax.grad(lambda *a: jnp.sum(_through_onednn(*a)[1])), *self.args
      )
    )

  def test_training_runs_the_fused_vjp_unless_switched(self):
    def gradient(*args):
      return jax.grad(lambda *a: jnp.sum(dispatch.lstm_sequence(*a)[1]))(*args)

    backward = "hk_rnn_lstm_backward"
    self.assertFalse(_runs_onednn(gradient, *self.args, target="hk_rnn_"))
    onednn.set_training(True)
    self.assertTrue(_runs_onednn(gradient, *self.args, target=backward))
    onednn.set_training(None)
    os.environ[onednn.TRAINING_VARIABLE] = "1"
    self.assertTrue(_runs_onednn(gradient, *self.args, target=backward))
    onednn.set_training(False)
    self.assertFalse(_runs_onednn(gradient, *self.args, target=backward))

  def test_second_derivatives_by_default(self):
    """The default's VJP is the fused kernel's, itself differentiable."""

    def second(w_h):
      def inner(w_h):
        x, w_i, _, b, carry = self.args
        return jnp.sum(dispatch.lstm_sequence(x, w_i, w_h, b, carry)[1] ** 2)

      return jnp.sum(jax.grad(inner)(w_h) ** 2)

    on = jax.grad(lambda w: second(w))(self.args[2])
    hk_rnn.use_kernels("xla")
    _assert_close(on, jax.grad(lambda w: second(w))(self.args[2]))

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
    hk_rnn.use_kernels("xla")
    self.assertFalse(_runs_onednn(run, *self.args))
    hk_rnn.use_kernels("compiled")
    self.assertTrue(_runs_onednn(run, *self.args))
    hk_rnn.use_kernels(None)
    for variable, value, expected in (
      ("HK_RNN_KERNELS", "xla", False),
      ("HK_RNN_KERNELS", "compiled", True),
      ("HK_RNN_KERNELS", "auto", False),
      ("HK_RNN_ONEDNN", "0", False),
      ("HK_RNN_ONEDNN", "1", True),
    ):
      os.environ[variable] = value
      self.assertEqual(_runs_onednn(run, *self.args), expected, value)
      del os.environ[variable]
    os.environ["HK_RNN_KERNELS"] = "compiled"
    hk_rnn.use_kernels("xla")  # takes precedence over the variable
    self.assertFalse(_runs_onednn(run, *self.args))

  def test_both_settings_give_the_same_numbers(self):
    run = _results_and_grads(self._lstm_sequence())
    hk_rnn.use_kernels("compiled")
    on = run(*self.args)
    hk_rnn.use_kernels("xla")
    run = _results_and_grads(self._lstm_sequence())
    _assert_close(on, run(*self.args))

  def test_one_thread_gives_the_same_numbers(self):
    all_threads = _results_and_grads(_through_onednn)(*self.args)
    os.environ[onednn.THREADS_VARIABLE] = "1"
    one_thread = _results_and_grads(_through_onednn)(*self.args)
    _assert_close(one_thread, all_threads)
    os.environ[onednn.THREADS_VARIABLE] = "two"
    with self.assertRaisesRegex(ValueError, "HK_RNN_ONEDNN_THREADS must be"):
      _through_onednn(*self.args)

  def test_bad_switch_values_raise(self):
    with self.assertRaisesRegex(ValueError, "use_kernels must be one of"):
      hk_rnn.use_kernels("yes")
    with self.assertRaisesRegex(ValueError, "set_training: training must be"):
      onednn.set_training(1)
    hk_rnn.use_kernels(None)
    os.environ["HK_RNN_KERNELS"] = "maybe"
    with self.assertRaisesRegex(ValueError, "HK_RNN_KERNELS must be"):
      dispatch.lstm_sequence(*self.args)


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
  """A missing or broken build: one logged line, then the XLA kernels."""

  def setUp(self):
    super().setUp()
    # A fresh load attempt, and the real state back afterwards.
    state = mock.patch.multiple(onednn, _library=None, _workspace_bytes={})
    state.start()
    self.addCleanup(state.stop)
    self.args = _make(4, 2, 3, 5)

  def _assert_falls_back(self, level):
    hk_rnn.use_kernels("auto")
    with self.assertLogs("absl", level) as logs:
      self.assertFalse(onednn.supports(*self.args))
      self.assertFalse(onednn.supports(*self.args))
      self.assertFalse(
        _runs_onednn(lambda *a: dispatch.lstm_sequence(*a), *self.args)
      )
    self.assertLen(logs.output, 1)
    self.assertIn("using the XLA kernels", logs.output[0])
    hk_rnn.use_kernels("compiled")
    with self.assertRaisesRegex(RuntimeError, "compiled CPU kernels"):
      dispatch.lstm_sequence(*self.args)

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
    hk_rnn.use_kernels("xla")
    with mock.patch.object(ctypes, "CDLL") as load:
      self.assertFalse(
        _runs_onednn(lambda *a: dispatch.lstm_sequence(*a), *self.args)
      )
    load.assert_not_called()


if __name__ == "__main__":
  absltest.main()
