"""Tests for hk_rnn.interop.from_haiku, against Haiku's own cores."""

import collections

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

import hk_rnn
from hk_rnn_test import test_utils
from hk_rnn_test.interop_helpers import (
  HIDDEN,
  HK_RNN_CELL,
  INPUTS,
  LENGTHS,
  VALID,
  batch_inputs,
  cells_step,
  key_sorted,
  randomized,
)


def _haiku_twin(x, lengths):
  layers = [
    hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
    hk_rnn.RNN(hk_rnn.SimpleCell(HIDDEN, activation_fn=jax.nn.relu)),
  ]
  return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)


def _haiku_deep(x):
  """``hk.DeepRNN`` of ``hk.LSTM`` and ``hk.VanillaRNN``, batch-major."""
  core = hk.DeepRNN([hk.LSTM(HIDDEN), hk.VanillaRNN(HIDDEN)])
  outputs, state = hk.dynamic_unroll(
    core, x, core.initial_state(x.shape[0]), time_major=False
  )
  return state, outputs


class HaikuTest(absltest.TestCase):
  def test_matches_dynamic_unroll_per_length(self):
    x = batch_inputs(nan_padding=False)
    deep = test_utils.transform(_haiku_deep)
    hk_params = randomized(deep.init(jax.random.PRNGKey(0), x), 1)
    model = test_utils.transform(_haiku_twin)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    carries, outputs = jax.tree.map(
      np.asarray, jax.jit(model.apply)(loaded, batch_inputs(), LENGTHS)
    )
    # Haiku's unroll knows no padding: run it on each length's rows alone.
    rows = collections.defaultdict(list)
    for row, length in enumerate(LENGTHS):
      rows[int(length)].append(row)
    for length, members in rows.items():
      (lstm_state, vanilla_state), expected = deep.apply(
        hk_params, x[members, :length]
      )
      np.testing.assert_allclose(
        outputs[members, :length], expected, atol=1e-5, rtol=1e-5
      )
      (c, h), vanilla = jax.tree.map(lambda leaf, m=members: leaf[m], carries)
      test_utils.tree_allclose(
        self,
        (c, h, vanilla),
        (lstm_state.cell, lstm_state.hidden, vanilla_state),
      )
    self.assertTrue(np.all(np.asarray(outputs)[~VALID] == 0))

  def test_numeric_order_of_eleven_sorted_cores(self):
    def deep(x):
      core = hk.DeepRNN([hk.LSTM(HIDDEN) for _ in range(11)])
      return core(x, core.initial_state(1))

    x = jnp.ones((1, HIDDEN))
    hk_params = key_sorted(
      randomized(hk.transform(deep).init(jax.random.PRNGKey(0), x), 0)
    )
    self.assertLess(
      list(hk_params).index("lstm_10/linear"),
      list(hk_params).index("lstm_2/linear"),
    )
    params = key_sorted(cells_step([lambda: hk_rnn.LSTMCell(HIDDEN)] * 11, x))
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    for index in range(11):
      suffix = f"_{index}" if index else ""
      w = hk_params[f"lstm{suffix}/linear"]["w"]
      np.testing.assert_array_equal(
        loaded[f"lstm_cell{suffix}"]["w_h"][:, :HIDDEN], w[HIDDEN:, :HIDDEN]
      )
      b = hk_params[f"lstm{suffix}/linear"]["b"]
      np.testing.assert_allclose(  # the forget block, Haiku's third, plus 1
        loaded[f"lstm_cell{suffix}"]["b"][HIDDEN : 2 * HIDDEN],
        b[2 * HIDDEN : 3 * HIDDEN] + 1,
      )

  def test_dtypes_kept_and_other_entries_untouched(self):
    x = jnp.ones((1, INPUTS))

    def forward(x):
      cell = hk_rnn.SimpleCell(HIDDEN, param_dtype=jnp.bfloat16)
      _, y = cell(cell.initialize_carry(x), x)
      return hk.Linear(2)(y)

    params = hk.transform(forward).init(jax.random.PRNGKey(0), x)
    hk_params = hk.transform(
      lambda x: hk.VanillaRNN(HIDDEN)(x, jnp.zeros((1, HIDDEN)))
    ).init(jax.random.PRNGKey(1), x)
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    self.assertEqual(list(loaded), list(params))
    self.assertIs(loaded["linear"]["w"], params["linear"]["w"])
    self.assertEqual(loaded["simple_cell"]["w_i"].dtype, jnp.bfloat16)
    np.testing.assert_allclose(
      np.asarray(loaded["simple_cell"]["w_i"], np.float32),
      hk_params["vanilla_rnn/linear"]["w"],
      rtol=1e-2,
    )

  def test_gru_points_to_core_cell(self):
    x = jnp.ones((1, INPUTS))
    hk_params = hk.transform(
      lambda x: hk.GRU(HIDDEN)(x, jnp.zeros((1, HIDDEN)))
    ).init(jax.random.PRNGKey(0), x)
    params = cells_step([HK_RNN_CELL["GRU"]], x)
    with self.assertRaisesRegex(
      ValueError,
      r"from_haiku: the source's 'gru' is an hk.GRU, which computes a "
      r"different GRU .* hk_rnn.CoreCell\(hk.GRU\(...\)\)",
    ):
      hk_rnn.interop.from_haiku(hk_params, params)


if __name__ == "__main__":
  absltest.main()
