"""Tests for hk_rnn.StackedRNN."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils

BATCH, TIME, INPUTS = 3, 6, 4
PACKED_IDS = np.array(
  [[1, 1, 1, 0, 0, 0], [2, 2, 5, 7, 7, 0], [3, 3, 3, 3, 3, 3]], np.int32
)


def _inputs():
  return jnp.asarray(
    np.random.default_rng(0).normal(size=(BATCH, TIME, INPUTS)), jnp.float32
  )


def _layers():
  return [
    hk_rnn.RNN(hk_rnn.LSTMCell(4, name="first")),
    hk_rnn.Bidirectional(
      hk_rnn.RNN(hk_rnn.GRUCell(2, name="forward")),
      hk_rnn.RNN(hk_rnn.GRUCell(2, name="backward")),
    ),
    hk_rnn.RNN(hk_rnn.SimpleCell(4, name="last")),
  ]


class StackedRNNTest(parameterized.TestCase):
  @parameterized.parameters(False, True)
  def test_equals_manual_composition(self, residual):
    inputs, mask = _inputs(), jnp.asarray(PACKED_IDS)

    def stacked(x, m):
      return hk_rnn.StackedRNN(_layers(), residual=residual)(x, m)

    def manual(x, m):
      carries, y = [], x
      for layer in _layers():
        carry, out = layer(y, m)
        y = out + jnp.where(m[..., None] != 0, y, 0) if residual else out
        carries.append(carry)
      return tuple(carries), y

    params, expected = test_utils.init_and_apply(manual, inputs, mask)
    model = test_utils.transform(stacked)
    test_utils.tree_allclose(self, model.apply(params, inputs, mask), expected)

    def loss(fn, params):
      carries, y = test_utils.transform(fn).apply(params, inputs, mask)
      return jnp.sum(y**2) + sum(jnp.sum(c) for c in jax.tree.leaves(carries))

    test_utils.tree_allclose(
      self,
      jax.grad(lambda p: loss(stacked, p))(params),
      jax.grad(lambda p: loss(manual, p))(params),
    )

  def test_padding_stays_zero_with_nan_inputs(self):
    inputs, mask = _inputs(), jnp.asarray(PACKED_IDS)
    dirty = jnp.where(mask[..., None] != 0, inputs, jnp.nan)

    def stacked(x, m):
      return hk_rnn.StackedRNN(_layers(), residual=True)(x, m)

    params, (_, clean) = test_utils.init_and_apply(stacked, inputs, mask)
    _, outputs = test_utils.transform(stacked).apply(params, dirty, mask)
    np.testing.assert_array_equal(outputs, clean)
    np.testing.assert_array_equal(np.asarray(outputs)[PACKED_IDS == 0], 0.0)

  def test_dropout_between_layers_only_when_training(self):
    inputs, lengths = _inputs(), jnp.array([3, 6, 1])

    def stacked(x, is_training):
      return hk_rnn.StackedRNN(_layers(), dropout_rate=0.5)(
        x, seq_lengths=lengths, is_training=is_training, return_carry=False
      )

    model = hk.transform(stacked)
    params = model.init(jax.random.PRNGKey(0), inputs, True)
    plain = model.apply(params, None, inputs, False)
    dropped = model.apply(params, jax.random.PRNGKey(1), inputs, True)
    again = model.apply(params, jax.random.PRNGKey(1), inputs, True)
    np.testing.assert_array_equal(dropped, again)
    self.assertFalse(np.allclose(dropped, plain))
    np.testing.assert_array_equal(np.asarray(dropped)[0, 3:], 0.0)

  def test_lengths_time_major_and_initial_carry(self):
    inputs, lengths = _inputs(), jnp.array([3, 6, 0])
    start = (
      (jnp.ones((BATCH, 4)), jnp.ones((BATCH, 4))),
      None,
      jnp.full((BATCH, 4), 0.5),
    )

    def stacked(x, time_major):
      return hk_rnn.StackedRNN(_layers())(
        x, seq_lengths=lengths, initial_carry=start, time_major=time_major
      )

    params, (carries, outputs) = test_utils.init_and_apply(
      stacked, inputs, False
    )
    tm_carries, tm_outputs = test_utils.transform(stacked).apply(
      params, inputs.transpose(1, 0, 2), True
    )
    test_utils.tree_allclose(self, tm_carries, carries)
    test_utils.tree_allclose(self, tm_outputs.transpose(1, 0, 2), outputs)
    # The empty row keeps the given carries.
    np.testing.assert_array_equal(carries[0][0][2], 1.0)
    np.testing.assert_array_equal(carries[2][2], 0.5)

  def test_streaming_packed_rows_chunk_by_chunk(self):
    """Chunks with initial_segment_ids equal one run over the whole rows."""
    # Segment 2 of row 0 starts mid-chunk; row 1's segment 5 crosses both
    # boundaries; row 2 is one segment throughout.
    ids = jnp.asarray(
      np.array(
        [
          [1, 1, 1, 1, 1, 1, 2, 2, 0],
          [4, 5, 5, 5, 5, 5, 5, 5, 5],
          [3, 3, 3, 3, 3, 3, 3, 3, 3],
        ],
        np.int32,
      )
    )
    inputs = jnp.asarray(
      np.random.default_rng(1).normal(size=(BATCH, 9, INPUTS)), jnp.float32
    )

    def forward(x, m, **options):
      return hk_rnn.StackedRNN(
        [
          hk_rnn.RNN(hk_rnn.LSTMCell(4, name="low")),
          hk_rnn.RNN(hk_rnn.GRUCell(4, name="high")),
        ],
        residual=True,
      )(x, m, **options)

    model = test_utils.transform(forward)
    params = model.init(jax.random.PRNGKey(0), inputs, ids)
    whole_carries, whole = model.apply(params, inputs, ids)
    carries, previous, outputs = None, None, []
    for start in (0, 4, 7):
      stop = {0: 4, 4: 7, 7: 9}[start]
      chunk_ids = ids[:, start:stop]
      carries, y = model.apply(
        params,
        inputs[:, start:stop],
        chunk_ids,
        initial_carry=carries,
        initial_segment_ids=previous,
      )
      previous = hk_rnn.last_segment_ids(chunk_ids, previous)
      outputs.append(y)
    np.testing.assert_allclose(
      jnp.concatenate(outputs, axis=1), whole, atol=1e-5
    )
    test_utils.tree_allclose(self, carries, whole_carries)

  @parameterized.named_parameters(
    (
      "bidirectional",
      lambda: hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.GRUCell(3)), hk_rnn.RNN(hk_rnn.GRUCell(3))
      ),
      r"needs every layer to be a forward hk_rnn.RNN; got layers\[1\] = a "
      "Bidirectional",
    ),
    (
      "reversed",
      lambda: hk_rnn.RNN(hk_rnn.GRUCell(3), reverse=True),
      r"got layers\[1\] = an RNN with reverse=True",
    ),
  )
  def test_streaming_needs_forward_layers(self, make_layer, message):
    def forward(x):
      stack = hk_rnn.StackedRNN([hk_rnn.RNN(hk_rnn.GRUCell(3)), make_layer()])
      return stack(
        x, jnp.asarray(PACKED_IDS), initial_segment_ids=jnp.ones(BATCH, int)
      )

    with self.assertRaisesRegex(ValueError, "StackedRNN: .*" + message):
      hk.transform(forward).init(jax.random.PRNGKey(0), _inputs())

  @parameterized.named_parameters(
    ("return_carry", dict(return_carry=False), {}, "return_carry=False"),
    (
      "time_major",
      {},
      dict(time_major=True),
      r"layers\[0\] has time_major=False and layers\[1\] has "
      "time_major=True",
    ),
  )
  def test_layer_settings_it_would_drop_are_rejected(
    self, first, second, message
  ):
    with self.assertRaisesRegex(ValueError, "StackedRNN: .*" + message):
      hk.transform(
        lambda: hk_rnn.StackedRNN(
          [
            hk_rnn.RNN(hk_rnn.GRUCell(3), **first),
            hk_rnn.RNN(hk_rnn.GRUCell(3), **second),
          ]
        )
      ).init(None)

  @parameterized.named_parameters(
    ("empty", [], {}, "at least one layer"),
    ("not_a_layer", [hk_rnn.GRUCell], {}, r"layers\[0\] must be an hk_rnn.RNN"),
    (
      "residual_width",
      None,
      {"residual": True},
      r"residual=True needs layers\[0\] to keep its input width, 4; got "
      r"outputs of width 3",
    ),
    (
      "carries",
      None,
      {"initial_carry": (None, None)},
      r"StackedRNN: initial_carry takes one entry per layer \(1 layer: .*\), "
      r"a tuple or list of 1; got a tuple of 2",
    ),
    (
      "both",
      None,
      {"seq_lengths": jnp.ones((BATCH,), int)},
      "StackedRNN: pass either segmentation_mask or seq_lengths",
    ),
    ("bad_rate", None, {"dropout_rate": 1.0}, r"dropout_rate must lie in"),
  )
  def test_bad_input(self, layers, options, message):
    construct = {
      k: v for k, v in options.items() if k in ("residual", "dropout_rate")
    }
    call = {k: v for k, v in options.items() if k not in construct}

    def forward(x):
      chosen = layers
      if chosen is None:
        chosen = [hk_rnn.RNN(hk_rnn.GRUCell(3))]
      elif chosen and chosen[0] is hk_rnn.GRUCell:
        chosen = [hk_rnn.GRUCell(3)]
      return hk_rnn.StackedRNN(chosen, **construct)(
        x, jnp.asarray(PACKED_IDS), **call
      )

    with self.assertRaisesRegex(ValueError, message):
      hk.transform(forward).init(jax.random.PRNGKey(0), _inputs())


if __name__ == "__main__":
  absltest.main()
