"""Tests for hk_rnn.interop.from_keras, against Keras 3's own layers.

Keras runs on the JAX backend (interop_helpers sets it before keras is
imported); skipped when keras is not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import hk_rnn
from hk_rnn_test import test_utils
from hk_rnn_test.interop_helpers import (
  BATCH,
  HAS_KERAS,
  HIDDEN,
  HK_RNN_CELL,
  INPUTS,
  LENGTHS,
  TIME,
  VALID,
  assert_valid_close,
  batch_inputs,
  cells_step,
  key_sorted,
)


@absltest.skipUnless(HAS_KERAS, "needs keras")
class KerasTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    import keras

    if keras.backend.backend() != "jax":
      self.skipTest("needs Keras on the JAX backend")
    self.keras = keras

  def _layers(self):
    """Bidirectional LSTM, GRU, SimpleRNN: random weights, built."""
    layers = self.keras.layers
    stack = [
      layers.Bidirectional(
        layers.LSTM(HIDDEN, return_sequences=True, return_state=True)
      ),
      layers.GRU(HIDDEN, return_sequences=True, return_state=True),
      layers.SimpleRNN(HIDDEN, return_sequences=True, return_state=True),
    ]
    x = np.zeros((1, 2, INPUTS), np.float32)
    for seed, layer in enumerate(stack):
      x = layer(x)[0]
      layer.set_weights(
        [
          np.random.default_rng(seed).normal(size=w.shape).astype(w.dtype) * 0.5
          for w in layer.get_weights()
        ]
      )
    return stack

  def _keras_run(self, stack, x, mask):
    outputs, bi_h, bi_c, bi_h_back, bi_c_back = stack[0](x, mask=mask)
    carries = [((bi_c, bi_h), (bi_c_back, bi_h_back))]
    for layer in stack[1:]:
      outputs, h = layer(outputs, mask=mask)
      carries.append(h)
    return tuple(carries), outputs

  def test_matches_keras_unpadded_and_masked(self):
    stack = self._layers()

    def forward(x, lengths):
      layers = [
        hk_rnn.Bidirectional(
          hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
          hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
        ),
        hk_rnn.RNN(hk_rnn.GRUCell(HIDDEN)),
        hk_rnn.RNN(hk_rnn.SimpleCell(HIDDEN)),
      ]
      return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)

    model = test_utils.transform(forward)
    x = batch_inputs(nan_padding=False)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    loaded = hk_rnn.interop.from_keras(stack, params)
    apply = jax.jit(model.apply)

    full = np.full((BATCH,), TIME, np.int32)
    expected_carries, expected = self._keras_run(stack, x, None)
    carries, outputs = apply(loaded, x, full)
    test_utils.tree_allclose(self, outputs, expected)
    test_utils.tree_allclose(self, carries, expected_carries)

    expected_carries, expected = self._keras_run(stack, x, VALID)
    carries, outputs = apply(loaded, batch_inputs(), LENGTHS)
    assert_valid_close(self, outputs, expected)
    test_utils.tree_allclose(self, carries, expected_carries)

    # A model holding the layers; sorted params, whose gru_cell now sorts
    # before lstm_cell, are matched kind by kind.
    inputs = self.keras.Input((None, INPUTS))
    y = inputs
    for layer in stack:
      y = layer(y)[0]
    keras_model = self.keras.Model(inputs, y)
    test_utils.tree_allclose(
      self,
      hk_rnn.interop.from_keras(keras_model, key_sorted(params)),
      key_sorted(loaded),
      atol=0,
      rtol=0,
    )

  def test_rnn_of_cells_gives_each_cell_in_order(self):
    layers = self.keras.layers
    rnn = layers.RNN([layers.LSTMCell(HIDDEN), layers.GRUCell(HIDDEN)])
    rnn.build((1, 2, INPUTS))
    for seed, weight in enumerate(rnn.weights):
      weight.assign(np.random.default_rng(seed).normal(size=weight.shape))
    params = cells_step(
      [HK_RNN_CELL["LSTM"], HK_RNN_CELL["GRU"]], jnp.ones((1, INPUTS))
    )
    loaded = hk_rnn.interop.from_keras(rnn, params)
    lstm, gru = rnn.cell.cells
    np.testing.assert_allclose(loaded["lstm_cell"]["w_i"], lstm.kernel)
    # Keras's GRU blocks are z, r, h; hk_rnn's r, z, n.
    bias = np.asarray(gru.bias)
    np.testing.assert_allclose(
      loaded["gru_cell"]["b_h"],
      np.concatenate(
        [bias[1, HIDDEN : 2 * HIDDEN], bias[1, :HIDDEN], bias[1, 2 * HIDDEN :]]
      ),
    )

  def test_mismatches(self):
    layers = self.keras.layers
    before = layers.GRU(HIDDEN, reset_after=False)
    before.build((1, 2, INPUTS))
    params = cells_step([HK_RNN_CELL["GRU"]], jnp.ones((1, INPUTS)))
    with self.assertRaisesRegex(
      ValueError,
      r"from_keras: the source's layer '.*' is a GRU with reset_after=False",
    ):
      hk_rnn.interop.from_keras(before, params)
    unbuilt = layers.GRU(HIDDEN)
    with self.assertRaisesRegex(ValueError, r"from_keras: .* is not built"):
      hk_rnn.interop.from_keras(unbuilt, params)
    lstm = layers.LSTM(HIDDEN)
    lstm.build((1, 2, INPUTS))
    with self.assertRaisesRegex(
      ValueError,
      r"from_keras: cell 'gru_cell' \(GRUCell\) is recurrent cell 0 but the "
      r"source's layer there, layer '.*' \(Keras LSTM\), needs an hk_rnn.LSTMCell",
    ):
      hk_rnn.interop.from_keras(lstm, params)


if __name__ == "__main__":
  absltest.main()
