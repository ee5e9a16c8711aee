"""Mistakes a new user makes, and the errors each module answers them with.

Every case raises before anything is computed, in ``init``; the messages
name the module, the argument, and what was most likely meant.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn


def _gru_rnn():
  return hk_rnn.RNN(hk_rnn.GRUCell(4))


def _module(kind):
  """A GRU ``RNN``, ``Bidirectional`` or ``StackedRNN`` (built in transform)."""
  if kind == "RNN":
    return _gru_rnn()
  if kind == "Bidirectional":
    return hk_rnn.Bidirectional(_gru_rnn(), _gru_rnn())
  return hk_rnn.StackedRNN([_gru_rnn(), _gru_rnn()])


def _init(kind, inputs, *args, **options):
  def forward(inputs):
    return _module(kind)(inputs, *args, **options)

  return hk.transform(forward).init(jax.random.PRNGKey(0), inputs)


MODULES = (("RNN",), ("Bidirectional",), ("StackedRNN",))


class UserMistakesTest(parameterized.TestCase):
  @parameterized.parameters(*MODULES)
  def test_token_ids_fed_straight_in(self, kind):
    tokens = jnp.ones((2, 5), jnp.int32)
    message = (
      rf"^{kind}: inputs must be floating point, got dtype int32 of shape "
      r"\(2, 5\); embed token ids first \(e.g. with hk.Embed\), or cast the "
      r"inputs to a float dtype$"
    )
    # The inputs are blamed, not the mask or lengths that came with them.
    for options in ({}, {"seq_lengths": jnp.array([5, 3])}):
      with self.assertRaisesRegex(ValueError, message):
        _init(kind, tokens, **options)
    with self.assertRaisesRegex(ValueError, message):
      _init(kind, tokens, jnp.ones((2, 5), jnp.int32))

  @parameterized.parameters(*MODULES)
  def test_inputs_missing_their_feature_axis(self, kind):
    with self.assertRaisesRegex(
      ValueError,
      rf"^{kind}: segmentation_mask must have shape \(\*batch, time\) = "
      r"\(2,\), got \(2, 5\); that shape would fit if the inputs, of shape "
      r"\(2, 5\), had one more axis: are they missing their feature axis\?",
    ):
      _init(kind, jnp.ones((2, 5)), jnp.ones((2, 5), jnp.int32))

  @parameterized.parameters(*MODULES)
  def test_lengths_passed_as_the_mask(self, kind):
    with self.assertRaisesRegex(
      ValueError,
      rf"^{kind}: segmentation_mask must have shape \(\*batch, time\) = "
      r"\(2, 5\), got \(2,\); that is the shape of seq_lengths \(\*batch,\): "
      r"pass lengths by keyword, seq_lengths=\.\.\., not as the mask$",
    ):
      _init(kind, jnp.ones((2, 5, 3)), jnp.array([5, 3]))

  @parameterized.named_parameters(
    (
      "bidirectional",
      "Bidirectional",
      ((jnp.zeros((2, 4)),), None),
      r"^Bidirectional: initial_carry is one \(forward, backward\) pair; its "
      r"forward carry does not fit forward_rnn: ",
    ),
    (
      "stacked",
      "StackedRNN",
      (None, (jnp.zeros((2, 4)),)),
      r"^StackedRNN: initial_carry takes one entry per layer .*; "
      r"initial_carry\[1\] does not fit layers\[1\]: ",
    ),
  )
  def test_gru_carry_in_a_one_tuple(self, kind, carry, where):
    with self.assertRaisesRegex(
      ValueError,
      where
      + r"RNN: initial_carry must match the cell's carry for these inputs: "
      r"GRUCell '[a-z_0-9]+' carries a single array of shape \(2, 4\); got a "
      r"tuple of 1 array, \(\(2, 4\),\); this cell's carry is a single array: "
      r"pass it itself, not in a 1-tuple$",
    ):
      _init(kind, jnp.ones((2, 5, 3)), initial_carry=carry)

  def test_lstm_carry_as_one_array(self):
    def forward(inputs):
      rnn = hk_rnn.RNN(hk_rnn.LSTMCell(4, name="encoder"))
      return rnn(inputs, initial_carry=jnp.zeros((2, 4)))

    with self.assertRaisesRegex(
      ValueError,
      r"LSTMCell 'encoder' carries a tuple of 2 arrays, \(\(2, 4\), \(2, 4\)\); "
      r"got a single array of shape \(2, 4\)$",
    ):
      hk.transform(forward).init(None, jnp.ones((2, 5, 3)))

  def test_padding_inside_a_row_through_a_stack(self):
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
    with self.assertRaisesRegex(
      ValueError,
      r"^StackedRNN: segmentation_mask padding \(0\) must only sit at the end "
      r"of a row; got row \(1,\): padding at step 2, then id 1 at step 3 "
      r"\(1 of 2 rows\); padding belongs after each row's steps: pad at the "
      r"end \(Keras' pad_sequences pads in front by default: pass "
      r"padding='post'\), or move each row's tokens to the front$",
    ):
      _init("StackedRNN", jnp.ones((2, 5, 3)), mask)


def _lstm_stack(bidirectional):
  def layer():
    if bidirectional:
      return hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.LSTMCell(4)), hk_rnn.RNN(hk_rnn.LSTMCell(4))
      )
    return hk_rnn.RNN(hk_rnn.LSTMCell(4))

  return hk_rnn.StackedRNN([layer(), layer()])


class PointsAtTheFixTest(parameterized.TestCase):
  """Mistakes seen in client code, each answered with what to do instead."""

  @parameterized.parameters(*MODULES)
  def test_packed_sequences_as_inputs(self, kind):
    packed = hk_rnn.pack_sequences(
      [np.ones((n, 3), np.float32) for n in (3, 2, 4)], row_length=5
    )
    with self.assertRaisesRegex(
      ValueError,
      rf"^{kind}: inputs is a PackedSequences; pass its arrays, and its slot "
      r"count for one carry per sequence: \(packed.inputs, "
      r"packed.segmentation_mask, max_segments=packed.max_segments\)$",
    ):
      _init(kind, packed)

  @parameterized.parameters(*MODULES)
  def test_list_of_arrays_as_inputs(self, kind):
    sequences = [np.ones((n, 3), np.float32) for n in (3, 2)]
    with self.assertRaisesRegex(
      ValueError,
      rf"^{kind}: inputs must be one array \(\*batch, time, \*features\), "
      r"got a list of 2 items; for sequences of different lengths, pad them "
      r"to one length and pass seq_lengths \(or a segmentation_mask\), or "
      r"pack them with hk_rnn.pack_sequences",
    ):
      _init(kind, sequences)

  @parameterized.parameters(False, True)
  def test_one_layers_carry_to_a_stack(self, bidirectional):
    x = jnp.ones((2, 5, 3))
    one_layer = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))
    inner = (
      r"Bidirectional: initial_carry must be one \(forward, backward\) pair"
      if bidirectional
      else r"RNN: initial_carry must match the cell's carry"
    )
    with self.assertRaisesRegex(
      ValueError,
      r"^StackedRNN: initial_carry takes one entry per layer \(2 layers: "
      r"None for a layer's own, a \(forward, backward\) pair for a "
      r"Bidirectional layer\); initial_carry\[0\] does not fit layers\[0\]: "
      + inner,
    ):
      hk.transform(
        lambda x: _lstm_stack(bidirectional)(x, initial_carry=one_layer)
      ).init(jax.random.PRNGKey(0), x)
    with self.assertRaisesRegex(
      ValueError,
      r"^StackedRNN: initial_carry takes one entry per layer .*, a tuple or "
      r"list of 2; got a single array of shape \(2, 4\)$",
    ):
      hk.transform(
        lambda x: _lstm_stack(bidirectional)(x, initial_carry=one_layer[1])
      ).init(jax.random.PRNGKey(0), x)

  def test_one_directions_carry_to_bidirectional(self):
    x = jnp.ones((2, 5, 3))
    one_direction = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))

    def forward(x, carry):
      return hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.LSTMCell(4)), hk_rnn.RNN(hk_rnn.LSTMCell(4))
      )(x, initial_carry=carry)

    with self.assertRaisesRegex(
      ValueError,
      r"^Bidirectional: initial_carry is one \(forward, backward\) pair; its "
      r"forward carry does not fit forward_rnn: RNN: initial_carry must "
      r"match the cell's carry .* got a single array of shape \(2, 4\)$",
    ):
      hk.transform(forward).init(jax.random.PRNGKey(0), x, one_direction)
    with self.assertRaisesRegex(
      ValueError,
      r"^Bidirectional: initial_carry must be one \(forward, backward\) "
      r"pair, a carry for each direction's RNN; got a tuple of 3$",
    ):
      hk.transform(forward).init(jax.random.PRNGKey(0), x, (None,) * 3)

  @parameterized.parameters(*MODULES)
  def test_pre_padded_tokens_short_message(self, kind):
    # Keras' pad_sequences pads in front by default: 150 pads, 50 tokens.
    tokens = np.zeros((3, 200), np.int32)
    tokens[:, 150:] = 7
    tokens[1, 120:] = 9
    with self.assertRaises(ValueError) as raised:
      _init(kind, jnp.ones((3, 200, 2)), tokens != 0)
    message = str(raised.exception)
    self.assertRegex(
      message,
      rf"^{kind}: segmentation_mask padding \(0\) must only sit at the end of "
      r"a row; got row \(0,\): padding at steps 0 to 149, then id 1 at step "
      r"150 \(3 of 3 rows\); padding belongs after each row's steps: pad at "
      r"the end \(Keras' pad_sequences pads in front by default: pass "
      r"padding='post'\), or move each row's tokens to the front$",
    )
    self.assertLess(len(message), 400)  # not the 200-step row


if __name__ == "__main__":
  absltest.main()
