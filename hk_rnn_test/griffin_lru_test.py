"""Tests of RGLRUCell, GriffinCell and LRUCell.

The oracle is a float64 numpy loop over each sequence (each segment of a
packed row) on its own, with the cells' equations written out again,
including the RG-LRU's first-step rule and the convolution's history.
Gradients are checked against it as directional derivatives (central
differences of the float64 loop along a random direction), and the
whole-sequence path against the step path (``fused=False``) directly.
A comparison with google-deepmind/recurrentgemma's own modules runs where
recurrentgemma is installed.
"""

import functools
import itertools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn._src import griffin
from hk_rnn_test import test_utils

WIDTH, HEADS, CONV_WIDTH, STATE = 4, 2, 3, 5
KINDS = ("rglru", "griffin", "lru")
# Row 0 is full, row 1 packs segments of 2, 1 and 3 steps, row 2 is padded,
# row 3 empty.
IDS = np.array(
  [
    [1, 1, 1, 1, 1, 1, 1],
    [1, 1, 2, 3, 3, 3, 0],
    [4, 4, 4, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
  ],
  np.int32,
)


def _make_cell(kind):
  if kind == "rglru":
    return hk_rnn.RGLRUCell(WIDTH, num_heads=HEADS)
  if kind == "griffin":
    return hk_rnn.GriffinCell(WIDTH, num_heads=HEADS, conv_width=CONV_WIDTH)
  return hk_rnn.LRUCell(WIDTH, state_size=STATE, r_min=0.5, r_max=0.95)


# ------------------------------------------------------------ the oracle


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _softplus(x):
  return np.log1p(np.exp(x))


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _entry(params, suffix):
  """The params entry whose module name ends with ``suffix``."""
  (name,) = [name for name in params if name.endswith(suffix)]
  return {k: np.asarray(v, np.float64) for k, v in params[name].items()}


def _block_diagonal(entry, x):
  heads, size = entry["b"].shape
  blocks = x.reshape(heads, size)
  return (np.einsum("hi,hij->hj", blocks, entry["w"]) + entry["b"]).ravel()


def rglru_step(params, prefix, h, x, start):
  """h' = a h + √(1−a²) i x; at a first step h' = a h + i x."""
  a_param = _entry(params, prefix)["a_param"]
  i = _sigmoid(_block_diagonal(_entry(params, prefix + "/~/input_gate"), x))
  r = _sigmoid(_block_diagonal(_entry(params, prefix + "/~/a_gate"), x))
  a = np.exp(-8.0 * r * _softplus(a_param))
  multiplier = 1.0 if start else np.sqrt(1 - a**2)
  h = a * h + multiplier * i * x
  return h, h


def griffin_step(params, carry, x, start):
  conv_state, h = carry
  dense = {
    name: _entry(params, "griffin_cell/~/" + name)
    for name in ("linear_y", "linear_x", "linear_out", "conv_1d")
  }
  y = _gelu(x @ dense["linear_y"]["w"] + dense["linear_y"]["b"])
  u = x @ dense["linear_x"]["w"] + dense["linear_x"]["b"]
  window = np.concatenate([conv_state, u[None]])
  v = (window * dense["conv_1d"]["w"]).sum(0) + dense["conv_1d"]["b"]
  h, _ = rglru_step(params, "griffin_cell/~/rg_lru", h, v, start)
  out = (h * y) @ dense["linear_out"]["w"] + dense["linear_out"]["b"]
  return (window[1:], h), out


def lru_step(params, h, x, start):
  del start  # the LRU has no first-step rule
  p = _entry(params, "lru_cell")
  lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
  h = lam * h + np.exp(p["gamma_log"]) * (x @ (p["b_re"] + 1j * p["b_im"]))
  return h, np.real(h @ (p["c_re"] + 1j * p["c_im"])) + p["d"] * x


def _step(kind, params, carry, x, start):
  if kind == "rglru":
    return rglru_step(params, "rglru_cell", carry, x, start)
  if kind == "griffin":
    return griffin_step(params, carry, x, start)
  return lru_step(params, carry, x, start)


def reference(kind, params, inputs, ids, initial, *, reverse=False):
  """Every segment of every row from ``initial`` (a per-row carry tree).

  Returns ``(finals, outputs, segment_finals)``: the carry after each
  row's last segment, outputs in processing order (padding 0), and a list
  per row of the carry after each of its segments; float64 (complex128).
  """
  inputs = np.asarray(inputs, np.float64)
  batch, time = ids.shape
  outputs = None
  finals, segment_finals = [], []
  for row in range(batch):
    row_initial = jax.tree.map(lambda leaf, r=row: np.asarray(leaf)[r], initial)
    carry, per_segment = row_initial, []
    for steps in test_utils.segments_of(ids[row]):
      carry = row_initial
      order = steps[::-1] if reverse else steps
      for k, (position, t) in enumerate(zip(steps, order, strict=True)):
        carry, y = _step(kind, params, carry, inputs[row, t], k == 0)
        if outputs is None:
          outputs = np.zeros((batch, time, y.shape[-1]))
        outputs[row, position] = y
      per_segment.append(carry)
    finals.append(carry)
    segment_finals.append(per_segment)
  finals = jax.tree.map(lambda *rows: np.stack(rows), *finals)
  return finals, outputs, segment_finals


# ----------------------------------------------------------- the models


_inputs = test_utils.inputs_with_bad_padding


def _real_parts(tree):
  """Complex leaves split into real and imaginary parts."""
  return jax.tree.map(
    lambda leaf: (
      jnp.stack([leaf.real, leaf.imag]) if jnp.iscomplexobj(leaf) else leaf
    ),
    tree,
  )


@functools.cache
def _model(kind, fused=True, reverse=False):
  """``(transformed, jitted run)``; ``run(params, x, ids, carry, w_out,
  w_final) -> (final, outputs, (grad params, grad x))`` for the loss
  ``Σ w_out·y + Σ w_final·final`` (complex carries as real and imaginary
  parts)."""

  def forward(x, ids, carry):
    return hk_rnn.RNN(_make_cell(kind), fused=fused, reverse=reverse)(
      x, ids, initial_carry=carry
    )

  model = test_utils.transform(forward)

  def loss(params, x, ids, carry, w_out, w_final):
    final, outputs = model.apply(params, x, ids, carry)
    finals = jax.tree.leaves(_real_parts(final))
    return jnp.sum(w_out * outputs) + sum(
      jnp.sum(w * leaf) for w, leaf in zip(w_final, finals, strict=True)
    ), (final, outputs)

  @jax.jit
  def run(params, x, ids, carry, w_out, w_final):
    grads, (final, outputs) = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      params, x, ids, carry, w_out, w_final
    )
    return final, outputs, grads

  return model, run


@functools.cache
def _setup(kind):
  """Params, NaN-padded inputs, a non-zero initial carry and loss weights."""
  x = _inputs((*IDS.shape, WIDTH), 0, IDS)
  model, _ = _model(kind)
  zero = jax.eval_shape(
    lambda: _make_carry(kind, jnp.zeros((IDS.shape[0], WIDTH)))
  )
  rng = np.random.default_rng(3)

  def draw(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
      parts = rng.normal(size=(2, *leaf.shape)) * 0.5
      return jnp.asarray(parts[0] + 1j * parts[1], leaf.dtype)
    return jnp.asarray(rng.normal(size=leaf.shape) * 0.5, leaf.dtype)

  carry = jax.tree.map(draw, zero)
  params = jax.jit(model.init)(
    jax.random.key(0), jnp.asarray(np.nan_to_num(x)), IDS, carry
  )
  w_out = rng.normal(size=(*IDS.shape, WIDTH)).astype(np.float32)
  w_final = [
    rng.normal(size=leaf.shape).astype(np.float32)
    for leaf in jax.tree.leaves(_real_parts(carry))
  ]
  return params, x, carry, w_out, w_final


def _make_carry(kind, sample):
  return hk.transform(lambda s: _make_cell(kind).initialize_carry(s)).apply(
    {}, None, sample
  )


def _loss_weights_of(kind, final, outputs, w_out, w_final):
  finals = jax.tree.leaves(_real_parts(final))
  return np.sum(w_out * outputs) + sum(
    np.sum(w * leaf) for w, leaf in zip(w_final, finals, strict=True)
  )


class MatchesFloat64LoopTest(parameterized.TestCase):
  """Values and gradients equal the per-sequence float64 loop, and the
  whole-sequence path's gradients equal the step path's."""

  @parameterized.parameters(*itertools.product(KINDS, (False, True)))
  def test_packed_padded_rows(self, kind, reverse):
    params, x, carry, w_out, w_final = _setup(kind)
    # The step path in the forward direction only: reversing is RNN's
    # flip, the same for both paths.
    results = {
      fused: _model(kind, fused, reverse)[1](
        params, x, IDS, carry, w_out, w_final
      )
      for fused in ((True,) if reverse else (True, False))
    }
    final, outputs, (g_params, g_x) = results[True]
    want_final, want_outputs, _ = reference(
      kind, params, x, IDS, carry, reverse=reverse
    )
    test_utils.tree_allclose(self, final, want_final)
    np.testing.assert_allclose(outputs, want_outputs, rtol=1e-5, atol=1e-5)
    self.assertTrue(np.all(np.asarray(outputs)[IDS == 0] == 0))
    if not reverse:  # the step path: the same values and gradients
      test_utils.tree_allclose(self, results[False], results[True], atol=1e-4)

    # The gradient along a random direction of the params, against central
    # differences of the float64 loop.
    rng = np.random.default_rng(7)
    direction = jax.tree.map(lambda p: rng.normal(size=p.shape), params)

    def reference_loss(step):
      moved = jax.tree.map(
        lambda p, d: np.asarray(p, np.float64) + step * d, params, direction
      )
      final, outputs, _ = reference(kind, moved, x, IDS, carry, reverse=reverse)
      final = jax.tree.map(
        lambda leaf: (
          np.stack([leaf.real, leaf.imag]) if np.iscomplexobj(leaf) else leaf
        ),
        final,
      )
      return _loss_weights_of(kind, final, outputs, w_out, w_final)

    epsilon = 1e-6
    numeric = (reference_loss(epsilon) - reference_loss(-epsilon)) / (
      2 * epsilon
    )
    analytic = sum(
      np.sum(np.asarray(g, np.float64) * d)
      for g, d in zip(
        jax.tree.leaves(g_params), jax.tree.leaves(direction), strict=True
      )
    )
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-4)
    # NaN/inf padding reaches no gradient; padded inputs get exactly zero.
    g_x = np.asarray(g_x)
    self.assertTrue(np.all(np.isfinite(g_x)))
    self.assertTrue(np.all(g_x[IDS == 0] == 0))


@functools.cache
def _plain_model(kind, fused=True):
  """Jitted ``apply(params, x, ids, carry, segment_ids) -> (carry, y)``,
  with ``max_segments=3`` when ``ids`` has packed rows."""

  def forward(x, ids, carry=None, initial_segment_ids=None, max_segments=None):
    return hk_rnn.RNN(_make_cell(kind), fused=fused)(
      x,
      ids,
      initial_carry=carry,
      initial_segment_ids=initial_segment_ids,
      max_segments=max_segments,
    )

  model = test_utils.transform(forward)
  return model, jax.jit(model.apply, static_argnames="max_segments")


class RNNFeaturesTest(parameterized.TestCase):
  @parameterized.parameters(*KINDS)
  def test_streaming_chunks_equal_one_run(self, kind):
    # Segments and padding cross the chunk boundaries at 4 and 8; the
    # Griffin's convolution reads across them, the RG-LRU's first-step rule
    # must not fire there.
    ids = np.array(
      [
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        [1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3],
        [4, 4, 4, 4, 6, 6, 6, 6, 6, 9, 9, 9],
      ],
      np.int32,
    )
    x = _inputs((3, 12, WIDTH), 4)
    model, apply = _plain_model(kind)
    params = jax.jit(model.init)(jax.random.key(0), x, ids)
    carry = _make_carry(kind, jnp.zeros((3, WIDTH)))
    previous = jnp.zeros((3,), jnp.int32)  # matches no segment
    outputs = []
    for start in range(0, 12, 4):
      chunk_ids = ids[:, start : start + 4]
      carry, y = apply(
        params, x[:, start : start + 4], chunk_ids, carry, previous
      )
      previous = hk_rnn.last_segment_ids(chunk_ids, previous)
      outputs.append(y)
    zero = _make_carry(kind, jnp.zeros((3, WIDTH)))
    want_final, want_outputs, _ = reference(kind, params, x, ids, zero)
    test_utils.tree_allclose(self, carry, want_final)
    np.testing.assert_allclose(
      np.concatenate(outputs, 1), want_outputs, rtol=1e-5, atol=1e-5
    )

  def test_griffin_lengths_and_an_initial_carry_whole_sequence_equals_step(
    self,
  ):
    # One sequence per row: the convolution's first taps read the initial
    # carry's history (no reset step marks the rows' starts).
    params, x, carry, _, _ = _setup("griffin")
    x = jnp.nan_to_num(x)
    lengths = jnp.array([7, 5, 3, 0])

    def forward(x, carry, fused):
      return hk_rnn.RNN(_make_cell("griffin"), fused=fused)(
        x, seq_lengths=lengths, initial_carry=carry
      )

    apply = jax.jit(test_utils.transform(forward).apply, static_argnums=3)
    fused, stepped = (apply(params, x, carry, f) for f in (True, False))
    test_utils.tree_allclose(self, fused, stepped)
    ids = np.asarray((np.arange(7)[None] < lengths[:, None]), np.int32)
    want_final, want_y, _ = reference("griffin", params, x, ids, carry)
    test_utils.tree_allclose(self, fused, (want_final, want_y))

  @parameterized.parameters(*KINDS)
  def test_max_segments_gives_each_segments_carry(self, kind):
    # The whole-sequence path's carries after every step (the step path's
    # come from RNN's generic loop).
    params, x, carry, _, _ = _setup(kind)
    _, apply = _plain_model(kind)
    per_segment, _ = apply(params, x, IDS, carry, max_segments=3)
    _, _, want = reference(kind, params, x, IDS, carry)
    for row, segments in enumerate(want):
      for slot in range(3):
        expected = (
          segments[slot]
          if slot < len(segments)
          else jax.tree.map(lambda leaf, r=row: np.asarray(leaf)[r], carry)
        )
        got = jax.tree.map(lambda leaf, r=row, s=slot: leaf[r, s], per_segment)
        test_utils.tree_allclose(self, got, expected)

  @parameterized.parameters(*KINDS)
  def test_bidirectional_equals_both_loops(self, kind):
    x = _inputs((*IDS.shape, WIDTH), 5, IDS)

    def forward(x, ids, fused):
      bi = hk_rnn.Bidirectional(
        hk_rnn.RNN(_make_cell(kind), fused=fused),
        hk_rnn.RNN(_make_cell(kind), fused=fused),
        merge_fn=lambda a, b: (a, b),
      )
      return bi(x, ids)

    model = test_utils.transform(forward)
    params = jax.jit(model.init, static_argnums=3)(
      jax.random.key(1), jnp.nan_to_num(x), IDS, True
    )
    apply = jax.jit(model.apply, static_argnums=3)
    (_, backward_final), (forward_y, backward_y) = apply(params, x, IDS, True)
    stepped = apply(params, x, IDS, False)
    test_utils.tree_allclose(
      self, stepped[1], (forward_y, backward_y), atol=1e-5
    )
    for half, y, reverse in (
      ("forward", forward_y, False),
      ("backward", backward_y, True),
    ):
      # The forward cell was created first: `<cell>`, the backward `<cell>_1`.
      first = half == "forward"
      own = {
        name.replace("_cell_1", "_cell"): entry
        for name, entry in params.items()
        if ("_cell_1" not in name) == first
      }
      zero = _make_carry(kind, jnp.zeros((IDS.shape[0], WIDTH)))
      want_final, want_y, _ = reference(
        kind, own, x, IDS, zero, reverse=reverse
      )
      if reverse:
        # Bidirectional returns the backward outputs in input order.
        want_y = np.asarray(hk_rnn.flip_sequences(want_y, IDS), np.float64)
        test_utils.tree_allclose(self, backward_final, want_final)
      np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)


class OwnLinearCellTest(absltest.TestCase):
  def test_coefficients_may_take_segment_starts(self):
    class FirstStepScaled(hk_rnn.LinearRecurrentCell):
      """h' = ½ h + x, and h' = ½ h + 3x at a sequence's first step."""

      def coefficients(self, inputs, segment_starts):
        scale = jnp.where(segment_starts[:, None], 3.0, 1.0)
        return 0.5, scale * inputs

    def forward(x, ids, fused):
      return hk_rnn.RNN(FirstStepScaled(2), fused=fused)(x, ids)

    model = test_utils.transform(forward)
    x = _inputs((*IDS.shape, 2), 6, IDS)
    want = np.zeros(x.shape)
    for row in range(IDS.shape[0]):
      for steps in test_utils.segments_of(IDS[row]):
        h = np.zeros(2)
        for k, t in enumerate(steps):
          h = 0.5 * h + (3.0 if k == 0 else 1.0) * x[row, t]
          want[row, t] = h
    for fused in (True, False):
      _, y = model.apply({}, x, IDS, fused)
      np.testing.assert_allclose(y, want, rtol=1e-6)


class CellOptionsTest(parameterized.TestCase):
  def test_parameter_layouts(self):
    x = jnp.ones((2, 3, 8))
    shapes = lambda cell: jax.tree.map(  # noqa: E731
      jnp.shape,
      test_utils.transform(lambda x: hk_rnn.RNN(cell())(x)).init(
        jax.random.key(0), x
      ),
    )
    self.assertEqual(
      shapes(lambda: hk_rnn.RGLRUCell(8, num_heads=2)),
      {
        "rglru_cell": {"a_param": (8,)},
        "rglru_cell/~/input_gate": {"w": (2, 4, 4), "b": (2, 4)},
        "rglru_cell/~/a_gate": {"w": (2, 4, 4), "b": (2, 4)},
      },
    )
    griffin_shapes = shapes(
      lambda: hk_rnn.GriffinCell(6, num_heads=2, lru_width=4, conv_width=3)
    )
    self.assertEqual(
      griffin_shapes["griffin_cell/~/conv_1d"], {"w": (3, 4), "b": (4,)}
    )
    self.assertEqual(
      griffin_shapes["griffin_cell/~/linear_out"], {"w": (4, 6), "b": (6,)}
    )
    self.assertEqual(
      griffin_shapes["griffin_cell/~/rg_lru/~/a_gate"],
      {"w": (2, 2, 2), "b": (2, 2)},
    )
    self.assertEqual(
      shapes(lambda: hk_rnn.LRUCell(8, state_size=3)),
      {
        "lru_cell": {
          "nu_log": (3,),
          "theta_log": (3,),
          "gamma_log": (3,),
          "b_re": (8, 3),
          "b_im": (8, 3),
          "c_re": (3, 8),
          "c_im": (3, 8),
          "d": (8,),
        }
      },
    )

  def test_carry_dtypes(self):
    x = jnp.ones((2, 3, 4), jnp.bfloat16)

    def carries(x):
      rglru = hk_rnn.RNN(hk_rnn.RGLRUCell(4, dtype=jnp.bfloat16))(x)
      block = hk_rnn.RNN(hk_rnn.GriffinCell(4, dtype=jnp.bfloat16))(x)
      lru = hk_rnn.RNN(hk_rnn.LRUCell(4))(x.astype(jnp.float32))
      return rglru, block, lru

    (h, y), ((conv, h_block), y_block), (h_lru, y_lru) = (
      test_utils.init_and_apply(carries, x)[1]
    )
    self.assertEqual((h.dtype, y.dtype), (jnp.float32, jnp.bfloat16))
    self.assertEqual((conv.dtype, h_block.dtype), (jnp.bfloat16, jnp.float32))
    self.assertEqual(y_block.dtype, jnp.bfloat16)
    self.assertEqual((h_lru.dtype, y_lru.dtype), (jnp.complex64, jnp.float32))

  def test_initialisation_rings(self):
    def init(x):
      lru = hk_rnn.LRUCell(64, r_min=0.4, r_max=0.9, max_phase=math.pi / 10)
      rglru = hk_rnn.RGLRUCell(64, min_radius=0.9, max_radius=0.999)
      return hk_rnn.RNN(lru)(x), hk_rnn.RNN(rglru)(x)

    params = test_utils.transform(init).init(
      jax.random.key(0), jnp.ones((1, 2, 64))
    )
    lru = params["lru_cell"]
    modulus = np.exp(-np.exp(lru["nu_log"]))
    self.assertTrue(np.all((modulus >= 0.4 - 1e-6) & (modulus <= 0.9 + 1e-6)))
    phase = np.exp(lru["theta_log"])
    self.assertTrue(np.all((phase >= 0) & (phase <= math.pi / 10)))
    np.testing.assert_allclose(
      np.exp(lru["gamma_log"]), np.sqrt(1 - modulus**2), rtol=1e-5
    )
    a = np.exp(-np.log1p(np.exp(params["rglru_cell"]["a_param"])))
    self.assertTrue(np.all((a >= 0.9 - 1e-5) & (a <= 0.999 + 1e-5)))

  def test_bounded_square_root_gradient(self):
    grad = jax.grad(griffin.bounded_sqrt)
    self.assertAlmostEqual(float(grad(0.0)), 1000.0, places=3)
    self.assertAlmostEqual(float(grad(0.25)), 1.0, places=6)

  @parameterized.parameters(
    (
      lambda: hk_rnn.RGLRUCell(4, recurrent_dropout_rate=0.1),
      "recurrent_dropout",
    ),
    (
      lambda: hk_rnn.GriffinCell(4, recurrent_dropout_rate=0.1),
      "recurrent_dropout",
    ),
    (
      lambda: hk_rnn.LRUCell(4, recurrent_dropout_rate=0.1),
      "recurrent_dropout",
    ),
    (lambda: hk_rnn.RGLRUCell(6, num_heads=4), "num_heads must divide"),
    (
      lambda: hk_rnn.GriffinCell(6, lru_width=6, num_heads=4),
      "num_heads must divide",
    ),
    (lambda: hk_rnn.GriffinCell(6, conv_width=0), "conv_width"),
    (
      lambda: hk_rnn.RGLRUCell(4, min_radius=0.99, max_radius=0.9),
      "min_radius",
    ),
    (lambda: hk_rnn.LRUCell(4, r_min=0.9, r_max=0.5), "r_min"),
    (lambda: hk_rnn.LRUCell(4, state_size=0), "state_size"),
  )
  def test_bad_options_are_value_errors(self, make, message):
    with self.assertRaisesRegex(ValueError, message):
      hk.transform(make).init(jax.random.key(0))

  @parameterized.parameters("rglru", "lru")
  def test_wrong_input_size_is_a_value_error(self, kind):
    with self.assertRaisesRegex(ValueError, "must have 4 features.*got 5"):
      test_utils.init_and_apply(
        lambda x: hk_rnn.RNN(_make_cell(kind))(x), jnp.ones((2, 3, 5))
      )


class RecurrentgemmaTest(absltest.TestCase):
  """Against google-deepmind/recurrentgemma's own modules, where installed."""

  def setUp(self):
    super().setUp()
    try:
      from recurrentgemma.jax import layers, modules  # noqa: PLC0415
    except ImportError:
      self.skipTest("recurrentgemma (with einops, jaxtyping) is not installed")
    self.layers, self.modules = layers, modules

  # Row 1 packs three documents; recurrentgemma reads them from positions.
  IDS = np.array([[1] * 9, [1, 1, 2, 2, 2, 2, 3, 3, 3]], np.int32)

  def _positions(self):
    position = np.zeros_like(self.IDS)
    for t in range(1, self.IDS.shape[1]):
      same = self.IDS[:, t] == self.IDS[:, t - 1]
      position[:, t] = np.where(same, position[:, t - 1] + 1, 0)
    return jnp.asarray(position)

  def _variables(self, module, x):
    variables = module.init(jax.random.key(2), x, self._positions())
    rng = np.random.default_rng(0)
    return jax.tree.map(
      lambda v: v + 0.1 * rng.normal(size=v.shape).astype(v.dtype), variables
    )

  def test_rglru_packed_rows_and_streamed_with_its_cache(self):
    ids, position = self.IDS, self._positions()
    x = jnp.asarray(_inputs((*ids.shape, WIDTH), 8))
    rglru = self.layers.RGLRU(width=WIDTH, num_heads=HEADS)
    variables = self._variables(rglru, x)
    model, apply = _plain_model("rglru")
    params = hk_rnn.interop.from_recurrentgemma(
      variables, model.init(jax.random.key(0), x, ids)
    )
    want_y, want_h = rglru.apply(variables, x, position)
    h, y = apply(params, x, ids)
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(h, want_h, atol=1e-5)
    # Two chunks; recurrentgemma continues from its cache.
    first_y, cache = rglru.apply(variables, x[:, :4], position[:, :4])
    second_y, cache = rglru.apply(
      variables, x[:, 4:], position[:, 4:], cache=cache
    )
    h, first = apply(params, x[:, :4], ids[:, :4])
    continues = hk_rnn.last_segment_ids(ids[:, :4])
    h, second = apply(params, x[:, 4:], ids[:, 4:], h, continues)
    np.testing.assert_allclose(first, first_y, atol=1e-5)
    np.testing.assert_allclose(second, second_y, atol=1e-5)
    np.testing.assert_allclose(h, cache, atol=1e-5)

  def test_recurrent_block_packed_rows(self):
    ids, position = self.IDS, self._positions()
    x = jnp.asarray(_inputs((*ids.shape, WIDTH), 9))
    block = self.modules.RecurrentBlock(
      width=WIDTH, num_heads=HEADS, conv1d_temporal_width=CONV_WIDTH
    )
    variables = self._variables(block, x)
    want_y, cache = block.apply(variables, x, position)
    model, apply = _plain_model("griffin")
    params = hk_rnn.interop.from_recurrentgemma(
      variables, model.init(jax.random.key(0), x, ids)
    )
    (conv_state, h), y = apply(params, x, ids)
    np.testing.assert_allclose(y, want_y, atol=1e-5)
    np.testing.assert_allclose(h, cache.rg_lru_state, atol=1e-5)
    np.testing.assert_allclose(conv_state, cache.conv1d_state, atol=1e-5)


if __name__ == "__main__":
  absltest.main()
