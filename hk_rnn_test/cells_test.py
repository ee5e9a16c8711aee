"""Tests for the cells: one step against the equations, carries, options."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils

BATCH, INPUTS, FEATURES = 3, 4, 5

LAYOUTS = {
  "lstm": {
    "w_i": (INPUTS, 4 * FEATURES),
    "w_h": (FEATURES, 4 * FEATURES),
    "b": (4 * FEATURES,),
  },
  "gru": {
    "w_i": (INPUTS, 3 * FEATURES),
    "w_h": (FEATURES, 3 * FEATURES),
    "b_i": (3 * FEATURES,),
    "b_h": (3 * FEATURES,),
  },
  "simple": {
    "w_i": (INPUTS, FEATURES),
    "w_h": (FEATURES, FEATURES),
    "b": (FEATURES,),
  },
  "mgu": {
    "w_i": (INPUTS, 2 * FEATURES),
    "w_h": (FEATURES, 2 * FEATURES),
    "b_i": (2 * FEATURES,),
    "b_h": (2 * FEATURES,),
  },
}


def _random(shape, seed):
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def _step_fn(kind, **options):
  def step(carry, inputs):
    return test_utils.CELLS[kind](FEATURES, name="cell", **options)(
      carry, inputs
    )

  return step


def _carry(kind, seed=1, batch=(BATCH,)):
  if kind == "lstm":
    return (
      _random((*batch, FEATURES), seed),
      _random((*batch, FEATURES), seed + 1),
    )
  return _random((*batch, FEATURES), seed)


class CellStepTest(parameterized.TestCase):
  @parameterized.parameters(*test_utils.CELLS)
  def test_parameter_layout(self, kind):
    params = test_utils.transform(_step_fn(kind)).init(
      jax.random.PRNGKey(0), _carry(kind), _random((BATCH, INPUTS), 0)
    )
    self.assertEqual(jax.tree.map(jnp.shape, params["cell"]), LAYOUTS[kind])

  @parameterized.parameters(*test_utils.CELLS)
  def test_step_matches_equations(self, kind):
    inputs, carry = _random((BATCH, INPUTS), 0), _carry(kind)
    params = test_utils.transform(_step_fn(kind)).init(
      jax.random.PRNGKey(0), carry, inputs
    )
    # Random biases too, so that every bias slot is exercised.
    params = jax.tree.map(lambda p: p + _random(p.shape, 3), params)
    new_carry, outputs = test_utils.transform(_step_fn(kind)).apply(
      params, carry, inputs
    )
    expected = test_utils.reference_step(kind, params["cell"], carry, inputs)
    test_utils.tree_allclose(self, (new_carry, outputs), expected)

  @parameterized.parameters(*test_utils.CELLS)
  def test_any_batch_axes(self, kind):
    inputs, carry = _random((2, 3, INPUTS), 0), _carry(kind, batch=(2, 3))
    params, batched = test_utils.init_and_apply(_step_fn(kind), carry, inputs)
    flat = test_utils.transform(_step_fn(kind)).apply(
      params,
      jax.tree.map(lambda x: x.reshape(6, FEATURES), carry),
      inputs.reshape(6, INPUTS),
    )
    test_utils.tree_allclose(
      self, batched, jax.tree.map(lambda x: x.reshape(2, 3, FEATURES), flat)
    )

  def test_recurrent_mask_feeds_w_h_only(self):
    inputs, carry = _random((BATCH, INPUTS), 0), _carry("gru")
    mask = jnp.asarray(
      np.random.default_rng(4).integers(0, 2, (BATCH, FEATURES)) * 2.0
    )
    params = test_utils.transform(_step_fn("gru")).init(
      jax.random.PRNGKey(0), carry, inputs
    )
    got = test_utils.transform(
      lambda c, x: hk_rnn.GRUCell(FEATURES, name="cell")(
        c, x, recurrent_mask=mask
      )
    ).apply(params, carry, inputs)
    expected = test_utils.reference_step(
      "gru", params["cell"], carry, inputs, mask
    )
    test_utils.tree_allclose(self, got, expected)

  def test_custom_activations(self):
    inputs, carry = _random((BATCH, INPUTS), 0), _carry("simple")
    params, (h, _) = test_utils.init_and_apply(
      _step_fn("simple", activation_fn=jax.nn.relu), carry, inputs
    )
    p = params["cell"]
    np.testing.assert_allclose(
      h, jax.nn.relu(inputs @ p["w_i"] + carry @ p["w_h"] + p["b"]), rtol=1e-5
    )

  def test_recurrent_kernel_is_orthogonal_per_gate(self):
    params = test_utils.transform(_step_fn("lstm")).init(
      jax.random.PRNGKey(0), _carry("lstm"), _random((BATCH, INPUTS), 0)
    )
    for block in jnp.split(params["cell"]["w_h"], 4, axis=1):
      np.testing.assert_allclose(block.T @ block, np.eye(FEATURES), atol=1e-5)

  def test_mgu_forget_bias_starts_at_one(self):
    params = test_utils.transform(_step_fn("mgu")).init(
      jax.random.PRNGKey(0), _carry("mgu"), _random((BATCH, INPUTS), 0)
    )
    np.testing.assert_array_equal(
      params["cell"]["b_i"], [1.0] * FEATURES + [0.0] * FEATURES
    )

  def test_bfloat16_compute_with_float32_params(self):
    inputs = _random((BATCH, INPUTS), 0).astype(jnp.bfloat16)
    carry = _carry("lstm")
    params, ((c, h), y) = test_utils.init_and_apply(
      _step_fn("lstm", dtype=jnp.bfloat16), carry, inputs
    )
    self.assertEqual(params["cell"]["w_i"].dtype, jnp.float32)
    self.assertEqual(y.dtype, jnp.bfloat16)
    expected = test_utils.reference_step(
      "lstm", params["cell"], carry, inputs.astype(jnp.float32)
    )
    test_utils.tree_allclose(self, ((c, h), y), expected, atol=3e-2, rtol=3e-2)

  def test_param_dtype(self):
    params = test_utils.transform(
      _step_fn("gru", param_dtype=jnp.bfloat16)
    ).init(jax.random.PRNGKey(0), _carry("gru"), _random((BATCH, INPUTS), 0))
    for leaf in jax.tree.leaves(params):
      self.assertEqual(leaf.dtype, jnp.bfloat16)

  @parameterized.parameters(0, -3, 2.5)
  def test_bad_features(self, features):
    with self.assertRaisesRegex(
      ValueError, "LSTMCell: features must be a positive int"
    ):
      hk.transform(lambda: hk_rnn.LSTMCell(features)).init(None)


class InitializeCarryTest(parameterized.TestCase):
  @parameterized.parameters(*test_utils.CELLS)
  def test_zeros_without_rng(self, kind):
    def carry(x):
      return test_utils.CELLS[kind](FEATURES).initialize_carry(x)

    result = hk.transform(carry).apply({}, None, jnp.ones((2, 3, INPUTS)))
    self.assertLen(jax.tree.leaves(result), test_utils.CARRY_SIZE[kind])
    for leaf in jax.tree.leaves(result):
      self.assertEqual(leaf.shape, (2, 3, FEATURES))
      np.testing.assert_array_equal(leaf, 0.0)

  def test_random_carry_init_uses_rng_argument(self):
    def carry(x, rng):
      cell = hk_rnn.LSTMCell(
        FEATURES, carry_init=hk.initializers.RandomNormal()
      )
      return cell.initialize_carry(x, rng=rng)

    model = hk.transform(carry)
    x = jnp.ones((BATCH, INPUTS))
    first = model.apply({}, None, x, jax.random.PRNGKey(1))
    again = model.apply({}, None, x, jax.random.PRNGKey(1))
    other = model.apply({}, None, x, jax.random.PRNGKey(2))
    test_utils.tree_allclose(self, first, again, atol=0, rtol=0)
    self.assertFalse(np.allclose(first[0], other[0]))
    self.assertFalse(np.allclose(first[0], first[1]))  # c and h differ.

  def test_random_carry_init_falls_back_to_next_rng_key(self):
    def carry(x):
      cell = hk_rnn.GRUCell(FEATURES, carry_init=hk.initializers.RandomNormal())
      return cell.initialize_carry(x)

    model = hk.transform(carry)
    h = model.apply({}, jax.random.PRNGKey(0), jnp.ones((BATCH, INPUTS)))
    self.assertEqual(h.shape, (BATCH, FEATURES))
    self.assertGreater(float(jnp.std(h)), 0.1)

  def test_carry_dtype_follows_compute_dtype(self):
    def carry(x):
      return hk_rnn.SimpleCell(FEATURES, dtype=jnp.bfloat16).initialize_carry(x)

    h = hk.transform(carry).apply({}, None, jnp.ones((BATCH, INPUTS)))
    self.assertEqual(h.dtype, jnp.bfloat16)


class ConvLSTMCellTest(parameterized.TestCase):
  @parameterized.parameters(((3,),), ((3, 2),), ((1, 3, 3),))
  def test_step_matches_dense_lstm_per_position(self, kernel_shape):
    """A conv is a dense layer over each position's neighbourhood."""
    spatial = (4,) * len(kernel_shape)
    inputs = _random((2, *spatial, 3), 0)
    carry = (
      _random((2, *spatial, FEATURES), 1),
      _random((2, *spatial, FEATURES), 2),
    )

    def step(carry, x):
      return hk_rnn.ConvLSTMCell(FEATURES, kernel_shape, name="cell")(carry, x)

    params, ((c, h), y) = test_utils.init_and_apply(step, carry, inputs)
    p = params["cell"]
    self.assertEqual(p["w_i"].shape, (*kernel_shape, 3, 4 * FEATURES))
    self.assertEqual(p["w_h"].shape, (*kernel_shape, FEATURES, 4 * FEATURES))
    z = (
      _numpy_conv(inputs, p["w_i"])
      + _numpy_conv(carry[1], p["w_h"])
      + np.asarray(p["b"])
    )
    i, f, g, o = np.split(z, 4, axis=-1)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    c_ref = sig(f) * np.asarray(carry[0]) + sig(i) * np.tanh(g)
    h_ref = sig(o) * np.tanh(c_ref)
    np.testing.assert_allclose(c, c_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(h, h_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(h, y)

  def test_carry_and_feature_axes(self):
    def carry(x):
      cell = hk_rnn.ConvLSTMCell(6, (3, 3))
      return cell.num_feature_axes, cell.initialize_carry(x)

    axes, (c, h) = hk.transform(carry).apply({}, None, jnp.ones((2, 5, 7, 3)))
    self.assertEqual(axes, 3)
    self.assertEqual(c.shape, (2, 5, 7, 6))
    self.assertEqual(h.shape, (2, 5, 7, 6))

  def test_rnn_over_conv_cell(self):
    x = _random((2, 4, 5, 5, 3), 0)  # (batch, time, height, width, channels)

    def forward(x, lengths):
      return hk_rnn.RNN(hk_rnn.ConvLSTMCell(4, (3, 3)))(x, seq_lengths=lengths)

    _, ((c, h), y) = test_utils.init_and_apply(forward, x, jnp.array([2, 4]))
    self.assertEqual(y.shape, (2, 4, 5, 5, 4))
    np.testing.assert_array_equal(y[0, 2:], 0.0)
    np.testing.assert_array_equal(h[0], y[0, 1])
    np.testing.assert_array_equal(h[1], y[1, 3])

  @parameterized.parameters(((),), ((3, 3, 3, 3),), ((0, 3),))
  def test_bad_kernel_shape(self, kernel_shape):
    with self.assertRaisesRegex(ValueError, "kernel_shape must hold 1, 2 or 3"):
      hk.transform(lambda: hk_rnn.ConvLSTMCell(4, kernel_shape)).init(None)


def _numpy_conv(x, w):
  """'SAME' stride-1 cross-correlation, channels last, by explicit loops."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kernel = w.shape[:-2]
  pads = [((k - 1) // 2, k // 2) for k in kernel]
  padded = np.pad(x, [(0, 0), *pads, (0, 0)])
  spatial = x.shape[1:-1]
  out = np.zeros((x.shape[0], *spatial, w.shape[-1]))
  for position in np.ndindex(*spatial):
    window = padded[
      (slice(None),)
      + tuple(slice(p, p + k) for p, k in zip(position, kernel, strict=True))
    ]
    out[(slice(None), *position)] = np.tensordot(
      window, w, axes=(list(range(1, window.ndim)), list(range(w.ndim - 1)))
    )
  return out


if __name__ == "__main__":
  absltest.main()
