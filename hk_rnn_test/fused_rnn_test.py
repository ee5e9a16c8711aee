"""``RNN`` with the fused kernels equals ``RNN`` stepping the cell.

Both paths share one set of parameters; values and the gradients of the
parameters, the inputs and the initial carry must agree across masks,
packing, directions, layouts, dropout and dtypes.
"""

from unittest import mock

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn._src.kernels import dispatch

FEATURES, INPUTS = 5, 3
CELLS = {
  "lstm": hk_rnn.LSTMCell,
  "gru": hk_rnn.GRUCell,
  "mgu": hk_rnn.MGUCell,
  "simple": hk_rnn.SimpleCell,
}
# Row 0 padded, row 1 packs three segments, row 2 full, row 3 empty.
PACKED_IDS = np.array(
  [[1, 1, 1, 0, 0, 0], [2, 2, 5, 7, 7, 0], [3, 3, 3, 3, 3, 3], [0] * 6],
  np.int32,
)
LENGTHS = np.array([3, 5, 6, 0], np.int32)


def _setup(kind, scenario, dtype=jnp.float32):
  """``(inputs, mask, call_options, rnn_options, cell_options)``."""
  rng = np.random.default_rng(0)
  batch_shape, time_major = (4,), False
  mask, call_options, rnn_options, cell_options = None, {}, {}, {}
  if scenario == "lengths":
    call_options["seq_lengths"] = jnp.asarray(LENGTHS)
  if scenario.startswith("packed"):
    mask = jnp.asarray(PACKED_IDS)
  if "reverse" in scenario:
    rnn_options["reverse"] = True
  if "keep_order" in scenario:
    rnn_options["keep_order"] = True
  if scenario == "time_major_two_batch_axes":
    batch_shape, time_major = (2, 2), True
    rnn_options["time_major"] = True
    mask = jnp.asarray(PACKED_IDS.reshape(2, 2, 6).transpose(2, 0, 1))
  if scenario == "no_batch_axes":
    batch_shape = ()
    mask = jnp.asarray(PACKED_IDS[1])
  if scenario == "dropout":
    mask = jnp.asarray(PACKED_IDS)
    cell_options = {"dropout_rate": 0.3, "recurrent_dropout_rate": 0.4}
    call_options["is_training"] = True
  if dtype != jnp.float32:
    cell_options["dtype"] = dtype
  time = 6
  shape = (
    (time, *batch_shape, INPUTS) if time_major else (*batch_shape, time, INPUTS)
  )
  inputs = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return inputs, mask, call_options, rnn_options, cell_options


def _loss_and_grads(kind, use_fused, scenario, dtype=jnp.float32):
  """Loss and gradients w.r.t. parameters, inputs and initial carry."""
  inputs, mask, call_options, rnn_options, cell_options = _setup(
    kind, scenario, dtype
  )

  def forward(inputs, initial_carry):
    cell = CELLS[kind](FEATURES, name="cell", **cell_options)
    layer = hk_rnn.RNN(cell, fused=use_fused, **rnn_options)
    return layer(inputs, mask, initial_carry=initial_carry, **call_options)

  batch_shape = (
    inputs.shape[1:-1] if "time_major" in scenario else (inputs.shape[:-2])
  )
  h = jnp.asarray(
    np.random.default_rng(1).normal(size=(*batch_shape, FEATURES)) * 0.5,
    jnp.float32,
  )
  initial_carry = (h * 0.7, h) if kind == "lstm" else h
  model = hk.transform(forward)
  key = jax.random.key(0)
  params = model.init(key, inputs, initial_carry)

  def loss(params, inputs, initial_carry):
    carry, outputs = model.apply(params, key, inputs, initial_carry)
    weights = jnp.cos(jnp.arange(outputs.size)).reshape(outputs.shape)
    total = jnp.sum(outputs.astype(jnp.float32) * weights)
    for leaf in jax.tree.leaves(carry):
      total = total + jnp.sum(jnp.sin(leaf.astype(jnp.float32)))
    return total

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
    params, inputs, initial_carry
  )


def _assert_tree_close(actual, expected, atol, rtol):
  for a, e in zip(
    jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), np.asarray(e, np.float64), atol=atol, rtol=rtol
    )


class FusedRNNTest(parameterized.TestCase):
  @parameterized.product(
    kind=("lstm",),
    scenario=(
      "none",
      "lengths",
      "packed",
      "packed_reverse",
      "packed_reverse_keep_order",
      "time_major_two_batch_axes",
      "no_batch_axes",
      "dropout",
    ),
  )
  def test_lstm_fused_equals_step_path(self, kind, scenario):
    _assert_tree_close(
      _loss_and_grads(kind, True, scenario),
      _loss_and_grads(kind, False, scenario),
      atol=1e-5,
      rtol=1e-5,
    )

  @parameterized.product(
    kind=("gru", "mgu", "simple"),
    scenario=("packed_reverse_keep_order", "dropout", "lengths"),
  )
  def test_gru_mgu_and_simple_fused_equal_step_path(self, kind, scenario):
    _assert_tree_close(
      _loss_and_grads(kind, True, scenario),
      _loss_and_grads(kind, False, scenario),
      atol=1e-5,
      rtol=1e-5,
    )

  @parameterized.parameters(*CELLS)
  def test_bfloat16_compute_close_to_step_path(self, kind):
    fused_result = _loss_and_grads(kind, True, "packed", jnp.bfloat16)
    step_result = _loss_and_grads(kind, False, "packed", jnp.bfloat16)
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(step_result))
    _assert_tree_close(fused_result, step_result, atol=0.03 * scale, rtol=0)

  @parameterized.parameters(
    ("lstm", "lstm_sequence"),
    ("gru", "gru_sequence"),
    ("mgu", "mgu_sequence"),
    ("simple", "simple_sequence"),
  )
  def test_rnn_uses_the_kernel_by_default(self, kind, kernel):
    with mock.patch.object(
      dispatch, kernel, wraps=getattr(dispatch, kernel)
    ) as spy:
      _loss_and_grads(kind, True, "packed")
    self.assertTrue(spy.called)

  @parameterized.parameters(
    ("lstm", "lstm_sequence", {"gate_fn": jax.nn.hard_sigmoid}),
    ("lstm", "lstm_sequence", {"activation_fn": jax.nn.relu}),
    ("gru", "gru_sequence", {"activation_fn": jax.nn.relu}),
    ("mgu", "mgu_sequence", {"gate_fn": jax.nn.hard_sigmoid}),
    ("simple", "simple_sequence", {"activation_fn": jax.nn.relu}),
  )
  def test_custom_activations_take_the_step_path(self, kind, kernel, options):
    def forward(inputs):
      return hk_rnn.RNN(CELLS[kind](FEATURES, **options))(inputs)

    inputs = jnp.ones((2, 3, INPUTS))
    model = hk.transform(forward)
    with mock.patch.object(
      dispatch, kernel, wraps=getattr(dispatch, kernel)
    ) as spy:
      model.apply(model.init(jax.random.key(0), inputs), None, inputs)
    self.assertFalse(spy.called)

  def test_fused_false_never_calls_the_kernel(self):
    with mock.patch.object(
      dispatch, "lstm_sequence", wraps=dispatch.lstm_sequence
    ) as spy:
      _loss_and_grads("lstm", False, "packed")
    self.assertFalse(spy.called)

  @parameterized.parameters(*CELLS)
  def test_parameters_are_those_of_the_step_path(self, kind):
    def forward(inputs, use_fused):
      return hk_rnn.RNN(CELLS[kind](FEATURES), fused=use_fused)(inputs)

    inputs = jnp.ones((2, 3, INPUTS))
    model = hk.transform(forward)
    key = jax.random.key(0)
    fused_params = model.init(key, inputs, True)
    step_params = model.init(key, inputs, False)
    _assert_tree_close(fused_params, step_params, atol=0, rtol=0)


if __name__ == "__main__":
  absltest.main()
