"""Tests for hk_rnn.CoreCell and hk_rnn.CellCore.

``CoreCell`` is checked against Haiku's own ``hk.dynamic_unroll`` run on each
sequence alone; ``CellCore`` against ``hk_rnn.RNN`` and ``StackedRNN`` on the
same params.
"""

import collections

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils

BATCH, TIME, INPUTS, HIDDEN = 3, 6, 4, 5
PACKED_IDS = np.array(
  [[1, 1, 1, 0, 0, 0], [2, 2, 5, 7, 7, 0], [3, 3, 3, 3, 3, 3]], np.int32
)
LENGTHS = np.array([3, 0, 6], np.int32)

CORES = {
  "lstm": lambda: hk.LSTM(HIDDEN),
  "gru": lambda: hk.GRU(HIDDEN),
  "deep": lambda: hk.DeepRNN(
    [hk.LSTM(HIDDEN), jax.nn.relu, hk.VanillaRNN(HIDDEN)]
  ),
}


def _inputs(shape=(BATCH, TIME, INPUTS), seed=0):
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def _core_rnn(core_name, **options):
  def forward(x, mask, **call):
    return hk_rnn.RNN(hk_rnn.CoreCell(CORES[core_name]()), **options)(
      x, mask, **call
    )

  return test_utils.transform(forward)


def _unroll(core_name):
  """``hk.dynamic_unroll`` of the same core, batch-major in and out."""

  def forward(x):
    core = CORES[core_name]()
    outputs, state = hk.dynamic_unroll(
      core, x, core.initial_state(x.shape[0]), time_major=False
    )
    return state, outputs

  return test_utils.transform(forward)


def _per_sequence(core_name, params, inputs, ids, *, reverse, keep_order):
  """Runs ``hk.dynamic_unroll`` on every segment alone; RNN's layout out.

  Segments of equal length share one unroll (stacked as a batch, never
  padded).
  """
  unroll = _unroll(core_name)
  ids = np.asarray(ids)
  by_length = collections.defaultdict(list)
  for row in range(ids.shape[0]):
    for steps in test_utils.segments_of(ids[row]):
      by_length[len(steps)].append((row, steps))
  outputs = np.zeros((*ids.shape, HIDDEN), np.float32)
  last_step = {}
  finals = {}
  for segments in by_length.values():
    order = [steps[::-1] if reverse else steps for _, steps in segments]
    x = jnp.stack(
      [
        inputs[row, steps]
        for (row, _), steps in zip(segments, order, strict=True)
      ]
    )
    state, y = unroll.apply(params, x)
    for index, ((row, steps), read) in enumerate(
      zip(segments, order, strict=True)
    ):
      targets = read if keep_order or not reverse else steps
      outputs[row, targets] = np.asarray(y[index])
      if steps[-1] >= last_step.get(row, -1):
        last_step[row] = steps[-1]
        finals[row] = jax.tree.map(lambda leaf, i=index: leaf[i], state)
  return finals, outputs


class CoreCellTest(parameterized.TestCase):
  @parameterized.product(
    core=tuple(CORES),
    direction=("forward", "reverse", "reverse_keep_order"),
  )
  def test_packed_rows_equal_dynamic_unroll_per_sequence(self, core, direction):
    inputs = _inputs()
    reverse = direction != "forward"
    keep_order = direction == "reverse_keep_order"
    model = _core_rnn(core, reverse=reverse, keep_order=keep_order)
    params = model.init(jax.random.PRNGKey(0), inputs, PACKED_IDS)
    # The params of the core are those of the core alone.
    self.assertEqual(
      set(params), set(_unroll(core).init(jax.random.PRNGKey(0), inputs))
    )
    finals, expected = _per_sequence(
      core, params, inputs, PACKED_IDS, reverse=reverse, keep_order=keep_order
    )
    carry, outputs = model.apply(params, inputs, PACKED_IDS)
    test_utils.tree_allclose(self, outputs, expected)
    for row, final in finals.items():
      test_utils.tree_allclose(
        self, jax.tree.map(lambda leaf, r=row: leaf[r], carry), final
      )

  @parameterized.parameters(False, True)
  def test_every_segments_state_with_max_segments(self, reverse):
    inputs = _inputs()
    model = _core_rnn("lstm", reverse=reverse)
    params = model.init(jax.random.PRNGKey(0), inputs, PACKED_IDS)
    carries, _ = model.apply(params, inputs, PACKED_IDS, max_segments=4)
    unroll = _unroll("lstm")
    for row in range(BATCH):
      segments = test_utils.segments_of(PACKED_IDS[row])
      for slot in range(4):
        got = jax.tree.map(lambda leaf, r=row, s=slot: leaf[r, s], carries)
        if slot < len(segments):
          steps = segments[slot][::-1] if reverse else segments[slot]
          state, _ = unroll.apply(params, inputs[row, steps][None])
          want = jax.tree.map(lambda leaf: leaf[0], state)
        else:  # no segment: the core's initial state
          want = jax.tree.map(jnp.zeros_like, got)
        test_utils.tree_allclose(self, got, want)

  def test_lengths_equal_dynamic_unroll_and_length_zero_keeps_initial(self):
    inputs = _inputs().at[1].set(jnp.nan)  # row 1 is all padding
    model = _core_rnn("lstm")
    params = model.init(jax.random.PRNGKey(0), inputs, None)
    carry, outputs = model.apply(params, inputs, None, seq_lengths=LENGTHS)
    ids = (np.arange(TIME) < LENGTHS[:, None]).astype(np.int32)
    finals, expected = _per_sequence(
      "lstm", params, inputs, ids, reverse=False, keep_order=False
    )
    test_utils.tree_allclose(self, outputs, expected)
    self.assertTrue(np.all(np.asarray(outputs[1]) == 0))
    for row, final in finals.items():
      test_utils.tree_allclose(
        self, jax.tree.map(lambda leaf, r=row: leaf[r], carry), final
      )
    # hk.LSTM's initial state is zeros: the empty row keeps it.
    for leaf in jax.tree.leaves(carry):
      self.assertTrue(np.all(np.asarray(leaf[1]) == 0))

  def test_gradients_equal_dynamic_unroll_per_sequence(self):
    inputs = _inputs()
    model = _core_rnn("lstm")
    params = model.init(jax.random.PRNGKey(0), inputs, PACKED_IDS)
    weights = np.random.default_rng(1).normal(size=(BATCH, TIME, HIDDEN))
    weights = jnp.asarray(weights * (PACKED_IDS[..., None] != 0), jnp.float32)

    def loss(params):
      _, outputs = model.apply(params, inputs, PACKED_IDS)
      return jnp.sum(outputs * weights)

    unroll = _unroll("lstm")

    def reference_loss(params):
      total = 0.0
      for row in range(BATCH):
        for steps in test_utils.segments_of(PACKED_IDS[row]):
          _, y = unroll.apply(params, inputs[row, steps][None])
          total += jnp.sum(y[0] * weights[row, steps])
      return total

    test_utils.tree_allclose(
      self, jax.grad(loss)(params), jax.grad(reference_loss)(params)
    )

  def test_streaming_in_chunks_equals_one_pass(self):
    inputs = _inputs()
    model = _core_rnn("lstm")
    params = model.init(jax.random.PRNGKey(0), inputs, PACKED_IDS)
    expected_carry, expected = model.apply(params, inputs, PACKED_IDS)
    split = 2
    carry, first = model.apply(params, inputs[:, :split], PACKED_IDS[:, :split])
    carry, second = model.apply(
      params,
      inputs[:, split:],
      PACKED_IDS[:, split:],
      initial_carry=carry,
      initial_segment_ids=hk_rnn.last_segment_ids(PACKED_IDS[:, :split]),
    )
    test_utils.tree_allclose(
      self, jnp.concatenate([first, second], axis=1), expected
    )
    test_utils.tree_allclose(self, carry, expected_carry)

  def test_any_number_of_batch_axes(self):
    inputs = _inputs((2, 3, TIME, INPUTS))
    lengths = np.array([[6, 2, 0], [1, 4, 5]], np.int32)
    model = _core_rnn("lstm")
    params = model.init(jax.random.PRNGKey(0), inputs, None)
    carry, outputs = model.apply(params, inputs, None, seq_lengths=lengths)
    flat_carry, flat = model.apply(
      params,
      inputs.reshape((6, TIME, INPUTS)),
      None,
      seq_lengths=lengths.reshape(6),
    )
    test_utils.tree_allclose(self, outputs, flat.reshape(outputs.shape))
    test_utils.tree_allclose(
      self,
      carry,
      jax.tree.map(lambda leaf: leaf.reshape((2, 3, HIDDEN)), flat_carry),
    )
    single_carry, single = model.apply(
      params, inputs[1, 2], None, seq_lengths=lengths[1, 2]
    )
    test_utils.tree_allclose(self, single, outputs[1, 2])
    test_utils.tree_allclose(
      self, single_carry, jax.tree.map(lambda leaf: leaf[1, 2], carry)
    )

  def test_bidirectional_stack_of_core_cells(self):
    inputs = _inputs()

    def layer():
      return hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.CoreCell(hk.LSTM(HIDDEN))),
        hk_rnn.RNN(hk_rnn.CoreCell(hk.GRU(HIDDEN))),
      )

    def stacked(x, mask):
      return hk_rnn.StackedRNN([layer(), layer()])(x, mask)

    def manual(x, mask):
      carries, y = [], x
      for _ in range(2):
        forward = hk_rnn.RNN(hk_rnn.CoreCell(hk.LSTM(HIDDEN)))
        backward = hk_rnn.RNN(
          hk_rnn.CoreCell(hk.GRU(HIDDEN)), reverse=True, keep_order=True
        )
        forward_carry, forward_y = forward(y, mask)
        backward_carry, backward_y = backward(y, mask)
        carries.append((forward_carry, backward_carry))
        y = jnp.concatenate([forward_y, backward_y], axis=-1)
      return tuple(carries), y

    params, expected = test_utils.init_and_apply(manual, inputs, PACKED_IDS)
    actual = test_utils.transform(stacked).apply(params, inputs, PACKED_IDS)
    test_utils.tree_allclose(self, actual, expected)

  def test_convolutional_core(self):
    inputs = _inputs((2, TIME, 7, 3))

    def forward(x):
      cell = hk_rnn.CoreCell(
        hk.Conv1DLSTM((7,), 4, kernel_shape=3), num_feature_axes=2
      )
      return hk_rnn.RNN(cell)(x)

    def unrolled(x):
      core = hk.Conv1DLSTM((7,), 4, kernel_shape=3)
      outputs, state = hk.dynamic_unroll(
        core, x, core.initial_state(2), time_major=False
      )
      return state, outputs

    params, expected = test_utils.init_and_apply(unrolled, inputs)
    actual = test_utils.transform(forward).apply(params, inputs)
    test_utils.tree_allclose(self, actual, expected)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(
      ValueError, "CoreCell: core must be an hk.RNNCore, got LSTMCell"
    ):
      hk.transform(lambda: hk_rnn.CoreCell(hk_rnn.LSTMCell(2))).init(None)
    with self.assertRaisesRegex(
      ValueError, "CoreCell: num_feature_axes must be a positive int, got 0"
    ):
      hk.transform(
        lambda: hk_rnn.CoreCell(hk.LSTM(2), num_feature_axes=0)
      ).init(None)
    with self.assertRaisesRegex(
      ValueError, r"CoreCell: inputs must have at least 2 feature axes"
    ):
      hk.transform(
        lambda: hk_rnn.CoreCell(hk.LSTM(2), num_feature_axes=2)(
          None, jnp.ones((3,))
        )
      ).init(None)


def _cell_rnn(x):
  """hk_rnn's own RNN of an LSTMCell then a GRUCell, time-major."""
  layers = [
    hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN), time_major=True),
    hk_rnn.RNN(hk_rnn.GRUCell(3), time_major=True),
  ]
  return hk_rnn.StackedRNN(layers)(x)


class CellCoreTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    self.inputs = _inputs((TIME, BATCH, INPUTS))  # time-major, as Haiku's
    self.params, (self.carries, self.outputs) = test_utils.init_and_apply(
      _cell_rnn, self.inputs
    )

  @parameterized.parameters(hk.dynamic_unroll, hk.static_unroll)
  def test_unroll_equals_rnn(self, unroll):
    def forward(x):
      core = hk_rnn.CellCore(hk_rnn.LSTMCell(HIDDEN))
      outputs, state = unroll(core, x, core.initial_state(x.shape[1]))
      return state, outputs

    state, outputs = test_utils.transform(forward).apply(
      {"lstm_cell": self.params["lstm_cell"]}, self.inputs
    )
    first_layer = test_utils.transform(
      lambda x: hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN), time_major=True)(x)
    ).apply({"lstm_cell": self.params["lstm_cell"]}, self.inputs)
    test_utils.tree_allclose(self, (state, outputs), first_layer)

  def test_deep_rnn_equals_stacked_rnn(self):
    def forward(x):
      core = hk.DeepRNN(
        [
          hk_rnn.CellCore(hk_rnn.LSTMCell(HIDDEN)),
          hk_rnn.CellCore(hk_rnn.GRUCell(3)),
        ]
      )
      outputs, state = hk.dynamic_unroll(core, x, core.initial_state(BATCH))
      return state, outputs

    state, outputs = test_utils.transform(forward).apply(
      self.params, self.inputs
    )
    test_utils.tree_allclose(self, outputs, self.outputs)
    test_utils.tree_allclose(self, state, self.carries)

  def test_reset_core_equals_packed_rows(self):
    ids = np.array(
      [[1, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 3], [4, 5, 5, 6, 6, 6]], np.int32
    ).T  # time-major; no padding, so only the resets differ
    starts = np.concatenate([np.ones((1, BATCH), bool), ids[1:] != ids[:-1]])

    def forward(x, should_reset):
      core = hk.ResetCore(hk_rnn.CellCore(hk_rnn.GRUCell(3)))
      outputs, state = hk.dynamic_unroll(
        core, (x, should_reset), core.initial_state(BATCH)
      )
      return state, outputs

    def packed(x, mask):
      return hk_rnn.RNN(hk_rnn.GRUCell(3), time_major=True)(x, mask)

    params, expected = test_utils.init_and_apply(packed, self.inputs, ids)
    actual = test_utils.transform(forward).apply(
      params, self.inputs, jnp.asarray(starts)
    )
    test_utils.tree_allclose(self, actual, expected)

  def test_conv_cell_needs_input_shape(self):
    inputs = _inputs((TIME, 2, 5, 3))

    def forward(x):
      core = hk_rnn.CellCore(
        hk_rnn.ConvLSTMCell(4, kernel_shape=(3,)), input_shape=(5, 3)
      )
      initial = core.initial_state(2)
      outputs, state = hk.dynamic_unroll(core, x, initial)
      return state, outputs, core.initial_state(None)

    def reference(x):
      rnn = hk_rnn.RNN(hk_rnn.ConvLSTMCell(4, kernel_shape=(3,)))
      return rnn(x, time_major=True)

    params, expected = test_utils.init_and_apply(reference, inputs)
    state, outputs, unbatched = test_utils.transform(forward).apply(
      params, inputs
    )
    test_utils.tree_allclose(self, (state, outputs), expected)
    self.assertEqual([leaf.shape for leaf in unbatched], [(5, 4), (5, 4)])
    with self.assertRaisesRegex(
      ValueError, r"CellCore: input_shape .* is needed for ConvLSTMCell"
    ):
      hk.transform(
        lambda: hk_rnn.CellCore(hk_rnn.ConvLSTMCell(4, kernel_shape=(3,)))
      ).init(None)
    with self.assertRaisesRegex(
      ValueError, r"CellCore: input_shape must hold 2 positive sizes"
    ):
      hk.transform(
        lambda: hk_rnn.CellCore(
          hk_rnn.ConvLSTMCell(4, kernel_shape=(3,)), input_shape=(5,)
        )
      ).init(None)
    with self.assertRaisesRegex(
      ValueError, "CellCore: cell must be an hk_rnn.RNNCellBase, got LSTM"
    ):
      hk.transform(lambda: hk_rnn.CellCore(hk.LSTM(2))).init(None)


if __name__ == "__main__":
  absltest.main()
