"""Fuzzing every public callable: a right number or a clear error, in time.

Hypothesis draws calls of `RNN`, `Bidirectional` and `StackedRNN` (with every
cell, `CoreCell` included), `flip_sequences`, `last_segment_ids`,
`pack_sequences` with `unpack_sequences` and `unpack_segments`, `CoreCell`,
`CellCore` and the `interop` converters: random shapes (axes of length 0
included), input dtypes (bool, int, float16, bfloat16, float32, float64,
complex), layouts (0 to 2 batch axes, time-major or not), wrappers (none,
`jit`, `vmap`, `grad`) and faults: NaN, float or negative lengths, lengths
past the time axis, masks with gaps, decreasing or negative ids, wrong ranks
and shapes, carries of the wrong shape or structure, Python objects where
arrays belong. Each call must

- match an independent oracle (each segment stepped alone through the cell,
  a numpy flip, a numpy round trip), or
- raise `ValueError` or `TypeError` whose message names the argument at
  fault (never `IndexError`, `AttributeError`, an XLA runtime error or an
  internal traceback),

and finish within `CALL_SECONDS`. Values are only checked when concrete: a
malformed mask under `jit` or `vmap` is the caller's promise (see
`hk_rnn/_src/layout.py`), so there the call must merely not crash.

Profiles (environment variable `HK_RNN_FUZZ_PROFILE`):
- `ci` (default): a fixed, derandomized set of about 200 examples in all,
  well under a minute on two cores once compiled shapes are cached.
- `thorough`: 10,000 examples in all (the shares in `_THOROUGH`), random, with
  hypothesis' statistics printed per test; run it with

    HK_RNN_FUZZ_PROFILE=thorough nice -n 19 venv/bin/python -m pytest -n 0 \\
      -s hk_rnn_test/fuzz_test.py --hypothesis-show-statistics
"""

import contextlib
import functools
import os
import signal

# Keras 3 on JAX, as the interop tests run it (its default backend is absent).
os.environ.setdefault("KERAS_BACKEND", "jax")

import haiku as hk
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from hypothesis import strategies as st

import hk_rnn

PROFILE = os.environ.get("HK_RNN_FUZZ_PROFILE", "ci")
# Examples per test in the thorough profile: 10,000 in all.
_THOROUGH = {
  "rnn": 4000,
  "flip": 1500,
  "last_segment_ids": 1000,
  "packing": 1500,
  "cores": 1000,
  "interop": 1000,
}
_CI = {
  "rnn": 60,
  "flip": 40,
  "last_segment_ids": 30,
  "packing": 40,
  "cores": 20,
  "interop": 20,
}
# No call may take longer (compiling a new shape on a busy machine included).
CALL_SECONDS = 60


def _settings(test):
  if PROFILE == "thorough":
    return hypothesis.settings(
      max_examples=_THOROUGH[test],
      deadline=None,
      print_blob=True,
      suppress_health_check=list(hypothesis.HealthCheck),
    )
  return hypothesis.settings(
    max_examples=_CI[test],
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=list(hypothesis.HealthCheck),
  )


class CallTimeout(Exception):
  """A call ran past `CALL_SECONDS`: a hang, as far as the user can tell."""


@contextlib.contextmanager
def time_limit(seconds=CALL_SECONDS):
  """Raises CallTimeout in the block once `seconds` have passed."""

  def expire(signum, frame):
    del signum, frame
    raise CallTimeout(f"a call took more than {seconds} s")

  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def outcome(fn, *args, **kwargs):
  """`("ok", result)` or `("error", exception)` for ValueError/TypeError.

  Any other exception (and a timeout) propagates: the test fails on it.
  """
  with time_limit():
    try:
      return "ok", fn(*args, **kwargs)
    except (ValueError, TypeError) as e:
      return "error", e


class FuzzCase(absltest.TestCase):
  def assertNamesArgument(self, error, names, case):
    """The error is ValueError/TypeError and names one of `names`."""
    self.assertIsInstance(error, (ValueError, TypeError), case)
    message = str(error)
    self.assertTrue(
      any(name in message for name in names),
      f"{case}: {type(error).__name__} names none of {names}: {message}",
    )

  def assertTreeClose(self, actual, expected, rtol, atol, case):
    actual_leaves, actual_tree = jax.tree.flatten(actual)
    expected_leaves, expected_tree = jax.tree.flatten(expected)
    self.assertEqual(actual_tree, expected_tree, case)
    for a, e in zip(actual_leaves, expected_leaves, strict=True):
      a, e = np.asarray(a), np.asarray(e)
      self.assertEqual(a.shape, e.shape, case)
      np.testing.assert_allclose(
        a.astype(np.complex128 if np.iscomplexobj(a) else np.float64),
        e.astype(np.complex128 if np.iscomplexobj(e) else np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=str(case),
      )


# --------------------------------------------------------------------------
# Shared draws.

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INPUT_DTYPES = (*FLOAT_DTYPES, "int32", "bool", "complex64")
BATCH_SHAPES = ((), (0,), (1,), (3,), (2, 2), (2, 0))
TIMES = (0, 1, 2, 4)
# Python objects where an array belongs.
JUNK = ("abc", {"a": 1}, [[1, "x"]], object(), 3.5, b"\x00")


def random_ids(rng, batch, time, packed):
  """Valid segment ids `(batch, time)`: padding at the end, ids growing."""
  ids = np.zeros((batch, time), np.int32)
  for b in range(batch):
    length = int(rng.integers(0, time + 1))
    segment, next_id = 0, int(rng.integers(1, 4))
    for t in range(length):
      if t and packed and rng.random() < 0.4:
        next_id += int(rng.integers(1, 3))
      segment = next_id
      ids[b, t] = segment
  return ids


def corrupt_ids(rng, ids, fault):
  """A copy of `(batch, time)` ids with one malformation, when it fits."""
  ids = ids.copy()
  batch, time = ids.shape
  if batch == 0 or time < 2:
    return None
  b = int(rng.integers(0, batch))
  if fault == "gap":
    ids[b] = 0
    ids[b, -1] = 1
  elif fault == "decreasing":
    ids[b] = 2
    ids[b, -1] = 1
  elif fault == "negative":
    ids[b, 0] = -1
  elif fault == "recurring":
    if time < 3:
      return None
    ids[b] = 1
    ids[b, 1] = 2
  return ids


def to_dtype(values, dtype):
  if dtype == "bool":
    return jnp.asarray(values > 0)
  if dtype == "int32":
    return jnp.asarray(np.round(values * 3), jnp.int32)
  if dtype == "complex64":
    return jnp.asarray(values + 0.5j * values[::-1], jnp.complex64)
  return jnp.asarray(values, dtype)


def tolerance(dtype):
  return (3e-2, 3e-2) if dtype in ("float16", "bfloat16") else (2e-4, 2e-5)


# --------------------------------------------------------------------------
# RNN, Bidirectional and StackedRNN with every cell.

CELL_KINDS = (
  "lstm",
  "gru",
  "simple",
  "mgu",
  "conv_lstm",
  "min_gru",
  "min_lstm",
  "core_cell",
)
ARCHITECTURES = (
  "forward",
  "reverse",
  "reverse_keep_order",
  "bidirectional",
  "stacked",
)
HIDDEN = 2


def make_cell(kind, index):
  name = f"cell_{index}"
  if kind == "conv_lstm":
    return hk_rnn.ConvLSTMCell(HIDDEN, (3,), name=name)
  if kind == "core_cell":
    return hk_rnn.CoreCell(hk.LSTM(HIDDEN, name=f"core_{index}"), name=name)
  constructor = {
    "lstm": hk_rnn.LSTMCell,
    "gru": hk_rnn.GRUCell,
    "simple": hk_rnn.SimpleCell,
    "mgu": hk_rnn.MGUCell,
    "min_gru": hk_rnn.MinGRUCell,
    "min_lstm": hk_rnn.MinLSTMCell,
  }[kind]
  return constructor(HIDDEN, name=name)


def feature_shape(kind):
  return (3, 2) if kind == "conv_lstm" else (3,)


def _segments(ids_row):
  """The steps of each segment of one row, in position order."""
  segments, steps, previous = [], [], 0
  for t, segment in enumerate(np.asarray(ids_row).tolist()):
    if segment == 0:
      break
    if segment != previous and steps:
      segments.append(steps)
      steps = []
    steps.append(t)
    previous = segment
  if steps:
    segments.append(steps)
  return segments


def oracle_layer(cell, inputs, ids, initial, reverse, keep_order):
  """One cell over `(rows, time, *features)`, each segment stepped alone.

  `initial` holds each row's initial carry (leading rows axis). Returns the
  final carries (stacked over rows) and outputs `(rows, time, *out)`, zero
  at padding; outputs of `reverse` come in processing order unless
  `keep_order`.
  """
  rows, time = ids.shape
  finals, outputs = [], []
  for r in range(rows):
    row_initial = jax.tree.map(lambda leaf, r=r: leaf[r], initial)
    final, row = row_initial, [None] * time
    for steps in _segments(ids[r]):
      carry = row_initial
      order = steps[::-1] if reverse else steps
      for position, t in zip(steps, order, strict=True):
        carry, y = cell(carry, inputs[r, t])
        row[t if keep_order or not reverse else position] = y
      final = carry
    finals.append(final)
    outputs.append(row)
  return finals, outputs


def _stack_rows(finals, outputs, rows, time, out_shape, out_dtype):
  zeros = jnp.zeros(out_shape, out_dtype)
  stacked_outputs = (
    jnp.stack(
      [
        jnp.stack([y if y is not None else zeros for y in row])
        for row in outputs
      ]
    )
    if rows and time
    else jnp.zeros((rows, time, *out_shape), out_dtype)
  )
  return stacked_outputs


def rnn_model(kind, arch):
  """The layer under test and its oracle, sharing cells (and parameters)."""

  def forward(inputs, mask, lengths, initial_carry, time_major, oracle):
    count = 1 if arch in ("forward", "reverse", "reverse_keep_order") else 2
    cells = [make_cell(kind, i) for i in range(count)]
    if not oracle:
      if arch == "bidirectional":
        layer = hk_rnn.Bidirectional(
          hk_rnn.RNN(cells[0]), hk_rnn.RNN(cells[1]), time_major=time_major
        )
      elif arch == "stacked":
        layer = hk_rnn.StackedRNN(
          [
            hk_rnn.RNN(cells[0], time_major=time_major),
            hk_rnn.RNN(cells[1], time_major=time_major),
          ]
        )
      else:
        layer = hk_rnn.RNN(
          cells[0],
          time_major=time_major,
          reverse=arch != "forward",
          keep_order=arch == "reverse_keep_order",
        )
      return layer(
        inputs, mask, seq_lengths=lengths, initial_carry=initial_carry
      )
    return oracle_call(
      cells, arch, inputs, mask, lengths, initial_carry, time_major
    )

  return hk.without_apply_rng(hk.transform(forward))


def oracle_call(cells, arch, inputs, mask, lengths, initial_carry, time_major):
  """What the layer must return, from cells stepped one segment at a time."""
  feature_axes = cells[0].num_feature_axes
  lead = inputs.ndim - feature_axes
  if time_major:
    inputs = jnp.moveaxis(inputs, 0, lead - 1)
    mask = None if mask is None else np.moveaxis(np.asarray(mask), 0, -1)
  batch_shape, time = inputs.shape[: lead - 1], inputs.shape[lead - 1]
  features = inputs.shape[lead:]
  rows = int(np.prod(batch_shape, dtype=int))
  flat = inputs.reshape((rows, time, *features))
  if mask is not None:
    ids = np.asarray(mask).astype(np.int64).reshape(rows, time)
  elif lengths is not None:
    ids = (np.arange(time) < np.asarray(lengths).reshape(rows, 1)).astype(int)
  else:
    ids = np.ones((rows, time), int)

  def initial_rows(cell, given, sample):
    if given is None:
      given = jax.tree.map(
        lambda leaf: jnp.broadcast_to(leaf, (*batch_shape, *leaf.shape)),
        cell.initialize_carry(sample),
      )
    return jax.tree.map(
      lambda leaf: leaf.reshape((rows, *leaf.shape[len(batch_shape) :])), given
    )

  def run(cell, x, given, reverse, keep_order):
    sample = jnp.zeros(x.shape[2:], x.dtype)
    init = initial_rows(cell, given, sample)
    finals, outputs = oracle_layer(cell, x, ids, init, reverse, keep_order)
    one_row = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), init
    )
    out = jax.eval_shape(cell, one_row, sample)[1]
    y = _stack_rows(finals, outputs, rows, time, out.shape, out.dtype)
    final = (
      jax.tree.map(lambda *leaves: jnp.stack(leaves), *finals) if rows else init
    )
    return final, y

  if arch == "bidirectional":
    given = initial_carry or (None, None)
    forward_final, forward_y = run(cells[0], flat, given[0], False, False)
    backward_final, backward_y = run(cells[1], flat, given[1], True, True)
    finals = (forward_final, backward_final)
    y = jnp.concatenate([forward_y, backward_y], -1)
  elif arch == "stacked":
    given = initial_carry or (None, None)
    first_final, first_y = run(cells[0], flat, given[0], False, False)
    second_final, y = run(cells[1], first_y, given[1], False, False)
    finals = (first_final, second_final)
  else:
    finals, y = run(
      cells[0],
      flat,
      initial_carry,
      arch != "forward",
      arch == "reverse_keep_order",
    )
  y = y.reshape((*batch_shape, time, *y.shape[2:]))
  if time_major:
    y = jnp.moveaxis(y, len(batch_shape), 0)
  finals = jax.tree.map(
    lambda leaf: leaf.reshape((*batch_shape, *leaf.shape[1:])), finals
  )
  return finals, y


RNN_FAULTS = {
  # fault: the argument the error must name
  "negative_lengths": ("seq_lengths",),
  "long_lengths": ("seq_lengths",),
  "nan_lengths": ("seq_lengths",),
  "lengths_shape": ("seq_lengths",),
  "lengths_object": ("seq_lengths",),
  "gap": ("segmentation_mask",),
  "decreasing": ("segmentation_mask",),
  "negative": ("segmentation_mask",),
  "recurring": ("segmentation_mask",),
  "mask_rank": ("segmentation_mask",),
  "float_mask": ("segmentation_mask",),
  "mask_object": ("segmentation_mask",),
  "both": ("seq_lengths", "segmentation_mask"),
  "carry_shape": ("initial_carry",),
  "carry_structure": ("initial_carry",),
  "inputs_rank": ("inputs",),
  "inputs_object": ("inputs",),
}
# Faults in values that only a concrete mask or lengths reveal.
VALUE_FAULTS = frozenset(
  {
    "negative_lengths",
    "long_lengths",
    "gap",
    "decreasing",
    "negative",
    "recurring",
  }
)


@st.composite
def rnn_cases(draw):
  return {
    "kind": draw(st.sampled_from(CELL_KINDS)),
    "arch": draw(st.sampled_from(ARCHITECTURES)),
    "batch_shape": draw(st.sampled_from(BATCH_SHAPES)),
    "time": draw(st.sampled_from(TIMES)),
    "time_major": draw(st.booleans()),
    "dtype": draw(st.sampled_from(("float32",) * 3 + INPUT_DTYPES)),
    "by": draw(st.sampled_from(("none", "lengths", "mask", "packed"))),
    "carry": draw(st.booleans()),
    "wrapper": draw(st.sampled_from(("eager", "jit", "vmap", "grad"))),
    "fault": draw(st.sampled_from((None,) * 8 + tuple(RNN_FAULTS))),
    "seed": draw(st.integers(0, 2**16)),
  }


@functools.cache
def _rnn_params(kind, arch, dtype, feature_shape_, time_major):
  model = rnn_model(kind, arch)
  x = jnp.zeros((1, 1, *feature_shape_), dtype)
  if time_major:
    x = jnp.moveaxis(x, 1, 0)
  return model.init(
    jax.random.PRNGKey(0), x, None, None, None, time_major, False
  )


class RNNFuzzTest(FuzzCase):
  @_settings("rnn")
  @hypothesis.given(rnn_cases())
  def test_rnn_family(self, case):
    kind, arch, time_major = case["kind"], case["arch"], case["time_major"]
    rng = np.random.default_rng(case["seed"])
    batch_shape, time = case["batch_shape"], case["time"]
    features = feature_shape(kind)
    rows = int(np.prod(batch_shape, dtype=int))
    values = rng.normal(size=(*batch_shape, time, *features)).astype("float32")
    inputs = to_dtype(values, case["dtype"])
    ids = random_ids(rng, rows, time, packed=case["by"] == "packed")
    lengths = mask = None
    if case["by"] == "lengths":
      lengths = jnp.asarray((ids != 0).sum(-1).reshape(batch_shape), jnp.int32)
    elif case["by"] in ("mask", "packed"):
      mask = jnp.asarray(ids.reshape(*batch_shape, time))
    model = rnn_model(kind, arch)
    params = _rnn_params(kind, arch, "float32", features, False)
    initial = None
    if case["carry"]:
      count = 2 if arch in ("bidirectional", "stacked") else 1

      def carry_of(index):
        cell_carry = jax.eval_shape(
          lambda: hk.transform(
            lambda: make_cell(kind, 0).initialize_carry(
              jnp.zeros((*batch_shape, *features))
            )
          ).apply({}, None)
        )
        return jax.tree.map(
          lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), cell_carry
        )

      initial = (
        carry_of(0) if count == 1 else tuple(carry_of(i) for i in range(2))
      )
    fault = case["fault"]
    if fault is not None:
      inputs, mask, lengths, initial = self._inject(
        rng, fault, inputs, mask, lengths, initial, ids, batch_shape, time
      )
      if inputs is None:
        return  # the fault does not fit this shape
    if time_major and hasattr(inputs, "ndim") and np.ndim(inputs) > 1:
      inputs = jnp.moveaxis(inputs, len(batch_shape), 0)
      if hasattr(mask, "ndim") and np.ndim(mask) == len(batch_shape) + 1:
        mask = jnp.moveaxis(mask, -1, 0)
    wrapper = case["wrapper"]
    if wrapper == "grad" and not (
      fault is None and case["dtype"] in ("float32", "float64")
    ):
      wrapper = "eager"
    if wrapper == "vmap" and fault is not None:
      wrapper = "jit"
    value_fault = fault in VALUE_FAULTS

    def call(x, m, n, c):
      return model.apply(params, x, m, n, c, time_major, False)

    if wrapper == "jit":
      # What is no array is closed over: jit itself refuses it as an
      # argument, before hk_rnn could see it.
      def run(*args):
        is_array = [isinstance(a, jax.Array) for a in args]
        arrays = [a for a, keep in zip(args, is_array, strict=True) if keep]

        def closed(*arrays):
          it = iter(arrays)
          return call(
            *(
              next(it) if keep else a
              for a, keep in zip(args, is_array, strict=True)
            )
          )

        return jax.jit(closed)(*arrays)
    elif wrapper == "vmap":

      def run(x, m, n, c):
        # Two calls at once: the inputs, then their negation (same mask).
        def pair(a, negate):
          if a is None:
            return None
          negate = negate and a.dtype != jnp.bool_
          return jnp.stack([a, -a if negate else a])

        return jax.vmap(call, in_axes=(0, 0, 0, None))(
          pair(x, True), pair(m, False), pair(n, False), c
        )
    elif wrapper == "grad":

      def run(x, m, n, c):
        return jax.grad(
          lambda x: sum(
            jnp.sum(leaf.astype(jnp.float32))
            for leaf in jax.tree.leaves(call(x, m, n, c))
          )
        )(x)
    else:
      run = call
    hypothesis.event(
      "callable: "
      + {"bidirectional": "Bidirectional", "stacked": "StackedRNN"}.get(
        arch, "RNN"
      )
    )
    hypothesis.event(f"cell: {kind}")
    status, result = outcome(run, inputs, mask, lengths, initial)
    hypothesis.event(f"outcome: {status}")
    # Layers take real floating-point inputs only (tokens go through an
    # embedding first): other dtypes are an error that names the inputs.
    real_float = case["dtype"] in FLOAT_DTYPES
    if fault is not None or not real_float:
      names = RNN_FAULTS[fault] if fault else ()
      names += () if real_float else ("inputs",)
      if status == "error":
        self.assertNamesArgument(result, names, case)
      elif not (value_fault and wrapper == "jit" and real_float):
        self.fail(f"{case}: {fault or case['dtype']} was accepted")
      return
    self.assertEqual(status, "ok", f"{case}: {result!r}")
    rtol, atol = tolerance(case["dtype"])
    if wrapper == "vmap":
      expected = []
      for sign in (1, -1):
        with time_limit():
          expected.append(
            model.apply(
              params, sign * inputs, mask, lengths, initial, time_major, True
            )
          )
      expected = jax.tree.map(lambda *leaves: jnp.stack(leaves), *expected)
    elif wrapper == "grad":
      with time_limit():
        expected = jax.grad(
          lambda x: sum(
            jnp.sum(leaf.astype(jnp.float32))
            for leaf in jax.tree.leaves(
              model.apply(params, x, mask, lengths, initial, time_major, True)
            )
          )
        )(inputs)
    else:
      with time_limit():
        expected = model.apply(
          params, inputs, mask, lengths, initial, time_major, True
        )
    self.assertTreeClose(result, expected, rtol, atol, case)

  def _inject(
    self, rng, fault, inputs, mask, lengths, initial, ids, batch_shape, time
  ):
    rows = int(np.prod(batch_shape, dtype=int))
    if fault in ("negative_lengths", "long_lengths", "nan_lengths"):
      if rows == 0:
        return (None,) * 4
      values = (ids != 0).sum(-1).reshape(batch_shape).astype(np.float32)
      flat = values.reshape(-1)
      flat[int(rng.integers(0, rows))] = {
        "negative_lengths": -1,
        "long_lengths": time + 1,
        "nan_lengths": np.nan,
      }[fault]
      lengths = jnp.asarray(
        values if fault == "nan_lengths" else values.astype(np.int32)
      )
      return inputs, None, lengths, initial
    if fault == "lengths_shape":
      return inputs, None, jnp.zeros((*batch_shape, 2), jnp.int32), initial
    if fault == "lengths_object":
      return inputs, None, JUNK[int(rng.integers(0, len(JUNK)))], initial
    if fault in ("gap", "decreasing", "negative", "recurring"):
      bad = corrupt_ids(rng, ids, fault)
      if bad is None:
        return (None,) * 4
      return inputs, jnp.asarray(bad.reshape(*batch_shape, time)), None, initial
    if fault == "mask_rank":
      return inputs, jnp.ones((*batch_shape, time, 2), jnp.int32), None, initial
    if fault == "float_mask":
      return inputs, jnp.ones((*batch_shape, time), jnp.float32), None, initial
    if fault == "mask_object":
      return inputs, JUNK[int(rng.integers(0, len(JUNK)))], None, initial
    if fault == "both":
      return (
        inputs,
        jnp.ones((*batch_shape, time), jnp.int32),
        jnp.full(batch_shape, time, jnp.int32),
        initial,
      )
    if fault == "carry_shape":
      if initial is None:
        return (None,) * 4
      return (
        inputs,
        mask,
        lengths,
        jax.tree.map(
          lambda leaf: jnp.zeros((*leaf.shape[:-1], leaf.shape[-1] + 1)),
          initial,
        ),
      )
    if fault == "carry_structure":
      return inputs, mask, lengths, (jnp.zeros(3),) * 3
    if fault == "inputs_rank":
      return inputs.reshape(-1), None, None, None
    if fault == "inputs_object":
      return JUNK[int(rng.integers(0, len(JUNK)))], None, None, None
    raise AssertionError(fault)


# --------------------------------------------------------------------------
# flip_sequences and last_segment_ids.

SEQUENCE_FAULTS = {
  "negative_lengths": ("seq_lengths",),
  "long_lengths": ("seq_lengths",),
  "nan_lengths": ("seq_lengths",),
  "lengths_shape": ("seq_lengths",),
  "lengths_object": ("seq_lengths",),
  "gap": ("segmentation_mask",),
  "decreasing": ("segmentation_mask",),
  "negative": ("segmentation_mask",),
  "recurring": ("segmentation_mask",),
  "mask_rank": ("segmentation_mask",),
  "float_mask": ("segmentation_mask",),
  "mask_object": ("segmentation_mask",),
  "both": ("seq_lengths", "segmentation_mask"),
  "num_batch_dims": ("num_batch_dims",),
  "inputs_rank": ("inputs",),
  "inputs_object": ("inputs",),
  "leaves_differ": ("inputs", "leaf"),
}


@st.composite
def flip_cases(draw):
  return {
    "batch_shape": draw(st.sampled_from(BATCH_SHAPES)),
    "time": draw(st.sampled_from(TIMES)),
    "features": draw(st.sampled_from(((), (2,), (1, 2)))),
    "time_major": draw(st.booleans()),
    "dtype": draw(st.sampled_from(INPUT_DTYPES)),
    "pytree": draw(st.booleans()),
    "by": draw(st.sampled_from(("none", "lengths", "mask", "packed"))),
    "wrapper": draw(st.sampled_from(("eager", "jit"))),
    "fault": draw(st.sampled_from((None,) * 6 + tuple(SEQUENCE_FAULTS))),
    "seed": draw(st.integers(0, 2**16)),
  }


def numpy_flip(values, ids):
  """`(rows, time, ...)` with each segment of each row reversed in place."""
  flipped = values.copy()
  for r in range(ids.shape[0]):
    for steps in _segments(ids[r]):
      flipped[r, steps] = values[r, steps[::-1]]
  return flipped


class SequencesFuzzTest(FuzzCase):
  @_settings("flip")
  @hypothesis.given(flip_cases())
  def test_flip_sequences(self, case):
    rng = np.random.default_rng(case["seed"])
    batch_shape, time = case["batch_shape"], case["time"]
    rows = int(np.prod(batch_shape, dtype=int))
    shape = (*batch_shape, time, *case["features"])
    values = rng.normal(size=shape).astype("float32")
    x = to_dtype(values, case["dtype"])
    ids = random_ids(rng, rows, time, packed=case["by"] == "packed")
    mask = lengths = None
    if case["by"] == "lengths":
      lengths = jnp.asarray((ids != 0).sum(-1).reshape(batch_shape))
    elif case["by"] in ("mask", "packed"):
      mask = jnp.asarray(ids.reshape(*batch_shape, time))
    num_batch_dims = len(batch_shape)
    fault = case["fault"]
    if fault == "num_batch_dims":
      num_batch_dims = [-1, "1", 1.5][int(rng.integers(0, 3))]
    elif fault == "inputs_rank":
      x = jnp.zeros(())  # no time axis, whatever num_batch_dims
    elif fault == "leaves_differ":
      if not case["pytree"]:
        return
    elif fault is not None:
      x, mask, lengths, _ = RNNFuzzTest._inject(
        None, rng, fault, x, mask, lengths, None, ids, batch_shape, time
      )
      if x is None:
        return
    inputs = x
    if (
      case["time_major"]
      and isinstance(x, jax.Array)
      and x.ndim > len(batch_shape)
    ):
      inputs = jnp.moveaxis(x, len(batch_shape), 0)
      if isinstance(mask, jax.Array) and mask.ndim == len(batch_shape) + 1:
        mask = jnp.moveaxis(mask, -1, 0)
    if case["pytree"]:
      second = inputs
      if fault == "leaves_differ" and hasattr(inputs, "ndim"):
        # One more step or row: the leading axes differ.
        shape = np.shape(inputs)
        second = jnp.zeros((shape[0] + 1, *shape[1:]))
      inputs = {"a": inputs, "b": (second,)}

    def call(inputs, mask, lengths):
      return hk_rnn.flip_sequences(
        inputs,
        mask,
        seq_lengths=lengths,
        num_batch_dims=num_batch_dims,
        time_major=case["time_major"],
      )

    run = call
    if case["wrapper"] == "jit" and fault not in (
      "inputs_object",
      "lengths_object",
      "mask_object",
      "num_batch_dims",
    ):
      run = jax.jit(call)
    status, result = outcome(run, inputs, mask, lengths)
    hypothesis.event(f"outcome: {status}")
    if fault is not None:
      if status == "error":
        self.assertNamesArgument(result, SEQUENCE_FAULTS[fault], case)
      elif not (fault in VALUE_FAULTS and run is not call):
        self.fail(f"{case}: {fault} was accepted")
      return
    self.assertEqual(status, "ok", f"{case}: {result!r}")
    leaves = jax.tree.leaves(result)
    for leaf in leaves:
      leaf = np.asarray(leaf)
      if case["time_major"]:
        leaf = np.moveaxis(leaf, 0, len(batch_shape))
      self.assertEqual(leaf.dtype, np.asarray(x).dtype, case)
      size = int(np.prod(case["features"], dtype=int))
      got = leaf.reshape(rows, time, size)
      want = numpy_flip(np.asarray(x).reshape(rows, time, size), ids)
      valid = ids != 0
      if case["by"] == "none":
        valid = np.ones_like(valid)
        want = np.asarray(x).reshape(rows, time, size)[:, ::-1]
      np.testing.assert_array_equal(got[valid], want[valid], err_msg=str(case))

  @_settings("last_segment_ids")
  @hypothesis.given(
    st.sampled_from(BATCH_SHAPES),
    st.sampled_from(TIMES),
    st.booleans(),
    st.sampled_from(("none", "given", "wrong_shape", "float", "object")),
    st.sampled_from(
      (None,) * 4
      + (
        "gap",
        "decreasing",
        "negative",
        "recurring",
        "float_mask",
        "mask_object",
        "no_time_axis",
      )
    ),
    st.sampled_from(("eager", "jit")),
    st.integers(0, 2**16),
  )
  def test_last_segment_ids(
    self, batch_shape, time, time_major, previous_kind, fault, wrapper, seed
  ):
    case = (batch_shape, time, time_major, previous_kind, fault, wrapper, seed)
    rng = np.random.default_rng(seed)
    rows = int(np.prod(batch_shape, dtype=int))
    ids = random_ids(rng, rows, time, packed=True)
    mask = jnp.asarray(ids.reshape(*batch_shape, time))
    previous_values = rng.integers(0, 5, size=batch_shape).astype(np.int32)
    previous = {
      "none": None,
      "given": jnp.asarray(previous_values),
      "wrong_shape": jnp.zeros((*batch_shape, 2), jnp.int32),
      "float": jnp.asarray(previous_values, jnp.float32),
      "object": "abc",
    }[previous_kind]
    names = ("previous",) if previous_kind not in ("none", "given") else ()
    if fault in ("gap", "decreasing", "negative", "recurring"):
      bad = corrupt_ids(rng, ids, fault)
      if bad is None:
        return
      mask = jnp.asarray(bad.reshape(*batch_shape, time))
    elif fault == "float_mask":
      mask = mask.astype(jnp.float32)
    elif fault == "mask_object":
      mask = JUNK[int(rng.integers(0, len(JUNK)))]
    elif fault == "no_time_axis":
      mask = jnp.ones((), jnp.int32)
    if fault is not None:
      names += ("segmentation_mask",)
    if time_major and isinstance(mask, jax.Array) and mask.ndim > 1:
      mask = jnp.moveaxis(mask, -1, 0)

    def call(mask, previous):
      return hk_rnn.last_segment_ids(mask, previous, time_major=time_major)

    arrays = isinstance(mask, jax.Array) and (
      previous is None or isinstance(previous, jax.Array)
    )
    run = jax.jit(call) if wrapper == "jit" and arrays else call
    status, result = outcome(run, mask, previous)
    hypothesis.event(f"outcome: {status}")
    if names:
      if status == "error":
        self.assertNamesArgument(result, names, case)
      elif not (fault in VALUE_FAULTS and run is not call and len(names) == 1):
        self.fail(f"{case}: accepted")
      return
    self.assertEqual(status, "ok", f"{case}: {result!r}")
    want = np.asarray(
      [
        ids[r][ids[r] != 0][-1]
        if (ids[r] != 0).any()
        else (previous_values.reshape(-1)[r] if previous is not None else 0)
        for r in range(rows)
      ],
      np.int32,
    ).reshape(batch_shape)
    np.testing.assert_array_equal(np.asarray(result), want, err_msg=str(case))
    self.assertEqual(np.asarray(result).dtype, np.int32)


# --------------------------------------------------------------------------
# pack_sequences, unpack_sequences and unpack_segments.


def first_fit_decreasing_rows(lengths, row_length, cap):
  """How many rows first-fit decreasing needs (the bound pack must meet)."""
  room, counts = [], []
  for length in sorted(lengths, reverse=True):
    for r in range(len(room)):
      if room[r] >= length and (cap is None or counts[r] < cap):
        room[r] -= length
        counts[r] += 1
        break
    else:
      room.append(row_length - length)
      counts.append(1)
  return len(room)


PACKING_FAULTS = {
  "empty": ("sequences",),
  "not_a_list": ("sequences",),
  "too_long": ("row_length", "sequence"),
  "features_differ": ("sequence", "feature"),
  "dtypes_differ": ("sequence", "dtype"),
  "row_length": ("row_length",),
  "num_rows": ("num_rows",),
  "max_segments": ("max_segments",),
  "object_sequence": ("sequence",),
  "wrong_packed": ("packed",),
  "outputs_shape": ("outputs",),
  "carry_shape": ("segment_carries", "max_segments"),
}


@st.composite
def packing_cases(draw):
  count = draw(st.integers(1, 6))
  return {
    "lengths": draw(
      st.lists(st.integers(0, 5), min_size=count, max_size=count)
    ),
    "features": draw(st.sampled_from(((), (2,), (1, 2)))),
    "dtype": draw(st.sampled_from(INPUT_DTYPES)),
    "row_length": draw(st.integers(5, 8)),
    "max_segments": draw(st.sampled_from((None, 1, 2, 3))),
    "extra_rows": draw(st.sampled_from((None, 0, 2))),
    "fault": draw(st.sampled_from((None,) * 6 + tuple(PACKING_FAULTS))),
    "wrapper": draw(st.sampled_from(("eager", "jit", "grad"))),
    "seed": draw(st.integers(0, 2**16)),
  }


class PackingFuzzTest(FuzzCase):
  @_settings("packing")
  @hypothesis.given(packing_cases())
  def test_pack_and_unpack(self, case):
    rng = np.random.default_rng(case["seed"])
    features, lengths = case["features"], case["lengths"]
    # Each sequence's values say which it is and which step: 10 i + t.
    sequences = [
      np.broadcast_to(
        (10 * i + np.arange(n)).reshape((n,) + (1,) * len(features)),
        (n, *features),
      ).astype(np.float32)
      for i, n in enumerate(lengths)
    ]
    sequences = [np.asarray(to_dtype(s, case["dtype"])) for s in sequences]
    if case["dtype"] in ("float16", "bfloat16", "float64", "float32"):
      sequences = [s.astype(np.float32) for s in sequences]
    row_length, cap = case["row_length"], case["max_segments"]
    needed = first_fit_decreasing_rows(lengths, row_length, cap)
    num_rows = (
      None if case["extra_rows"] is None else needed + case["extra_rows"]
    )
    fault = case["fault"]
    args = [sequences, row_length]
    options = {"num_rows": num_rows, "max_segments": cap}
    if fault == "empty":
      args[0] = []
    elif fault == "not_a_list":
      args[0] = ["abc", np.zeros(3), 7][int(rng.integers(0, 3))]
    elif fault == "too_long":
      args[0] = [
        *sequences,
        np.zeros((row_length + 1, *features), sequences[0].dtype),
      ]
    elif fault == "features_differ":
      args[0] = [*sequences, np.zeros((1, *features, 3), sequences[0].dtype)]
    elif fault == "dtypes_differ":
      other = np.int32 if sequences[0].dtype != np.int32 else np.float32
      args[0] = [*sequences, np.zeros((1, *features), other)]
    elif fault == "row_length":
      args[1] = [0, -2, 2.5, "8", None][int(rng.integers(0, 5))]
    elif fault == "num_rows":
      if not any(lengths):
        return
      options["num_rows"] = [0, -1, "2", 1.5][int(rng.integers(0, 4))]
      if needed > 1 and rng.random() < 0.5:
        options["num_rows"] = needed - 1
    elif fault == "max_segments":
      options["max_segments"] = [0, -1, 1.5, "2", True][int(rng.integers(0, 5))]
    elif fault == "object_sequence":
      args[0] = [*sequences, {"a": 1}]
    status, packed = outcome(hk_rnn.pack_sequences, *args, **options)
    hypothesis.event(f"pack_sequences: {status}")
    if fault in PACKING_FAULTS and fault not in (
      "wrong_packed",
      "outputs_shape",
      "carry_shape",
    ):
      if status == "error":
        self.assertNamesArgument(packed, PACKING_FAULTS[fault], case)
      else:
        self.fail(f"{case}: {fault} was accepted")
      return
    self.assertEqual(status, "ok", f"{case}: {packed!r}")
    # Every sequence sits whole in its row, as its own segment.
    self.assertLessEqual(packed.num_rows, max(needed, num_rows or 0), case)
    if num_rows is not None:
      self.assertEqual(packed.num_rows, num_rows, case)
    mask = np.asarray(packed.segmentation_mask)
    for i, sequence in enumerate(sequences):
      row, start, slot = packed.rows[i], packed.starts[i], packed.slots[i]
      n = lengths[i]
      np.testing.assert_array_equal(
        packed.inputs[row, start : start + n], sequence, err_msg=str(case)
      )
      self.assertTrue((mask[row, start : start + n] == slot + 1).all(), case)
    for row in mask:
      self.assertLessEqual(len(_segments(row)), packed.max_segments, case)
      if cap is not None:
        self.assertLessEqual(len(_segments(row)), cap, case)
    outputs = jnp.asarray(packed.inputs)
    carries = jnp.asarray(
      100 * np.arange(packed.num_rows)[:, None]
      + np.arange(packed.max_segments)[None, :],
      jnp.float32,
    )
    # A cell's carry has at least the feature axes of a step (one at least).
    carries = carries.reshape(carries.shape + (1,) * max(1, len(features)))
    if fault == "wrong_packed":
      packed = [packed.inputs, mask, object()][int(rng.integers(0, 3))]
    elif fault == "outputs_shape":
      outputs = outputs[:, :-1] if rng.random() < 0.5 else outputs[0]
    elif fault == "carry_shape":
      # Too few rows, or no slot at all (every sequence needs one).
      carries = carries[:-1] if rng.random() < 0.5 else carries[:, :0]
      if packed.num_rows == 0:
        return

    def unpack(outputs, carries):
      return (
        hk_rnn.unpack_sequences(outputs, packed),
        hk_rnn.unpack_segments(carries, packed),
      )

    wrapper = case["wrapper"]
    real_float = jnp.issubdtype(outputs.dtype, jnp.floating)
    if wrapper == "jit":
      run = jax.jit(unpack)
    elif wrapper == "grad" and real_float:

      def run(outputs, carries):
        return jax.grad(
          lambda o: jnp.sum(unpack(o, carries)[0].astype(jnp.float32))
        )(outputs), unpack(outputs, carries)[1]
    else:
      wrapper, run = "eager", unpack
    status, result = outcome(run, outputs, carries)
    hypothesis.event(f"unpack_sequences/unpack_segments: {status}")
    if fault is not None:
      if status == "error":
        self.assertNamesArgument(result, PACKING_FAULTS[fault], case)
      else:
        self.fail(f"{case}: {fault} was accepted")
      return
    self.assertEqual(status, "ok", f"{case}: {result!r}")
    unpacked, per_sequence = result
    longest = max(lengths)
    if wrapper == "grad":
      # d sum(unpacked) / d outputs: 1 at every step a sequence occupies.
      self.assertEqual(unpacked.shape, outputs.shape)
      np.testing.assert_array_equal(
        np.asarray(unpacked).reshape(mask.shape + (-1,)).max(-1),
        (mask != 0).astype(np.float32),
      )
    else:
      self.assertEqual(
        unpacked.shape, (len(sequences), longest, *features), case
      )
      for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(
          np.asarray(unpacked[i, : lengths[i]]), sequence, err_msg=str(case)
        )
        self.assertFalse(np.asarray(unpacked[i, lengths[i] :]).any(), case)
    np.testing.assert_array_equal(
      np.asarray(per_sequence).reshape(len(sequences), -1)[:, 0],
      100 * packed.rows + packed.slots,
      err_msg=str(case),
    )


# --------------------------------------------------------------------------
# CoreCell, CellCore and interop: argument checking and one-step agreement.


@st.composite
def core_cases(draw):
  return {
    "what": draw(st.sampled_from(("cell_core", "core_cell"))),
    "kind": draw(st.sampled_from(("lstm", "gru", "min_gru", "conv_lstm"))),
    "batch": draw(st.sampled_from((None, 0, 1, 3))),
    "time": draw(st.sampled_from((0, 1, 3))),
    "fault": draw(
      st.sampled_from(
        (None,) * 3 + ("wrapped", "option", "batch_size", "inputs")
      )
    ),
    "junk": draw(
      st.sampled_from(
        ("abc", None, 0, -1, 1.5, True, (2, -1), {"a": 1}, object())
      )
    ),
    "seed": draw(st.integers(0, 2**16)),
  }


class CoresFuzzTest(FuzzCase):
  @_settings("cores")
  @hypothesis.given(core_cases())
  def test_cores(self, case):
    rng = np.random.default_rng(case["seed"])
    kind, batch, time, fault = (
      case["kind"],
      case["batch"],
      case["time"],
      case["fault"],
    )
    features = feature_shape(kind)
    junk = case["junk"]
    batch_axes = () if batch is None else (batch,)
    xs = jnp.asarray(
      rng.normal(size=(time, *batch_axes, *features)), jnp.float32
    )
    if case["what"] == "cell_core":
      names = {
        "wrapped": ("cell",),
        "option": ("input_shape",),
        "batch_size": ("batch_size", "prev_state"),
        "inputs": ("inputs",),
      }

      def build():
        cell = make_cell(kind, 0) if fault != "wrapped" else junk
        options = {}
        if kind == "conv_lstm" or fault == "option":
          options["input_shape"] = junk if fault == "option" else features
        return hk_rnn.CellCore(cell, **options)

      def forward(xs):
        core = build()
        state = core.initial_state(junk if fault == "batch_size" else batch)
        if fault == "inputs":
          return core(junk, state)
        unrolled, _ = hk.dynamic_unroll(core, xs, state)
        cell = core._cell if hasattr(core, "_cell") else None  # noqa: SLF001
        del cell
        return unrolled, state

      def oracle(xs):
        cell = make_cell(kind, 0)
        carry = cell.initialize_carry(jnp.zeros((*batch_axes, *features)))
        ys = []
        for t in range(time):
          carry, y = cell(carry, xs[t])
          ys.append(y)
        return ys
    else:
      names = {
        "wrapped": ("core",),
        "option": ("num_feature_axes",),
        "batch_size": ("core", "num_feature_axes", "inputs"),
        "inputs": ("inputs",),
      }
      if kind == "conv_lstm":
        return  # CoreCell wraps Haiku cores; the kind only picks features

      def make_core():
        return (
          hk.GRU(HIDDEN, name="core")
          if kind == "gru"
          else hk.LSTM(HIDDEN, name="core")
        )

      def forward(xs):
        options = {}
        if fault in ("option", "batch_size"):
          options["num_feature_axes"] = junk
        cell = hk_rnn.CoreCell(
          junk if fault == "wrapped" else make_core(), **options
        )
        if fault == "inputs":
          return cell.initialize_carry(junk)
        carry = cell.initialize_carry(jnp.zeros((*batch_axes, *features)))
        ys = []
        for t in range(time):
          carry, y = cell(carry, xs[t])
          ys.append(y)
        return ys

      def oracle(xs):
        core = make_core()
        state = core.initial_state(batch)
        ys = []
        for t in range(time):
          y, state = core(xs[t], state)
          ys.append(y)
        return ys

    hypothesis.event(
      "callable: " + ("CellCore" if case["what"] == "cell_core" else "CoreCell")
    )
    model = hk.without_apply_rng(hk.transform(forward))
    status, params = outcome(model.init, jax.random.PRNGKey(0), xs)
    if status == "ok":
      status, result = outcome(model.apply, params, xs)
    else:
      result = params
    if fault is not None:
      # A junk value that is also valid (0 or 1 feature axes, batch size
      # None or 0) may be accepted; anything refused must say why.
      if status == "error":
        self.assertNamesArgument(result, names[fault], case)
      return
    self.assertEqual(status, "ok", f"{case}: {result!r}")
    with time_limit():
      expected = hk.without_apply_rng(hk.transform(oracle)).apply(params, xs)
    if case["what"] == "cell_core":
      result = list(result[0]) if time else []
    self.assertTreeClose(list(result), list(expected), 1e-5, 1e-6, case)

  @_settings("interop")
  @hypothesis.given(
    st.sampled_from(
      ("from_torch", "to_torch", "from_flax", "from_keras", "from_haiku")
    ),
    st.sampled_from(("source", "params")),
    st.sampled_from(
      (
        "abc",
        None,
        3,
        1.5,
        {},
        {"a": 1},
        [1, 2],
        object(),
        "wrong_shape",
        "wrong_kind",
        "nested_junk",
      )
    ),
  )
  def test_interop_argument_checks(self, function, argument, junk):
    case = (function, argument, junk)
    params = _lstm_params()
    if junk == "wrong_shape":
      junk = jax.tree.map(lambda leaf: np.zeros(leaf.shape + (1,)), params)
    elif junk == "wrong_kind":
      junk = {"rnn/gru_cell": {"w_i": np.zeros((3, 6))}}
    elif junk == "nested_junk":
      junk = {"a": {"b": "c"}}
    call = getattr(hk_rnn.interop, function)
    if argument == "params":
      source = (
        _torch_lstm()
        if function in ("from_torch", "to_torch")
        else (params if function == "from_haiku" else {"params": {}})
      )
      args = (junk, source) if function == "to_torch" else (source, junk)
      # No Flax or Keras model is built here: their source is refused too.
      names = {
        "from_flax": ("params", "variables"),
        "from_keras": ("params", "layer"),
      }.get(function, ("params",))
    else:
      args = (params, junk) if function == "to_torch" else (junk, params)
      names = {
        "from_torch": ("source", "state dict", "prefix"),
        "to_torch": ("module",),
        "from_flax": ("variables",),
        "from_keras": ("layer",),
        "from_haiku": ("hk_params",),
      }[function]
    hypothesis.event(f"callable: interop.{function}")
    status, result = outcome(call, *args)
    if status == "error":
      self.assertNamesArgument(result, names + ("cell",), case)
    else:
      self.fail(f"{case}: accepted, returned {type(result).__name__}")


@functools.cache
def _lstm_params():
  model = hk.without_apply_rng(
    hk.transform(lambda x: hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN))(x))
  )
  return jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3))))


def _torch_lstm():
  torch = __import__("torch")
  return torch.nn.LSTM(3, HIDDEN)


class FoundByFuzzingTest(FuzzCase):
  """The failures the fuzzing found, pinned: each crashed before its fix."""

  def test_empty_axes_run_and_differentiate(self):
    # An empty time axis: RNN read inputs[0] (IndexError); the fused
    # kernels reshaped with -1 (ZeroDivisionError) and sliced a step of an
    # empty buffer in their forward and backward scans (TypeError).
    for kind in ("lstm", "gru", "conv_lstm", "min_gru"):
      for shape in ((3, 0), (0, 2), (0, 0)):
        x = jnp.ones((*shape, *feature_shape(kind)))
        model = hk.without_apply_rng(
          hk.transform(lambda x, kind=kind: hk_rnn.RNN(make_cell(kind, 0))(x))
        )
        params = model.init(jax.random.PRNGKey(0), x)

        def loss(p, x, model=model):
          carry, y = model.apply(p, x)
          return jnp.sum(y) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))

        with time_limit():
          carry, y = model.apply(params, x)
          grads = jax.grad(loss, argnums=(0, 1))(params, x)
        spatial = feature_shape(kind)[:-1]
        self.assertEqual(y.shape, (*shape, *spatial, HIDDEN))
        for leaf in jax.tree.leaves((carry, grads)):
          self.assertFalse(np.asarray(leaf).any(), (kind, shape))

  def test_python_objects_are_named_errors(self):
    x = jnp.ones((2, 3, 1))
    model = hk.without_apply_rng(
      hk.transform(
        lambda x, m=None, n=None: hk_rnn.RNN(hk_rnn.GRUCell(2))(
          x, m, seq_lengths=n
        )
      )
    )
    params = model.init(jax.random.PRNGKey(0), x)
    for call, argument in (
      (lambda: model.apply(params, "abc"), "inputs"),
      (lambda: model.apply(params, x, {"a": 1}), "segmentation_mask"),
      (lambda: model.apply(params, x, None, object()), "seq_lengths"),
      (lambda: hk_rnn.last_segment_ids("abc"), "segmentation_mask"),
      (lambda: hk_rnn.last_segment_ids(jnp.ones((2, 3)), {}), "previous"),
      (lambda: hk_rnn.flip_sequences(x, num_batch_dims="1"), "num_batch_dims"),
    ):
      with self.assertRaisesRegex((TypeError, ValueError), argument):
        call()

  def test_cores_refuse_what_they_cannot_run(self):
    def cell_core(input_shape=None, batch_size=2, inputs=None):
      core = hk_rnn.CellCore(hk_rnn.LSTMCell(2), input_shape=input_shape)
      return core(inputs, core.initial_state(batch_size))

    for options, argument in (
      ({"input_shape": 0}, "input_shape"),
      ({"batch_size": "2"}, "batch_size"),
      ({"batch_size": -1}, "batch_size"),
      ({"inputs": "abc"}, "inputs"),
      ({"inputs": jnp.float32(1.0)}, "inputs"),
    ):
      with self.assertRaisesRegex((TypeError, ValueError), argument):
        hk.transform(lambda options=options: cell_core(**options)).init(
          jax.random.PRNGKey(0)
        )
    with self.assertRaisesRegex(TypeError, "inputs"):
      hk.transform(lambda: hk_rnn.CoreCell(hk.LSTM(2))(None, "abc")).init(
        jax.random.PRNGKey(0)
      )


if __name__ == "__main__":
  absltest.main()
