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
    ("bidirectional", "Bidirectional", ((jnp.zeros((2, 4)),), None)),
    ("stacked", "StackedRNN", (None, (jnp.zeros((2, 4)),))),
  )
  def test_gru_carry_in_a_one_tuple(self, kind, carry):
    with self.assertRaisesRegex(
      ValueError,
      r"^RNN: initial_carry must match the cell's carry for these inputs: "
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
      r"of a row; got row \(1,\) = \[1, 1, 0, 1, 1\] \(padding at step 2, "
      r"then id 1 at step 3\)$",
    ):
      _init("StackedRNN", jnp.ones((2, 5, 3)), mask)


if __name__ == "__main__":
  absltest.main()
