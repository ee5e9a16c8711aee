"""Tests for variational (input and recurrent) dropout in RNN."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils
from hk_rnn_test.rnn_helpers import (
  FEATURES,
  PACKED_IDS,
  random_inputs,
  rnn_fn,
  zero_carry,
)


class VariationalDropoutTest(parameterized.TestCase):
  def _forward(self, kind, **options):
    def forward(inputs, mask, is_training):
      cell = test_utils.CELLS[kind](FEATURES, name="cell", **options)
      return hk_rnn.RNN(cell)(inputs, mask, is_training=is_training)

    return forward

  @parameterized.parameters("lstm", "gru", "simple", "mgu")
  def test_masks_are_fixed_over_time(self, kind):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    options = dict(dropout_rate=0.3, recurrent_dropout_rate=0.4)
    model = hk.transform(self._forward(kind, **options))
    params = model.init(jax.random.PRNGKey(0), inputs, mask, True)
    rng = jax.random.PRNGKey(7)
    carry, outputs = model.apply(params, rng, inputs, mask, True)

    def sample_masks(inputs):
      cell = test_utils.CELLS[kind](FEATURES, name="cell", **options)
      return cell.dropout_masks(inputs[:, 0], rng=hk.next_rng_key())

    # The same rng in the same order draws the masks RNN used.
    masks = hk.transform(sample_masks).apply({}, rng, inputs)
    expected = test_utils.reference_rnn(
      kind,
      params["cell"],
      inputs * masks.inputs[:, None],
      PACKED_IDS,
      zero_carry(kind),
      recurrent_mask=masks.recurrent,
    )
    test_utils.tree_allclose(self, (carry, outputs), expected)

  def test_mask_statistics(self):
    def sample(x):
      cell = hk_rnn.LSTMCell(64, dropout_rate=0.25, recurrent_dropout_rate=0.5)
      return cell.dropout_masks(x)

    masks = hk.transform(sample).apply(
      {}, jax.random.PRNGKey(0), jnp.ones((500, 32))
    )
    for rate, mask in ((0.25, masks.inputs), (0.5, masks.recurrent)):
      mask = np.asarray(mask)
      np.testing.assert_allclose(
        np.unique(mask), [0.0, 1.0 / (1 - rate)], rtol=1e-6
      )
      kept = (mask != 0).mean()
      self.assertAlmostEqual(kept, 1 - rate, delta=0.02)
      self.assertAlmostEqual(mask.mean(), 1.0, delta=0.04)

  def test_not_training_is_deterministic_and_needs_no_rng(self):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    forward = self._forward(
      "lstm", dropout_rate=0.5, recurrent_dropout_rate=0.5
    )
    model = hk.transform(forward)
    params = model.init(jax.random.PRNGKey(0), inputs, mask, False)
    plain = test_utils.transform(rnn_fn("lstm")).apply(params, inputs, mask)
    test_utils.tree_allclose(
      self, model.apply(params, None, inputs, mask, False), plain
    )

  def test_training_without_rng_names_the_cell_and_the_ways_out(self):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    model = hk.transform(self._forward("gru", recurrent_dropout_rate=0.5))
    params = model.init(jax.random.PRNGKey(0), inputs, mask, True)
    message = (
      r"^RNN: is_training=True applies the dropout of GRUCell 'cell' "
      r"\(dropout_rate=0.0, recurrent_dropout_rate=0.5\), which needs an rng, "
      r"but none was given; pass an rng to apply \(model.apply\(params, rng, "
      r"\.\.\.\), so not under hk.without_apply_rng\), or call with "
      r"is_training=False$"
    )
    with self.assertRaisesRegex(ValueError, message):
      model.apply(params, None, inputs, mask, True)
    with self.assertRaisesRegex(ValueError, message):
      hk.without_apply_rng(model).apply(params, inputs, mask, True)

  def test_stack_dropout_without_rng_names_the_stack(self):
    def forward(inputs, is_training):
      layers = [hk_rnn.RNN(hk_rnn.GRUCell(FEATURES)) for _ in range(2)]
      stack = hk_rnn.StackedRNN(layers, dropout_rate=0.2, name="encoder")
      return stack(inputs, is_training=is_training)

    inputs = random_inputs()
    model = hk.transform(forward)
    params = model.init(jax.random.PRNGKey(0), inputs, False)
    with self.assertRaisesRegex(
      ValueError,
      r"^StackedRNN: is_training=True applies dropout_rate=0.2 between the "
      r"layers of StackedRNN 'encoder', which needs an rng, but none was "
      r"given; pass an rng to apply .*, or call with is_training=False$",
    ):
      model.apply(params, None, inputs, True)

  def test_masks_without_rng_name_the_cell(self):
    def sample(x):
      cell = hk_rnn.LSTMCell(FEATURES, dropout_rate=0.25, name="tagger")
      return cell.dropout_masks(x)

    with self.assertRaisesRegex(
      ValueError,
      r"^LSTMCell: dropout_masks samples masks for LSTMCell 'tagger' "
      r"\(dropout_rate=0.25, recurrent_dropout_rate=0.0\), which needs an "
      r"rng, but none was given; pass rng= to dropout_masks, or an rng to "
      r"apply",
    ):
      hk.transform(sample).apply({}, None, jnp.ones((2, 3)))
    # Without dropout there is nothing to sample and no rng is needed.
    masks = hk.transform(lambda x: hk_rnn.LSTMCell(2).dropout_masks(x)).apply(
      {}, None, jnp.ones((2, 3))
    )
    self.assertEqual(masks, (None, None))

  @parameterized.parameters(-0.1, 1.0, 1.5)
  def test_bad_rate(self, rate):
    with self.assertRaisesRegex(
      ValueError, r"dropout_rate must lie in \[0, 1\)"
    ):
      hk.transform(lambda: hk_rnn.GRUCell(3, dropout_rate=rate)).init(None)

  @parameterized.parameters("lstm", "gru")
  def test_sampling_strategies_agree(self, kind):
    """Per-step sampling from a fixed key gives the masks sampled once."""
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    options = dict(dropout_rate=0.2, recurrent_dropout_rate=0.5)

    def forward(inputs, mask, sampling, fused):
      cell = test_utils.CELLS[kind](FEATURES, name="cell", **options)
      rnn = hk_rnn.RNN(cell, dropout_sampling=sampling, fused=fused)
      return rnn(inputs, mask, is_training=True)

    model = hk.transform(
      forward,
    )
    params = model.init(jax.random.PRNGKey(0), inputs, mask, "once", True)
    rng = jax.random.PRNGKey(3)
    once = model.apply(params, rng, inputs, mask, "once", False)
    per_step = model.apply(params, rng, inputs, mask, "per_step", False)
    fused = model.apply(params, rng, inputs, mask, "per_step", True)
    test_utils.tree_allclose(self, per_step, once, atol=0, rtol=0)
    test_utils.tree_allclose(self, fused, once)

  def test_bad_sampling(self):
    with self.assertRaisesRegex(ValueError, "dropout_sampling must be one of"):
      hk.transform(
        lambda: hk_rnn.RNN(hk_rnn.GRUCell(2), dropout_sampling="each")
      ).init(None)


if __name__ == "__main__":
  absltest.main()
