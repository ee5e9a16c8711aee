"""Tests for hk_rnn.RNN against per-sequence reference loops."""

import itertools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils
from hk_rnn_test.rnn_helpers import (
  BATCH,
  FEATURES,
  INPUTS,
  LENGTHS,
  PACKED_IDS,
  PADDED_IDS,
  TIME,
  random_inputs,
  rnn_fn,
  zero_carry,
)


def _loss(carry, outputs):
  # Different weights per position, so that misplaced outputs show.
  weights = jnp.cos(jnp.arange(outputs.size, dtype=outputs.dtype))
  carry_term = sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(carry))
  return jnp.sum(outputs.reshape(-1) * weights) + carry_term


class RNNMatchesReferenceTest(parameterized.TestCase):
  """Values and gradients equal a loop over each sequence on its own."""

  @parameterized.parameters(
    # Every masking and direction with the LSTM...
    *itertools.product(
      ["lstm"],
      ["none", "lengths", "padded", "packed"],
      ["forward", "reverse", "reverse_keep_order"],
    ),
    # ...and packed rows in every direction, plus lengths, for the others.
    *itertools.product(
      ["gru", "simple", "mgu"],
      ["packed"],
      ["forward", "reverse", "reverse_keep_order"],
    ),
    *itertools.product(["gru", "simple", "mgu"], ["lengths"], ["forward"]),
  )
  def test_values_and_gradients(self, kind, masking, direction):
    inputs = random_inputs()
    reverse = direction != "forward"
    keep_order = direction == "reverse_keep_order"
    mask, call_options, ids = None, {}, np.ones((BATCH, TIME), np.int32)
    if masking == "lengths":
      call_options["seq_lengths"] = jnp.asarray(LENGTHS)
      ids = PADDED_IDS
    elif masking in ("padded", "packed"):
      ids = PADDED_IDS if masking == "padded" else PACKED_IDS
      mask = jnp.asarray(ids)
    model = test_utils.transform(
      rnn_fn(kind, reverse=reverse, keep_order=keep_order)
    )
    params = model.init(jax.random.PRNGKey(0), inputs, mask, **call_options)

    def rnn_loss(params, inputs):
      return _loss(*model.apply(params, inputs, mask, **call_options))

    def reference_loss(params, inputs):
      return _loss(
        *test_utils.reference_rnn(
          kind,
          params["cell"],
          inputs,
          ids,
          zero_carry(kind),
          reverse=reverse,
          keep_order=keep_order,
        )
      )

    carry, outputs = model.apply(params, inputs, mask, **call_options)
    expected_carry, expected_outputs = test_utils.reference_rnn(
      kind,
      params["cell"],
      inputs,
      ids,
      zero_carry(kind),
      reverse=reverse,
      keep_order=keep_order,
    )
    test_utils.tree_allclose(self, outputs, expected_outputs)
    test_utils.tree_allclose(self, carry, expected_carry)
    grads = jax.grad(rnn_loss, argnums=(0, 1))(params, inputs)
    expected_grads = jax.grad(reference_loss, argnums=(0, 1))(params, inputs)
    test_utils.tree_allclose(self, grads, expected_grads, atol=1e-4)


class RNNPaddingTest(parameterized.TestCase):
  @parameterized.parameters(
    ("lstm", False, True),
    ("gru", True, True),
    ("lstm", True, False),
    ("mgu", False, False),
  )
  def test_non_finite_padding_changes_nothing(self, kind, reverse, fused):
    clean = random_inputs()
    valid = jnp.asarray(PACKED_IDS != 0)[..., None]
    poison = jnp.where(jnp.arange(INPUTS) % 2 == 0, jnp.nan, jnp.inf)
    dirty = jnp.where(valid, clean, poison * jnp.ones_like(clean))
    mask = jnp.asarray(PACKED_IDS)
    model = test_utils.transform(rnn_fn(kind, reverse=reverse, fused=fused))
    params = model.init(jax.random.PRNGKey(0), clean, mask)

    @jax.jit
    def values_and_gradients(params, inputs):
      def loss(params, inputs):
        return _loss(*model.apply(params, inputs, mask))

      grads = jax.grad(loss, argnums=(0, 1))(params, inputs)
      return model.apply(params, inputs, mask), grads

    from_dirty = values_and_gradients(params, dirty)
    for leaf in jax.tree.leaves(from_dirty):
      self.assertTrue(bool(jnp.isfinite(leaf).all()))
    test_utils.tree_allclose(
      self, from_dirty, values_and_gradients(params, clean), atol=0, rtol=0
    )

  def test_padded_outputs_are_exactly_zero(self):
    _, (_, outputs) = test_utils.init_and_apply(
      rnn_fn("lstm"), random_inputs(), jnp.asarray(PACKED_IDS)
    )
    np.testing.assert_array_equal(np.asarray(outputs)[PACKED_IDS == 0], 0.0)

  @parameterized.parameters("lstm", "gru")
  def test_empty_row_returns_initial_carry(self, kind):
    ids = np.array([[0] * TIME, [1] * TIME], np.int32)
    start = jax.tree.map(lambda leaf: leaf + 0.5, zero_carry(kind, batch=2))
    _, (carry, outputs) = test_utils.init_and_apply(
      rnn_fn(kind),
      random_inputs(shape=(2, TIME, INPUTS)),
      jnp.asarray(ids),
      initial_carry=start,
    )
    np.testing.assert_array_equal(np.asarray(outputs[0]), 0.0)
    for got, want in zip(
      jax.tree.leaves(carry), jax.tree.leaves(start), strict=True
    ):
      np.testing.assert_array_equal(got[0], want[0])

  @parameterized.parameters(True, False)
  def test_initial_carry_is_cast_to_the_cells_dtype(self, fused):
    """As the docstring says: a bf16 cell rounds a float32 initial carry."""
    ids = np.array([[0] * TIME, [1] * TIME], np.int32)
    # 1 + 2**-10 is a float32 that bfloat16 (8 significant bits) rounds to 1.
    start = jnp.full((2, FEATURES), 1 + 2.0**-10, jnp.float32)

    def forward(inputs, mask, carry):
      cell = hk_rnn.LSTMCell(FEATURES, dtype=jnp.bfloat16)
      return hk_rnn.RNN(cell, fused=fused)(inputs, mask, initial_carry=carry)

    _, (carry, _) = test_utils.init_and_apply(
      forward,
      random_inputs(shape=(2, TIME, INPUTS)),
      jnp.asarray(ids),
      (start,) * 2,
    )
    for leaf in carry:
      self.assertEqual(leaf.dtype, jnp.bfloat16)
      # The empty row returns the cast value bit for bit, not the float32 one.
      np.testing.assert_array_equal(leaf[0], start[0].astype(jnp.bfloat16))
      self.assertFalse((leaf[0].astype(jnp.float32) == start[0]).any())

  def test_every_segment_starts_from_initial_carry(self):
    inputs = random_inputs()
    start = jnp.asarray(
      np.random.default_rng(1).normal(size=(BATCH, FEATURES)), jnp.float32
    )
    params, (carry, outputs) = test_utils.init_and_apply(
      rnn_fn("gru"), inputs, jnp.asarray(PACKED_IDS), initial_carry=start
    )
    expected = test_utils.reference_rnn(
      "gru", params["cell"], inputs, PACKED_IDS, start
    )
    test_utils.tree_allclose(self, (carry, outputs), expected)

  def test_lengths_and_mask_agree(self):
    inputs = random_inputs()
    params, by_mask = test_utils.init_and_apply(
      rnn_fn("lstm"), inputs, jnp.asarray(PADDED_IDS)
    )
    by_lengths = test_utils.transform(rnn_fn("lstm")).apply(
      params, inputs, seq_lengths=jnp.asarray(LENGTHS)
    )
    test_utils.tree_allclose(self, by_mask, by_lengths, atol=0, rtol=0)

  def test_bool_mask(self):
    inputs = random_inputs()
    params, by_ints = test_utils.init_and_apply(
      rnn_fn("gru"), inputs, jnp.asarray(PADDED_IDS)
    )
    by_bools = test_utils.transform(rnn_fn("gru")).apply(
      params, inputs, jnp.asarray(PADDED_IDS != 0)
    )
    test_utils.tree_allclose(self, by_ints, by_bools, atol=0, rtol=0)


class RNNLayoutTest(parameterized.TestCase):
  @parameterized.parameters(False, True)
  def test_time_major_is_a_transpose(self, reverse):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    params, (carry, outputs) = test_utils.init_and_apply(
      rnn_fn("lstm", reverse=reverse), inputs, mask
    )
    tm_carry, tm_outputs = test_utils.transform(
      rnn_fn("lstm", reverse=reverse, time_major=True)
    ).apply(params, inputs.transpose(1, 0, 2), mask.T)
    test_utils.tree_allclose(self, tm_carry, carry)
    test_utils.tree_allclose(self, tm_outputs.transpose(1, 0, 2), outputs)

  def test_call_overrides_constructor(self):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    params, expected = test_utils.init_and_apply(
      rnn_fn("gru", time_major=True), inputs.transpose(1, 0, 2), mask.T
    )
    outputs = test_utils.transform(rnn_fn("gru", time_major=True)).apply(
      params, inputs, mask, time_major=False, return_carry=False
    )
    test_utils.tree_allclose(self, outputs.transpose(1, 0, 2), expected[1])

  def test_several_batch_axes_flatten(self):
    inputs = random_inputs(shape=(2, 3, TIME, INPUTS))
    lengths = jnp.array([[0, 2, 6], [3, 4, 1]])
    params, (carry, outputs) = test_utils.init_and_apply(
      rnn_fn("lstm"), inputs, seq_lengths=lengths
    )
    flat_carry, flat_outputs = test_utils.transform(rnn_fn("lstm")).apply(
      params, inputs.reshape(6, TIME, INPUTS), seq_lengths=lengths.reshape(6)
    )
    self.assertEqual(outputs.shape, (2, 3, TIME, FEATURES))
    test_utils.tree_allclose(
      self, outputs, flat_outputs.reshape(2, 3, TIME, FEATURES)
    )
    test_utils.tree_allclose(
      self, carry, jax.tree.map(lambda x: x.reshape(2, 3, FEATURES), flat_carry)
    )

  @parameterized.parameters(False, True)
  def test_no_batch_axes(self, time_major):
    inputs = random_inputs()
    params, (carry, outputs) = test_utils.init_and_apply(
      rnn_fn("gru"), inputs[:1], jnp.asarray(PACKED_IDS[1:2])
    )
    single = test_utils.transform(rnn_fn("gru", time_major=time_major)).apply(
      params, inputs[0], jnp.asarray(PACKED_IDS[1])
    )
    test_utils.tree_allclose(self, single, (carry[0], outputs[0]))

  def test_unroll_changes_nothing(self):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    params, expected = test_utils.init_and_apply(rnn_fn("lstm"), inputs, mask)
    unrolled = test_utils.transform(rnn_fn("lstm", unroll=4)).apply(
      params, inputs, mask
    )
    test_utils.tree_allclose(self, unrolled, expected)

  def test_jit_and_vmap(self):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    model = test_utils.transform(rnn_fn("lstm"))
    params, expected = test_utils.init_and_apply(rnn_fn("lstm"), inputs, mask)
    jitted = jax.jit(model.apply)(params, inputs, mask)
    test_utils.tree_allclose(self, jitted, expected)
    # vmap over the batch of single rows equals the batched call.
    mapped = jax.vmap(model.apply, in_axes=(None, 0, 0))(params, inputs, mask)
    test_utils.tree_allclose(self, mapped, expected)

  def test_return_carry_false(self):
    inputs = random_inputs()
    params, (_, expected) = test_utils.init_and_apply(rnn_fn("simple"), inputs)
    outputs = test_utils.transform(rnn_fn("simple", return_carry=False)).apply(
      params, inputs
    )
    test_utils.tree_allclose(self, outputs, expected)


def _error_cases():
  """(name, inputs shape, call options, message regex) for bad input."""
  x = (BATCH, TIME, INPUTS)
  return [
    (
      "rank",
      (INPUTS,),
      {},
      r"RNN: inputs must be .* at least 2 axes; got shape \(4,\)",
    ),
    (
      "mask_shape",
      x,
      {"segmentation_mask": np.ones((BATCH, TIME + 1), np.int32)},
      r"segmentation_mask must have shape \(\*batch, time\) = \(3, 6\), got \(3, 7\)",
    ),
    (
      "mask_dtype",
      x,
      {"segmentation_mask": np.ones((BATCH, TIME), np.float32)},
      "segmentation_mask must be an integer or bool array, got dtype float32",
    ),
    (
      "lengths_shape",
      x,
      {"seq_lengths": np.ones((BATCH + 1,), np.int32)},
      r"seq_lengths must have shape \(\*batch,\) = \(3,\), got \(4,\)",
    ),
    (
      "lengths_dtype",
      x,
      {"seq_lengths": np.ones((BATCH,), np.float32)},
      "seq_lengths must be an integer array",
    ),
    (
      "both",
      x,
      {
        "segmentation_mask": np.ones((BATCH, TIME), np.int32),
        "seq_lengths": np.ones((BATCH,), np.int32),
      },
      "either segmentation_mask or seq_lengths, not both",
    ),
    (
      "lengths_too_long",
      x,
      {"seq_lengths": np.array([1, 7, 2])},
      r"seq_lengths must lie in \[0, time\] = \[0, 6\], got 7 for row \(1,\)",
    ),
    (
      "lengths_negative",
      x,
      {"seq_lengths": np.array([1, -1, 2])},
      r"seq_lengths must lie in \[0, time\] = \[0, 6\], got -1",
    ),
    (
      "padding_inside",
      x,
      {"segmentation_mask": np.array([[1, 1, 0, 1, 0, 0]] + [[1] * TIME] * 2)},
      r"padding \(0\) must only sit at the end of a row; got row \(0,\): "
      r"padding at step 2, then id 1 at step 3 \(1 of 3 rows\)",
    ),
    (
      "negative_id",
      x,
      {"segmentation_mask": np.array([[1, -2, 0, 0, 0, 0]] + [[1] * TIME] * 2)},
      "ids must be non-negative",
    ),
    (
      "decreasing",
      x,
      {"segmentation_mask": np.array([[2, 2, 1, 1, 0, 0]] + [[1] * TIME] * 2)},
      "segment ids must not decrease",
    ),
    (
      "recurring",
      x,
      {"segmentation_mask": np.array([[1, 2, 1, 0, 0, 0]] + [[1] * TIME] * 2)},
      "segment ids must not decrease",
    ),
    (
      "carry_shape",
      x,
      {"initial_carry": np.zeros((BATCH, FEATURES + 1))},
      r"initial_carry must match the cell's carry .* \(3, 5\).* got \(3, 6\)",
    ),
    (
      "carry_structure",
      x,
      {"initial_carry": (np.zeros((BATCH, FEATURES)),) * 2},
      r"initial_carry must match the cell's carry for these inputs: GRUCell "
      r"'gru_cell' carries a single array of shape \(3, 5\); got a tuple of 2 "
      r"arrays, \(\(3, 5\), \(3, 5\)\)$",
    ),
    (
      "carry_in_a_one_tuple",
      x,
      {"initial_carry": (np.zeros((BATCH, FEATURES)),)},
      r"GRUCell 'gru_cell' carries a single array of shape \(3, 5\); got a "
      r"tuple of 1 array, \(\(3, 5\),\); this cell's carry is a single "
      r"array: pass it itself, not in a 1-tuple",
    ),
    (
      "lengths_passed_as_the_mask",
      x,
      {"segmentation_mask": LENGTHS},
      r"RNN: segmentation_mask must have shape \(\*batch, time\) = \(3, 6\), "
      r"got \(3,\); that is the shape of seq_lengths \(\*batch,\): pass "
      r"lengths by keyword, seq_lengths=\.\.\., not as the mask",
    ),
  ]


class RNNBadInputTest(parameterized.TestCase):
  @parameterized.named_parameters(*_error_cases())
  def test_raises_before_computing(self, shape, options, message):
    def forward(inputs):
      return hk_rnn.RNN(hk_rnn.GRUCell(FEATURES))(inputs, **options)

    with self.assertRaisesRegex(ValueError, message):
      hk.transform(forward).init(jax.random.PRNGKey(0), jnp.ones(shape))

  def test_traced_mask_is_accepted_under_jit(self):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    params, expected = test_utils.init_and_apply(rnn_fn("gru"), inputs, mask)
    model = test_utils.transform(rnn_fn("gru"))
    test_utils.tree_allclose(
      self, jax.jit(model.apply)(params, inputs, mask), expected
    )

  def test_cell_must_be_a_cell(self):
    with self.assertRaisesRegex(
      ValueError, "cell must be an hk_rnn.RNNCellBase"
    ):
      hk.transform(lambda: hk_rnn.RNN(lambda c, x: (c, x))).init(None)


class CustomCellTest(absltest.TestCase):
  """Any RNNCellBase works, with pytree carries and outputs."""

  def test_running_sum_cell(self):
    class RunningSum(hk_rnn.RNNCellBase):
      def __call__(self, carry, inputs):
        total, count = carry
        total = total + inputs
        count = count + 1
        return (total, count), {"total": total, "mean": total / count}

      def initialize_carry(self, sample_inputs, rng=None):
        return jnp.zeros_like(sample_inputs), jnp.zeros(
          sample_inputs.shape[:-1] + (1,)
        )

    inputs = random_inputs()
    _, ((total, count), outputs) = test_utils.init_and_apply(
      lambda x, m: hk_rnn.RNN(RunningSum())(x, m, reverse=True),
      inputs,
      jnp.asarray(PACKED_IDS),
    )
    for b, t in itertools.product(range(BATCH), range(TIME)):
      if PACKED_IDS[b, t] == 0:
        self.assertTrue(bool((outputs["total"][b, t] == 0).all()))
    # Row 1 packs [2, 2 | 5 | 7, 7]; reversed, the last segment ends at step 3.
    np.testing.assert_allclose(total[1], inputs[1, 3] + inputs[1, 4], rtol=1e-6)
    self.assertEqual(float(count[1, 0]), 2.0)
    np.testing.assert_allclose(
      outputs["total"][1, 1], inputs[1, 0] + inputs[1, 1], rtol=1e-6
    )


class FusedSequenceHookTest(absltest.TestCase):
  """RNN hands a user cell's ``fused_sequence`` the masks, and uses it."""

  def _cell_and_calls(self):
    calls = []

    class CumulativeSum(hk_rnn.RNNCellBase):
      def __call__(self, carry, inputs):
        return carry + inputs, carry + inputs

      def initialize_carry(self, sample_inputs, rng=None):
        return jnp.zeros_like(sample_inputs)

      def fused_sequence(self, inputs, initial_carry, steps):
        calls.append(steps)
        if steps.reset is not None:
          return None  # leaves packed rows to the step loop
        total = initial_carry + jnp.cumsum(inputs, axis=0)
        # Offset by 1 so that the test can tell this form from stepping.
        outputs = jnp.where(steps.valid[..., None], total + 1.0, 0.0)
        return initial_carry + inputs.sum(0), outputs

    return CumulativeSum, calls

  def _run(self, cell_type, x, mask=None, **options):
    def forward(x, mask):
      return hk_rnn.RNN(cell_type(), unroll=2)(x, mask, **options)

    return hk.transform(forward).apply({}, None, x, mask)

  def test_padded_rows_run_in_the_cells_form(self):
    cell_type, calls = self._cell_and_calls()
    lengths = jnp.asarray(LENGTHS)
    carry, outputs = self._run(cell_type, random_inputs(), seq_lengths=lengths)
    (steps,) = calls
    np.testing.assert_array_equal(steps.valid, PADDED_IDS.T != 0)
    self.assertIsNone(steps.reset)
    self.assertIsNone(steps.segment_starts)
    self.assertEqual(steps.unroll, 2)
    self.assertFalse(steps.return_step_carries)
    x = np.asarray(random_inputs())
    expected = np.cumsum(x, axis=1) + 1.0
    expected[PADDED_IDS == 0] = 0
    np.testing.assert_allclose(outputs, expected, rtol=1e-6)
    np.testing.assert_allclose(
      carry, (x * (PADDED_IDS != 0)[..., None]).sum(1), rtol=1e-6
    )
    lines = hk_rnn.explain(
      lambda x, lengths: self._run(cell_type, x, seq_lengths=lengths),
      random_inputs(),
      lengths,
    )
    self.assertEqual(
      lines,
      [
        "rnn (CumulativeSum 'cumulative_sum'): the cell's own "
        "whole-sequence form (xla)"
      ],
    )

  def test_none_falls_back_to_stepping_with_the_steps_rnn_computed(self):
    cell_type, calls = self._cell_and_calls()
    ids = jnp.asarray(PACKED_IDS)
    carry, outputs = self._run(cell_type, random_inputs(), ids, max_segments=3)
    (steps,) = calls
    starts = np.zeros_like(PACKED_IDS, bool)
    starts[:, 0] = True
    starts[:, 1:] = PACKED_IDS[:, 1:] != PACKED_IDS[:, :-1]
    np.testing.assert_array_equal(steps.reset, (starts & (PACKED_IDS != 0)).T)
    self.assertTrue(steps.return_step_carries)
    x = np.asarray(random_inputs())
    # Row 1 packs [2, 2 | 5 | 7, 7]: stepped, each segment sums from zero.
    np.testing.assert_allclose(outputs[1, 3], x[1, 3], rtol=1e-6)
    np.testing.assert_allclose(carry[1, 2], x[1, 3] + x[1, 4], rtol=1e-6)
    lines = hk_rnn.explain(
      lambda x, ids: self._run(cell_type, x, ids), random_inputs(), ids
    )
    self.assertEqual(
      lines,
      [
        "rnn (CumulativeSum 'cumulative_sum'): step scan (the cell "
        "has no whole-sequence kernel)"
      ],
    )


class RNNRematTest(parameterized.TestCase):
  """Rematerialisation changes memory, never values or gradients."""

  @parameterized.product(remat=("step", "chunked"), reverse=(False, True))
  def test_matches_plain_scan(self, remat, reverse):
    # time 6 is not a multiple of the chunk (3), exercising the tail.
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    plain = test_utils.transform(rnn_fn("lstm", reverse=reverse, fused=False))
    rematted = test_utils.transform(
      rnn_fn("lstm", reverse=reverse, remat=remat)
    )
    params = plain.init(jax.random.PRNGKey(0), inputs, mask)

    def run(model):
      def loss(params, inputs):
        return _loss(*model.apply(params, inputs, mask))

      values = model.apply(params, inputs, mask)
      return values, jax.grad(loss, argnums=(0, 1))(params, inputs)

    test_utils.tree_allclose(self, run(rematted), run(plain), atol=1e-6)

  @parameterized.parameters(
    ("lstm", False, False), ("gru", True, False), ("lstm", True, True),
    ("gru", False, True),
  )  # fmt: skip
  def test_chunked_runs_each_chunk_in_the_fused_kernel(
    self, kind, reverse, packed
  ):
    from unittest import mock

    from hk_rnn._src.kernels import dispatch

    kernel = {"lstm": "lstm_sequence", "gru": "gru_sequence"}[kind]
    inputs = random_inputs()
    if packed:
      masks = {"mask": jnp.asarray(PACKED_IDS)}
    else:
      masks = {"seq_lengths": jnp.asarray(LENGTHS)}
    plain = test_utils.transform(rnn_fn(kind, reverse=reverse, fused=False))
    chunked = test_utils.transform(
      rnn_fn(kind, reverse=reverse, remat="chunked")
    )
    params = plain.init(jax.random.PRNGKey(0), inputs, **masks)

    def run(model):
      def loss(params, inputs):
        return _loss(*model.apply(params, inputs, **masks))

      values = model.apply(params, inputs, **masks)
      return values, jax.grad(loss, argnums=(0, 1))(params, inputs)

    with mock.patch.object(
      dispatch, kernel, wraps=getattr(dispatch, kernel)
    ) as spy:
      got = run(chunked)
    self.assertTrue(spy.called)
    test_utils.tree_allclose(self, got, run(plain), atol=1e-5)

  def test_chunked_without_mask_and_odd_length(self):
    inputs = random_inputs(shape=(2, 7, INPUTS))
    params, expected = test_utils.init_and_apply(
      rnn_fn("gru", fused=False), inputs
    )
    got = test_utils.transform(rnn_fn("gru", remat="chunked")).apply(
      params, inputs
    )
    test_utils.tree_allclose(self, got, expected)

  def test_bad_mode(self):
    with self.assertRaisesRegex(ValueError, "remat must be one of"):
      hk.transform(lambda: hk_rnn.RNN(hk_rnn.GRUCell(2), remat="all")).init(
        None
      )


class RNNStreamingTest(parameterized.TestCase):
  """Chunk by chunk, passing carries along, equals one full-sequence run."""

  @parameterized.parameters(("lstm", True), ("gru", True), ("lstm", False))
  def test_chunks_equal_full_sequence(self, kind, fused):
    time = 12
    # Segments and padding cross the chunk boundaries at 4 and 8; row 2 has
    # a segment starting exactly at a boundary, row 3 is padding from 3.
    ids = np.array(
      [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3],
        [4, 4, 4, 4, 6, 6, 6, 6, 6, 9, 9, 9],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      ],
      np.int32,
    )
    inputs = random_inputs(shape=(4, time, INPUTS))
    full_model = test_utils.transform(rnn_fn(kind, fused=fused))
    params = full_model.init(jax.random.PRNGKey(0), inputs, jnp.asarray(ids))
    full_carry, full_outputs = full_model.apply(
      params, inputs, jnp.asarray(ids)
    )

    def chunk_loss(params, inputs):
      carry, previous, outputs = None, None, []
      for start in range(0, time, 4):
        chunk_ids = jnp.asarray(ids[:, start : start + 4])
        carry, chunk_outputs = full_model.apply(
          params,
          inputs[:, start : start + 4],
          chunk_ids,
          initial_carry=carry,
          initial_segment_ids=previous,
        )
        previous = hk_rnn.last_segment_ids(chunk_ids, previous)
        outputs.append(chunk_outputs)
      return carry, jnp.concatenate(outputs, axis=1)

    from unittest import mock

    from hk_rnn._src.kernels import dispatch

    kernel = {"lstm": "lstm_sequence", "gru": "gru_sequence"}[kind]
    with mock.patch.object(
      dispatch, kernel, wraps=getattr(dispatch, kernel)
    ) as spy:
      carry, outputs = chunk_loss(params, inputs)
    # Every chunk runs in the kernel when fused, also those whose packed
    # segments restart from a different carry than the one they continue.
    self.assertEqual(spy.call_count, 3 if fused else 0)
    test_utils.tree_allclose(self, outputs, full_outputs)
    test_utils.tree_allclose(self, carry, full_carry)

    def full_loss(params):
      return _loss(*full_model.apply(params, inputs, jnp.asarray(ids)))

    test_utils.tree_allclose(
      self,
      jax.grad(lambda p: _loss(*chunk_loss(p, inputs)))(params),
      jax.grad(full_loss)(params),
      atol=1e-5,
    )

  def test_lengths_stream_with_carry_alone(self):
    """One sequence per row needs no segment ids: the carry continues."""
    inputs, lengths = random_inputs(), jnp.array([2, 5, 6])
    model = test_utils.transform(rnn_fn("gru"))
    params, (carry, outputs) = test_utils.init_and_apply(
      rnn_fn("gru"), inputs, seq_lengths=lengths
    )
    first_carry, first = model.apply(
      params, inputs[:, :3], seq_lengths=jnp.minimum(lengths, 3)
    )
    second_carry, second = model.apply(
      params,
      inputs[:, 3:],
      seq_lengths=jnp.maximum(lengths - 3, 0),
      initial_carry=first_carry,
    )
    test_utils.tree_allclose(self, second_carry, carry)
    test_utils.tree_allclose(
      self, jnp.concatenate([first, second], axis=1), outputs
    )

  @parameterized.parameters(("gru", True), ("gru", False), ("lstm", True))
  def test_an_empty_chunk_passes_the_carry_through(self, kind, fused):
    """A stream's chunk may hold no step: the carry comes back as it went in."""
    model = test_utils.transform(rnn_fn(kind, fused=fused))
    params, (carry, _) = test_utils.init_and_apply(
      rnn_fn(kind, fused=fused), random_inputs(), jnp.asarray(PACKED_IDS)
    )
    empty, empty_mask = random_inputs()[:, :0], jnp.zeros((BATCH, 0), jnp.int32)
    ids = hk_rnn.last_segment_ids(jnp.asarray(PACKED_IDS))
    same_carry, outputs = model.apply(
      params, empty, empty_mask, initial_carry=carry, initial_segment_ids=ids
    )
    test_utils.tree_allclose(self, same_carry, carry, atol=0, rtol=0)
    self.assertEqual(outputs.shape, (BATCH, 0, FEATURES))

  def test_streaming_rejects_reverse_and_bad_ids(self):
    inputs, mask = random_inputs(), jnp.asarray(PACKED_IDS)
    with self.assertRaisesRegex(ValueError, "initial_segment_ids .* reverse"):
      test_utils.init_and_apply(
        rnn_fn("gru", reverse=True),
        inputs,
        mask,
        initial_segment_ids=jnp.ones((BATCH,), jnp.int32),
      )
    with self.assertRaisesRegex(
      ValueError, r"initial_segment_ids must be an integer array of shape"
    ):
      test_utils.init_and_apply(
        rnn_fn("gru"), inputs, mask, initial_segment_ids=jnp.ones((2,), int)
      )

  def test_last_segment_ids(self):
    ids = jnp.array([[1, 1, 2, 0], [0, 0, 0, 0], [3, 3, 3, 3]])
    np.testing.assert_array_equal(hk_rnn.last_segment_ids(ids), [2, 0, 3])
    np.testing.assert_array_equal(
      hk_rnn.last_segment_ids(ids.T, jnp.array([5, 6, 7]), time_major=True),
      [2, 6, 3],
    )


if __name__ == "__main__":
  absltest.main()
