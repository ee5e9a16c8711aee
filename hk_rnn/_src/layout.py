"""How a batch of sequences is laid out, and the one parse of a call's batch.

``RNN``, ``Bidirectional`` and ``StackedRNN`` each call :func:`parse` once on
what the user passed: the inputs, ``segmentation_mask`` or ``seq_lengths``,
``max_segments`` and ``initial_segment_ids``. It checks them (values too,
when concrete) and returns a :class:`Batch`, which the modules hand down to
the RNNs they run; nothing below looks at the user's mask again.

A batch of sequences is described by *segment ids*, an integer array laid
out like the inputs without their feature axes: ``0`` marks padding, a
non-zero value is the id of the sequence (segment) a step belongs to::

    one sequence per row      [1, 1, 1, 0, 0]
    packed row                [1, 1, 1, 2, 2, 0, 0]
    seq_lengths=[3]  ==       [1, 1, 1, 0, 0]

Padding only ever sits at the end of a row, ids never decrease along a row
and each segment is contiguous. These invariants are checked whenever the
mask or lengths are concrete (outside ``jit``, and held whole by this
process); traced values and global arrays spread over several processes
cannot be inspected here, so for them they are the caller's promise.

This module also checks a user's ``initial_carry`` against the cell's own;
checks of single arguments shared with other modules are in ``checks``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src import checks, packing

Array = jax.Array
Carry = Any


class Layout:
  """Where the batch, time and feature axes of one call's inputs are.

  Moves arrays between the user's layout, ``(*batch, time, *features)`` or
  ``(time, *batch, *features)``, and the scan's: time-major with exactly
  one batch axis, ``(time, batch, *features)``, where ``batch`` flattens all
  batch axes (a size-1 axis when there are none).

  >>> import jax.numpy as jnp
  >>> layout = Layout.of(jnp.ones((2, 3, 5, 4)), 1, False, "RNN")
  >>> layout.batch_shape, layout.time, layout.mask_shape
  ((2, 3), 5, (2, 3, 5))
  >>> layout.to_scan(jnp.ones((2, 3, 5, 4))).shape
  (5, 6, 4)
  """

  def __init__(
    self,
    batch_shape: Sequence[int],
    time: int,
    feature_shape: Sequence[int] = (),
    dtype: Any = None,
    *,
    time_major: bool,
  ):
    self.batch_shape = tuple(batch_shape)
    self.time = time
    self.feature_shape = tuple(feature_shape)
    self.num_feature_axes = len(self.feature_shape)
    self.dtype = dtype
    self.time_major = time_major
    self.time_axis = 0 if time_major else len(self.batch_shape)
    self.batch_size = math.prod(self.batch_shape)

  @classmethod
  def of(
    cls, inputs: Any, num_feature_axes: int, time_major: bool, context: str
  ) -> Layout:
    """The layout of ``inputs`` for a cell with ``num_feature_axes``."""
    _check_one_array(inputs, context)
    shape = np.shape(inputs)
    dtype = _inputs_dtype(inputs, context)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
        f"{context}: inputs must be floating point, got dtype {dtype} of "
        f"shape {tuple(shape)}; embed token ids first (e.g. with hk.Embed), "
        "or cast the inputs to a float dtype"
      )
    if len(shape) < num_feature_axes + 1:
      axes = (
        "(time, *batch, *features)"
        if time_major
        else ("(*batch, time, *features)")
      )
      raise ValueError(
        f"{context}: inputs must be {axes} with {num_feature_axes} "
        f"feature axes for this cell, so at least {num_feature_axes + 1} "
        f"axes; got shape {tuple(shape)}"
      )
    split = len(shape) - num_feature_axes
    lead, feature_shape = shape[:split], shape[split:]
    batch_shape = lead[1:] if time_major else lead[:-1]
    time = lead[0] if time_major else lead[-1]
    return cls(batch_shape, time, feature_shape, dtype, time_major=time_major)

  @property
  def mask_shape(self) -> tuple[int, ...]:
    """The shape a ``segmentation_mask`` for these inputs must have."""
    if self.time_major:
      return (self.time, *self.batch_shape)
    return (*self.batch_shape, self.time)

  def missing_axis_hint(self, shape: Sequence[int], *, lengths: bool) -> str:
    """Says so when ``shape`` fits inputs that have one more axis.

    Inputs ``(*batch, time, features)`` that lack their feature axis are read
    with their time axis as features: the mask or lengths meant for them then
    has one axis more than expected.
    """
    if not self.feature_shape:
      return ""
    shifted = (*self.mask_shape, self.feature_shape[0])
    if lengths:
      shifted = shifted[1:] if self.time_major else shifted[:-1]
    if tuple(shape) != shifted:
      return ""
    if self.time_major:
      inputs = (self.time, *self.batch_shape, *self.feature_shape)
    else:
      inputs = (*self.batch_shape, self.time, *self.feature_shape)
    return (
      f"; that shape would fit if the inputs, of shape {checks.describe_shape(inputs)}, "
      "had one more axis: are they missing their feature axis? (inputs[..., "
      "None] gives one feature per step)"
    )

  def to_scan(self, array: Array, features: bool = True) -> Array:
    """``(time, batch, *features)`` (without ``features``: ``(time, batch)``)."""
    array = jnp.moveaxis(jnp.asarray(array), self.time_axis, 0)
    trailing = self.feature_shape if features else ()
    return array.reshape((self.time, self.batch_size, *trailing))

  def from_scan(self, tree: Any) -> Any:
    """Every leaf ``(time, batch, ...)`` back in the user's layout."""

    def restore(leaf):
      leaf = leaf.reshape((self.time, *self.batch_shape, *leaf.shape[2:]))
      return jnp.moveaxis(leaf, 0, self.time_axis)

    return jax.tree.map(restore, tree)

  def carry_to_scan(self, carry: Carry) -> Carry:
    """Every leaf ``(*batch, ...)`` as ``(batch, ...)``."""
    return jax.tree.map(
      lambda leaf: leaf.reshape(
        (self.batch_size, *leaf.shape[len(self.batch_shape) :])
      ),
      carry,
    )

  def carry_from_scan(self, carry: Carry) -> Carry:
    """Every leaf ``(batch, ...)`` as ``(*batch, ...)``."""
    return jax.tree.map(
      lambda leaf: leaf.reshape((*self.batch_shape, *leaf.shape[1:])), carry
    )


def _inputs_dtype(inputs: Any, context: str) -> np.dtype:
  """The dtype of ``inputs``, or a TypeError when they are not numbers."""
  try:
    return jnp.result_type(inputs)
  except TypeError:
    raise TypeError(
      f"{context}: inputs must be an array of numbers (*batch, time, "
      f"*features), got {type(inputs).__name__} {checks.abbreviate(inputs)}"
    ) from None


def _check_one_array(inputs: Any, context: str) -> None:
  """Refuses what is not one array of steps, saying what to pass instead."""
  if isinstance(inputs, packing.PackedSequences):
    raise ValueError(
      f"{context}: inputs is a PackedSequences; pass its arrays, and its "
      "slot count for one carry per sequence: (packed.inputs, "
      "packed.segmentation_mask, max_segments=packed.max_segments)"
    )
  if isinstance(inputs, (list, tuple)):
    raise ValueError(
      f"{context}: inputs must be one array (*batch, time, *features), got "
      f"a {type(inputs).__name__} of {len(inputs)} items; for sequences of "
      "different lengths, pad them to one length and pass seq_lengths (or "
      "a segmentation_mask), or pack them with hk_rnn.pack_sequences and "
      "pass packed.inputs, packed.segmentation_mask"
    )


@dataclasses.dataclass(frozen=True)
class Batch:
  """One call's sequences, parsed once by :func:`parse`.

  Everything is in the scan's layout (time first, one flattened batch axis)
  and already checked; the modules that run RNNs hand it down unchanged.

  Attributes:
    batch_shape: the batch axes of the inputs.
    time: the length of their time axis.
    time_major: whether the user's arrays put time before the batch axes.
    ids: int32 segment ids ``(time, batch)``; None when every step is valid.
    packed: whether some row may hold several segments (True when the
      mask is traced, or when streaming continues some rows' carries).
    max_segments: None, or K: return the carry of each of K segments.
    streaming: ``initial_segment_ids`` was given.
    continued: when streaming with a mask over at least one step, bool
      ``(batch,)``: the rows whose first segment continues the carry passed
      in; else None.
  """

  batch_shape: tuple[int, ...]
  time: int
  time_major: bool
  ids: Array | None
  packed: bool
  max_segments: int | None = None
  streaming: bool = False
  continued: Array | None = None

  @property
  def carry_continues(self) -> bool:
    """Every row continues the carry passed in (streaming without a mask)."""
    return self.streaming and self.ids is None

  def valid_steps(self) -> Array | None:
    """True at valid steps, in the user's layout; None: every step is valid.

    Bool ``(*batch, time)``, or ``(time, *batch)`` when time-major.
    """
    if self.ids is None:
      return None
    user = Layout(self.batch_shape, self.time, time_major=self.time_major)
    return user.from_scan(self.ids != 0)


def parse(
  inputs: Any,
  segmentation_mask: Any = None,
  seq_lengths: Any = None,
  *,
  num_feature_axes: int,
  time_major: bool,
  max_segments: Any = None,
  initial_segment_ids: Any = None,
  context: str,
) -> Batch:
  """Checks one call's inputs, mask or lengths and options; the :class:`Batch`.

  >>> import jax.numpy as jnp
  >>> batch = parse(jnp.ones((2, 4, 3)), jnp.array([[1, 1, 2, 0]] * 2),
  ...               num_feature_axes=1, time_major=False, context="RNN")
  >>> batch.ids.shape, batch.packed
  ((4, 2), True)

  Args:
    inputs: ``(*batch, time, *features)`` (``(time, *batch, *features)``
      when ``time_major``), checked for a cell with ``num_feature_axes``.
    segmentation_mask: ``None``, or integer or bool, laid out like
      ``inputs`` without their feature axes.
    seq_lengths: ``None``, or integer ``(*batch,)``.
    num_feature_axes: the feature axes of one step for the first cell.
    time_major: the layout of ``inputs`` and ``segmentation_mask``.
    max_segments: None or a positive int.
    initial_segment_ids: None, or integer ``(*batch,)`` (streaming).
    context: the module parsing, for error messages.

  Raises:
    ValueError, TypeError: as described for each argument of ``RNN``.
  """
  layout = Layout.of(inputs, num_feature_axes, time_major, context)
  ids = segment_ids(segmentation_mask, seq_lengths, layout, context)
  max_segments = checks.positive_int(
    max_segments, "max_segments", context, allow_none=True
  )
  if max_segments is not None and segmentation_mask is not None:
    check_segment_count(
      ids, max_segments, time_major=time_major, context=context
    )
  packed = segmentation_mask is not None and has_packed_rows(
    segmentation_mask, axis=layout.time_axis
  )
  if ids is not None:
    ids = layout.to_scan(ids, features=False)
  continued = None
  if initial_segment_ids is not None:
    continued = _continued_rows(initial_segment_ids, ids, layout, context)
    packed = packed or continued is not None
  return Batch(
    batch_shape=layout.batch_shape,
    time=layout.time,
    time_major=time_major,
    ids=ids,
    packed=packed,
    max_segments=max_segments,
    streaming=initial_segment_ids is not None,
    continued=continued,
  )


def _continued_rows(initial_segment_ids, ids, layout, context) -> Array | None:
  """Rows whose first step continues the segment of the incoming carry."""
  previous = jnp.asarray(initial_segment_ids)
  if tuple(previous.shape) != layout.batch_shape or not jnp.issubdtype(
    previous.dtype, jnp.integer
  ):
    raise ValueError(
      f"{context}: initial_segment_ids must be an integer array of shape "
      f"(*batch,) = {layout.batch_shape}, got {previous.dtype} "
      f"{tuple(previous.shape)}"
    )
  if ids is None or not layout.time:
    # One unbroken sequence per row, or no step at all: nothing restarts.
    return None
  return ids[0] == previous.reshape(layout.batch_size)


def segment_ids(
  segmentation_mask: Array | None,
  seq_lengths: Array | None,
  layout: Layout,
  context: str,
) -> Array | None:
  """Validates a mask or lengths and returns int32 segment ids (or None).

  Args:
    segmentation_mask: integer or bool, ``layout.mask_shape``.
    seq_lengths: integer ``(*batch,)``, the number of valid steps per row.
    layout: the inputs' layout; its ``feature_shape``, when known, lets an
      error say when the mask or lengths fit inputs with one more axis
      (inputs missing their feature axis).
    context: the caller's name, for error messages.

  Returns:
    ``None`` when neither is given (every step is valid), else int32 segment
    ids in the layout of ``segmentation_mask``.

  Raises:
    ValueError: for both arguments at once, a wrong shape or dtype, and, when
      the values are concrete, out-of-range lengths, padding before the end of
      a row, negative or decreasing ids.
  """
  if segmentation_mask is not None and seq_lengths is not None:
    raise ValueError(
      f"{context}: pass either segmentation_mask or seq_lengths, not both; "
      f"got segmentation_mask of shape {checks.describe_shape(np.shape(segmentation_mask))}"
      f" and seq_lengths of shape {checks.describe_shape(np.shape(seq_lengths))}"
    )
  if seq_lengths is not None:
    return _ids_from_lengths(seq_lengths, layout, context)
  if segmentation_mask is not None:
    return ids_from_mask(segmentation_mask, layout, context)
  return None


def _ids_from_lengths(lengths, layout, context):
  batch_shape, time = layout.batch_shape, layout.time
  lengths = checks.as_array(lengths, context, "seq_lengths")
  if tuple(lengths.shape) != batch_shape:
    raise ValueError(
      f"{context}: seq_lengths must have shape (*batch,) = "
      f"{checks.describe_shape(batch_shape)}, got {checks.describe_shape(lengths.shape)}"
      + layout.missing_axis_hint(lengths.shape, lengths=True)
    )
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
      f"{context}: seq_lengths must be an integer array, got dtype "
      f"{lengths.dtype}"
    )
  if checks.is_concrete(lengths):
    values = np.asarray(lengths)
    bad = (values < 0) | (values > time)
    if bad.any():
      row = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(
        f"{context}: seq_lengths must lie in [0, time] = [0, {time}], got "
        f"{int(values[row])} for row {row}"
      )
  steps = jnp.arange(time, dtype=jnp.int32)
  ids = (steps < lengths[..., None]).astype(jnp.int32)
  return jnp.moveaxis(ids, -1, 0) if layout.time_major else ids


def ids_from_mask(mask, layout, context, argument="segmentation_mask"):
  """``mask`` checked against ``layout.mask_shape``, as int32 segment ids.

  Its values are checked too when concrete (see :func:`segment_ids`).
  """
  mask = checks.as_array(mask, context, argument)
  expected = layout.mask_shape
  axes = "(time, *batch)" if layout.time_major else "(*batch, time)"
  is_integer = jnp.issubdtype(mask.dtype, jnp.integer)
  if tuple(mask.shape) != expected:
    hint = layout.missing_axis_hint(mask.shape, lengths=False)
    if is_integer and tuple(mask.shape) == layout.batch_shape:
      hint = (
        "; that is the shape of seq_lengths (*batch,): pass lengths by "
        "keyword, seq_lengths=..., not as the mask"
      )
    raise ValueError(
      f"{context}: {argument} must have shape {axes} = "
      f"{checks.describe_shape(expected)}, got {checks.describe_shape(mask.shape)}{hint}"
    )
  if not (is_integer or mask.dtype == jnp.bool_):
    raise ValueError(
      f"{context}: {argument} must be an integer or bool array, got "
      f"dtype {mask.dtype}"
    )
  if checks.is_concrete(mask):
    rows = np.moveaxis(np.asarray(mask), 0, -1) if layout.time_major else mask
    _check_mask_values(np.asarray(rows).astype(np.int64), context, argument)
  return mask.astype(jnp.int32)


def _check_mask_values(
  rows: np.ndarray, context: str, argument: str = "segmentation_mask"
) -> None:
  """Checks concrete ids laid out as ``(*batch, time)``.

  A failure names the first offending row, its first offending steps and
  how many rows offend, never the whole row (rows run to thousands of
  steps).
  """
  num_rows = int(np.prod(rows.shape[:-1]))

  def fail(problem, offending, found, hint=""):
    where = np.argwhere(offending)[0]
    row = tuple(int(i) for i in where[:-1])
    count = int(offending.reshape(num_rows, -1).any(axis=-1).sum())
    raise ValueError(
      f"{context}: {argument} {problem}; got row {row}: {found(where)} "
      f"({count} of {num_rows} rows){hint}"
    )

  def negative(where):
    return f"id {rows[tuple(where)]} at step {int(where[-1])}"

  if (rows < 0).any():
    fail("ids must be non-negative", rows < 0, negative)
  valid = rows != 0
  resumed = valid[..., 1:] & ~valid[..., :-1]

  def padding_then_id(where):
    step = int(where[-1]) + 1
    row = rows[tuple(where[:-1])]
    # The padding run that this id follows, from its first step.
    first = step - 1
    while first > 0 and row[first - 1] == 0:
      first -= 1
    padding = (
      f"step {first}" if first == step - 1 else f"steps {first} to {step - 1}"
    )
    return f"padding at {padding}, then id {row[step]} at step {step}"

  if resumed.any():
    fail(
      "padding (0) must only sit at the end of a row",
      resumed,
      padding_then_id,
      "; padding belongs after each row's steps: pad at the end (Keras' "
      "pad_sequences pads in front by default: pass padding='post'), or "
      "move each row's tokens to the front",
    )
  decreased = valid[..., 1:] & (rows[..., 1:] < rows[..., :-1])

  def id_then_smaller(where):
    step = int(where[-1]) + 1
    row = rows[tuple(where[:-1])]
    return (
      f"id {row[step - 1]} at step {step - 1}, then id {row[step]} at step "
      f"{step}"
    )

  if decreased.any():
    fail(
      "segment ids must not decrease along a row (each segment "
      "contiguous, ids non-decreasing)",
      decreased,
      id_then_smaller,
    )


def check_segment_count(
  ids: Array | None, max_segments: int, *, time_major: bool, context: str
) -> None:
  """Raises when a concrete row holds more than ``max_segments`` segments."""
  if ids is None or not checks.is_concrete(ids):
    return
  rows = np.asarray(ids)
  rows = np.moveaxis(rows, 0, -1) if time_major else rows
  valid = rows != 0
  starts = valid.copy()
  starts[..., 1:] &= rows[..., 1:] != rows[..., :-1]
  counts = starts.sum(-1)
  if (counts > max_segments).any():
    row = tuple(int(i) for i in np.argwhere(counts > max_segments)[0])
    raise ValueError(
      f"{context}: segmentation_mask must hold at most max_segments = "
      f"{max_segments} segments per row; got {int(counts[row])} in row "
      f"{row} = {rows[row].tolist()}"
    )


def has_packed_rows(ids: Array | None, axis: int) -> bool:
  """Whether some row may hold several segments (True when unknowable)."""
  if ids is None:
    return False
  if not checks.is_concrete(ids):
    return True
  # numpy, not jnp: under an outer jit even constants become tracers.
  ids = np.moveaxis(np.asarray(ids), axis, -1)
  return bool(((ids[..., 1:] != ids[..., :-1]) & (ids[..., 1:] != 0)).any())


class InitialCarryMismatch(ValueError):
  """An ``initial_carry`` that does not fit; wrappers add their own context."""


def describe_carry(carry: Any) -> str:
  """What a user passed as a carry, for errors: ``a tuple of 2``, ..."""
  if isinstance(carry, (tuple, list)):
    return f"a {type(carry).__name__} of {len(carry)}"
  return f"a single array of shape {tuple(np.shape(carry))}"


@contextlib.contextmanager
def initial_carry_context(context: str, what: str) -> Iterator[None]:
  """Prefixes an inner module's ``InitialCarryMismatch`` with ``context``."""
  try:
    yield
  except InitialCarryMismatch as error:
    raise InitialCarryMismatch(f"{context}: {what}: {error}") from None


def check_initial_carry(
  cell: Any, initial_carry: Carry, layout: Layout, context: str
) -> Carry:
  """Checks a user's carry against ``cell``'s own, casting its dtypes.

  ``cell`` is an ``RNNCellBase``; ``layout`` that of the inputs it runs on.
  """
  sample = jax.ShapeDtypeStruct(
    (*layout.batch_shape, *layout.feature_shape), layout.dtype
  )
  # A throwaway key: only shapes are computed, and a random carry_init must
  # not consume the caller's rng just to be checked.
  expected = hk.eval_shape(
    lambda s: cell.initialize_carry(s, rng=jax.random.PRNGKey(0)), sample
  )
  expected_leaves, expected_tree = jax.tree.flatten(expected)
  leaves, tree = jax.tree.flatten(initial_carry)
  got = [tuple(np.shape(leaf)) for leaf in leaves]
  want = [tuple(leaf.shape) for leaf in expected_leaves]
  if tree != expected_tree:
    raise InitialCarryMismatch(
      f"{context}: initial_carry must match the cell's carry for these "
      f"inputs: {_structure_mismatch(cell, expected, initial_carry)}"
    )
  if got != want:
    raise InitialCarryMismatch(
      f"{context}: initial_carry must match the cell's carry for these "
      f"inputs, shapes {jax.tree.unflatten(expected_tree, want)}; got "
      f"{jax.tree.unflatten(tree, got)}"
    )
  return jax.tree.unflatten(
    tree,
    [
      jnp.asarray(leaf, spec.dtype)
      for leaf, spec in zip(leaves, expected_leaves, strict=True)
    ],
  )


def _structure_mismatch(cell, expected: Carry, carry: Carry) -> str:
  """Says what carry structure ``cell`` expects and what ``carry`` has."""

  def describe(tree):
    leaves, structure = jax.tree.flatten(tree)
    if structure.num_nodes == 1:
      return f"a single array of shape {tuple(np.shape(leaves[0]))}"
    shapes = jax.tree.unflatten(
      structure, [_Shape(np.shape(leaf)) for leaf in leaves]
    )
    arrays = "array" if len(leaves) == 1 else "arrays"
    return f"a {type(tree).__name__} of {len(leaves)} {arrays}, {shapes!r}"

  message = (
    f"{type(cell).__name__} {cell.module_name!r} carries "
    f"{describe(expected)}; got {describe(carry)}"
  )
  if jax.tree.structure(expected).num_nodes == 1 and (
    isinstance(carry, (tuple, list)) and len(carry) == 1
  ):
    message += (
      "; this cell's carry is a single array: pass it itself, not in a "
      f"1-{type(carry).__name__}"
    )
  return message


class _Shape(tuple):
  """A shape that prints as one, as a leaf of a structure being described."""

  def __repr__(self):
    return str(tuple(int(d) for d in self))
