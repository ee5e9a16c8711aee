"""Tests for hk_rnn.interop.from_flax, against Flax linen's own cells.

Skipped when flax is not installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import hk_rnn
from hk_rnn_test import test_utils
from hk_rnn_test.interop_helpers import (
  HAS_FLAX,
  HIDDEN,
  HK_RNN_CELL,
  INPUTS,
  LENGTHS,
  assert_valid_close,
  batch_inputs,
  cells_step,
  key_sorted,
  randomized,
)


def _flax_model(nn):
  class Model(nn.Module):
    """Every linen cell kind; returns every layer's final carry."""

    @nn.compact
    def __call__(self, x, lengths):
      carries = []
      carry, x = nn.Bidirectional(
        nn.RNN(nn.LSTMCell(HIDDEN)),
        nn.RNN(nn.GRUCell(HIDDEN)),
        return_carry=True,
      )(x, seq_lengths=lengths)
      carries.append(carry)
      for cell in (
        nn.OptimizedLSTMCell(HIDDEN),
        nn.SimpleCell(HIDDEN),
        nn.MGUCell(HIDDEN),
      ):
        carry, x = nn.RNN(cell, return_carry=True)(x, seq_lengths=lengths)
        carries.append(carry)
      return tuple(carries), x

  return Model()


def _hk_rnn_flax_twin(x, lengths):
  layers = [
    hk_rnn.Bidirectional(
      hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)), hk_rnn.RNN(hk_rnn.GRUCell(HIDDEN))
    ),
    hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
    hk_rnn.RNN(hk_rnn.SimpleCell(HIDDEN)),
    hk_rnn.RNN(hk_rnn.MGUCell(HIDDEN)),
  ]
  return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)


@absltest.skipUnless(HAS_FLAX, "needs flax")
class FlaxTest(absltest.TestCase):
  def test_matches_flax_with_seq_lengths(self):
    import flax.linen as nn

    flax_model = _flax_model(nn)
    x = batch_inputs(nan_padding=False)
    variables = flax_model.init(jax.random.PRNGKey(0), x, LENGTHS)
    variables = randomized(variables, 1)
    expected_carries, expected = flax_model.apply(variables, x, LENGTHS)

    model = test_utils.transform(_hk_rnn_flax_twin)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    loaded = hk_rnn.interop.from_flax(variables, params)
    carries, outputs = jax.jit(model.apply)(loaded, batch_inputs(), LENGTHS)
    assert_valid_close(self, outputs, expected)
    test_utils.tree_allclose(self, carries, expected_carries)

    # Sorted params: the same cells get the same weights.
    test_utils.tree_allclose(
      self,
      hk_rnn.interop.from_flax(variables, key_sorted(params)),
      key_sorted(loaded),
      atol=0,
      rtol=0,
    )
    # Sorted variables: Flax's names (LSTMCell_0, OptimizedLSTMCell_0) do
    # not say which LSTM came first, and the converter says so.
    with self.assertRaisesRegex(
      ValueError,
      r"from_flax: the order of cells 'LSTMCell_0' and 'OptimizedLSTMCell_0' "
      r"\(both of the kind an hk_rnn.LSTMCell takes\) cannot be settled from "
      r"their names: the source's variables have their keys sorted",
    ):
      hk_rnn.interop.from_flax(key_sorted(variables), params)
    # The "params" collection alone is accepted too.
    test_utils.tree_allclose(
      self,
      hk_rnn.interop.from_flax(variables["params"], params),
      loaded,
      atol=0,
      rtol=0,
    )

  def test_setup_bidirectional_takes_forward_first(self):
    import flax.linen as nn

    class Model(nn.Module):
      def setup(self):
        self.rnn = nn.Bidirectional(
          nn.RNN(nn.GRUCell(HIDDEN)), nn.RNN(nn.GRUCell(HIDDEN))
        )

      def __call__(self, x):
        return self.rnn(x)

    variables = key_sorted(
      Model().init(jax.random.PRNGKey(0), jnp.ones((1, 2, INPUTS)))
    )
    self.assertEqual(
      list(variables["params"]["rnn"]), ["backward_rnn", "forward_rnn"]
    )
    params = cells_step(
      [HK_RNN_CELL["GRU"]] * 2, jnp.ones((1, INPUTS)), chain=False
    )
    loaded = hk_rnn.interop.from_flax(variables, params)
    rnn = variables["params"]["rnn"]
    np.testing.assert_array_equal(
      loaded["gru_cell"]["w_h"][:, :HIDDEN],
      rnn["forward_rnn"]["cell"]["hr"]["kernel"],
    )
    np.testing.assert_array_equal(
      loaded["gru_cell_1"]["w_h"][:, :HIDDEN],
      rnn["backward_rnn"]["cell"]["hr"]["kernel"],
    )

  def test_mismatches(self):
    import flax.linen as nn

    x = jnp.ones((1, 2, INPUTS))
    no_reset = nn.RNN(nn.MGUCell(HIDDEN, reset_gate=False))
    variables = no_reset.init(jax.random.PRNGKey(0), x)
    params = cells_step([lambda: hk_rnn.MGUCell(HIDDEN)], x[:, 0])
    with self.assertRaisesRegex(
      ValueError,
      r"from_flax: the source's 'cell' \(Flax MGUCell\) has no bias in "
      r"'hn': an MGUCell\(reset_gate=False\)",
    ):
      hk_rnn.interop.from_flax(variables, params)
    gru = nn.RNN(nn.GRUCell(HIDDEN)).init(jax.random.PRNGKey(0), x)
    with self.assertRaisesRegex(
      ValueError,
      r"from_flax: cell 'mgu_cell' \(MGUCell\) is recurrent cell 0 but the "
      r"source's layer there, 'cell' \(Flax GRUCell\), needs an hk_rnn.GRUCell",
    ):
      hk_rnn.interop.from_flax(gru, params)
    with self.assertRaisesRegex(
      ValueError, "from_flax: the source holds no recurrent layer"
    ):
      hk_rnn.interop.from_flax({"params": {"dense": {"kernel": x}}}, params)


if __name__ == "__main__":
  absltest.main()
