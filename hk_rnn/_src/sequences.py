"""Pure functions on sequence layouts: masks, lengths, segments and flips.

Every mask-aware piece of hk_rnn goes through this module. A batch of
sequences is described by *segment ids*, an integer array laid out like the
inputs without their feature axes: ``0`` marks padding, a non-zero value is
the id of the sequence (segment) a step belongs to::

    one sequence per row      [1, 1, 1, 0, 0]
    packed row                [1, 1, 1, 2, 2, 0, 0]
    seq_lengths=[3]  ==       [1, 1, 1, 0, 0]

Padding only ever sits at the end of a row, ids never decrease along a row
and each segment is contiguous. These invariants are checked whenever the
mask or lengths are concrete (outside ``jit``, and held whole by this
process); traced values and global arrays spread over several processes
cannot be inspected here, so for them they are the caller's promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


def is_concrete(value: Any) -> bool:
  """Whether ``value``'s contents can be read on this host now.

  Not for a tracer (under ``jit``, ``vmap``, ``grad``), nor for a global
  ``jax.Array`` of a multi-process run whose shards sit partly on other
  processes' devices: fetching it would fail, and checking only the local
  shards would let one process raise while the others wait for it in a
  collective. Both are checked as traced values are: shapes and dtypes only.
  """
  if isinstance(value, jax.core.Tracer):
    return False
  return not isinstance(value, jax.Array) or value.is_fully_addressable


def _describe(shape: Sequence[int]) -> str:
  return str(tuple(int(d) for d in shape))


def segment_ids(
  segmentation_mask: Array | None,
  seq_lengths: Array | None,
  *,
  batch_shape: Sequence[int],
  time: int,
  time_major: bool,
  context: str,
  feature_shape: Sequence[int] = (),
) -> Array | None:
  """Validates a mask or lengths and returns int32 segment ids (or None).

  Args:
    segmentation_mask: integer or bool, ``(*batch, time)`` or, when
      ``time_major``, ``(time, *batch)``.
    seq_lengths: integer ``(*batch,)``, the number of valid steps per row.
    batch_shape: the batch axes of the inputs.
    time: the length of the time axis of the inputs.
    time_major: the layout of ``segmentation_mask`` and of the result.
    context: the caller's name, for error messages.
    feature_shape: the feature axes of the inputs; with it, a mask or
      lengths shaped for inputs with one more axis says so (inputs missing
      their feature axis).

  Returns:
    ``None`` when neither is given (every step is valid), else int32 segment
    ids in the layout of ``segmentation_mask``.

  Raises:
    ValueError: for both arguments at once, a wrong shape or dtype, and, when
      the values are concrete, out-of-range lengths, padding before the end of
      a row, negative or decreasing ids.
  """
  batch_shape = tuple(batch_shape)
  layout = _InputsLayout(batch_shape, time, tuple(feature_shape), time_major)
  if segmentation_mask is not None and seq_lengths is not None:
    raise ValueError(
      f"{context}: pass either segmentation_mask or seq_lengths, not both; "
      f"got segmentation_mask of shape {_describe(np.shape(segmentation_mask))}"
      f" and seq_lengths of shape {_describe(np.shape(seq_lengths))}"
    )
  if seq_lengths is not None:
    return _ids_from_lengths(seq_lengths, layout, context)
  if segmentation_mask is not None:
    return _ids_from_mask(segmentation_mask, layout, context)
  return None


class _InputsLayout:
  """The axes of the inputs a mask or lengths must fit, for error messages."""

  def __init__(self, batch_shape, time, feature_shape, time_major):
    self.batch_shape = batch_shape
    self.time = time
    self.feature_shape = feature_shape
    self.time_major = time_major

  @property
  def mask_shape(self) -> tuple[int, ...]:
    if self.time_major:
      return (self.time, *self.batch_shape)
    return (*self.batch_shape, self.time)

  def missing_axis_hint(self, shape, *, lengths: bool) -> str:
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
      f"; that shape would fit if the inputs, of shape {_describe(inputs)}, "
      "had one more axis: are they missing their feature axis? (inputs[..., "
      "None] gives one feature per step)"
    )


def as_array(value: Any, context: str, argument: str) -> Any:
  """``value`` as a jax array (tracers as they are), or a TypeError.

  The error names ``argument`` when ``value`` is no array of numbers (a
  string, None, a dict, a ragged list), where ``jnp.asarray`` would name
  nothing the caller passed.
  """
  if not is_concrete(value) or isinstance(value, jax.Array):
    return value
  try:
    return jnp.asarray(value)
  except (TypeError, ValueError):
    raise TypeError(
      f"{context}: {argument} must be an array of numbers, got "
      f"{type(value).__name__} {abbreviate(value)}"
    ) from None


def abbreviate(value: Any) -> str:
  """``repr(value)`` cut to 60 characters, for error messages."""
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _ids_from_lengths(lengths, layout, context):
  batch_shape, time = layout.batch_shape, layout.time
  lengths = as_array(lengths, context, "seq_lengths")
  if tuple(lengths.shape) != batch_shape:
    raise ValueError(
      f"{context}: seq_lengths must have shape (*batch,) = "
      f"{_describe(batch_shape)}, got {_describe(lengths.shape)}"
      + layout.missing_axis_hint(lengths.shape, lengths=True)
    )
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(
      f"{context}: seq_lengths must be an integer array, got dtype "
      f"{lengths.dtype}"
    )
  if is_concrete(lengths):
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


def _ids_from_mask(mask, layout, context, argument="segmentation_mask"):
  mask = as_array(mask, context, argument)
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
      f"{_describe(expected)}, got {_describe(mask.shape)}{hint}"
    )
  if not (is_integer or mask.dtype == jnp.bool_):
    raise ValueError(
      f"{context}: {argument} must be an integer or bool array, got "
      f"dtype {mask.dtype}"
    )
  if is_concrete(mask):
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


def segment_starts(ids: Array, axis: int) -> Array:
  """True at the first step of every segment (never at padding)."""
  ids = jnp.moveaxis(ids, axis, -1)
  previous = jnp.concatenate([jnp.zeros_like(ids[..., :1]), ids[..., :-1]], -1)
  first = jnp.arange(ids.shape[-1]) == 0
  starts = (ids != 0) & (first | (ids != previous))
  return jnp.moveaxis(starts, -1, axis)


def check_max_segments(max_segments: Any, context: str) -> int | None:
  """Validates a ``max_segments`` argument: None or a positive int."""
  if max_segments is None:
    return None
  if (
    isinstance(max_segments, (bool, np.bool_))
    or not isinstance(max_segments, (int, np.integer))
    or max_segments < 1
  ):
    raise ValueError(
      f"{context}: max_segments must be a positive int or None, got "
      f"{max_segments!r}"
    )
  return int(max_segments)


def check_segment_count(
  ids: Array | None, max_segments: int, *, time_major: bool, context: str
) -> None:
  """Raises when a concrete row holds more than ``max_segments`` segments."""
  if ids is None or not is_concrete(ids):
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


def segment_end_steps(ids: Array, max_segments: int) -> Array:
  """The last step of each row's k-th segment, or -1 where there is none.

  ``ids`` is time-major, ``(time, batch)``; the result is ``(batch,
  max_segments)`` int32. Segments beyond the ``max_segments``-th are left
  out. A flip of each segment in place keeps every segment's span, so the
  same steps end the segments of the flipped (reversed) sequences.

  >>> import jax.numpy as jnp
  >>> ids = jnp.array([[1, 1, 2, 0], [5, 5, 5, 5]]).T   # (time, batch)
  >>> segment_end_steps(ids, 3)
  Array([[ 1,  2, -1],
         [ 3, -1, -1]], dtype=int32)
  """
  time, batch = ids.shape
  ordinal = jnp.cumsum(segment_starts(ids, axis=0), axis=0, dtype=jnp.int32)
  following = jnp.concatenate([ids[1:], jnp.zeros_like(ids[:1])])
  ends = (ids != 0) & (ids != following)
  # Steps that end no segment, and segments past the last slot, land on the
  # out-of-range slot ``max_segments`` and are dropped.
  slots = jnp.where(ends, ordinal - 1, max_segments)
  steps = jnp.broadcast_to(
    jnp.arange(time, dtype=jnp.int32)[:, None], ids.shape
  )
  rows = jnp.broadcast_to(jnp.arange(batch)[None, :], ids.shape)
  return (
    jnp.full((batch, max_segments), -1, jnp.int32)
    .at[rows, slots]
    .max(steps, mode="drop")
  )


def has_packed_rows(ids: Array | None, axis: int) -> bool:
  """Whether some row may hold several segments (True when unknowable)."""
  if ids is None:
    return False
  if not is_concrete(ids):
    return True
  # numpy, not jnp: under an outer jit even constants become tracers.
  ids = np.moveaxis(np.asarray(ids), axis, -1)
  return bool(((ids[..., 1:] != ids[..., :-1]) & (ids[..., 1:] != 0)).any())


def flip_indices(ids: Array, axis: int) -> Array:
  """For each step, the step it takes its value from when sequences flip.

  A step at position ``t`` in a segment spanning ``[start, end]`` reads from
  ``start + end - t``; padding reads from itself.
  """
  ids = jnp.moveaxis(ids, axis, -1)
  time = ids.shape[-1]
  steps = jnp.arange(time, dtype=jnp.int32)
  valid = ids != 0
  starts = segment_starts(ids, -1)
  following = jnp.concatenate([ids[..., 1:], jnp.zeros_like(ids[..., :1])], -1)
  ends = valid & (ids != following)
  start = jax.lax.cummax(jnp.where(starts, steps, 0), axis=ids.ndim - 1)
  end = jax.lax.cummin(
    jnp.where(ends, steps, time - 1), axis=ids.ndim - 1, reverse=True
  )
  source = jnp.where(valid, start + end - steps, steps)
  return jnp.moveaxis(source, -1, axis)


def flip_tree(tree: PyTree, ids: Array | None, axis: int) -> PyTree:
  """Flips every leaf of ``tree`` along ``axis`` segment by segment.

  ``ids`` has the leaves' leading axes (up to and including ``axis``);
  ``None`` reverses the whole axis.
  """
  if ids is None:
    return jax.tree.map(lambda leaf: jnp.flip(leaf, axis), tree)
  source = flip_indices(ids, axis)

  def flip(leaf):
    index = source.reshape(source.shape + (1,) * (leaf.ndim - source.ndim))
    return jnp.take_along_axis(leaf, index, axis=axis)

  return jax.tree.map(flip, tree)


def flip_sequences(
  inputs: PyTree,
  segmentation_mask: Array | None = None,
  *,
  seq_lengths: Array | None = None,
  num_batch_dims: int = 1,
  time_major: bool = False,
) -> PyTree:
  """Reverses each sequence in place, leaving padding at the end.

  Each row of ``inputs`` may hold one sequence followed by padding (described
  by ``seq_lengths`` or a 0/1 ``segmentation_mask``) or several packed
  sequences (a mask with several ids); every sequence is reversed where it
  stands. With neither, the whole time axis is reversed. Values at padded
  positions are unspecified.

  >>> import jax.numpy as jnp
  >>> import hk_rnn
  >>> x = jnp.array([[1, 0, 0], [2, 3, 0], [4, 5, 6]])
  >>> hk_rnn.flip_sequences(x, seq_lengths=jnp.array([1, 2, 3]))
  Array([[1, 0, 0],
         [3, 2, 0],
         [6, 5, 4]], dtype=int32)
  >>> packed = jnp.array([[1, 2, 3, 4, 5, 0]])
  >>> hk_rnn.flip_sequences(packed, jnp.array([[1, 1, 1, 2, 2, 0]]))
  Array([[3, 2, 1, 5, 4, 0]], dtype=int32)

  Args:
    inputs: an array, or a pytree of arrays, laid out ``(*batch, time, ...)``
      (``(time, *batch, ...)`` when ``time_major``) with ``num_batch_dims``
      batch axes and any number of trailing feature axes.
    segmentation_mask: integer or bool, shaped like ``inputs`` without its
      feature axes; 0 marks padding, other values are segment ids.
    seq_lengths: integer ``(*batch,)``, the number of valid steps per row.
    num_batch_dims: how many batch axes ``inputs`` has (0 or more).
    time_major: whether time comes before the batch axes.

  Returns:
    ``inputs`` with each sequence reversed in place.

  Raises:
    ValueError: for inputs with too few axes, a mask or lengths of the wrong
      shape, both at once, or (when concrete) invalid mask or length values.
  """
  context = "flip_sequences"
  if isinstance(num_batch_dims, (bool, np.bool_)) or not isinstance(
    num_batch_dims, (int, np.integer)
  ):
    raise TypeError(
      f"{context}: num_batch_dims must be an int, got "
      f"{abbreviate(num_batch_dims)}"
    )
  if num_batch_dims < 0:
    raise ValueError(
      f"{context}: num_batch_dims must be >= 0, got {num_batch_dims}"
    )
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError(f"{context}: inputs must hold at least one array")
  lead = num_batch_dims + 1
  layout = "(time, *batch, ...)" if time_major else "(*batch, time, ...)"
  for leaf in leaves:
    if np.ndim(leaf) < lead:
      raise ValueError(
        f"{context}: inputs must have at least num_batch_dims + 1 = {lead} "
        f"axes {layout}, got shape {_describe(np.shape(leaf))}"
      )
  first = np.shape(leaves[0])[:lead]
  for leaf in leaves[1:]:
    if np.shape(leaf)[:lead] != first:
      raise ValueError(
        f"{context}: every leaf of inputs must share the leading "
        f"{layout} axes {_describe(first)}, got {_describe(np.shape(leaf))}"
      )
  axis = 0 if time_major else num_batch_dims
  batch_shape = first[1:] if time_major else first[:-1]
  ids = segment_ids(
    segmentation_mask,
    seq_lengths,
    batch_shape=batch_shape,
    time=first[axis],
    time_major=time_major,
    context=context,
  )
  return flip_tree(jax.tree.map(jnp.asarray, inputs), ids, axis)


def last_segment_ids(
  segmentation_mask: Array,
  previous: Array | None = None,
  *,
  time_major: bool = False,
) -> Array:
  """The id of each row's last segment, for streaming the next chunk.

  Pass the result as ``initial_segment_ids`` with the chunk's final carry
  when running the next chunk of the same rows (see ``RNN``). A row that is
  all padding in this chunk keeps ``previous`` (0 when there is none).

  >>> import jax.numpy as jnp, hk_rnn
  >>> hk_rnn.last_segment_ids(jnp.array([[1, 1, 2, 0], [0, 0, 0, 0]]),
  ...                         previous=jnp.array([1, 7]))
  Array([2, 7], dtype=int32)

  Args:
    segmentation_mask: integer or bool, ``(*batch, time)`` (``(time,
      *batch)`` when ``time_major``).
    previous: integer ``(*batch,)``, the ids before this chunk.
    time_major: the mask's layout.

  Returns:
    int32 ``(*batch,)``.

  Raises:
    ValueError: as ``RNN`` does for its mask: a mask without a time axis, of
      a dtype other than integer or bool, or (when concrete) with padding
      before the end of a row, negative or decreasing ids; and ``previous``
      of a shape other than the mask's batch axes, or not integer.
  """
  context = "last_segment_ids"
  mask = as_array(segmentation_mask, context, "segmentation_mask")
  axes = "(time, *batch)" if time_major else "(*batch, time)"
  if mask.ndim < 1:
    raise ValueError(
      f"{context}: segmentation_mask must have shape {axes}, with a time "
      f"axis, got {_describe(mask.shape)}"
    )
  batch_shape = mask.shape[1:] if time_major else mask.shape[:-1]
  if previous is not None:
    previous = as_array(previous, context, "previous")
    if tuple(previous.shape) != tuple(batch_shape):
      hint = ""
      if tuple(previous.shape) == tuple(mask.shape):
        hint = (
          "; segmentation_mask has the shape of previous, so no time axis: "
          "is it seq_lengths rather than a mask?"
        )
      raise ValueError(
        f"{context}: previous must have shape (*batch,) = "
        f"{_describe(batch_shape)} for segmentation_mask of shape {axes} = "
        f"{_describe(mask.shape)}, got {_describe(previous.shape)}{hint}"
      )
    if not jnp.issubdtype(previous.dtype, jnp.integer):
      raise ValueError(
        f"{context}: previous must be an integer array, got dtype "
        f"{previous.dtype}"
      )
  time = mask.shape[0] if time_major else mask.shape[-1]
  layout = _InputsLayout(tuple(batch_shape), time, (), time_major)
  ids = _ids_from_mask(mask, layout, context)
  # Ids never decrease along a row and padding is 0, so the last is the max.
  last = jnp.max(ids, axis=0 if time_major else -1, initial=0)
  if previous is None:
    return last
  return jnp.where(last == 0, previous.astype(jnp.int32), last)
