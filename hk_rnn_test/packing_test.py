"""Packing end to end: ``pack_sequences``, ``max_segments``, ``unpack_*``.

The references know nothing of packing: a pure-Python first-fit decreasing
for the placement, and each sequence (each segment) run on its own, one
step at a time, for the per-segment carries.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn._src.kernels import dispatch
from hk_rnn_test import test_utils

FEATURES, INPUTS = 5, 3
# Row 0: three segments and padding; row 1: one; row 2: empty; row 3: two.
IDS = np.array(
  [[1, 1, 2, 3, 3, 0], [4, 4, 4, 4, 4, 4], [0] * 6, [1, 2, 2, 2, 2, 2]],
  np.int32,
)
SLOTS = 4


def _reference_first_fit_decreasing(lengths, row_length, cap):
  """One sequence at a time: the longest first into the first row with room."""
  room, counts, rows = [], [], {}
  for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    if not lengths[index]:
      continue
    for row in range(len(room)):
      if room[row] >= lengths[index] and (cap is None or counts[row] < cap):
        break
    else:
      room.append(row_length)
      counts.append(0)
      row = len(room) - 1
    rows[index] = row
    room[row] -= lengths[index]
    counts[row] += 1
  return len(room), rows


def _random_sequences(rng, count, max_length, features=(2,)):
  lengths = rng.integers(0, max_length + 1, count)
  return [
    rng.normal(size=(n, *features)).astype(np.float32) for n in lengths
  ], lengths


class PackSequencesTest(parameterized.TestCase):
  """Where sequences go, checked against a one-at-a-time first fit."""

  @parameterized.parameters(None, 1, 2, 3)
  def test_placement_is_first_fit_decreasing(self, cap):
    rng = np.random.default_rng(cap or 0)
    for _ in range(40):
      row_length = int(rng.integers(1, 12))
      sequences, lengths = _random_sequences(
        rng, int(rng.integers(1, 25)), row_length
      )
      packed = hk_rnn.pack_sequences(sequences, row_length, max_segments=cap)
      expected_rows, rows = _reference_first_fit_decreasing(
        lengths, row_length, cap
      )
      for index, row in rows.items():
        self.assertEqual(packed.rows[index], row)
      # At most one all-padding row, opened for length-0 sequences only.
      self.assertIn(packed.num_rows - expected_rows, (0, 1) if cap else (0,))
      self._check_layout(packed, sequences, cap)

  def _check_layout(self, packed, sequences, cap):
    """No overlap, no split, ids 1, 2, ... by position, inputs in place."""
    mask = packed.segmentation_mask
    self.assertEqual(mask.dtype, np.int32)
    covered = np.zeros(mask.shape, int)
    for index, sequence in enumerate(sequences):
      row, start = packed.rows[index], packed.starts[index]
      length, slot = len(sequence), packed.slots[index]
      self.assertEqual(packed.lengths[index], length)
      steps = slice(start, start + length)
      covered[row, steps] += 1
      np.testing.assert_array_equal(mask[row, steps], slot + 1)
      np.testing.assert_array_equal(packed.inputs[row, steps], sequence)
      segments = len(test_utils.segments_of(mask[row]))
      if length:
        self.assertLess(slot, segments)
      else:
        self.assertGreaterEqual(slot, segments)
      self.assertLess(slot, packed.max_segments)
    self.assertLessEqual(covered.max(), 1)
    np.testing.assert_array_equal(covered == 1, mask != 0)
    np.testing.assert_array_equal(packed.inputs[mask == 0], 0)
    for row in mask:
      ids = row[row != 0]
      np.testing.assert_array_equal(
        np.unique(ids), np.arange(1, len(np.unique(ids)) + 1)
      )
      self.assertTrue((np.diff(ids) >= 0).all())
      self.assertTrue((row[len(ids) :] == 0).all())  # padding at the end
      if cap:
        self.assertLessEqual(len(np.unique(ids)), cap)
    if cap:
      self.assertEqual(packed.max_segments, cap)

  def test_worked_example_and_ties_in_input_order(self):
    sequences = [
      np.full((n, 1), i, np.float32) for i, n in enumerate([2, 3, 2, 3])
    ]
    packed = hk_rnn.pack_sequences(sequences, row_length=5)
    # Longest first, ties in input order: 1, 3, then 0 and 2 into the gaps.
    np.testing.assert_array_equal(packed.rows, [0, 0, 1, 1])
    np.testing.assert_array_equal(packed.starts, [3, 0, 3, 0])
    np.testing.assert_array_equal(
      packed.segmentation_mask, [[1, 1, 1, 2, 2], [1, 1, 1, 2, 2]]
    )
    self.assertEqual(packed.max_segments, 2)
    self.assertEqual(packed.max_length, 3)

  def test_num_rows_pads_with_empty_rows(self):
    packed = hk_rnn.pack_sequences(
      [np.ones((3, 2), np.float32)] * 2, row_length=4, num_rows=5
    )
    self.assertEqual(packed.inputs.shape, (5, 4, 2))
    np.testing.assert_array_equal(packed.segmentation_mask[2:], 0)

  def test_length_zero_sequences(self):
    sequences = [np.zeros((0, 2), np.float32), np.ones((4, 2), np.float32)]
    packed = hk_rnn.pack_sequences(sequences, row_length=4)
    # The only row is full: the empty sequence takes its second slot.
    self.assertEqual((packed.rows[0], packed.slots[0]), (0, 1))
    self.assertEqual(packed.max_segments, 2)
    capped = hk_rnn.pack_sequences(sequences, row_length=4, max_segments=1)
    self.assertEqual(capped.num_rows, 2)  # a padding row holds its slot
    self.assertEqual((capped.rows[0], capped.slots[0]), (1, 0))
    only_empty = hk_rnn.pack_sequences([np.zeros((0,), np.int32)], 3)
    np.testing.assert_array_equal(only_empty.segmentation_mask, [[0, 0, 0]])
    self.assertEqual(only_empty.max_length, 0)

  def test_features_of_any_rank_and_dtype(self):
    sequences = [np.arange(n * 6).reshape(n, 2, 3) for n in (1, 2)]
    packed = hk_rnn.pack_sequences(sequences, row_length=3)
    self.assertEqual(packed.inputs.shape, (1, 3, 2, 3))
    self.assertEqual(packed.inputs.dtype, sequences[0].dtype)

  @parameterized.named_parameters(
    ("empty", [], 4, {}, "non-empty list or tuple"),
    ("array", np.ones((2, 3)), 4, {}, "got ndarray"),
    ("scalar", [np.float32(1)], 4, {}, r"sequences\[0\] must be"),
    (
      "feature_shape",
      [np.ones((2, 3)), np.ones((2, 4))],
      4,
      {},
      r"feature shape of sequences\[0\], \(3,\); got sequences\[1\]",
    ),
    (
      "dtype",
      [np.ones((2, 3), np.float32), np.ones((2, 3))],
      4,
      {},
      r"dtype of sequences\[0\], float32; got sequences\[1\] of dtype float64",
    ),
    (
      "too_long",
      [np.ones((2, 3)), np.ones((5, 3))],
      4,
      {},
      r"sequences\[1\] has length 5, longer than row_length = 4",
    ),
    ("row_length", [np.ones((2, 3))], 0, {}, "row_length must be a positive"),
    ("cap_zero", [np.ones((2, 3))], 4, {"max_segments": 0}, "max_segments"),
    ("cap_bool", [np.ones((2, 3))], 4, {"max_segments": True}, "max_segments"),
    ("cap_float", [np.ones((2, 3))], 4, {"max_segments": 2.0}, "max_segments"),
    ("rows_zero", [np.ones((2, 3))], 4, {"num_rows": 0}, "num_rows"),
    (
      "does_not_fit",
      [np.ones((3, 1))] * 3,
      4,
      {"num_rows": 2},
      "do not fit in num_rows = 2 rows of 4 steps; first-fit decreasing "
      "needs 3",
    ),
    (
      "cap_does_not_fit",
      [np.ones((1, 1))] * 3,
      4,
      {"num_rows": 1, "max_segments": 2},
      "do not fit in num_rows = 1 rows of 4 steps and 2 segments",
    ),
    (
      "no_slot_for_empty",
      [np.ones((1, 1)), np.ones((0, 1))],
      4,
      {"num_rows": 1, "max_segments": 1},
      "length-0 sequences need a free segment slot",
    ),
  )
  def test_bad_input(self, sequences, row_length, options, message):
    with self.assertRaisesRegex(ValueError, "pack_sequences: .*" + message):
      hk_rnn.pack_sequences(sequences, row_length, **options)


class UnpackSequencesTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(1)
    self.sequences, self.lengths = _random_sequences(rng, 9, 5, (2,))
    self.packed = hk_rnn.pack_sequences(self.sequences, row_length=7)

  def _padded(self):
    padded = np.zeros((9, self.packed.max_length, 2), np.float32)
    for index, sequence in enumerate(self.sequences):
      padded[index, : len(sequence)] = sequence
    return padded

  def test_round_trip_in_input_order(self):
    unpacked = hk_rnn.unpack_sequences(self.packed.inputs, self.packed)
    np.testing.assert_array_equal(unpacked, self._padded())

  def test_pytrees_time_major_jit_and_grad(self):
    inputs = jnp.asarray(self.packed.inputs)
    tree = {"a": inputs, "b": jnp.swapaxes(inputs, 0, 1)}

    @jax.jit
    def unpack(tree):
      return (
        hk_rnn.unpack_sequences(tree["a"], self.packed),
        hk_rnn.unpack_sequences(tree["b"], self.packed, time_major=True),
      )

    a, b = unpack(tree)
    np.testing.assert_array_equal(a, self._padded())
    np.testing.assert_array_equal(b, self._padded())
    weights = jnp.asarray(np.random.default_rng(2).normal(size=a.shape))
    grad = jax.grad(
      lambda x: jnp.sum(hk_rnn.unpack_sequences(x, self.packed) * weights)
    )(inputs)
    # Each step's gradient is the weight at its unpacked place; padding 0.
    expected = np.zeros(inputs.shape, np.float32)
    for index, length in enumerate(self.lengths):
      row, start = self.packed.rows[index], self.packed.starts[index]
      expected[row, start : start + length] = weights[index, :length]
    np.testing.assert_allclose(grad, expected, rtol=1e-6)

  def test_bad_input(self):
    with self.assertRaisesRegex(
      ValueError,
      r"unpack_sequences: outputs must be \(rows, row_length, \.\.\.\) = "
      r"\(4, 7, \.\.\.\), got \(7, 2, 2\)",
    ):
      hk_rnn.unpack_sequences(np.zeros((7, 2, 2)), self.packed)
    with self.assertRaisesRegex(ValueError, "packed must be the"):
      hk_rnn.unpack_sequences(self.packed.inputs, {"rows": 1})
    needed = self.packed.slots.max() + 1
    with self.assertRaisesRegex(
      ValueError,
      r"unpack_segments: segment_carries leaves must be \(rows, K, \.\.\.\) "
      rf"with rows = 4 and K >= {needed} slots",
    ):
      hk_rnn.unpack_segments(np.zeros((4, needed - 1, 3)), self.packed)
    # More slots than needed (a fixed max_segments across batches) is fine.
    wide = np.arange(4 * 9).reshape(4, 9, 1)
    np.testing.assert_array_equal(
      hk_rnn.unpack_segments(wide, self.packed)[:, 0],
      9 * self.packed.rows + self.packed.slots,
    )


def _forward(kind, *, layer="rnn", fused_kernel=True, reverse=False, **rnn):
  """A model returning ``(carry, outputs)`` for ``(inputs, mask)``."""

  def make(name):
    cell = test_utils.CELLS[kind](FEATURES, name=f"{name}_cell")
    return hk_rnn.RNN(cell, fused=fused_kernel, name=name, **rnn)

  def forward(inputs, mask, **options):
    if layer == "rnn":
      return make("rnn")(inputs, mask, reverse=reverse, **options)
    if layer == "bidirectional":
      both = hk_rnn.Bidirectional(make("forward"), make("backward"))
      return both(inputs, mask, **options)
    stack = hk_rnn.StackedRNN(
      [
        hk_rnn.RNN(test_utils.CELLS[kind](FEATURES, name="low")),
        hk_rnn.Bidirectional(make("forward"), make("backward")),
      ]
    )
    return stack(inputs, mask, **options)

  return test_utils.transform(forward)


def _reference_segment_carries(kind, params, inputs, ids, carry0, reverse):
  """Each segment run alone with the written-out cell: ``(batch, K, ...)``."""
  batch = ids.shape[0]
  slots = []
  for b in range(batch):
    initial = jax.tree.map(lambda leaf, b=b: leaf[b], carry0)
    row = [initial] * SLOTS
    for k, steps in enumerate(test_utils.segments_of(ids[b])):
      carry = initial
      for t in steps[::-1] if reverse else steps:
        carry, _ = test_utils.reference_step(kind, params, carry, inputs[b, t])
      row[k] = carry
    slots.append(jax.tree.map(lambda *leaves: jnp.stack(leaves), *row))
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *slots)


def _loss(carries, outputs):
  weights = jnp.cos(jnp.arange(outputs.size, dtype=outputs.dtype))
  carry_term = sum(
    jnp.sum(jnp.sin(leaf) * jnp.cos(jnp.arange(leaf.size).reshape(leaf.shape)))
    for leaf in jax.tree.leaves(carries)
  )
  return jnp.sum(outputs.reshape(-1) * weights) + carry_term


def _inputs(seed=0, shape=(4, 6, INPUTS)):
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def _nonzero_carry(kind, batch):
  h = jnp.asarray(np.random.default_rng(5).normal(size=(batch, FEATURES)))
  return (0.5 * h, h) if kind == "lstm" else h


class UnpackSegmentsWithoutSlotsTest(parameterized.TestCase):
  """A carry computed without max_segments is refused, whatever its sizes.

  Without ``max_segments`` the carry is one per row, ``(rows, *carry)``;
  read as slots it would give wrong shapes and values, so unpack_segments
  must say to run with ``max_segments``.
  """

  def _carries(self, cell_fn, sequences, max_segments):
    packed = hk_rnn.pack_sequences(sequences, row_length=6)

    def forward(x, mask):
      return hk_rnn.RNN(cell_fn())(x, mask, max_segments=max_segments)

    model = test_utils.transform(forward)
    x, mask = packed.inputs, packed.segmentation_mask
    carry, _ = model.apply(model.init(jax.random.PRNGKey(0), x, mask), x, mask)
    return carry, packed

  def _sequences(self, features=(2,)):
    rng = np.random.default_rng(0)
    return [
      rng.normal(size=(n, *features)).astype(np.float32) for n in (3, 2, 1, 4)
    ]

  @parameterized.named_parameters(
    # F below, equal to and above the slots the batch uses (2): shapes alone
    # would pass for the last two.
    ("gru_narrow", lambda: hk_rnn.GRUCell(1)),
    ("gru_as_wide_as_the_slots", lambda: hk_rnn.GRUCell(2)),
    ("gru_wide", lambda: hk_rnn.GRUCell(5)),
    ("lstm_c_and_h", lambda: hk_rnn.LSTMCell(5)),
    ("lstm_as_wide_as_the_slots", lambda: hk_rnn.LSTMCell(2)),
  )
  def test_vector_carry_without_slots_is_refused(self, cell_fn):
    sequences = self._sequences()
    carry, packed = self._carries(cell_fn, sequences, None)
    self.assertEqual(packed.max_segments, 2)
    with self.assertRaisesRegex(
      ValueError,
      r"^unpack_segments: segment_carries has no slot axis: .* That is the "
      r"carry of an RNN run without max_segments, one per row; run the RNN "
      r"with max_segments=packed.max_segments = 2 to get one per segment",
    ):
      hk_rnn.unpack_segments(carry, packed)
    # With max_segments the same cell's carries unpack, one per sequence.
    carry, packed = self._carries(cell_fn, sequences, packed.max_segments)
    unpacked = hk_rnn.unpack_segments(carry, packed)
    for leaf in jax.tree.leaves(unpacked):
      self.assertEqual(leaf.shape[0], len(sequences))

  def test_conv_lstm_carry_without_slots_is_refused(self):
    # (rows, H, W, F) with H >= the slots: a rank-4 leaf that shape and
    # size checks alone would read as (rows, K, W, F).
    sequences = self._sequences(features=(3, 3, 1))

    def cell():
      return hk_rnn.ConvLSTMCell(2, kernel_shape=(1, 1))

    carry, packed = self._carries(cell, sequences, None)
    self.assertGreaterEqual(carry[0].shape[1], packed.max_segments)
    with self.assertRaisesRegex(ValueError, r"no slot axis: .*max_segments"):
      hk_rnn.unpack_segments(carry, packed)
    carry, packed = self._carries(cell, sequences, packed.max_segments)
    c, h = hk_rnn.unpack_segments(carry, packed)
    self.assertEqual(h.shape, (len(sequences), 3, 3, 2))

  def test_leaves_with_different_slot_counts_are_refused(self):
    packed = hk_rnn.pack_sequences(self._sequences(), row_length=6)
    rows = packed.num_rows
    with self.assertRaisesRegex(
      ValueError,
      r"no slot axis: its leaves differ in the size of axis 1, where every "
      r"leaf with slots has the same K \(leaves \[0\] "
      rf"\({rows}, 3, 4\), \[1\] \({rows}, 4, 4\)\)",
    ):
      hk_rnn.unpack_segments(
        (np.zeros((rows, 3, 4)), np.zeros((rows, 4, 4))), packed
      )


class SegmentCarriesTest(parameterized.TestCase):
  """``max_segments``: every segment's carry, as if run on its own."""

  @parameterized.parameters(
    ("lstm", True, False),
    ("lstm", True, True),
    ("lstm", False, False),
    ("lstm", False, True),
    ("gru", True, False),
    ("gru", False, True),
    ("mgu", True, True),
    ("simple", True, False),
  )
  def test_values_and_gradients_equal_each_segment_alone(
    self, kind, fused_kernel, reverse
  ):
    inputs, ids = _inputs(), jnp.asarray(IDS)
    carry0 = _nonzero_carry(kind, 4)
    model = _forward(kind, fused_kernel=fused_kernel, reverse=reverse)
    params = model.init(jax.random.PRNGKey(0), inputs, ids)

    def run(params, inputs, carry0):
      return model.apply(
        params, inputs, ids, initial_carry=carry0, max_segments=SLOTS
      )

    def reference(params, inputs, carry0):
      cell = params["rnn_cell"]
      carries = _reference_segment_carries(
        kind, cell, inputs, IDS, carry0, reverse
      )
      _, outputs = test_utils.reference_rnn(
        kind, cell, inputs, IDS, carry0, reverse=reverse
      )
      return carries, outputs

    carries, outputs = run(params, inputs, carry0)
    expected = reference(params, inputs, carry0)
    test_utils.tree_allclose(self, (carries, outputs), expected)
    grads = jax.grad(lambda *a: _loss(*run(*a)), argnums=(0, 1, 2))
    expected_grads = jax.grad(lambda *a: _loss(*reference(*a)), (0, 1, 2))
    test_utils.tree_allclose(
      self,
      grads(params, inputs, carry0),
      expected_grads(params, inputs, carry0),
    )

  @parameterized.parameters("lstm", "gru", "mgu", "simple")
  def test_packed_rows_run_in_the_fused_kernel(self, kind):
    name = {"lstm": "lstm", "gru": "gru", "mgu": "mgu", "simple": "simple"}
    kernel = getattr(dispatch, f"{name[kind]}_sequence")
    inputs, ids = _inputs(), jnp.asarray(IDS)
    model = _forward(kind)
    params = model.init(jax.random.PRNGKey(0), inputs, ids)
    with absltest.mock.patch.object(
      dispatch, kernel.__name__, wraps=kernel
    ) as spy:
      model.apply(params, inputs, ids, max_segments=SLOTS)
    spy.assert_called_once()
    self.assertTrue(spy.call_args.kwargs["return_step_carries"])

  def test_slots_past_the_segments_and_unpacked_rows(self):
    inputs = _inputs()
    carry0 = _nonzero_carry("lstm", 4)
    model = _forward("lstm")
    params = model.init(jax.random.PRNGKey(0), inputs, jnp.asarray(IDS))
    lengths = jnp.asarray([3, 6, 0, 1])
    final, _ = model.apply(
      params, inputs, None, seq_lengths=lengths, initial_carry=carry0
    )
    for mask, options in (
      (None, {"seq_lengths": lengths}),
      (jnp.asarray(np.arange(6) < lengths[:, None], jnp.int32), {}),
    ):
      carries, _ = model.apply(
        params, inputs, mask, initial_carry=carry0, max_segments=3, **options
      )
      for slots, last, initial in zip(carries, final, carry0, strict=True):
        self.assertEqual(slots.shape, (4, 3, FEATURES))
        np.testing.assert_allclose(slots[:, 0], last, rtol=1e-6)
        np.testing.assert_array_equal(
          slots[:, 1:], np.broadcast_to(initial[:, None], (4, 2, FEATURES))
        )
    no_mask, _ = model.apply(params, inputs, None, max_segments=2)
    full, _ = model.apply(params, inputs, None)
    np.testing.assert_allclose(no_mask[1][:, 0], full[1], rtol=1e-6)

  def test_nan_padding_jit_remat_and_layouts(self):
    inputs = np.array(_inputs())
    inputs[IDS == 0] = np.nan
    ids = jnp.asarray(IDS)
    model = _forward("gru")
    params = model.init(jax.random.PRNGKey(0), jnp.zeros_like(inputs), ids)
    expected = model.apply(params, jnp.nan_to_num(inputs), ids, max_segments=4)

    @jax.jit
    def traced(params, inputs, ids):
      return model.apply(params, inputs, ids, max_segments=4)

    test_utils.tree_allclose(self, traced(params, inputs, ids), expected)
    grads = jax.grad(lambda x: _loss(*traced(params, x, ids)))(inputs)
    self.assertTrue(np.isfinite(grads).all())
    np.testing.assert_array_equal(grads[IDS == 0], 0)
    for remat in ("step", "chunked"):
      chunked = _forward("gru", remat=remat)
      test_utils.tree_allclose(
        self,
        chunked.apply(params, jnp.asarray(inputs), ids, max_segments=4),
        expected,
      )
    # Two batch axes, time-major: the slot axis follows the batch axes.
    time_major = _forward("gru", time_major=True)
    carries, outputs = time_major.apply(
      params,
      jnp.transpose(jnp.asarray(inputs).reshape(2, 2, 6, INPUTS), (2, 0, 1, 3)),
      jnp.transpose(ids.reshape(2, 2, 6), (2, 0, 1)),
      max_segments=4,
    )
    np.testing.assert_allclose(
      carries.reshape(4, 4, FEATURES), expected[0], rtol=1e-6
    )
    np.testing.assert_allclose(
      jnp.transpose(outputs, (1, 2, 0, 3)).reshape(4, 6, FEATURES),
      expected[1],
      rtol=1e-6,
    )

  def test_dropout_keeps_outputs_and_last_segment(self):
    def forward(inputs, mask, **options):
      cell = hk_rnn.LSTMCell(
        FEATURES, dropout_rate=0.3, recurrent_dropout_rate=0.3
      )
      return hk_rnn.RNN(cell)(inputs, mask, is_training=True, **options)

    model = hk.transform(forward)
    inputs, ids = _inputs(), jnp.asarray(IDS)
    params = model.init(jax.random.PRNGKey(0), inputs, ids)
    key = jax.random.PRNGKey(3)
    final, outputs = model.apply(params, key, inputs, ids)
    carries, segmented = model.apply(params, key, inputs, ids, max_segments=3)
    np.testing.assert_allclose(segmented, outputs, rtol=1e-6)
    # Row 0's last segment is its third, row 3's its second.
    for slots, last in zip(carries, final, strict=True):
      np.testing.assert_allclose(slots[0, 2], last[0], rtol=1e-6)
      np.testing.assert_allclose(slots[3, 1], last[3], rtol=1e-6)

  def test_streaming_chunks_keep_each_segments_carry(self):
    # Segment 2 of row 0 crosses the chunk boundary at step 3.
    ids = jnp.asarray(IDS)
    inputs = _inputs()
    model = _forward("lstm")
    params = model.init(jax.random.PRNGKey(0), inputs, ids)
    whole, _ = model.apply(params, inputs, ids, max_segments=SLOTS)
    first, _ = model.apply(params, inputs[:, :3], ids[:, :3])
    segments, _ = model.apply(
      params,
      inputs[:, 3:],
      ids[:, 3:],
      initial_carry=first,
      initial_segment_ids=hk_rnn.last_segment_ids(ids[:, :3]),
      max_segments=SLOTS,
    )
    # Row 0's third segment (slot 0 of the second chunk), row 1's only one.
    for chunked, full in zip(segments, whole, strict=True):
      np.testing.assert_allclose(chunked[0, 0], full[0, 2], rtol=1e-5)
      np.testing.assert_allclose(chunked[1, 0], full[1, 0], rtol=1e-5)
      np.testing.assert_allclose(chunked[3, 0], full[3, 1], rtol=1e-5)

  @parameterized.parameters(("MinGRUCell", False), ("MinLSTMCell", True))
  def test_linear_cells_whole_sequence_equals_their_step(self, name, reverse):
    inputs, ids = _inputs(), jnp.asarray(IDS)
    carry0 = _nonzero_carry("gru", 4)

    def model(fused_kernel):
      return test_utils.transform(
        lambda x, m, h: hk_rnn.RNN(
          getattr(hk_rnn, name)(FEATURES, name="cell"), fused=fused_kernel
        )(x, m, initial_carry=h, reverse=reverse, max_segments=SLOTS)
      )

    params = model(True).init(jax.random.PRNGKey(0), inputs, ids, carry0)
    results = []
    for fused_kernel in (True, False):
      run = model(fused_kernel).apply
      grads = jax.grad(lambda *a, run=run: _loss(*run(*a)), (0, 1, 3))
      results.append(
        (run(params, inputs, ids, carry0), grads(params, inputs, ids, carry0))
      )
    test_utils.tree_allclose(self, results[0], results[1])
    # Row 2 is empty: every slot holds the initial carry.
    np.testing.assert_array_equal(
      results[0][0][0][2], np.broadcast_to(carry0[2], (SLOTS, FEATURES))
    )

  def test_a_users_cell_through_the_step_path(self):
    class Counter(hk_rnn.RNNCellBase):
      """Carries ``{"sum": Σx, "steps": n}``; a dict, to test pytrees."""

      def __call__(self, carry, inputs):
        scale = hk.get_parameter("scale", (), init=jnp.ones)
        new = {
          "sum": carry["sum"] + scale * inputs,
          "steps": carry["steps"] + 1,
        }
        return new, new["sum"]

      def initialize_carry(self, sample_inputs, rng=None):
        del rng
        return {
          "sum": jnp.zeros_like(sample_inputs),
          "steps": jnp.zeros(sample_inputs.shape[:-1] + (1,)),
        }

    inputs, ids = _inputs(), jnp.asarray(IDS)
    model = test_utils.transform(
      lambda x, m, **o: hk_rnn.RNN(Counter())(x, m, reverse=True, **o)
    )
    params = model.init(jax.random.PRNGKey(0), inputs, ids)
    carries, _ = model.apply(params, inputs, ids, max_segments=SLOTS)
    for b in range(4):
      segments = test_utils.segments_of(IDS[b])
      for k in range(SLOTS):
        steps = segments[k] if k < len(segments) else []
        np.testing.assert_allclose(
          carries["sum"][b, k], inputs[b, steps].sum(0), atol=1e-6
        )
        self.assertEqual(carries["steps"][b, k, 0], len(steps))

  @parameterized.parameters("rnn", "bidirectional", "stacked")
  def test_bad_max_segments(self, layer):
    model = _forward("gru", layer=layer)
    inputs, ids = _inputs(), jnp.asarray(IDS)
    params = model.init(jax.random.PRNGKey(0), inputs, ids)
    context = {"rnn": "RNN", "bidirectional": "Bidirectional"}.get(
      layer, "StackedRNN"
    )
    for bad in (0, -2, True, 2.0):
      with self.assertRaisesRegex(
        ValueError, f"{context}: max_segments must be a positive int"
      ):
        model.apply(params, inputs, ids, max_segments=bad)
    with self.assertRaisesRegex(
      ValueError,
      f"{context}: segmentation_mask must hold at most max_segments = 2 "
      r"segments per row; got 3 in row \(0,\)",
    ):
      model.apply(params, inputs, ids, max_segments=2)


class PackedWorkflowTest(parameterized.TestCase):
  """pack -> run -> unpack equals running every sequence on its own."""

  @parameterized.parameters("rnn", "bidirectional", "stacked")
  def test_round_trip(self, layer):
    rng = np.random.default_rng(7)
    sequences, lengths = _random_sequences(rng, 7, 5, (INPUTS,))
    lengths[2] = 0
    sequences[2] = sequences[2][:0]
    packed = hk_rnn.pack_sequences(sequences, row_length=8)
    model = _forward("lstm", layer=layer)
    inputs = jnp.asarray(packed.inputs)
    mask = jnp.asarray(packed.segmentation_mask)
    params = model.init(jax.random.PRNGKey(0), inputs, mask)
    carries, outputs = model.apply(
      params, inputs, mask, max_segments=packed.max_segments
    )
    per_carry = hk_rnn.unpack_segments(carries, packed)
    per_output = hk_rnn.unpack_sequences(outputs, packed)
    padded = np.zeros((7, packed.max_length, INPUTS), np.float32)
    for index, sequence in enumerate(sequences):
      padded[index, : len(sequence)] = sequence
    # The reference: one sequence per row, padded, carried by lengths.
    alone_carry, alone_outputs = model.apply(
      params, jnp.asarray(padded), None, seq_lengths=jnp.asarray(lengths)
    )
    test_utils.tree_allclose(self, per_carry, alone_carry)
    np.testing.assert_allclose(per_output, alone_outputs, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
