"""Tests for flip_sequences and the segment-id helpers."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn._src import layout, sequences
from hk_rnn_test import test_utils


def _reference_flip(values, ids):
  """Flips ``values (batch, time, ...)`` row by row, segment by segment."""
  out = np.array(values, copy=True)
  for b in range(ids.shape[0]):
    for steps in test_utils.segments_of(ids[b]):
      out[b, steps] = values[b, steps[::-1]]
  return out


def _valid(ids):
  return np.asarray(ids) != 0


class FlipSequencesTest(parameterized.TestCase):
  def test_lengths_example(self):
    x = jnp.array([[1, 0, 0], [2, 3, 0], [4, 5, 6]])
    np.testing.assert_array_equal(
      hk_rnn.flip_sequences(x, seq_lengths=jnp.array([1, 2, 3])),
      [[1, 0, 0], [3, 2, 0], [6, 5, 4]],
    )

  @parameterized.product(packed=(False, True), feature_axes=(0, 1, 2))
  def test_matches_row_by_row_reference(self, packed, feature_axes):
    rng = np.random.default_rng(0)
    ids = test_utils.random_ids(rng, 6, 9, packed=packed)
    values = rng.normal(size=(6, 9) + (2,) * feature_axes)
    flipped = hk_rnn.flip_sequences(values, jnp.asarray(ids))
    expected = _reference_flip(values, ids)
    np.testing.assert_allclose(
      np.asarray(flipped)[_valid(ids)], expected[_valid(ids)], rtol=1e-6
    )

  def test_time_major_and_several_batch_axes(self):
    rng = np.random.default_rng(1)
    ids = test_utils.random_ids(rng, 6, 7, packed=True)
    values = rng.normal(size=(6, 7, 3)).astype(np.float32)
    expected = _reference_flip(values, ids)
    # (2, 3, time, 3) batch-major and (time, 2, 3, 3) time-major.
    batch_major = hk_rnn.flip_sequences(
      values.reshape(2, 3, 7, 3), ids.reshape(2, 3, 7), num_batch_dims=2
    )
    time_major = hk_rnn.flip_sequences(
      np.moveaxis(values.reshape(2, 3, 7, 3), 2, 0),
      np.moveaxis(ids.reshape(2, 3, 7), 2, 0),
      num_batch_dims=2,
      time_major=True,
    )
    valid = _valid(ids)
    np.testing.assert_array_equal(
      np.asarray(batch_major).reshape(6, 7, 3)[valid], expected[valid]
    )
    np.testing.assert_array_equal(
      np.moveaxis(np.asarray(time_major), 0, 2).reshape(6, 7, 3)[valid],
      expected[valid],
    )

  def test_no_batch_axes(self):
    flipped = hk_rnn.flip_sequences(
      jnp.arange(5), jnp.array([1, 1, 2, 2, 0]), num_batch_dims=0
    )
    np.testing.assert_array_equal(np.asarray(flipped)[:4], [1, 0, 3, 2])

  def test_without_mask_reverses_whole_axis(self):
    x = jnp.arange(12).reshape(2, 3, 2)
    np.testing.assert_array_equal(hk_rnn.flip_sequences(x), x[:, ::-1])

  def test_pytree_inputs(self):
    ids = jnp.array([[1, 1, 1, 0]])
    tree = {"a": jnp.arange(4)[None], "b": (jnp.arange(8).reshape(1, 4, 2),)}
    flipped = hk_rnn.flip_sequences(tree, ids)
    np.testing.assert_array_equal(flipped["a"][0, :3], [2, 1, 0])
    np.testing.assert_array_equal(
      flipped["b"][0][0, :3], [[4, 5], [2, 3], [0, 1]]
    )

  def test_flipping_twice_restores_valid_steps(self):
    rng = np.random.default_rng(2)
    ids = jnp.asarray(test_utils.random_ids(rng, 5, 8, packed=True))
    values = jnp.asarray(rng.normal(size=(5, 8)))
    twice = hk_rnn.flip_sequences(hk_rnn.flip_sequences(values, ids), ids)
    valid = _valid(ids)
    np.testing.assert_array_equal(
      np.asarray(twice)[valid], np.asarray(values)[valid]
    )

  def test_jit_with_traced_mask_and_gradient(self):
    ids = jnp.array([[1, 1, 2, 0], [3, 3, 3, 3]])
    values = jnp.arange(8.0).reshape(2, 4)
    weights = jnp.arange(8.0).reshape(2, 4)

    def loss(values, ids):
      return jnp.sum(hk_rnn.flip_sequences(values, ids) * weights)

    grad = jax.jit(jax.grad(loss))(values, ids)
    # Step t receives the weight of the step it was flipped to.
    np.testing.assert_array_equal(grad, [[1, 0, 2, 3], [7, 6, 5, 4]])


class SegmentIdsTest(absltest.TestCase):
  def test_lengths_become_one_segment(self):
    ids = layout.segment_ids(
      None,
      jnp.array([0, 2, 3]),
      layout.Layout((3,), 3, time_major=False),
      "test",
    )
    np.testing.assert_array_equal(ids, [[0, 0, 0], [1, 1, 0], [1, 1, 1]])

  def test_segment_starts(self):
    ids = jnp.array([[4, 4, 7, 7, 9, 0], [1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
      sequences.segment_starts(ids, axis=1),
      [[1, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]],
    )

  def test_packing_is_detected_only_with_several_segments(self):
    packed = layout.has_packed_rows
    self.assertFalse(packed(jnp.array([[1, 1, 0], [2, 2, 2]]), axis=1))
    self.assertTrue(packed(jnp.array([[1, 2, 0]]), axis=1))
    self.assertTrue(packed(jnp.array([[1], [2], [0]]), axis=0))
    self.assertFalse(packed(jnp.array([[1, 2], [1, 2], [0, 2]]), axis=0))
    self.assertFalse(packed(None, axis=0))


def _ids(mask, batch_shape, time, time_major=False, feature_shape=(4,)):
  return layout.segment_ids(
    mask,
    None,
    layout.Layout(batch_shape, time, feature_shape, time_major=time_major),
    "RNN",
  )


class MaskErrorMessagesTest(parameterized.TestCase):
  """Errors say where in the row the mask goes wrong, and what was meant."""

  @parameterized.named_parameters(
    (
      "padding_then_an_id",
      [[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]],
      r"padding \(0\) must only sit at the end of a row; got row \(1,\): "
      r"padding at step 2, then id 1 at step 3 \(1 of 2 rows\); padding "
      r"belongs after each row's steps",
    ),
    (
      "longer_padding_then_an_id",
      [[1, 0, 0, 2, 0], [1, 1, 1, 1, 1]],
      r"padding \(0\) must only sit at the end of a row; got row \(0,\): "
      r"padding at steps 1 to 2, then id 2 at step 3 \(1 of 2 rows\)",
    ),
    (
      "decreasing",
      [[1, 1, 1, 1, 1], [1, 2, 2, 1, 0]],
      r"segment ids must not decrease .*; got row \(1,\): id 2 at step 2, "
      r"then id 1 at step 3 \(1 of 2 rows\)$",
    ),
    (
      "negative",
      [[1, -2, 0, 0, 0], [1, 1, 1, 1, 1]],
      r"ids must be non-negative; got row \(0,\): id -2 at step 1 \(1 of 2 "
      r"rows\)$",
    ),
  )
  def test_names_the_steps(self, mask, message):
    mask = np.array(mask, np.int32)
    with self.assertRaisesRegex(
      ValueError, "^RNN: segmentation_mask " + message
    ):
      _ids(mask, (2,), 5)
    # Time-major masks name the same row and steps.
    with self.assertRaisesRegex(ValueError, message):
      _ids(mask.T, (2,), 5, time_major=True)

  def test_lengths_passed_as_the_mask(self):
    with self.assertRaisesRegex(
      ValueError,
      r"^RNN: segmentation_mask must have shape \(\*batch, time\) = \(2, 5\), "
      r"got \(2,\); that is the shape of seq_lengths \(\*batch,\): pass "
      r"lengths by keyword, seq_lengths=\.\.\., not as the mask$",
    ):
      _ids(np.array([5, 3]), (2,), 5)
    with self.assertRaisesRegex(ValueError, r"got \(2,\)$"):
      _ids(np.array([5.0, 3.0]), (2,), 5)  # Float: not lengths either.

  @parameterized.named_parameters(
    ("batch_major", False, (2, 5)), ("time_major", True, (5, 2))
  )
  def test_inputs_missing_their_feature_axis(self, time_major, shape):
    # Inputs meant as (batch 2, time 5) with no feature axis read as one
    # unbatched sequence whose last axis is the features.
    time, feature = shape
    hint = (
      rf"; that shape would fit if the inputs, of shape \({time}, {feature}\), "
      r"had one more axis: are they missing their feature axis\? "
      r"\(inputs\[\.\.\., None\] gives one feature per step\)$"
    )
    with self.assertRaisesRegex(
      ValueError, rf"got \({time}, {feature}\)" + hint
    ):
      _ids(np.ones(shape, int), (), time, time_major, (feature,))
    with self.assertRaisesRegex(
      ValueError,
      r"^RNN: seq_lengths must have shape \(\*batch,\) = \(\), got \(2,\)"
      + hint,
    ):
      layout.segment_ids(
        None,
        np.array([5, 3]),
        layout.Layout((), time, (feature,), time_major=time_major),
        "RNN",
      )
    # A shape that fits no reading gets no hint.
    with self.assertRaisesRegex(ValueError, r"got \(3, 6\)$"):
      _ids(np.ones((3, 6), int), (), time, time_major, (feature,))


class LastSegmentIdsTest(parameterized.TestCase):
  def test_values(self):
    mask = jnp.array([[1, 1, 2, 0], [0, 0, 0, 0], [3, 3, 3, 3]])
    np.testing.assert_array_equal(hk_rnn.last_segment_ids(mask), [2, 0, 3])
    np.testing.assert_array_equal(
      hk_rnn.last_segment_ids(mask.T, [5, 6, 7], time_major=True), [2, 6, 3]
    )
    # Bool masks, an unbatched row, a zero-length chunk and a traced mask.
    np.testing.assert_array_equal(
      hk_rnn.last_segment_ids(jnp.array([[True, False]]), jnp.array([4])), [1]
    )
    self.assertEqual(int(hk_rnn.last_segment_ids(jnp.array([1, 2, 2]))), 2)
    np.testing.assert_array_equal(
      hk_rnn.last_segment_ids(jnp.zeros((2, 0), int), jnp.array([4, 5])),
      [4, 5],
    )
    np.testing.assert_array_equal(
      jax.jit(hk_rnn.last_segment_ids)(mask, jnp.array([1, 2, 3])), [2, 2, 3]
    )

  @parameterized.named_parameters(
    (
      "float_mask",
      np.ones((2, 4), np.float32),
      None,
      r"segmentation_mask must be an integer or bool array, got dtype "
      r"float32$",
    ),
    (
      "no_time_axis",
      np.array(3),
      None,
      r"segmentation_mask must have shape \(\*batch, time\), with a time "
      r"axis, got \(\)$",
    ),
    (
      "padding_inside",
      np.array([[1, 1, 0, 1]]),
      None,
      r"segmentation_mask padding \(0\) must only sit at the end of a row; "
      r"got row \(0,\): padding at step 2, then id 1 at step 3 \(1 of 1 "
      r"rows\); padding belongs",
    ),
    (
      "decreasing",
      np.array([[2, 1, 0, 0]]),
      None,
      "segmentation_mask segment ids must not decrease",
    ),
    (
      "lengths_as_the_mask",
      np.array([3, 5]),
      np.array([1, 1]),
      r"previous must have shape \(\*batch,\) = \(\) for segmentation_mask "
      r"of shape \(\*batch, time\) = \(2,\), got \(2,\); segmentation_mask "
      r"has the shape of previous, so no time axis: is it seq_lengths rather "
      r"than a mask\?$",
    ),
    (
      "previous_shape",
      np.ones((2, 4), int),
      np.array([1, 1, 1]),
      r"previous must have shape \(\*batch,\) = \(2,\) for "
      r"segmentation_mask of shape \(\*batch, time\) = \(2, 4\), got "
      r"\(3,\)$",
    ),
    (
      "previous_dtype",
      np.ones((2, 4), int),
      np.array([1.0, 1.0]),
      "previous must be an integer array, got dtype float32",
    ),
  )
  def test_validates_like_rnn(self, mask, previous, message):
    with self.assertRaisesRegex(ValueError, "^last_segment_ids: " + message):
      hk_rnn.last_segment_ids(mask, previous)

  def test_time_major_layout_is_named(self):
    with self.assertRaisesRegex(
      ValueError,
      r"previous must have shape \(\*batch,\) = \(2,\) for "
      r"segmentation_mask of shape \(time, \*batch\) = \(4, 2\)",
    ):
      hk_rnn.last_segment_ids(
        np.ones((4, 2), int), np.ones((4,), int), time_major=True
      )


class FlipSequencesBadInputTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (
      "too_few_axes",
      jnp.ones((3,)),
      dict(num_batch_dims=1),
      r"flip_sequences: inputs must have at least num_batch_dims \+ 1 = 2 axes",
    ),
    (
      "mask_shape",
      jnp.ones((2, 3)),
      dict(segmentation_mask=jnp.ones((2, 4), int)),
      r"segmentation_mask must have shape \(\*batch, time\) = \(2, 3\), got \(2, 4\)",
    ),
    (
      "time_major_mask_shape",
      jnp.ones((3, 2)),
      dict(segmentation_mask=jnp.ones((2, 3), int), time_major=True),
      r"segmentation_mask must have shape \(time, \*batch\) = \(3, 2\), got \(2, 3\)",
    ),
    (
      "lengths_shape",
      jnp.ones((2, 3)),
      dict(seq_lengths=jnp.ones((3,), int)),
      r"seq_lengths must have shape \(\*batch,\) = \(2,\), got \(3,\)",
    ),
    (
      "both",
      jnp.ones((2, 3)),
      dict(
        segmentation_mask=jnp.ones((2, 3), int), seq_lengths=jnp.ones((2,), int)
      ),
      "not both",
    ),
    (
      "lengths_value",
      jnp.ones((2, 3)),
      dict(seq_lengths=jnp.array([1, 4])),
      r"seq_lengths must lie in \[0, time\] = \[0, 3\], got 4 for row \(1,\)",
    ),
    (
      "padding_first",
      jnp.ones((1, 3)),
      dict(segmentation_mask=jnp.array([[0, 1, 1]])),
      "padding",
    ),
    (
      "negative_batch_dims",
      jnp.ones((2, 3)),
      dict(num_batch_dims=-1),
      "num_batch_dims must be >= 0, got -1",
    ),
    (
      "mismatched_leaves",
      (jnp.ones((2, 3)), jnp.ones((2, 4))),
      {},
      "every leaf of inputs must share",
    ),
  )
  def test_raises(self, inputs, options, message):
    with self.assertRaisesRegex(ValueError, message):
      hk_rnn.flip_sequences(inputs, **options)


if __name__ == "__main__":
  absltest.main()
