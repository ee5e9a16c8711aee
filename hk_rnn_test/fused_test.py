"""Tests of the fused sequence kernels against two independent references.

* a plain ``lax.scan`` over the step equations, differentiated by JAX: values
  and gradients of every differentiable argument;
* a float64 numpy loop: values, and a central finite difference of the loss
  along a random direction in all arguments at once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax import lax
from jax.experimental import rnn

from hk_rnn._src.kernels import cudnn, dispatch

CELLS = ("lstm", "gru", "mgu", "simple")
CASES = ("plain", "lengths", "packed", "dropout", "packed_dropout", "one_step")
_BLOCKS = {"lstm": 4, "gru": 3, "mgu": 2, "simple": 1}
_TIME, _BATCH, _INPUTS, _FEATURES = 6, 4, 3, 5


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _segments(case):
  """Segment ids ``(T, B)`` for a case: 0 is padding."""
  if case in ("packed", "packed_dropout"):
    rows = [
      [1, 1, 2, 2, 2, 0],
      [3, 3, 3, 3, 3, 3],
      [1, 2, 3, 4, 0, 0],
      [0, 0, 0, 0, 0, 0],  # a row of length 0
    ]
  elif case == "lengths":
    rows = [[1] * n + [0] * (_TIME - n) for n in (6, 3, 0, 1)]
  elif case == "one_step":
    rows = [[1], [0], [1], [1]]
  else:
    return None
  return np.asarray(rows).T


def _make(cell, case, seed=0):
  """Random arguments ``(inputs, params, carry, valid, reset, mask)``."""
  rng = np.random.default_rng(seed)
  ids = _segments(case)
  time = _TIME if ids is None else ids.shape[0]
  width = _BLOCKS[cell] * _FEATURES
  normal = lambda *shape, scale=1.0: scale * rng.normal(size=shape)  # noqa: E731
  params = {
    "w_i": normal(_INPUTS, width, scale=0.6),
    "w_h": normal(_FEATURES, width, scale=0.4),
  }
  if cell in ("gru", "mgu"):
    params["b_i"] = normal(width, scale=0.3)
    params["b_h"] = normal(width, scale=0.3)
  else:
    params["b"] = normal(width, scale=0.3)
  carry = normal(_BATCH, _FEATURES, scale=0.5)
  if cell == "lstm":
    carry = (normal(_BATCH, _FEATURES, scale=0.5), carry)
  valid = reset = mask = None
  if ids is not None:
    valid = ids != 0
    previous = np.concatenate([np.zeros_like(ids[:1]), ids[:-1]])
    reset = valid & (ids != previous)
    if case == "lengths" or case == "one_step":
      reset = None
  if "dropout" in case:
    mask = (rng.uniform(size=(_BATCH, _FEATURES)) > 0.3) / 0.7
  inputs = normal(time, _BATCH, _INPUTS)
  if valid is not None:
    inputs = np.where(valid[..., None], inputs, 0.0)
  return inputs, params, carry, valid, reset, mask


def _as(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def _make_jax(cell, case, seed=0, dtype=jnp.float32):
  """``_make`` as jax arrays: floats in ``dtype``, ``valid``/``reset`` bool."""
  inputs, params, carry, valid, reset, mask = _make(cell, case, seed)
  inputs, params, carry, mask = _as((inputs, params, carry, mask), dtype)
  valid, reset = _as((valid, reset), bool)
  return inputs, params, carry, valid, reset, mask


def _kernel(
  cell, inputs, params, carry, valid, reset, mask, unroll=1, reset_carry=None
):
  options = dict(
    valid=valid,
    reset=reset,
    reset_carry=reset_carry,
    recurrent_mask=mask,
    unroll=unroll,
  )
  if cell == "lstm":
    return dispatch.lstm_sequence(
      inputs, params["w_i"], params["w_h"], params["b"], carry, **options
    )
  if cell in ("gru", "mgu"):
    kernel = dispatch.gru_sequence if cell == "gru" else dispatch.mgu_sequence
    return kernel(
      inputs,
      params["w_i"],
      params["w_h"],
      params["b_i"],
      params["b_h"],
      carry,
      **options,
    )
  return dispatch.simple_sequence(
    inputs, params["w_i"], params["w_h"], params["b"], carry, **options
  )


def _step(cell, params, carry, x, h_in, xp):
  """One step of the cell equations, in ``xp`` (numpy or jax.numpy)."""
  sigmoid = _sigmoid if xp is np else jax.nn.sigmoid
  if cell == "lstm":
    c, _ = carry
    z = x @ params["w_i"] + h_in @ params["w_h"] + params["b"]
    i, f, g, o = xp.split(z, 4, axis=-1)
    new_c = sigmoid(f) * c + sigmoid(i) * xp.tanh(g)
    new_h = sigmoid(o) * xp.tanh(new_c)
    return (new_c, new_h), new_h
  if cell == "gru":
    x_r, x_z, x_n = xp.split(x @ params["w_i"] + params["b_i"], 3, axis=-1)
    h_r, h_z, h_n = xp.split(h_in @ params["w_h"] + params["b_h"], 3, axis=-1)
    r, z = sigmoid(x_r + h_r), sigmoid(x_z + h_z)
    n = xp.tanh(x_n + r * h_n)
    new_h = (1 - z) * n + z * carry
    return new_h, new_h
  if cell == "mgu":
    x_f, x_n = xp.split(x @ params["w_i"] + params["b_i"], 2, axis=-1)
    h_f, h_n = xp.split(h_in @ params["w_h"] + params["b_h"], 2, axis=-1)
    f = sigmoid(x_f + h_f)
    n = xp.tanh(x_n + f * h_n)
    new_h = (1 - f) * n + f * carry
    return new_h, new_h
  new_h = xp.tanh(x @ params["w_i"] + h_in @ params["w_h"] + params["b"])
  return new_h, new_h


def _hidden(cell, carry):
  return carry[1] if cell == "lstm" else carry


def _reference(
  cell, inputs, params, carry, valid, reset, mask, reset_carry=None
):
  """The masked recurrence as a plain ``lax.scan`` (autodiff gives its VJP)."""
  time, batch = inputs.shape[:2]
  valid = jnp.ones((time, batch), bool) if valid is None else valid
  reset = jnp.zeros((time, batch), bool) if reset is None else reset
  initial = carry if reset_carry is None else reset_carry

  def body(state, step_inputs):
    x, valid_t, reset_t = step_inputs
    pick = lambda p, a, b: jax.tree.map(  # noqa: E731
      lambda u, v: jnp.where(p[:, None], u, v), a, b
    )
    state = pick(reset_t, initial, state)
    h = _hidden(cell, state)
    h_in = h if mask is None else h * mask
    new_state, output = _step(cell, params, state, x, h_in, jnp)
    return pick(valid_t, new_state, state), jnp.where(
      valid_t[:, None], output, 0
    )

  return lax.scan(body, carry, (inputs, valid, reset))


def _numpy_loop(cell, inputs, params, carry, valid, reset, mask):
  """The masked recurrence step by step in float64 numpy."""
  time, batch = inputs.shape[:2]
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  initial = jax.tree.map(lambda a: np.asarray(a, np.float64), carry)
  state = initial
  outputs = np.zeros((time, batch, _FEATURES))
  for t in range(time):
    for row in range(batch):
      if valid is not None and not valid[t, row]:
        continue
      row_state = jax.tree.map(lambda a: a[row : row + 1], state)  # noqa: B023
      if reset is not None and reset[t, row]:
        row_state = jax.tree.map(lambda a: a[row : row + 1], initial)  # noqa: B023
      h_in = _hidden(cell, row_state)
      if mask is not None:
        h_in = h_in * mask[row]
      x = np.asarray(inputs[t, row : row + 1], np.float64)
      new_state, output = _step(cell, params, row_state, x, h_in, np)
      state = jax.tree.map(
        lambda full, part: np.concatenate(
          [full[:row], part, full[row + 1 :]]  # noqa: B023
        ),
        state,
        new_state,
      )
      outputs[t, row] = output[0]
  return state, outputs


def _loss(run, cotangent_seed=1):
  """``Σ outputs·u + Σ carry·v`` with fixed random ``u``, ``v``."""

  def loss(inputs, params, carry):
    final, outputs = run(inputs, params, carry)
    rng = np.random.default_rng(cotangent_seed)
    total = jnp.sum(outputs * rng.normal(size=outputs.shape))
    for part in jax.tree.leaves(final):
      total = total + jnp.sum(part * rng.normal(size=part.shape))
    return total.astype(jnp.float32)

  return loss


def _value_and_grad(run):
  return jax.jit(jax.value_and_grad(_loss(run), argnums=(0, 1, 2)))


def _results_and_grads(run):
  """``run``'s ``(final, outputs)`` and its VJP of random cotangents, jitted.

  One compilation gives both the values and the gradients to compare.
  """

  def both(inputs, params, carry):
    results, pullback = jax.vjp(run, inputs, params, carry)
    rng = np.random.default_rng(1)
    cotangents = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), results
    )
    return results, pullback(cotangents)

  return jax.jit(both)


def _assert_tree_close(actual, expected, atol, rtol=0.0):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(b, np.float64), atol=atol, rtol=rtol
    ),
    actual,
    expected,
  )


class FusedTest(parameterized.TestCase):
  @parameterized.product(cell=CELLS, case=CASES)
  def test_values_and_gradients_match_autodiff_scan(self, cell, case):
    inputs, params, carry, valid, reset, mask = _make_jax(cell, case)
    fused_run = functools.partial(
      _kernel, cell, valid=valid, reset=reset, mask=mask
    )
    reference_run = functools.partial(
      _reference, cell, valid=valid, reset=reset, mask=mask
    )
    arguments = (inputs, params, carry)
    _assert_tree_close(
      _results_and_grads(fused_run)(*arguments),
      _results_and_grads(reference_run)(*arguments),
      atol=1e-5,
      rtol=1e-5,
    )

  @parameterized.parameters(*CELLS)
  def test_packed_segments_restart_from_reset_carry(self, cell):
    inputs, params, carry, valid, reset, mask = _make_jax(cell, "packed")
    _, _, reset_carry, *_ = _make_jax(cell, "packed", seed=3)
    arguments = (inputs, params, carry, reset_carry)

    def results_and_grads(run):
      def both(*arguments):
        results, pullback = jax.vjp(run, *arguments)
        rng = np.random.default_rng(1)
        cotangents = jax.tree.map(
          lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), results
        )
        return results, pullback(cotangents)

      return jax.jit(both)(*arguments)

    def fused_run(inputs, params, carry, reset_carry):
      return _kernel(
        cell, inputs, params, carry, valid, reset, mask, reset_carry=reset_carry
      )

    def reference_run(inputs, params, carry, reset_carry):
      return _reference(
        cell, inputs, params, carry, valid, reset, mask, reset_carry
      )

    fused_results = results_and_grads(fused_run)
    _assert_tree_close(
      fused_results, results_and_grads(reference_run), atol=1e-5, rtol=1e-5
    )
    # Both carries matter: the packed rows restart, the others do not.
    for d_carry in fused_results[1][2:]:
      for leaf in jax.tree.leaves(d_carry):
        self.assertGreater(float(jnp.max(jnp.abs(leaf))), 0.0)

  @parameterized.product(cell=CELLS, case=("packed_dropout", "lengths"))
  def test_values_match_numpy_loop(self, cell, case):
    inputs, params, carry, valid, reset, mask = _make(cell, case)
    expected = _numpy_loop(cell, inputs, params, carry, valid, reset, mask)
    actual = _kernel(
      cell,
      *_as((inputs, params, carry), jnp.float32),
      valid=valid,
      reset=reset,
      mask=None if mask is None else jnp.asarray(mask, jnp.float32),
    )
    _assert_tree_close(actual, expected, atol=1e-5)

  @parameterized.parameters(*CELLS)
  def test_gradient_matches_numpy_finite_difference(self, cell):
    inputs, params, carry, valid, reset, mask = _make(cell, "packed_dropout")
    arguments = (inputs, params, carry)
    rng = np.random.default_rng(7)
    direction = jax.tree.map(lambda a: rng.normal(size=np.shape(a)), arguments)

    def numpy_loss(arguments):
      final, outputs = _numpy_loop(cell, *arguments, valid, reset, mask)
      cotangents = np.random.default_rng(1)
      total = np.sum(outputs * cotangents.normal(size=outputs.shape))
      for part in jax.tree.leaves(final):
        total += np.sum(part * cotangents.normal(size=part.shape))
      return total

    step = 1e-5
    shifted = lambda sign: jax.tree.map(  # noqa: E731
      lambda a, d: a + sign * step * d, arguments, direction
    )
    expected = (numpy_loss(shifted(1)) - numpy_loss(shifted(-1))) / (2 * step)
    run = functools.partial(
      _kernel,
      cell,
      valid=valid,
      reset=reset,
      mask=jnp.asarray(mask, jnp.float32),
    )
    _, grads = _value_and_grad(run)(*_as(arguments, jnp.float32))
    actual = sum(
      np.sum(np.asarray(g, np.float64) * d)
      for g, d in zip(
        jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True
      )
    )
    np.testing.assert_allclose(actual, expected, rtol=1e-4)

  @parameterized.parameters(*CELLS)
  def test_nan_padding_reaches_no_value_or_gradient(self, cell):
    inputs, params, carry, valid, reset, mask = _make_jax(cell, "packed")
    poisoned = jnp.where(valid[..., None], inputs, jnp.nan)
    run = functools.partial(_kernel, cell, valid=valid, reset=reset, mask=mask)
    clean = _value_and_grad(run)(inputs, params, carry)
    dirty = _value_and_grad(run)(poisoned, params, carry)
    for leaf in jax.tree.leaves(dirty):
      self.assertTrue(np.all(np.isfinite(leaf)))
    _assert_tree_close(dirty, clean, atol=0.0)

  @parameterized.parameters(*CELLS)
  def test_padded_steps_have_zero_outputs_and_input_gradients(self, cell):
    inputs, params, carry, valid, reset, mask = _make_jax(cell, "lengths")
    valid = jnp.asarray(valid)
    run = functools.partial(_kernel, cell, valid=valid, reset=None, mask=None)
    _, outputs = run(inputs, params, carry)
    _, (d_inputs, _, _) = _value_and_grad(run)(inputs, params, carry)
    padded = ~np.asarray(valid)
    self.assertTrue(np.all(np.asarray(outputs)[padded] == 0))
    self.assertTrue(np.all(np.asarray(d_inputs)[padded] == 0))

  @parameterized.parameters(*CELLS)
  def test_row_of_length_zero_returns_initial_carry(self, cell):
    inputs, params, carry, valid, _, _ = _make_jax(cell, "lengths")
    final, _ = _kernel(
      cell, inputs, params, carry, jnp.asarray(valid, bool), None, None
    )
    # Row 2 has length 0.
    _assert_tree_close(
      jax.tree.map(lambda a: a[2], final),
      jax.tree.map(lambda a: a[2], carry),
      atol=0.0,
    )

  @parameterized.parameters(*CELLS)
  def test_bfloat16_matches_float32_reference(self, cell):
    inputs, params, carry, valid, reset, mask = _make(cell, "packed_dropout")
    run = functools.partial(_kernel, cell, valid=valid, reset=reset, mask=mask)
    low = _as((inputs, params, carry), jnp.bfloat16)
    value, grads = _value_and_grad(run)(*low)
    reference = functools.partial(
      _reference, cell, valid=valid, reset=reset, mask=mask
    )
    expected_value, expected_grads = _value_and_grad(reference)(
      *_as(low, jnp.float32)
    )
    for grad, argument in zip(
      jax.tree.leaves(grads), jax.tree.leaves(low), strict=True
    ):
      self.assertEqual(grad.dtype, argument.dtype)
    np.testing.assert_allclose(value, expected_value, rtol=0.05, atol=0.1)
    scale = max(np.max(np.abs(g)) for g in jax.tree.leaves(expected_grads))
    _assert_tree_close(grads, expected_grads, atol=0.05 * scale)

  def test_gradients_come_back_in_each_arguments_dtype(self):
    inputs, params, carry, *_ = _make("lstm", "plain")
    inputs = jnp.asarray(inputs, jnp.bfloat16)
    params, carry = _as((params, carry), jnp.float32)
    _, (d_inputs, d_params, d_carry) = _value_and_grad(
      functools.partial(_kernel, "lstm", valid=None, reset=None, mask=None)
    )(inputs, params, carry)
    self.assertEqual(d_inputs.dtype, jnp.bfloat16)
    for leaf in jax.tree.leaves((d_params, d_carry)):
      self.assertEqual(leaf.dtype, jnp.float32)

  @parameterized.parameters(*CELLS)
  def test_vmap_matches_separate_calls(self, cell):
    examples = [_make_jax(cell, "packed", seed) for seed in (0, 1)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *examples)
    inputs, params, carry, valid, reset, _ = stacked

    def loss_and_grad(inputs, params, carry, valid, reset):
      run = functools.partial(
        _kernel, cell, valid=valid, reset=reset, mask=None
      )
      return jax.value_and_grad(_loss(run), argnums=(0, 1, 2))(
        inputs, params, carry
      )

    batched = jax.jit(jax.vmap(loss_and_grad))(
      inputs, params, carry, valid, reset
    )
    for index, example in enumerate(examples):
      inputs, params, carry, valid, reset, _ = example
      expected = loss_and_grad(
        inputs, params, carry, *_as((valid, reset), bool)
      )
      _assert_tree_close(
        jax.tree.map(lambda a: a[index], batched),  # noqa: B023
        expected,
        atol=1e-5,
        rtol=1e-5,
      )

  def test_unroll_does_not_change_results(self):
    inputs, params, carry, valid, reset, mask = _make_jax(
      "lstm", "packed_dropout"
    )
    results = [
      _value_and_grad(
        functools.partial(
          _kernel,
          "lstm",
          valid=valid,
          reset=reset,
          mask=mask,
          unroll=unroll,
        )
      )(inputs, params, carry)
      for unroll in (1, 4)
    ]
    _assert_tree_close(results[0], results[1], atol=1e-5, rtol=1e-5)

  def test_wrong_weight_shape_names_the_argument(self):
    inputs, params, carry, *_ = _make_jax("lstm", "plain")
    with self.assertRaisesRegex(ValueError, r"w_h must have shape \(5, 20\)"):
      dispatch.lstm_sequence(
        inputs, params["w_i"], params["w_h"][:, :-1], params["b"], carry
      )


def _cudnn_reference_lstm(
  x, h_0, c_0, weights, seq_lengths, *, input_size, hidden_size, **options
):
  """``jax.experimental.rnn.lstm``'s signature, run by its CPU reference.

  Unpacking with jax's own ``unpack_lstm_weights`` checks our packing
  against the layout jax documents for cuDNN.
  """
  w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(
    weights, input_size, hidden_size, 1, False
  )
  return rnn.lstm_ref(
    x,
    h_0,
    c_0,
    w_ih,
    w_hh,
    b_ih,
    b_hh,
    seq_lengths,
    input_size,
    hidden_size,
    options["num_layers"],
    options["dropout"],
    options["bidirectional"],
  )


class CudnnTest(parameterized.TestCase):
  """The cuDNN path, with cuDNN replaced by jax's CPU reference of it.

  No GPU runs these tests: they check our weight packing, the batch-major
  transposes, the lengths and the empty-row handling, not cuDNN itself.
  """

  @parameterized.parameters("plain", "lengths")
  def test_matches_scan_kernel(self, case):
    inputs, params, carry, valid, _, _ = _make_jax("lstm", case)

    def through_cudnn(inputs, params, carry):
      return cudnn.lstm(
        inputs,
        params["w_i"],
        params["w_h"],
        params["b"],
        carry,
        valid=valid,
        lstm_fn=_cudnn_reference_lstm,
      )

    def through_scan(inputs, params, carry):
      return dispatch.lstm_sequence(
        inputs,
        params["w_i"],
        params["w_h"],
        params["b"],
        carry,
        valid=valid,
        allow_cudnn=False,
      )

    expected = _value_and_grad(through_scan)(inputs, params, carry)
    actual = _value_and_grad(through_cudnn)(inputs, params, carry)
    _assert_tree_close(actual, expected, atol=1e-5, rtol=1e-5)
    _assert_tree_close(
      through_cudnn(inputs, params, carry),
      through_scan(inputs, params, carry),
      atol=1e-5,
    )

  def test_packing_puts_transposed_gate_blocks_first(self):
    features, input_size = 2, 3
    rng = np.random.default_rng(0)
    w_i = jnp.asarray(rng.normal(size=(input_size, 4 * features)))
    w_h = jnp.asarray(rng.normal(size=(features, 4 * features)))
    b = jnp.asarray(rng.normal(size=(4 * features,)))
    flat = cudnn.lstm_weights(w_i, w_h, b)

    self.assertEqual(
      flat.shape,
      (rnn.get_num_params_in_lstm(input_size, features, 1, False),),
    )
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(
      flat, input_size, features, 1, False
    )
    np.testing.assert_array_equal(w_ih[0], w_i.T)
    np.testing.assert_array_equal(w_hh[0], w_h.T)
    np.testing.assert_array_equal(b_ih[0], b)
    np.testing.assert_array_equal(b_hh[0], 0)

  @parameterized.named_parameters(
    ("cuda", {}, True),
    ("cpu", {"platform": "cpu"}, False),
    ("rocm_gate_order_differs", {"platform": "rocm"}, False),
    ("reset", {"reset": True}, False),
    ("recurrent_mask", {"mask": True}, False),
    ("bfloat16", {"dtype": jnp.bfloat16}, False),
  )
  def test_dispatch_only_where_cudnn_computes_the_same(self, change, expected):
    inputs, params, carry, _, reset, mask = _make_jax(
      "lstm", "packed_dropout", dtype=change.get("dtype", jnp.float32)
    )
    self.assertEqual(
      cudnn.refusal(
        inputs,
        params["w_i"],
        params["w_h"],
        params["b"],
        carry,
        reset=reset if change.get("reset") else None,
        recurrent_mask=mask if change.get("mask") else None,
        platform=change.get("platform", "cuda"),
      )
      is None,
      expected,
    )

  def test_cpu_never_dispatches_to_cudnn(self):
    self.assertNotEqual(cudnn._platform(), "cuda")


if __name__ == "__main__":
  absltest.main()
