"""Property-based tests of every mask path, with hypothesis.

Hypothesis draws the cases: a cell, a direction (forward, reverse, reverse
with keep_order, Bidirectional), a layout (0 to 2 batch axes, time-major or
not), a number of steps, and a mask: one sequence per row (given both as
lengths and as a mask) or packed rows with a random number of segments and
random ids, length-0 rows included. For each case:

- the fused kernels equal stepping the cell (values and gradients);
- every segment equals its run alone (`test_utils.reference_rnn`, a loop over
  each segment that knows nothing of masks);
- `seq_lengths` equals the same rows given as a mask;
- NaN in every padded input changes no output, carry or gradient;
- and every malformed mask (padding in the middle, decreasing ids, negative
  ids, an id that recurs after another) and every length outside
  `[0, time]` raises ValueError.

Compiling is what costs, so shapes come from a small fixed set (features
fixed, time in {1, 3, 6}, three batch shapes), parameters come from
`eval_shape` (no compiling), and each path (mask or lengths, fused or not) of
a layer configuration is compiled once, ahead of time and without XLA's
backend optimisations, into a function that runs it on the clean and the
NaN-padded inputs at once (`vmap`); the drawn masks and values are its
arguments.

Profiles: "ci" (the default, so also whenever CI is set) runs a fixed,
derandomized set of 40 cases per test, with no example database; its layer
configurations come from CI_CONFIGS, 8 that between them cover every cell,
direction, batch shape, time and layout, so that it compiles little (the
masks and values are drawn anew within them). `HYPOTHESIS_PROFILE=thorough`
draws 1000 random cases per test from all 288 configurations, for local
runs (many minutes; it keeps failing examples in `.hypothesis/`):

  HYPOTHESIS_PROFILE=thorough venv/bin/python -m pytest -n 0 \\
    hk_rnn_test/properties_test.py
"""

import functools
import itertools
import math
import os

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from hypothesis import strategies as st

import hk_rnn
from hk_rnn_test import test_utils

hypothesis.settings.register_profile(
  "ci",
  max_examples=40,
  derandomize=True,
  database=None,
  deadline=None,
  print_blob=True,
)
hypothesis.settings.register_profile(
  "thorough", max_examples=1000, deadline=None, print_blob=True
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
hypothesis.settings.load_profile(PROFILE)

FEATURES, INPUTS = 3, 2
KINDS = tuple(test_utils.CELLS)
DIRECTIONS = ("forward", "reverse", "reverse_keep_order", "bidirectional")
BATCH_SHAPES = ((), (3,), (2, 2))
TIMES = (1, 3, 6)
# Every layer configuration: (cell, direction, batch shape, time, time-major).
CONFIGS = tuple(
  itertools.product(KINDS, DIRECTIONS, BATCH_SHAPES, TIMES, (False, True))
)
# The "ci" profile's: each cell and each direction twice, every batch shape,
# time and layout at least twice, so that 8 compilations cover them all.
CI_CONFIGS = (
  ("lstm", "forward", (), 6, False),
  ("gru", "reverse", (3,), 3, True),
  ("simple", "reverse_keep_order", (2, 2), 6, False),
  ("mgu", "bidirectional", (3,), 1, False),
  ("lstm", "bidirectional", (2, 2), 3, True),
  ("gru", "reverse_keep_order", (), 1, True),
  ("simple", "forward", (3,), 6, True),
  ("mgu", "reverse", (2, 2), 6, False),
)


def _layer(kind, direction, use_fused, time_major):
  """The layer under test, built inside `hk.transform`."""

  def rnn(name, **options):
    cell = test_utils.CELLS[kind](FEATURES, name=f"{name}_cell")
    return hk_rnn.RNN(cell, fused=use_fused, time_major=time_major, **options)

  if direction == "bidirectional":
    return hk_rnn.Bidirectional(
      rnn("forward"), rnn("backward"), time_major=time_major
    )
  return rnn(
    "forward",
    reverse=direction != "forward",
    keep_order=direction == "reverse_keep_order",
  )


def _model(kind, direction, time_major):
  def forward(inputs, ids, lengths, by, use_fused):
    layer = _layer(kind, direction, use_fused, time_major)
    if by == "lengths":
      return layer(inputs, seq_lengths=lengths)
    return layer(inputs, ids)

  return test_utils.transform(forward)


@functools.cache
def _params(kind, direction):
  """Random parameters (non-zero biases too) for a layer of any layout.

  The parameters' shapes depend only on the cell and the direction, so
  `eval_shape` gives them without compiling anything.
  """
  model = _model(kind, direction, time_major=False)
  shapes = jax.eval_shape(
    functools.partial(model.init, by="mask", use_fused=True),
    jax.random.PRNGKey(0),
    jnp.zeros((1, 1, INPUTS)),
    jnp.ones((1, 1), jnp.int32),
    jnp.ones((1,), jnp.int32),
  )
  rng = np.random.default_rng(len(kind) * 7 + len(direction))
  return jax.tree.map(
    lambda leaf: (rng.normal(size=leaf.shape) * 0.5).astype(leaf.dtype),
    shapes,
  )


@functools.cache
def _compiled(kind, direction, batch_shape, time, time_major, by, use_fused):
  """One path of a layer, compiled once for a layout.

  Returns `run(params, inputs, ids, lengths)`: for the clean inputs and for
  the inputs with NaN at every padded step (stacked on a leading axis, by
  `vmap`), the layer's `(carry, outputs)` and the gradients of a loss of both
  w.r.t. the parameters and the inputs.
  """
  model = _model(kind, direction, time_major)
  shape = (time, *batch_shape) if time_major else (*batch_shape, time)
  weights = jnp.cos(jnp.arange(math.prod(shape) * FEATURES * 2))

  def loss(params, inputs, ids, lengths):
    carry, outputs = model.apply(params, inputs, ids, lengths, by, use_fused)
    total = jnp.sum(outputs * weights[: outputs.size].reshape(outputs.shape))
    for leaf in jax.tree.leaves(carry):
      total = total + jnp.sum(jnp.sin(leaf))
    return total, (carry, outputs)

  def run(params, inputs, ids, lengths):
    padding = (ids == 0)[..., None]
    both = jnp.stack([inputs, jnp.where(padding, jnp.nan, inputs)])
    grad_fn = jax.grad(loss, argnums=(0, 1), has_aux=True)
    grads, values = jax.vmap(grad_fn, in_axes=(None, 0, None, None))(
      params, both, ids, lengths
    )
    return values, grads

  arguments = (
    _params(kind, direction),
    jax.ShapeDtypeStruct((*shape, INPUTS), jnp.float32),
    jax.ShapeDtypeStruct(shape, jnp.int32),
    jax.ShapeDtypeStruct(batch_shape, jnp.int32),
  )
  # XLA's backend optimisations take most of the compile time, and change
  # nothing these checks look at.
  return (
    jax.jit(run)
    .lower(*arguments)
    .compile(compiler_options={"xla_backend_optimization_level": 0})
  )


@st.composite
def _row_ids(draw, time, packed):
  """One row of valid segment ids: segments, then padding."""
  length = draw(st.integers(0, time))
  ids = np.zeros(time, np.int32)
  segment = draw(st.integers(1, 4))
  for t in range(length):
    if t and packed and draw(st.booleans()):
      segment += draw(st.integers(1, 3))  # ids need not be consecutive
    ids[t] = segment
  return ids


@st.composite
def _cases(draw):
  configs = CI_CONFIGS if PROFILE == "ci" else CONFIGS
  kind, direction, batch_shape, time, time_major = draw(
    st.sampled_from(configs)
  )
  packed = draw(st.booleans())
  rows = [draw(_row_ids(time, packed)) for _ in range(math.prod(batch_shape))]
  ids = np.stack(rows).reshape(*batch_shape, time)
  seed = draw(st.integers(0, 2**16))
  return kind, direction, batch_shape, time, time_major, ids, seed


def _to_rows(array, batch_shape, time_major):
  """`(*batch, time, ...)` or `(time, *batch, ...)` -> `(rows, time, ...)`."""
  if time_major:
    array = np.moveaxis(array, 0, len(batch_shape))
  return array.reshape(-1, *array.shape[len(batch_shape) :])


def _from_rows(array, batch_shape, time_major):
  """The inverse of `_to_rows` (the time axis is axis 1 of `array`)."""
  array = np.asarray(array).reshape(*batch_shape, *array.shape[1:])
  return np.moveaxis(array, len(batch_shape), 0) if time_major else array


def _reference(kind, direction, params, inputs, ids, batch_shape, time_major):
  """`(carry, outputs)` from running each segment alone."""
  x = jnp.asarray(_to_rows(inputs, batch_shape, time_major))
  rows = _to_rows(ids, batch_shape, time_major)
  zeros = jnp.zeros((rows.shape[0], FEATURES))
  initial = (zeros, zeros) if kind == "lstm" else zeros

  def run(name, **options):
    carry, outputs = test_utils.reference_rnn(
      kind, params[f"{name}_cell"], x, rows, initial, **options
    )
    carry = jax.tree.map(lambda leaf: leaf.reshape(*batch_shape, -1), carry)
    return carry, _from_rows(outputs, batch_shape, time_major)

  if direction == "bidirectional":
    forward_carry, forward_outputs = run("forward")
    backward_carry, backward_outputs = run(
      "backward", reverse=True, keep_order=True
    )
    outputs = np.concatenate([forward_outputs, backward_outputs], -1)
    return (forward_carry, backward_carry), outputs
  return run(
    "forward",
    reverse=direction != "forward",
    keep_order=direction == "reverse_keep_order",
  )


def _cell_params(params):
  """Haiku params keyed by the cell's own name (`forward_cell`, ...)."""
  return {name.split("/")[-1]: values for name, values in params.items()}


def _assert_close(actual, expected, atol=2e-5, rtol=2e-5, what=""):
  actual_leaves, expected_leaves = (
    jax.tree.leaves(actual),
    jax.tree.leaves(expected),
  )
  assert len(actual_leaves) == len(expected_leaves), what
  for a, e in zip(actual_leaves, expected_leaves, strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)


def _split(tree):
  """`(clean, nan_padded)` from a tree whose leaves stack both."""
  return jax.tree.map(lambda leaf: leaf[0], tree), jax.tree.map(
    lambda leaf: leaf[1], tree
  )


class PropertiesTest(absltest.TestCase):
  @hypothesis.given(_cases())
  def test_every_path_matches_per_segment_runs(self, case):
    kind, direction, batch_shape, time, time_major, ids, seed = case
    params = _params(kind, direction)
    layout_ids = np.moveaxis(ids, -1, 0) if time_major else ids
    shape = (*layout_ids.shape, INPUTS)
    inputs = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    lengths = (ids != 0).sum(-1).astype(np.int32)
    one_segment_per_row = bool(
      ((ids[..., 1:] == ids[..., :-1]) | (ids[..., 1:] == 0)).all()
    )
    expected = _reference(
      kind,
      direction,
      _cell_params(params),
      inputs,
      layout_ids,
      batch_shape,
      time_major,
    )
    # Reported by --hypothesis-show-statistics: what the cases covered.
    hypothesis.event(f"{kind}, {direction}")
    hypothesis.event(f"batch {batch_shape}, time {time}, major {time_major}")
    hypothesis.event("one segment per row" if one_segment_per_row else "packed")
    if (lengths == 0).any():
      hypothesis.event("a length-0 row")
    padding = np.asarray(layout_ids == 0)
    results = {}
    # Lengths cannot say where a packed row's segments start.
    for by in ("mask", "lengths") if one_segment_per_row else ("mask",):
      for use_fused in (False, True):
        run = _compiled(
          kind, direction, batch_shape, time, time_major, by, use_fused
        )
        values, grads = run(params, inputs, layout_ids, lengths)
        (values, nan_values), (grads, nan_grads) = _split(values), _split(grads)
        path = f"{by}, fused={use_fused}"
        _assert_close(values, expected, what=f"{path}: per-segment reference")
        # NaN in every padded input: the same values and gradients, and no
        # gradient flows to padded inputs.
        _assert_close(nan_values, values, atol=0, rtol=0, what=f"{path}: NaN")
        _assert_close(nan_grads, grads, atol=0, rtol=0, what=f"{path}: NaN")
        self.assertTrue((np.asarray(grads[1])[padding] == 0).all(), path)
        results[by, use_fused] = values, grads
    # Every path has the same gradients as stepping the cell over the mask.
    _, step_grads = results["mask", False]
    for path, (_, grads) in results.items():
      _assert_close(grads, step_grads, atol=1e-4, what=f"{path}: gradients")


# Each fault, and the words of the error it must raise.
FAULTS = {
  "padding_in_middle": "padding \\(0\\) must only sit at the end",
  "decreasing": "must not decrease",
  "negative": "must be non-negative",
  "recurring": "must not decrease",
}


@st.composite
def _malformed(draw):
  """Valid rows but one, which has exactly one fault of a drawn kind."""
  fault = draw(st.sampled_from(sorted(FAULTS)))
  time = 6
  batch_shape = draw(st.sampled_from(BATCH_SHAPES))
  rows = [
    draw(_row_ids(time, packed=True)) for _ in range(math.prod(batch_shape))
  ]
  row = rows[draw(st.integers(0, len(rows) - 1))]
  row[:] = 0
  a = draw(st.integers(1, 5))
  b = a + draw(st.integers(1, 3))
  if fault == "padding_in_middle":  # a ... 0 ... a
    length = draw(st.integers(2, time))
    row[:length] = a
    row[draw(st.integers(0, length - 2))] = 0
  elif fault == "decreasing":  # b ... a
    split = draw(st.integers(1, time - 1))
    row[:split] = b
    row[split : draw(st.integers(split + 1, time))] = a
  elif fault == "negative":  # -a ... (padding or not after it)
    row[: draw(st.integers(1, time))] = -a
  else:  # a ... b ... a: an id that comes back after another
    first = draw(st.integers(1, time - 2))
    second = draw(st.integers(first + 1, time - 1))
    row[:first] = a
    row[first:second] = b
    row[second : draw(st.integers(second + 1, time))] = a
  time_major = draw(st.booleans())
  ids = np.stack(rows).reshape(*batch_shape, time)
  return fault, batch_shape, time_major, ids


class MalformedMaskTest(absltest.TestCase):
  @hypothesis.given(_malformed(), st.sampled_from(DIRECTIONS))
  def test_every_malformed_mask_raises(self, case, direction):
    fault, batch_shape, time_major, ids = case
    layout_ids = np.moveaxis(ids, -1, 0) if time_major else ids
    inputs = jnp.zeros((*layout_ids.shape, INPUTS))
    with self.assertRaisesRegex(ValueError, FAULTS[fault]):
      hk_rnn.flip_sequences(
        inputs,
        jnp.asarray(layout_ids),
        num_batch_dims=len(batch_shape),
        time_major=time_major,
      )
    # Validation happens before any computation, so each call is cheap.
    params = _params("gru", direction)
    model = _model("gru", direction, time_major)
    with self.assertRaisesRegex(
      ValueError, "segmentation_mask .*" + FAULTS[fault]
    ):
      model.apply(params, inputs, jnp.asarray(layout_ids), None, "mask", True)

  @hypothesis.given(
    st.sampled_from(BATCH_SHAPES),
    st.sampled_from(TIMES),
    st.booleans(),
    st.data(),
  )
  def test_lengths_outside_the_time_axis_raise(
    self, batch_shape, time, time_major, data
  ):
    size = math.prod(batch_shape)
    lengths = np.asarray(
      data.draw(st.lists(st.integers(0, time), min_size=size, max_size=size))
    )
    lengths = lengths.reshape(batch_shape).astype(np.int32)
    flat = lengths.reshape(-1)
    flat[data.draw(st.integers(0, size - 1))] = data.draw(
      st.sampled_from((-1, -5, time + 1, time + 7))
    )
    shape = (time, *batch_shape) if time_major else (*batch_shape, time)
    inputs = jnp.zeros((*shape, INPUTS))
    params = _params("simple", "forward")
    model = _model("simple", "forward", time_major)
    with self.assertRaisesRegex(ValueError, "seq_lengths"):
      model.apply(params, inputs, None, jnp.asarray(lengths), "lengths", True)


if __name__ == "__main__":
  absltest.main()
