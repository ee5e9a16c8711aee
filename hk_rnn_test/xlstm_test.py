"""Tests of SLSTMCell and MLSTMCell (xLSTM).

The oracle is a float64 numpy loop over each sequence (each segment of a
packed row) on its own, with the contract's equations written out again,
head by head. Gradients are checked against it as directional derivatives
(central differences of the float64 loop along a random direction), and
the whole-sequence paths (the fused sLSTM kernel, the chunkwise mLSTM)
against the step path (``fused=False``) directly.
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
from hk_rnn._src import xlstm
from hk_rnn_test import test_utils

INPUTS, FEATURES, HEADS = 3, 4, 2
CELLS = {"slstm": hk_rnn.SLSTMCell, "mlstm": hk_rnn.MLSTMCell}
IDS = test_utils.PACKED_IDS


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def slstm_step(params, carry, x):
  """One sLSTM step of the contract's equations, for one sequence."""
  c, n, m, h = carry
  heads, size, _ = params["w_h"].shape
  features = heads * size
  pre = x @ params["w_i"] + params["b"]
  for head in range(heads):
    units = slice(head * size, (head + 1) * size)
    for gate in range(4):
      columns = slice(gate * size, (gate + 1) * size)
      rows = slice(
        gate * features + head * size, gate * features + (head + 1) * size
      )
      pre[rows] += h[units] @ params["w_h"][head][:, columns]
  i_pre, f_pre, z_pre, o_pre = np.split(pre, 4)
  log_f = _log_sigmoid(f_pre)
  # NX-AI's code starts the stabiliser at ĩ while n is zero.
  m_new = np.where(n == 0, i_pre, np.maximum(log_f + m, i_pre))
  # ... and caps the gates at 1 (f = 1 multiplies n = 0 there).
  i = np.minimum(np.exp(i_pre - m_new), 1.0)
  f = np.minimum(np.exp(log_f + m - m_new), 1.0)
  new_c = f * c + i * np.tanh(z_pre)
  new_n = f * n + i
  new_h = _sigmoid(o_pre) * new_c / new_n
  return (new_c, new_n, m_new, new_h), new_h


def mlstm_step(params, carry, x):
  """One mLSTM step of the contract's equations, for one sequence."""
  c, n, m = carry
  heads = m.shape[0]
  size = c.shape[-1]
  q, k, v = (
    (x @ params[name]).reshape(heads, size) for name in ("w_q", "w_k", "w_v")
  )
  k = k / np.sqrt(size)
  gates = x @ params["w_if"] + params["b_if"]
  new_c, new_n, new_m, h = [], [], [], []
  for head in range(heads):
    log_f = _log_sigmoid(gates[heads + head])
    i_pre = gates[head]
    m_new = max(log_f + m[head], i_pre)
    i, f = np.exp(i_pre - m_new), np.exp(log_f + m[head] - m_new)
    c_head = f * c[head] + i * np.outer(v[head], k[head])
    n_head = f * n[head] + i * k[head]
    denominator = max(abs(n_head @ q[head]), np.exp(-m_new)) + 1e-6
    h.append(c_head @ q[head] / denominator)
    new_c.append(c_head)
    new_n.append(n_head)
    new_m.append(m_new)
  output = _sigmoid(x @ params["w_o"] + params["b_o"]) * np.concatenate(h)
  return (np.stack(new_c), np.stack(new_n), np.array(new_m)), output


STEPS = {"slstm": slstm_step, "mlstm": mlstm_step}


def reference(
  kind, params, inputs, ids, initial, *, reverse=False, keep_order=False
):
  """Each segment of each row run on its own: ``inputs (B, T, D)``.

  ``initial`` is the carry, leaves with a leading batch axis. Returns
  ``(final, outputs (B, T, F), segment_carries)``: the last, per row, the
  carry after each segment in order. All float64.
  """
  params = {k: np.asarray(v, np.float64) for k, v in params.items()}
  inputs = np.asarray(inputs, np.float64)
  initial = [np.asarray(leaf, np.float64) for leaf in initial]
  batch, time = ids.shape
  outputs = np.zeros((batch, time, FEATURES))
  finals = [leaf.copy() for leaf in initial]
  segment_carries = []
  for row in range(batch):
    row_carries = []
    for steps in test_utils.segments_of(ids[row]):
      order = steps[::-1] if reverse else steps
      carry = tuple(leaf[row] for leaf in initial)
      for position, t in zip(steps, order, strict=True):
        carry, y = STEPS[kind](params, carry, inputs[row, t])
        outputs[row, t if keep_order or not reverse else position] = y
      for leaf, part in zip(finals, carry, strict=True):
        leaf[row] = part
      row_carries.append(carry)
    segment_carries.append(row_carries)
  return tuple(finals), outputs, segment_carries


def _random(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _initial_carry(kind, batch, seed):
  """A random carry (``n > 0`` for the sLSTM, as a carry it produced)."""
  size = FEATURES // HEADS
  if kind == "slstm":
    shapes = [(batch, FEATURES)] * 4
  else:
    shapes = [(batch, HEADS, size, size), (batch, HEADS, size), (batch, HEADS)]
  carry = [0.5 * _random(shape, seed + n) for n, shape in enumerate(shapes)]
  if kind == "slstm":
    carry[1] = 1.0 + np.abs(carry[1])
  return tuple(carry)


def _cell_params(params):
  (cell,) = params.values()
  return cell


@functools.cache
def _model(kind, fused=True, **rnn_options):
  """Jitted ``(params, x, ids, carry, w_out, w_final) -> (final, y, grads)``.

  ``grads`` are those of ``Σ w_out·y + Σ w_final·final`` with respect to
  the parameters, ``x`` and the initial carry.
  """

  def forward(x, ids, carry):
    cell = CELLS[kind](FEATURES, num_heads=HEADS)
    return hk_rnn.RNN(cell, fused=fused, **rnn_options)(
      x, ids, initial_carry=carry
    )

  model = test_utils.transform(forward)
  return model, test_utils.weighted_sum_and_grads(model)


def _setup(kind, ids, seed=0):
  batch, time = ids.shape
  x = test_utils.inputs_with_bad_padding((batch, time, INPUTS), seed, ids)
  carry = _initial_carry(kind, batch, seed + 1)
  model, _ = _model(kind)
  params = model.init(jax.random.PRNGKey(seed), x, ids, carry)
  # Non-zero everywhere (w_if starts at zero), gates differing by block.
  params = jax.tree.map(lambda p: p + 0.5 * _random(p.shape, seed + 2), params)
  w_out = _random((batch, time, FEATURES), seed + 3)
  w_final = tuple(
    _random(leaf.shape, seed + 4 + n) for n, leaf in enumerate(carry)
  )
  return params, x, carry, w_out, w_final


def _close(test, got, want, tolerance):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(
      np.asarray(a, np.float64), b, rtol=tolerance, atol=tolerance
    )


TOLERANCE = {"slstm": 1e-5, "mlstm": 1e-4}
WHOLE_SEQUENCE_KERNELS = {"slstm": "_slstm_engine", "mlstm": "mlstm_chunkwise"}


class MatchesFloat64LoopTest(parameterized.TestCase):
  """Values and gradients equal the per-sequence float64 loop."""

  @parameterized.parameters(
    *itertools.product(CELLS, (False, True), [{}]),
    *itertools.product(
      CELLS, (True,), [dict(reverse=True), dict(reverse=True, keep_order=True)]
    ),
  )
  def test_values_and_gradients(self, kind, fused, direction):
    _, run = _model(kind, fused, **direction)
    params, x, carry, w_out, w_final = _setup(kind, IDS)
    kernel = WHOLE_SEQUENCE_KERNELS[kind]
    with mock.patch.object(xlstm, kernel, wraps=getattr(xlstm, kernel)) as spy:
      final, outputs, (g_params, g_x, g_carry) = run(
        params, x, IDS, carry, w_out, w_final
      )
    # Traced once here (jit caches per test case): the whole-sequence path
    # runs the cell's kernel, the step path never does.
    self.assertEqual(spy.call_count, int(fused))
    cell = {
      k: np.asarray(v, np.float64) for k, v in _cell_params(params).items()
    }
    want_final, want_outputs, _ = reference(
      kind, cell, x, IDS, carry, **direction
    )
    _close(self, final, want_final, TOLERANCE[kind])
    _close(self, outputs, want_outputs, TOLERANCE[kind])
    self.assertTrue(np.all(np.asarray(outputs)[IDS == 0] == 0))

    # The gradient along a random direction of (cell params, carry), against
    # central differences of the float64 loop.
    d_params = {k: np.float64(_random(v.shape, 7)) for k, v in cell.items()}
    d_carry = [np.float64(_random(leaf.shape, 8)) for leaf in carry]

    def reference_loss(step):
      moved = {k: cell[k] + step * d_params[k] for k in cell}
      start = [
        np.float64(a) + step * d for a, d in zip(carry, d_carry, strict=True)
      ]
      final, outputs, _ = reference(kind, moved, x, IDS, start, **direction)
      return np.sum(w_out * outputs) + sum(
        np.sum(w * leaf) for w, leaf in zip(w_final, final, strict=True)
      )

    epsilon = 1e-6
    numeric = (reference_loss(epsilon) - reference_loss(-epsilon)) / (
      2 * epsilon
    )
    g_cell = _cell_params(g_params)
    analytic = sum(
      np.sum(np.asarray(g_cell[k], np.float64) * d_params[k]) for k in cell
    ) + sum(
      np.sum(np.asarray(g, np.float64) * d)
      for g, d in zip(g_carry, d_carry, strict=True)
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-4)
    # NaN/inf padding reaches no gradient; padded inputs get exactly zero.
    g_x = np.asarray(g_x)
    self.assertTrue(np.all(np.isfinite(g_x)))
    self.assertTrue(np.all(g_x[IDS == 0] == 0))
    for leaf in jax.tree.leaves(g_params):
      self.assertTrue(np.all(np.isfinite(leaf)))


class WholeSequenceMatchesStepTest(parameterized.TestCase):
  """At T = 150 (mLSTM chunks of 32), the whole-sequence path = the step path."""

  @parameterized.parameters(*CELLS)
  def test_long_packed_rows(self, kind):
    ids = np.zeros((2, 150), np.int32)
    ids[0, :] = 1
    # Segments start and padding sits inside and across chunk boundaries.
    ids[1, :60], ids[1, 60:70], ids[1, 70:140] = 1, 2, 3
    params, x, carry, w_out, w_final = _setup(kind, ids)
    params = jax.tree.map(lambda p: 0.5 * p, params)
    step = _model(kind, fused=False)[1](params, x, ids, carry, w_out, w_final)
    whole = _model(kind)[1](params, x, ids, carry, w_out, w_final)
    for got, want in zip(
      jax.tree.leaves(whole), jax.tree.leaves(step), strict=True
    ):
      scale = np.max(np.abs(want))
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


@functools.cache
def _long_run(kind):
  """Jitted ``(params, x) -> (outputs, final, grads)`` from the zero carry."""

  def forward(x):
    return hk_rnn.RNN(CELLS[kind](2))(x)

  model = test_utils.transform(forward)

  def loss(params, x):
    final, outputs = model.apply(params, x)
    return jnp.sum(jnp.sin(outputs)) + sum(jnp.sum(leaf) for leaf in final), (
      outputs,
      final,
    )

  @jax.jit
  def run(params, x):
    grads, (outputs, final) = jax.grad(loss, has_aux=True)(params, x)
    return outputs, final, grads

  return model, run


class StabiliserTest(parameterized.TestCase):
  """Large gate pre-activations over many steps neither overflow nor NaN.

  Unstabilised, the sLSTM's ``n`` grows like ``Σ e^{ĩ}``: with ĩ ≈ 40 it
  passes float32's range at the first step; with ĩ ≈ -200 the first
  ``e^{ĩ}`` underflows to 0 and ``c/n`` is 0/0.
  """

  @parameterized.parameters(
    ("slstm", 10_000, 40.0, 40.0),
    ("slstm", 10_000, -200.0, 8.0),
    ("mlstm", 2_000, 40.0, 40.0),
    ("mlstm", 2_000, -30.0, 8.0),
  )
  def test_long_sequence_with_large_biases(self, kind, time, i_bias, f_bias):
    x = 0.5 * _random((1, time, INPUTS), 11)
    model, run = _long_run(kind)
    params = model.init(jax.random.PRNGKey(0), x)
    cell_name = next(iter(params))
    cell = dict(params[cell_name])
    bias_name = "b" if kind == "slstm" else "b_if"
    bias = np.asarray(cell[bias_name]).copy()
    width = bias.size // (4 if kind == "slstm" else 2)
    bias[:width] = i_bias
    bias[width : 2 * width] = f_bias
    cell[bias_name] = jnp.asarray(bias)
    params = {cell_name: cell}
    outputs, final, grads = run(params, x)
    for leaf in (outputs, *final, *jax.tree.leaves(grads)):
      self.assertTrue(np.all(np.isfinite(leaf)))
    want_final, want_outputs, _ = reference_long(kind, cell, x[0])
    np.testing.assert_allclose(outputs[0], want_outputs, rtol=1e-3, atol=1e-4)
    self.assertTrue(np.all(np.isfinite(want_outputs)))


def reference_long(kind, cell, x):
  """The float64 loop over one long sequence from the zero carry."""
  params = {k: np.asarray(v, np.float64) for k, v in cell.items()}
  features = 2
  if kind == "slstm":
    carry = tuple(np.zeros(features) for _ in range(4))
  else:
    carry = (np.zeros((1, 2, 2)), np.zeros((1, 2)), np.zeros(1))
  outputs = []
  for t in range(x.shape[0]):
    carry, y = STEPS[kind](params, carry, np.float64(x[t]))
    outputs.append(y)
  return carry, np.stack(outputs), None


class CompositionTest(parameterized.TestCase):
  """Bidirectional, StackedRNN, streaming, per-segment carries, dropout."""

  def test_stacked_bidirectional_equals_step_path(self):
    lengths = np.array([7, 4, 0, 2])

    def forward(x, lengths, fused):
      def rnn(cell):
        return hk_rnn.RNN(cell, fused=fused)

      stack = hk_rnn.StackedRNN(
        [
          hk_rnn.Bidirectional(
            rnn(hk_rnn.SLSTMCell(4, num_heads=2)),
            rnn(hk_rnn.MLSTMCell(4, num_heads=2)),
          ),
          rnn(hk_rnn.SLSTMCell(FEATURES)),
        ]
      )
      return stack(x, seq_lengths=lengths)

    model = test_utils.transform(forward)
    x = test_utils.inputs_with_bad_padding((4, 7, INPUTS), 3)
    params = model.init(jax.random.PRNGKey(0), x, lengths, True)
    params = jax.tree.map(lambda p: p + 0.3 * _random(p.shape, 4), params)
    run = jax.jit(
      functools.partial(test_utils.value_and_grad, model), static_argnums=3
    )
    fused, stepped = (run(params, x, lengths, f) for f in (True, False))
    test_utils.tree_allclose(self, fused, stepped, atol=1e-4, rtol=1e-4)

  @parameterized.parameters(*CELLS)
  def test_streaming_chunks_equal_one_run(self, kind):
    # Segments and padding cross the chunk boundary at 6.
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
      cell = CELLS[kind](FEATURES, num_heads=HEADS)
      return hk_rnn.RNN(cell)(
        x,
        ids,
        initial_carry=initial_carry,
        initial_segment_ids=initial_segment_ids,
      )

    model = test_utils.transform(forward)
    params = model.init(jax.random.PRNGKey(0), x, ids)
    params = jax.tree.map(lambda p: p + 0.3 * _random(p.shape, 5), params)
    zero_carry = jax.tree.map(jnp.zeros_like, _initial_carry(kind, 3, 0))
    chunk_apply = jax.jit(model.apply)

    def streamed(params):
      carry = zero_carry
      previous = jnp.zeros((3,), jnp.int32)  # matches no segment
      outputs = []
      for start in (0, 6):
        chunk_ids = ids[:, start : start + 6]
        carry, y = chunk_apply(
          params, x[:, start : start + 6], chunk_ids, carry, previous
        )
        previous = hk_rnn.last_segment_ids(chunk_ids, previous)
        outputs.append(y)
      return carry, jnp.concatenate(outputs, axis=1)

    want_final, want_outputs, _ = reference(
      kind, _cell_params(params), x, ids, zero_carry
    )
    final, outputs = streamed(params)
    _close(self, final, want_final, TOLERANCE[kind])
    _close(self, outputs, want_outputs, TOLERANCE[kind])

    def loss(carry_and_outputs):
      final, outputs = carry_and_outputs
      return sum(jnp.sum(jnp.sin(leaf)) for leaf in final) + jnp.sum(
        jnp.sin(2 * outputs)
      )

    test_utils.tree_allclose(
      self,
      jax.jit(jax.grad(lambda p: loss(streamed(p))))(params),
      jax.jit(jax.grad(lambda p: loss(model.apply(p, x, ids))))(params),
      atol=1e-4,
      rtol=1e-4,
    )

  @parameterized.parameters(*itertools.product(CELLS, (True, False)))
  def test_max_segments_gives_each_segments_carry(self, kind, fused):
    def forward(x, ids):
      cell = CELLS[kind](FEATURES, num_heads=HEADS)
      return hk_rnn.RNN(cell, fused=fused)(x, ids, max_segments=3)

    model = test_utils.transform(forward)
    x = test_utils.inputs_with_bad_padding((4, 7, INPUTS), 6, IDS)
    params = model.init(jax.random.PRNGKey(0), x, IDS)
    params = jax.tree.map(lambda p: p + 0.3 * _random(p.shape, 6), params)
    carries, _ = jax.jit(model.apply)(params, x, IDS)
    zero = jax.tree.map(np.zeros_like, _initial_carry(kind, 4, 0))
    _, _, want = reference(kind, _cell_params(params), x, IDS, zero)
    for row in range(4):
      for slot in range(3):
        got = [np.asarray(leaf)[row, slot] for leaf in carries]
        if slot < len(want[row]):
          expected = want[row][slot]
        else:
          expected = [leaf[row] for leaf in zero]
        _close(self, got, expected, TOLERANCE[kind])

  def test_recurrent_dropout_same_masks_either_path(self):
    def forward(x, lengths, fused):
      cell = hk_rnn.SLSTMCell(
        FEATURES, num_heads=HEADS, recurrent_dropout_rate=0.4
      )
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

    def value_and_grad(params, x, fused):
      def loss(params):
        return jnp.sum(jnp.sin(model.apply(params, key, x, lengths, fused)[1]))

      return model.apply(params, key, x, lengths, fused), jax.grad(loss)(params)

    run = jax.jit(value_and_grad, static_argnums=2)
    test_utils.tree_allclose(self, run(params, x, True), run(params, x, False))
    without = test_utils.transform(
      lambda x: hk_rnn.RNN(hk_rnn.SLSTMCell(FEATURES, num_heads=HEADS))(
        x, seq_lengths=lengths
      )
    ).apply(params, x)
    self.assertFalse(np.allclose(run(params, x, True)[0][1], without[1]))

  def test_time_major_and_vmap(self):
    def forward(x, ids):
      cell = hk_rnn.MLSTMCell(FEATURES, num_heads=HEADS)
      return hk_rnn.RNN(cell, time_major=True)(x, ids)

    model = test_utils.transform(forward)
    x = test_utils.inputs_with_bad_padding((4, 7, INPUTS), 7, IDS)
    params = model.init(jax.random.PRNGKey(0), x.swapaxes(0, 1), IDS.T)
    xs = np.stack(
      [x, test_utils.inputs_with_bad_padding(x.shape, 8, IDS)]
    ).swapaxes(1, 2)
    final, outputs = jax.vmap(jax.jit(model.apply), (None, 0, None))(
      params, xs, IDS.T
    )
    zero = jax.tree.map(np.zeros_like, _initial_carry("mlstm", 4, 0))
    for n in range(2):
      want_final, want_outputs, _ = reference(
        "mlstm", _cell_params(params), xs[n].swapaxes(0, 1), IDS, zero
      )
      _close(self, outputs[n].swapaxes(0, 1), want_outputs, 1e-4)
      _close(self, [leaf[n] for leaf in final], want_final, 1e-4)


class OptionsTest(absltest.TestCase):
  def _construct(self, cell_class, *args, **options):
    hk.transform(lambda: cell_class(*args, **options)).init(None)

  def test_bad_options_are_value_errors(self):
    for cell in CELLS.values():
      with self.assertRaisesRegex(
        ValueError, "features must be a multiple of num_heads"
      ):
        self._construct(cell, 6, num_heads=4)
      with self.assertRaisesRegex(
        ValueError, "num_heads must be a positive int, got 0"
      ):
        self._construct(cell, 4, num_heads=0)
      with self.assertRaisesRegex(ValueError, "features must be a positive"):
        self._construct(cell, 0)
    with self.assertRaisesRegex(
      ValueError, r"recurrent_dropout_rate must be 0 .* got 0.1"
    ):
      self._construct(hk_rnn.MLSTMCell, 4, recurrent_dropout_rate=0.1)

  def test_parameter_layout_and_carry(self):
    def step(x):
      slstm = hk_rnn.SLSTMCell(6, num_heads=3)
      mlstm = hk_rnn.MLSTMCell(6, num_heads=3)
      return (
        slstm(slstm.initialize_carry(x), x),
        mlstm(mlstm.initialize_carry(x), x),
      )

    model = test_utils.transform(step)
    x = jnp.ones((2, 5))
    params = model.init(jax.random.PRNGKey(0), x)
    shapes = jax.tree.map(lambda p: p.shape, params)
    self.assertEqual(
      shapes,
      {
        "slstm_cell": {"w_i": (5, 24), "w_h": (3, 2, 8), "b": (24,)},
        "mlstm_cell": {
          "w_q": (5, 6),
          "w_k": (5, 6),
          "w_v": (5, 6),
          "w_o": (5, 6),
          "b_o": (6,),
          "w_if": (5, 6),
          "b_if": (6,),
        },
      },
    )
    (s_carry, s_out), (m_carry, m_out) = model.apply(params, x)
    self.assertEqual([c.shape for c in s_carry], [(2, 6)] * 4)
    self.assertEqual(
      [c.shape for c in m_carry], [(2, 3, 2, 2), (2, 3, 2), (2, 3)]
    )
    self.assertEqual((s_out.shape, m_out.shape), ((2, 6), (2, 6)))
    # The forget-gate biases start at linspace(3, 6).
    np.testing.assert_allclose(
      params["slstm_cell"]["b"][6:12], np.linspace(3, 6, 6)
    )
    np.testing.assert_allclose(
      params["mlstm_cell"]["b_if"][3:], np.linspace(3, 6, 3)
    )

  def test_block_diagonal_weight_feeds_only_its_head(self):
    w_h = jnp.asarray(_random((2, 3, 12), 9))
    dense = xlstm._block_diagonal(w_h)  # noqa: SLF001
    h = jnp.asarray(_random((5, 6), 10))
    np.testing.assert_allclose(
      h @ dense,
      xlstm._slstm_recurrent(h, w_h),
      rtol=1e-5,
      atol=1e-5,  # noqa: SLF001
    )
    self.assertEqual(float(jnp.abs(dense[:3, 3:6]).sum()), 0.0)


if __name__ == "__main__":
  absltest.main()
