"""Pure functions on segment ids: segment starts and ends, and flips.

Segment ids describe a batch of sequences (see :mod:`hk_rnn._src.layout`,
which parses them from a mask or lengths): ``0`` marks padding, a non-zero
value the sequence (segment) a step belongs to. The functions here compute
what the scan needs from them, and the two public ones, ``flip_sequences``
and ``last_segment_ids``, parse their own mask first.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src import checks
from hk_rnn._src import layout as layout_lib

Array = jax.Array
PyTree = Any


def segment_starts(ids: Array, axis: int) -> Array:
  """True at the first step of every segment (never at padding)."""
  ids = jnp.moveaxis(ids, axis, -1)
  previous = jnp.concatenate([jnp.zeros_like(ids[..., :1]), ids[..., :-1]], -1)
  first = jnp.arange(ids.shape[-1]) == 0
  starts = (ids != 0) & (first | (ids != previous))
  return jnp.moveaxis(starts, -1, axis)


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
      f"{checks.abbreviate(num_batch_dims)}"
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
        f"axes {layout}, got shape {checks.describe_shape(np.shape(leaf))}"
      )
  first = np.shape(leaves[0])[:lead]
  for leaf in leaves[1:]:
    if np.shape(leaf)[:lead] != first:
      raise ValueError(
        f"{context}: every leaf of inputs must share the leading "
        f"{layout} axes {checks.describe_shape(first)}, got "
        f"{checks.describe_shape(np.shape(leaf))}"
      )
  axis = 0 if time_major else num_batch_dims
  batch_shape = first[1:] if time_major else first[:-1]
  ids = layout_lib.segment_ids(
    segmentation_mask,
    seq_lengths,
    layout_lib.Layout(batch_shape, first[axis], time_major=time_major),
    context,
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
  mask = checks.as_array(segmentation_mask, context, "segmentation_mask")
  axes = "(time, *batch)" if time_major else "(*batch, time)"
  if mask.ndim < 1:
    raise ValueError(
      f"{context}: segmentation_mask must have shape {axes}, with a time "
      f"axis, got {checks.describe_shape(mask.shape)}"
    )
  batch_shape = mask.shape[1:] if time_major else mask.shape[:-1]
  if previous is not None:
    previous = checks.as_array(previous, context, "previous")
    if tuple(previous.shape) != tuple(batch_shape):
      hint = ""
      if tuple(previous.shape) == tuple(mask.shape):
        hint = (
          "; segmentation_mask has the shape of previous, so no time axis: "
          "is it seq_lengths rather than a mask?"
        )
      raise ValueError(
        f"{context}: previous must have shape (*batch,) = "
        f"{checks.describe_shape(batch_shape)} for segmentation_mask of "
        f"shape {axes} = {checks.describe_shape(mask.shape)}, got "
        f"{checks.describe_shape(previous.shape)}{hint}"
      )
    if not jnp.issubdtype(previous.dtype, jnp.integer):
      raise ValueError(
        f"{context}: previous must be an integer array, got dtype "
        f"{previous.dtype}"
      )
  time = mask.shape[0] if time_major else mask.shape[-1]
  layout = layout_lib.Layout(batch_shape, time, time_major=time_major)
  ids = layout_lib.ids_from_mask(mask, layout, context)
  # Ids never decrease along a row and padding is 0, so the last is the max.
  last = jnp.max(ids, axis=0 if time_major else -1, initial=0)
  if previous is None:
    return last
  return jnp.where(last == 0, previous.astype(jnp.int32), last)
