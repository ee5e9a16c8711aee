"""Tests of MinGRUCell, MinLSTMCell and the linear-recurrence path.

The oracle is a float64 numpy loop over each sequence (each segment of a
packed row) on its own, with the contract's equations written out again.
Gradients are checked against it as directional derivatives (central
differences of the float64 loop along a random direction), and the
whole-sequence path against the step path (``fused=False``) directly.
"""

import functools
import itertools
from unittest import mock

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn._src import linear_scan, sequences
from hk_rnn_test import test_utils

INPUTS, FEATURES = 3, 5
CELLS = {"gru": hk_rnn.MinGRUCell, "lstm": hk_rnn.MinLSTMCell}
METHODS = ("sequential", "chunked", "associative")
IDS = test_utils.PACKED_IDS


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def reference_step(kind, params, h, x):
  """One step of the contract's equations, in numpy."""
  z = x @ params["w_i"] + params["b"]
  if kind == "gru":
    z_z, h_tilde = np.split(z, 2, axis=-1)
    gate = _sigmoid(z_z)
    return (1 - gate) * h + gate * h_tilde
  z_f, z_i, h_tilde = np.split(z, 3, axis=-1)
  f, i = _sigmoid(z_f), _sigmoid(z_i)
  return (f * h + i * h_tilde) / (f + i)


def reference(
  kind, params, inputs, ids, initial, *, reverse=False, keep_order=False
):
  """Each segment of each row run on its own: ``inputs (B, T, D)``.

  Returns ``(final (B, F), outputs (B, T, F), carries (B, T, F))``, the
  last holding the carry after each processed step (NaN at padding), all
  float64.
  """
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  inputs = np.asarray(inputs, np.float64)
  initial = np.asarray(initial, np.float64)
  batch, time = ids.shape
  features = initial.shape[-1]
  outputs = np.zeros((batch, time, features))
  carries = np.full((batch, time, features), np.nan)
  finals = initial.copy()
  for row in range(batch):
    for steps in test_utils.segments_of(ids[row]):
      order = steps[::-1] if reverse else steps
      h = initial[row]
      for position, t in zip(steps, order, strict=True):
        h = reference_step(kind, params, h, inputs[row, t])
        outputs[row, t if keep_order or not reverse else position] = h
        carries[row, position] = h
      finals[row] = h
  return finals, outputs, carries


def _cell_params(params):
  """The one cell's parameter dict inside a model's params."""
  (name,) = [name for name in params if "w_i" in params[name]]
  return params[name]


def _weights(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@functools.cache
def _model(kind, method="auto", fused=True, **rnn_options):
  """Jitted ``(params, x, ids, h0, w_out, w_final) -> (final, y, grads)``.

  ``grads`` are those of ``Σ w_out·y + Σ w_final·final`` with respect to
  the parameters, ``h0`` and ``x``.
  """

  def forward(x, ids, h0):
    cell = CELLS[kind](FEATURES, scan_method=method)
    return hk_rnn.RNN(cell, fused=fused, **rnn_options)(
      x, ids, initial_carry=h0
    )

  model = test_utils.transform(forward)
  return model, test_utils.weighted_sum_and_grads(model)


def _setup(kind, ids, seed=0):
  batch, time = ids.shape
  x = test_utils.inputs_with_bad_padding((batch, time, INPUTS), seed, ids)
  h0 = _weights((batch, FEATURES), seed + 1)
  model, _ = _model(kind)
  params = model.init(jax.random.PRNGKey(seed), x, ids, h0)
  # Non-zero biases, so that the gates differ across blocks.
  params = jax.tree.map(lambda p: p + 0.3 * _weights(p.shape, seed + 2), params)
  w_out = _weights((batch, time, FEATURES), seed + 3)
  w_final = _weights((batch, FEATURES), seed + 4)
  return params, x, h0, w_out, w_final


class MatchesFloat64LoopTest(parameterized.TestCase):
  """Values and gradients equal the per-sequence float64 loop."""

  @parameterized.parameters(
    *itertools.product(
      CELLS, ("step", *METHODS), [dict(reverse=False, keep_order=False)]
    ),
    *itertools.product(
      CELLS,
      ("step", "auto"),
      [
        dict(reverse=True, keep_order=False),
        dict(reverse=True, keep_order=True),
      ],
    ),
  )
  def test_values_and_gradients(self, kind, path, direction):
    fused = path != "step"
    _, run = _model(
      kind, "auto" if path == "step" else path, fused, **direction
    )
    params, x, h0, w_out, w_final = _setup(kind, IDS)
    with mock.patch.object(
      linear_scan,
      "masked_linear_recurrence",
      wraps=linear_scan.masked_linear_recurrence,
    ) as spy:
      final, outputs, (g_params, g_x, g_h0) = run(
        params, x, IDS, h0, w_out, w_final
      )
    # Traced once here (jit caches per test case): the whole-sequence path
    # runs the recurrence, the step path never does.
    self.assertEqual(spy.call_count, int(fused))
    cell = {
      k: np.asarray(v, np.float64) for k, v in _cell_params(params).items()
    }
    want_final, want_outputs, _ = reference(kind, cell, x, IDS, h0, **direction)
    np.testing.assert_allclose(final, want_final, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs, want_outputs, rtol=1e-5, atol=1e-5)
    self.assertTrue(np.all(np.asarray(outputs)[IDS == 0] == 0))

    # The gradient along a random direction of (cell params, h0), against
    # central differences of the float64 loop.
    direction_params = {
      k: np.float64(_weights(v.shape, 7)) for k, v in cell.items()
    }
    direction_h0 = np.float64(_weights(h0.shape, 8))

    def reference_loss(step):
      moved = {k: cell[k] + step * direction_params[k] for k in cell}
      final, outputs, _ = reference(
        kind, moved, x, IDS, h0 + step * direction_h0, **direction
      )
      return np.sum(w_out * outputs) + np.sum(w_final * final)

    epsilon = 1e-6
    numeric = (reference_loss(epsilon) - reference_loss(-epsilon)) / (
      2 * epsilon
    )
    g_cell = _cell_params(g_params)
    analytic = sum(
      np.sum(np.asarray(g_cell[k], np.float64) * direction_params[k])
      for k in cell
    ) + np.sum(np.asarray(g_h0, np.float64) * direction_h0)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-4)
    # NaN/inf padding reaches no gradient; padded inputs get exactly zero.
    g_x = np.asarray(g_x)
    self.assertTrue(np.all(np.isfinite(g_x)))
    self.assertTrue(np.all(g_x[IDS == 0] == 0))


class WholeSequenceMatchesStepTest(parameterized.TestCase):
  """At T = 300, every form equals the step path to ~1e-5 in float32."""

  @parameterized.parameters(*itertools.product(CELLS, METHODS))
  def test_long_packed_rows(self, kind, method):
    ids = np.zeros((2, 300), np.int32)
    ids[0, :] = 1
    ids[1, :120], ids[1, 120:250] = 1, 2
    params, x, h0, w_out, w_final = _setup(kind, ids)
    step = _model(kind, fused=False)[1](params, x, ids, h0, w_out, w_final)
    whole = _model(kind, method)[1](params, x, ids, h0, w_out, w_final)
    for got, want in zip(
      jax.tree.leaves(whole), jax.tree.leaves(step), strict=True
    ):
      scale = np.max(np.abs(want))
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


class LongSequenceTest(parameterized.TestCase):
  @parameterized.parameters(*itertools.product(CELLS, METHODS))
  def test_t4096_is_finite_and_close_to_the_loop(self, kind, method):
    # Products of thousands of gates underflow; no form divides by them.
    ids = np.ones((2, 4096), np.int32)
    ids[1, 3000:] = 2
    params, x, h0, w_out, w_final = _setup(kind, ids)
    final, outputs, grads = _model(kind, method)[1](
      params, x, ids, h0, w_out, w_final
    )
    want_final, want_outputs, _ = reference(
      kind, _cell_params(params), x, ids, h0
    )
    np.testing.assert_allclose(outputs, want_outputs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final, want_final, rtol=1e-4, atol=1e-4)
    for leaf in jax.tree.leaves(grads):
      self.assertTrue(np.all(np.isfinite(leaf)))


class LayoutTest(parameterized.TestCase):
  """Layouts only move axes: the results are the batch-major ones."""

  def setUp(self):
    super().setUp()
    self.params, self.x, self.h0, _, _ = _setup("gru", IDS)
    self.cell = _cell_params(self.params)
    zeros = np.zeros_like(self.h0)
    self.want_final, self.want_outputs, _ = reference(
      "gru", self.cell, self.x, IDS, zeros
    )

  def _check(self, forward, x, ids, final_shape):
    model = test_utils.transform(forward)
    params = self.params
    final, outputs = jax.jit(model.apply)(params, x, ids)
    self.assertEqual(final.shape, final_shape)
    return np.asarray(final), np.asarray(outputs)

  def test_time_major(self):
    def forward(x, ids):
      return hk_rnn.RNN(hk_rnn.MinGRUCell(FEATURES), time_major=True)(x, ids)

    final, outputs = self._check(
      forward, self.x.swapaxes(0, 1), IDS.T, (4, FEATURES)
    )
    np.testing.assert_allclose(final, self.want_final, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
      outputs.swapaxes(0, 1), self.want_outputs, rtol=1e-5, atol=1e-5
    )

  def test_no_batch_axis(self):
    def forward(x, ids):
      return hk_rnn.RNN(hk_rnn.MinGRUCell(FEATURES))(x, ids)

    final, outputs = self._check(forward, self.x[1], IDS[1], (FEATURES,))
    np.testing.assert_allclose(final, self.want_final[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
      outputs, self.want_outputs[1], rtol=1e-5, atol=1e-5
    )

  def test_two_batch_axes(self):
    def forward(x, ids):
      return hk_rnn.RNN(hk_rnn.MinGRUCell(FEATURES))(x, ids)

    x = self.x.reshape((2, 2, *self.x.shape[1:]))
    final, outputs = self._check(
      forward, x, IDS.reshape(2, 2, -1), (2, 2, FEATURES)
    )
    np.testing.assert_allclose(
      final.reshape(4, -1), self.want_final, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
      outputs.reshape(self.want_outputs.shape),
      self.want_outputs,
      rtol=1e-5,
      atol=1e-5,
    )

  def test_vmap_of_jit_equals_each_example(self):
    def forward(x, ids):
      return hk_rnn.RNN(hk_rnn.MinGRUCell(FEATURES))(x, ids)

    model = test_utils.transform(forward)
    params = self.params
    xs = np.stack(
      [self.x, test_utils.inputs_with_bad_padding(self.x.shape, 5, IDS)]
    )
    final, outputs = jax.vmap(jax.jit(model.apply), (None, 0, None))(
      params, xs, IDS
    )
    for n in range(2):
      want_final, want_outputs, _ = reference(
        "gru", self.cell, xs[n], IDS, np.zeros_like(self.h0)
      )
      np.testing.assert_allclose(final[n], want_final, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(outputs[n], want_outputs, rtol=1e-5, atol=1e-5)


class CompositionTest(absltest.TestCase):
  """Bidirectional, StackedRNN, streaming and dropout: fused = stepped."""

  def test_stacked_bidirectional_equals_step_path(self):
    lengths = np.array([7, 4, 0, 2])

    def forward(x, lengths, fused):
      def rnn(cell):
        return hk_rnn.RNN(cell, fused=fused)

      stack = hk_rnn.StackedRNN(
        [
          hk_rnn.Bidirectional(
            rnn(hk_rnn.MinGRUCell(4)), rnn(hk_rnn.MinLSTMCell(3))
          ),
          rnn(hk_rnn.MinLSTMCell(FEATURES)),
        ]
      )
      return stack(x, seq_lengths=lengths)

    model = test_utils.transform(forward)
    x = test_utils.inputs_with_bad_padding((4, 7, INPUTS), 3)
    params = model.init(jax.random.PRNGKey(0), x, lengths, True)
    results = [
      jax.jit(
        functools.partial(test_utils.value_and_grad, model), static_argnums=3
      )(params, x, lengths, fused)
      for fused in (True, False)
    ]
    test_utils.tree_allclose(self, results[0], results[1])

  def test_streaming_chunks_equal_one_run(self):
    # Segments and padding cross the chunk boundaries at 4 and 8.
    ids = np.array(
      [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3],
        [4, 4, 4, 4, 6, 6, 6, 6, 6, 9, 9, 9],
      ],
      np.int32,
    )
    x = test_utils.inputs_with_bad_padding((3, 12, INPUTS), 4)

    def forward(x, ids, initial_carry=None, initial_segment_ids=None):
      return hk_rnn.RNN(hk_rnn.MinLSTMCell(FEATURES))(
        x,
        ids,
        initial_carry=initial_carry,
        initial_segment_ids=initial_segment_ids,
      )

    model = test_utils.transform(forward)
    params = model.init(jax.random.PRNGKey(0), x, ids)
    chunk_apply = jax.jit(model.apply)

    def streamed(params):
      carry = jnp.zeros((3, FEATURES))
      previous = jnp.zeros((3,), jnp.int32)  # matches no segment
      outputs = []
      for start in range(0, 12, 4):
        chunk_ids = ids[:, start : start + 4]
        carry, y = chunk_apply(
          params, x[:, start : start + 4], chunk_ids, carry, previous
        )
        previous = hk_rnn.last_segment_ids(chunk_ids, previous)
        outputs.append(y)
      return carry, jnp.concatenate(outputs, axis=1)

    want_final, want_outputs, _ = reference(
      "lstm", _cell_params(params), x, ids, np.zeros((3, FEATURES))
    )
    final, outputs = streamed(params)
    np.testing.assert_allclose(final, want_final, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs, want_outputs, rtol=1e-5, atol=1e-5)

    def loss(carry_and_outputs):
      final, outputs = carry_and_outputs
      return jnp.sum(jnp.sin(final)) + jnp.sum(jnp.sin(2 * outputs))

    test_utils.tree_allclose(
      self,
      jax.grad(lambda p: loss(streamed(p)))(params),
      jax.grad(lambda p: loss(model.apply(p, x, ids)))(params),
    )

  def test_input_dropout_same_masks_either_path(self):
    def forward(x, lengths, fused):
      cell = hk_rnn.MinGRUCell(FEATURES, dropout_rate=0.4)
      return hk_rnn.RNN(cell, fused=fused)(
        x, seq_lengths=lengths, is_training=True
      )

    model = hk.transform(forward)
    x, lengths = (
      test_utils.inputs_with_bad_padding((3, 6, INPUTS), 5),
      np.array([6, 3, 0]),
    )
    params = model.init(jax.random.PRNGKey(0), x, lengths, True)
    key = jax.random.PRNGKey(1)
    apply = jax.jit(model.apply, static_argnums=4)
    fused, stepped = (apply(params, key, x, lengths, f) for f in (True, False))
    test_utils.tree_allclose(self, fused, stepped)
    # Dropout is on: another key drops other units.
    other = apply(params, jax.random.PRNGKey(2), x, lengths, True)
    self.assertFalse(np.allclose(fused[1], other[1]))


class DiagonalLRU(hk_rnn.LinearRecurrentCell):
  """A user's cell, written only through ``coefficients``."""

  def coefficients(self, inputs):
    nu = hk.get_parameter("nu", (self.features,), init=jnp.zeros)
    w = hk.get_parameter(
      "w",
      (inputs.shape[-1], self.features),
      init=hk.initializers.RandomNormal(),
    )
    a = jnp.exp(-jnp.exp(nu))
    return a, jnp.sqrt(1 - a**2) * (inputs @ w)


class UserCellTest(absltest.TestCase):
  def test_user_cell_gets_the_whole_sequence_path(self):
    x = test_utils.inputs_with_bad_padding((4, 7, INPUTS), 6, IDS)

    def forward(x, ids, fused):
      return hk_rnn.RNN(DiagonalLRU(FEATURES), fused=fused, reverse=True)(
        x, ids
      )

    model = test_utils.transform(forward)
    params = model.init(jax.random.PRNGKey(0), x, IDS, True)
    params = jax.tree.map(lambda p: p + _weights(p.shape, 9) * 0.5, params)
    run = jax.jit(
      functools.partial(test_utils.value_and_grad, model), static_argnums=3
    )
    fused, stepped = (run(params, x, IDS, f) for f in (True, False))
    test_utils.tree_allclose(self, fused, stepped)

    # The float64 loop of h' = a h + b, each segment read backwards.
    (cell,) = params.values()
    a = np.exp(-np.exp(np.float64(cell["nu"])))
    final, outputs = fused[0]
    for row in range(4):
      h = np.zeros(FEATURES)
      for steps in test_utils.segments_of(IDS[row]):
        h = np.zeros(FEATURES)
        for position, t in zip(steps, steps[::-1], strict=True):
          h = a * h + np.sqrt(1 - a**2) * (x[row, t] @ cell["w"])
          np.testing.assert_allclose(outputs[row, position], h, atol=1e-5)
      np.testing.assert_allclose(final[row], h, atol=1e-5)


class StepCarriesTest(absltest.TestCase):
  def test_return_step_carries_gives_the_carry_after_every_step(self):
    x = test_utils.inputs_with_bad_padding((4, 7, INPUTS), 7, IDS)
    valid = jnp.asarray(IDS.T != 0)
    reset = sequences.segment_starts(jnp.asarray(IDS.T), axis=0)

    def forward(x, h0, flag):
      cell = hk_rnn.MinLSTMCell(FEATURES)
      steps = hk_rnn.SequenceSteps(
        valid=valid, reset=reset, reset_carry=h0, return_step_carries=flag
      )
      return cell.fused_sequence(jnp.swapaxes(x, 0, 1), h0, steps)

    model = test_utils.transform(forward)
    h0 = _weights((4, FEATURES), 8)
    params = model.init(jax.random.PRNGKey(0), x, h0, True)
    final, outputs, carries = model.apply(params, x, h0, True)
    self.assertLen(model.apply(params, x, h0, False), 2)
    want_final, want_outputs, want_carries = reference(
      "lstm", _cell_params(params), x, IDS, h0
    )
    carries = np.swapaxes(np.asarray(carries), 0, 1)
    valid = IDS != 0
    np.testing.assert_allclose(
      carries[valid], want_carries[valid], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
      np.swapaxes(outputs, 0, 1), want_outputs, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(final, want_final, rtol=1e-5, atol=1e-5)


class LinearRecurrenceTest(parameterized.TestCase):
  @parameterized.parameters(*itertools.product(METHODS, (1, 5, 10)))
  def test_forms_equal_the_loop_in_values_and_gradients(self, method, time):
    rng = np.random.default_rng(time)
    a = rng.uniform(0, 1, (time, 2)).astype(np.float32)
    b = rng.normal(size=(time, 2)).astype(np.float32)
    initial = rng.normal(size=(2,)).astype(np.float32)
    weights = rng.normal(size=(time, 2)).astype(np.float32)

    def loop(a, b, initial):
      h, out = initial, []
      for t in range(time):
        h = a[t] * h + b[t]
        out.append(h)
      return jnp.stack(out)

    def loss(fn):
      return lambda *args: jnp.sum(weights * fn(*args))

    form = functools.partial(linear_scan.linear_recurrence, method=method)
    test_utils.tree_allclose(self, form(a, b, initial), loop(a, b, initial))
    test_utils.tree_allclose(
      self,
      jax.grad(loss(form), (0, 1, 2))(a, b, initial),
      jax.grad(loss(loop), (0, 1, 2))(a, b, initial),
    )

  @parameterized.parameters(*METHODS)
  def test_masked_recurrence_skips_padding_even_when_not_finite(self, method):
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, (6, 3, 2)).astype(np.float32)
    b = rng.normal(size=(6, 3, 2)).astype(np.float32)
    valid = np.arange(6)[:, None] < np.array([6, 2, 0])
    a[~valid], b[~valid] = np.inf, np.nan
    initial = rng.normal(size=(3, 2)).astype(np.float32)
    weights = rng.normal(size=(6, 3, 2)).astype(np.float32)

    def loss(a, b, initial):
      outputs, final = linear_scan.masked_linear_recurrence(
        a, b, initial, valid, method=method
      )
      return jnp.sum(weights * outputs) + jnp.sum(jnp.sin(final))

    def loop_loss(a, b, initial):
      total, h = 0.0, initial
      for t in range(6):
        keep = valid[t][:, None]
        h = jnp.where(
          keep, jnp.where(keep, a[t], 0) * h + jnp.where(keep, b[t], 0), h
        )
        total = total + jnp.sum(jnp.where(keep, weights[t] * h, 0))
      return total + jnp.sum(jnp.sin(h))

    test_utils.tree_allclose(
      self, loss(a, b, initial), loop_loss(a, b, initial)
    )
    grads = jax.grad(loss, (0, 1, 2))(a, b, initial)
    test_utils.tree_allclose(
      self, grads, jax.grad(loop_loss, (0, 1, 2))(a, b, initial)
    )
    self.assertTrue(all(np.all(g[~valid] == 0) for g in grads[:2]))

  def test_auto_rule(self):
    self.assertEqual(linear_scan.choose_method(4096, "cpu"), "sequential")
    self.assertEqual(linear_scan.choose_method(4096, "gpu"), "associative")
    self.assertEqual(linear_scan.choose_method(8, "tpu"), "associative")


class OptionsTest(absltest.TestCase):
  def _construct(self, cell_class, *args, **options):
    hk.transform(lambda: cell_class(*args, **options)).init(None)

  def test_recurrent_dropout_is_a_value_error(self):
    for cell in CELLS.values():
      with self.assertRaisesRegex(
        ValueError, r"recurrent_dropout_rate must be 0 .* got 0.1"
      ):
        self._construct(cell, 4, recurrent_dropout_rate=0.1)

  def test_bad_options_are_value_errors(self):
    with self.assertRaisesRegex(ValueError, "w_h_init must be None"):
      self._construct(hk_rnn.MinGRUCell, 4, w_h_init=jnp.zeros)
    with self.assertRaisesRegex(ValueError, "scan_method must be one of"):
      self._construct(hk_rnn.MinLSTMCell, 4, scan_method="fast")
    with self.assertRaisesRegex(ValueError, "features must be a positive"):
      self._construct(hk_rnn.MinGRUCell, 0)

  def test_parameter_layout_dtype_and_carry(self):
    def step(x):
      gru, lstm = (
        hk_rnn.MinGRUCell(4, dtype=jnp.bfloat16, name="gru"),
        hk_rnn.MinLSTMCell(4, carry_init=jnp.ones, name="lstm"),
      )
      return gru(gru.initialize_carry(x), x), lstm(lstm.initialize_carry(x), x)

    model = test_utils.transform(step)
    x = jnp.ones((2, 3))
    params = model.init(jax.random.PRNGKey(0), x)
    shapes = jax.tree.map(lambda p: (p.shape, p.dtype), params)
    self.assertEqual(
      shapes,
      {
        "gru": {"w_i": ((3, 8), jnp.float32), "b": ((8,), jnp.float32)},
        "lstm": {"w_i": ((3, 12), jnp.float32), "b": ((12,), jnp.float32)},
      },
    )
    (h, y), (lstm_h, _) = model.apply(params, x)
    self.assertEqual(h.dtype, jnp.bfloat16)
    self.assertIs(h, y)
    # From h = 1 the MinLSTM step is a convex combination of 1 and h̃.
    h_tilde = x @ params["lstm"]["w_i"][:, 8:] + params["lstm"]["b"][8:]
    self.assertTrue(
      np.all(np.minimum(1, h_tilde) - 1e-6 <= lstm_h)
      and np.all(lstm_h <= np.maximum(1, h_tilde) + 1e-6)
    )


if __name__ == "__main__":
  absltest.main()
