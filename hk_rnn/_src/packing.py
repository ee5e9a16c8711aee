"""Packing variable-length sequences into rows, and reading them back.

``pack_sequences`` is host-side numpy: it places whole sequences into rows
of ``row_length`` steps by first-fit decreasing and builds the inputs and
the segmentation mask that ``RNN`` reads. ``unpack_sequences`` and
``unpack_segments`` are jax functions that turn the packed outputs and the
per-segment carries (``max_segments``) back into one entry per sequence, in
input order. The placement is concrete numpy, so both run under ``jit`` and
``grad`` as plain gathers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src import checks

_PACK = "pack_sequences"
Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class PackedSequences:
  """Sequences packed into rows, and where each one sits.

  Sequence ``i`` occupies steps ``starts[i] : starts[i] + lengths[i]`` of
  row ``rows[i]`` and is that row's segment number ``slots[i]`` (0-based,
  by position), so its steps carry id ``slots[i] + 1`` in
  ``segmentation_mask``. A sequence of length 0 occupies no step: it points
  at a slot past its row's last segment, which is why its per-segment carry
  is the initial carry; its ``starts`` entry is 0.

  Attributes:
    inputs: ``(rows, row_length, *features)``, zeros at padding.
    segmentation_mask: int32 ``(rows, row_length)``; a row's segments take
      ids 1, 2, 3, ... in position order, 0 is padding.
    max_segments: the segment slots per row to ask ``RNN`` for: the cap
      given to ``pack_sequences``, else the most any row needs.
    lengths: int32 ``(N,)``, each sequence's number of steps.
    rows: int32 ``(N,)``, the row each sequence sits in.
    starts: int32 ``(N,)``, its first step in that row.
    slots: int32 ``(N,)``, its segment slot in that row.
  """

  inputs: np.ndarray
  segmentation_mask: np.ndarray
  max_segments: int
  lengths: np.ndarray
  rows: np.ndarray
  starts: np.ndarray
  slots: np.ndarray

  @property
  def num_rows(self) -> int:
    """How many rows the batch has."""
    return int(self.segmentation_mask.shape[0])

  @property
  def row_length(self) -> int:
    """Steps per row."""
    return int(self.segmentation_mask.shape[1])

  @property
  def num_sequences(self) -> int:
    """N, the number of sequences packed."""
    return int(self.lengths.shape[0])

  @property
  def max_length(self) -> int:
    """The longest sequence's length, the time axis ``unpack_sequences`` gives."""
    return int(self.lengths.max(initial=0))

  @property
  def fill(self) -> float:
    """The fraction of the rows' steps that hold a sequence's step."""
    return float(self.lengths.sum()) / max(1, self.num_rows * self.row_length)

  def __repr__(self) -> str:
    return (
      f"PackedSequences({self.num_sequences} sequences in {self.num_rows} "
      f"rows of {self.row_length}, max_segments={self.max_segments}, "
      f"fill={self.fill:.1%}, inputs {self.inputs.dtype}"
      f"{tuple(self.inputs.shape)})"
    )


def _check_sequences(sequences: Any, row_length: int) -> list[np.ndarray]:
  if not isinstance(sequences, (list, tuple)) or not sequences:
    described = (
      f"an empty {type(sequences).__name__}"
      if isinstance(sequences, (list, tuple))
      else type(sequences).__name__
    )
    raise ValueError(
      "pack_sequences: sequences must be a non-empty list or tuple of "
      f"(length, *features) arrays, got {described}"
    )
  arrays = [np.asarray(sequence) for sequence in sequences]
  first = arrays[0]
  for index, array in enumerate(arrays):
    if array.ndim < 1:
      raise ValueError(
        f"pack_sequences: sequences[{index}] must be (length, *features), "
        f"got a scalar of shape {array.shape}"
      )
    if array.shape[1:] != first.shape[1:]:
      raise ValueError(
        f"pack_sequences: every sequence must have the feature shape of "
        f"sequences[0], {first.shape[1:]}; got sequences[{index}] of shape "
        f"{array.shape}"
      )
    if array.dtype != first.dtype:
      raise ValueError(
        f"pack_sequences: every sequence must have the dtype of "
        f"sequences[0], {first.dtype}; got sequences[{index}] of dtype "
        f"{array.dtype}"
      )
    if array.shape[0] > row_length:
      raise ValueError(
        f"pack_sequences: sequences[{index}] has length {array.shape[0]}, "
        f"longer than row_length = {row_length}; sequences are never split"
      )
  return arrays


def _first_fit_decreasing(
  lengths: np.ndarray, row_length: int, max_segments: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Places sequences of ``lengths > 0`` by first-fit decreasing.

  Longest first (ties in input order), each sequence goes into the first
  row with room for it and, under a cap, a free segment slot. Equal lengths
  are placed together: each row, in order, takes as many of them as fit
  (exactly what one-at-a-time first fit would give it), and what is left
  opens new rows. That is O(rows) numpy work per distinct length, instead
  of a search over rows per sequence.

  Returns ``(rows, starts, slots)`` per sequence and each row's remaining
  room and segment count.
  """
  count = lengths.shape[0]
  rows = np.zeros(count, np.int64)
  starts = np.zeros(count, np.int64)
  slots = np.zeros(count, np.int64)
  room = np.zeros(0, np.int64)
  segments = np.zeros(0, np.int64)
  order = np.argsort(-lengths, kind="stable")
  sorted_lengths = lengths[order]
  boundaries = np.flatnonzero(np.diff(sorted_lengths)) + 1
  for group in np.split(order, boundaries):
    length = int(lengths[group[0]])
    if length == 0:
      continue
    need = group.shape[0]
    fits = room // length
    if max_segments is not None:
      fits = np.minimum(fits, max_segments - segments)
    filled = np.cumsum(fits)
    if filled.shape[0] and filled[-1] >= need:
      last = int(np.searchsorted(filled, need))
      take = fits[: last + 1].copy()
      take[last] -= filled[last] - need
      take_rows = np.arange(last + 1)
    else:
      left = need - (int(filled[-1]) if filled.shape[0] else 0)
      per_row = row_length // length
      if max_segments is not None:
        per_row = min(per_row, max_segments)
      opened = -(-left // per_row)
      new_take = np.full(opened, per_row, np.int64)
      new_take[-1] = left - per_row * (opened - 1)
      take = np.concatenate([fits, new_take])
      take_rows = np.arange(room.shape[0] + opened)
      room = np.concatenate([room, np.full(opened, row_length, np.int64)])
      segments = np.concatenate([segments, np.zeros(opened, np.int64)])
    used = take > 0
    take_rows, take = take_rows[used], take[used]
    item_rows = np.repeat(take_rows, take)
    within = np.arange(need) - np.repeat(np.cumsum(take) - take, take)
    rows[group] = item_rows
    starts[group] = row_length - room[item_rows] + within * length
    slots[group] = segments[item_rows] + within
    room[take_rows] -= take * length
    segments[take_rows] += take
  return rows, starts, slots, room, segments


def _fill_rows(arrays, lengths, rows, starts, slots, num_rows, row_length):
  """The packed inputs and mask, each step copied once.

  The rows are one flat buffer in which every sequence, and every stretch
  of padding, is contiguous: one ``concatenate`` of the sequences in their
  placed order, with zero blocks for the padding between them, writes it
  without a scatter.
  """
  first = arrays[0]
  feature_shape = first.shape[1:]
  placed = np.flatnonzero(lengths)
  placed = placed[np.lexsort((starts[placed], rows[placed]))]
  begins = rows[placed] * row_length + starts[placed]
  ends = begins + lengths[placed]
  gap_before = begins - np.concatenate([[0], ends[:-1]])
  tail = num_rows * row_length - (int(ends[-1]) if placed.shape[0] else 0)
  zeros = np.zeros((row_length * max(1, num_rows), *feature_shape), first.dtype)
  pieces = []
  for index, gap in zip(placed.tolist(), gap_before.tolist(), strict=True):
    if gap:
      pieces.append(zeros[:gap])
    pieces.append(arrays[index])
  if tail:
    pieces.append(zeros[:tail])
  inputs = np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])
  ids = np.zeros(num_rows * row_length + 1, np.int32)
  # Each placed sequence's ids: +id at its first step, -id after its last,
  # so a cumulative sum paints them in.
  np.add.at(ids, begins, slots[placed] + 1)
  np.add.at(ids, ends, -(slots[placed] + 1))
  mask = np.cumsum(ids[:-1], dtype=np.int32)
  return (
    inputs.reshape(num_rows, row_length, *feature_shape),
    mask.reshape(num_rows, row_length),
  )


def pack_sequences(
  sequences: Sequence[Any],
  row_length: int,
  *,
  num_rows: int | None = None,
  max_segments: int | None = None,
) -> PackedSequences:
  """Packs whole sequences into rows of ``row_length`` steps.

  Sequences are placed by first-fit decreasing (longest first, ties in
  input order, each into the first row with room and a free segment slot)
  and never split; a row's segments are numbered 1, 2, 3, ... by position.
  A packed batch for ``row_length=8``::

      sequences   a: 5 steps   b: 3 steps   c: 4 steps   d: 2 steps   e: 0
      row 0       a a a a a b b b           mask  1 1 1 1 1 2 2 2
      row 1       c c c c d d . .           mask  1 1 1 1 2 2 0 0

  ``e`` (length 0) takes no step; it is given a slot past a row's last
  segment (here row 0's third), where the per-segment carry is the initial
  carry.

  >>> import numpy as np, hk_rnn
  >>> seqs = [np.full((n, 1), n, np.float32) for n in (5, 3, 4, 2, 0)]
  >>> packed = hk_rnn.pack_sequences(seqs, row_length=8)
  >>> packed.segmentation_mask
  array([[1, 1, 1, 1, 1, 2, 2, 2],
         [1, 1, 1, 1, 2, 2, 0, 0]], dtype=int32)
  >>> packed.rows.tolist(), packed.starts.tolist(), packed.slots.tolist()
  ([0, 0, 1, 1, 0], [0, 5, 0, 4, 0], [0, 1, 0, 1, 2])
  >>> packed.max_segments          # e needs a third slot, in row 0
  3

  Args:
    sequences: a non-empty list or tuple of N arrays ``(length_i,
      *features)`` with one feature shape and dtype; a length may be 0.
    row_length: steps per row; no sequence may be longer.
    num_rows: exactly this many rows (those left over are all padding);
      None: as many as first-fit decreasing needs.
    max_segments: at most this many segments per row; None: no cap.

  Returns:
    A :class:`PackedSequences`: ``inputs``, ``segmentation_mask``,
    ``max_segments`` and where each sequence sits.

  Raises:
    ValueError: for an empty list, differing feature shapes or dtypes
      (naming the index), a sequence longer than ``row_length``, arguments
      that are not positive ints, and sequences that do not fit in
      ``num_rows`` rows.
  """
  row_length = checks.positive_int(row_length, "row_length", _PACK)
  num_rows = checks.positive_int(num_rows, "num_rows", _PACK, allow_none=True)
  max_segments = checks.positive_int(
    max_segments, "max_segments", _PACK, allow_none=True
  )
  arrays = _check_sequences(sequences, row_length)
  lengths = np.array([array.shape[0] for array in arrays], np.int64)
  rows, starts, slots, room, segments = _first_fit_decreasing(
    lengths, row_length, max_segments
  )
  used_rows = room.shape[0]
  if num_rows is not None:
    if used_rows > num_rows:
      raise ValueError(
        f"pack_sequences: the sequences do not fit in num_rows = {num_rows} "
        f"rows of {row_length} steps"
        + ("" if max_segments is None else f" and {max_segments} segments")
        + f"; first-fit decreasing needs {used_rows}"
      )
    segments = np.concatenate(
      [segments, np.zeros(num_rows - used_rows, np.int64)]
    )
  # Length-0 sequences share one slot past a row's segments: the row with
  # the fewest, opening an all-padding row when every row is at the cap.
  empty = lengths == 0
  if empty.any():
    if not segments.shape[0] or (
      max_segments is not None and segments.min() >= max_segments
    ):
      if num_rows is not None:
        raise ValueError(
          f"pack_sequences: the length-0 sequences need a free segment slot,"
          f" but all num_rows = {num_rows} rows hold max_segments = "
          f"{max_segments} segments"
        )
      segments = np.concatenate([segments, np.zeros(1, np.int64)])
    row = int(np.argmin(segments))
    rows[empty], starts[empty], slots[empty] = row, 0, segments[row]
  total_rows = segments.shape[0]
  if max_segments is None:
    max_segments = max(1, int(segments.max()), int(slots.max()) + 1)

  inputs, mask = _fill_rows(
    arrays, lengths, rows, starts, slots, total_rows, row_length
  )
  as_int32 = lambda a: a.astype(np.int32)  # noqa: E731
  return PackedSequences(
    inputs=inputs,
    segmentation_mask=mask,
    max_segments=int(max_segments),
    lengths=as_int32(lengths),
    rows=as_int32(rows),
    starts=as_int32(starts),
    slots=as_int32(slots),
  )


def _check_packed(packed: Any, context: str) -> PackedSequences:
  if not isinstance(packed, PackedSequences):
    raise ValueError(
      f"{context}: packed must be the hk_rnn.PackedSequences that "
      f"pack_sequences returned, got {type(packed).__name__}"
    )
  return packed


def _leaves(tree: PyTree, context: str, argument: str) -> list[Any]:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{context}: {argument} must hold at least one array")
  return leaves


def unpack_sequences(
  outputs: PyTree, packed: PackedSequences, *, time_major: bool = False
) -> PyTree:
  """Packed outputs back to one padded row per sequence, in input order.

  Leaves ``(rows, row_length, *F)`` (``(row_length, rows, *F)`` when
  ``time_major``) become ``(N, max_length, *F)``: row ``i`` holds sequence
  ``i``'s steps, zeros past its length. A plain gather with concrete
  indices: it works on jax arrays under ``jit`` and ``grad`` (close over
  ``packed``; it is not a pytree).

  >>> import numpy as np, hk_rnn
  >>> seqs = [np.arange(n, dtype=np.float32)[:, None] for n in (1, 3, 2)]
  >>> packed = hk_rnn.pack_sequences(seqs, row_length=4)
  >>> hk_rnn.unpack_sequences(packed.inputs, packed)[..., 0]
  Array([[0., 0., 0.],
         [0., 1., 2.],
         [0., 1., 0.]], dtype=float32)

  Args:
    outputs: an array or a pytree of arrays laid out like
      ``packed.inputs`` in their leading two axes.
    packed: what :func:`pack_sequences` returned.
    time_major: the leaves are ``(row_length, rows, ...)``.

  Returns:
    The same pytree with leaves ``(N, max_length, *F)``.
  """
  context = "unpack_sequences"
  packed = _check_packed(packed, context)
  expected = (packed.num_rows, packed.row_length)
  if time_major:
    expected = expected[::-1]
  for leaf in _leaves(outputs, context, "outputs"):
    if tuple(np.shape(leaf)[:2]) != expected:
      layout = (
        "(row_length, rows, ...)" if time_major else "(rows, row_length, ...)"
      )
      raise ValueError(
        f"{context}: outputs must be {layout} = ({expected[0]}, "
        f"{expected[1]}, ...), got {tuple(np.shape(leaf))}"
      )
  steps = np.arange(packed.max_length)
  valid = steps[None, :] < packed.lengths[:, None]
  row_index = np.broadcast_to(packed.rows[:, None], valid.shape)
  step_index = np.where(valid, packed.starts[:, None] + steps, 0)

  def unpack(leaf):
    leaf = jnp.asarray(leaf)
    if time_major:
      leaf = jnp.swapaxes(leaf, 0, 1)
    picked = leaf[row_index, step_index]
    keep = valid.reshape(valid.shape + (1,) * (picked.ndim - 2))
    return jnp.where(keep, picked, jnp.zeros((), picked.dtype))

  return jax.tree.map(unpack, outputs)


def unpack_segments(segment_carries: PyTree, packed: PackedSequences) -> PyTree:
  """Per-segment carries back to one carry per sequence, in input order.

  ``segment_carries`` is what ``RNN(...)(..., max_segments=packed.max_segments)``
  returned for ``packed``'s batch: leaves ``(rows, K, ...)``. The result has
  leaves ``(N, ...)``: sequence ``i``'s carry after its last step (or,
  reversed, after its first); a length-0 sequence gets the initial carry.

  >>> import haiku as hk, jax, numpy as np, hk_rnn
  >>> seqs = [np.ones((n, 2), np.float32) for n in (3, 1, 0, 2)]
  >>> packed = hk_rnn.pack_sequences(seqs, row_length=4)
  >>> def forward(x, mask):
  ...   rnn = hk_rnn.RNN(hk_rnn.GRUCell(5))
  ...   return rnn(x, mask, max_segments=packed.max_segments)
  >>> model = hk.transform(forward)
  >>> x, mask = packed.inputs, packed.segmentation_mask
  >>> params = model.init(jax.random.key(0), x, mask)
  >>> segment_carries, outputs = model.apply(params, None, x, mask)
  >>> segment_carries.shape
  (2, 2, 5)
  >>> h = hk_rnn.unpack_segments(segment_carries, packed)
  >>> h.shape, bool((h[2] == 0).all())                    # length 0: h_0
  ((4, 5), True)

  **A carry without slots.** Run without ``max_segments`` the RNN returns
  one carry per row, leaves ``(rows, *carry)``, which must not be read as
  slots. The shapes alone can look alike (an LSTM's ``(rows, F)`` is a
  slotted ``(rows, K)`` of scalars when F ≥ the slots), so a leaf is read
  by rank: every cell carries at least as many axes per row as one input
  step has feature axes (at least one: ``(F,)`` for the vector cells,
  ``(H, W, C)`` for a ``ConvLSTMCell`` on ``(H, W, C)`` inputs), so a
  leaf with slots has at least ``2 +`` that many axes, one more than the
  same carry without them. Every leaf must also have the same size K on
  axis 1, as the slots are shared. A leaf that breaks either rule is a
  ``ValueError`` that names ``max_segments``, whatever its sizes. (A
  user's cell whose carry has fewer axes than an input step, e.g. a
  ``CoreCell`` with a scalar state, is refused too; for it, gather the
  slots yourself: ``jax.tree.map(lambda c: c[packed.rows, packed.slots],
  segment_carries)``.)

  >>> carry, _ = hk.transform(  # no max_segments: one carry per row
  ...     lambda x, m: hk_rnn.RNN(hk_rnn.GRUCell(5))(x, m)).apply(
  ...     params, None, x, mask)
  >>> hk_rnn.unpack_segments(carry, packed)
  Traceback (most recent call last):
  ...
  ValueError: unpack_segments: segment_carries has no slot axis: ...

  Args:
    segment_carries: a pytree with leaves ``(rows, K, ...)``, K at least
      the slots ``packed`` uses (``packed.max_segments`` always is).
    packed: what :func:`pack_sequences` returned.

  Returns:
    The same pytree with leaves ``(N, ...)``.

  Raises:
    ValueError: leaves that are not ``(rows, K, ...)`` with K at least the
      slots ``packed`` uses, or a carry without slots (see above).
  """
  context = "unpack_segments"
  packed = _check_packed(packed, context)
  needed = int(packed.slots.max()) + 1
  # Each leaf is (rows, K, *carry) and a cell's carry has at least as many
  # axes as an input step has feature axes (and at least one).
  carry_axes = max(1, np.ndim(packed.inputs) - 2)
  run_with = (
    f"run the RNN with max_segments=packed.max_segments = {packed.max_segments}"
  )
  paths_and_leaves = jax.tree_util.tree_flatten_with_path(segment_carries)[0]
  _leaves(segment_carries, context, "segment_carries")
  shapes = {
    jax.tree_util.keystr(path) or "the carry": tuple(np.shape(leaf))
    for path, leaf in paths_and_leaves
  }

  def check_sizes(shape):
    if len(shape) < 2 or shape[0] != packed.num_rows or shape[1] < needed:
      raise ValueError(
        f"{context}: segment_carries leaves must be (rows, K, ...) with rows "
        f"= {packed.num_rows} and K >= {needed} slots ({run_with}), got "
        f"{shape}"
      )

  for shape in shapes.values():
    if len(shape) < 1 or shape[0] != packed.num_rows:
      check_sizes(shape)
  slot_counts = {shape[1:2] for shape in shapes.values()}
  flat = [name for name, shape in shapes.items() if len(shape) < 2 + carry_axes]
  if flat or len(slot_counts) > 1:
    listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    why = (
      f"{flat[0]} has {len(shapes[flat[0]])} axes, fewer than rows, slots "
      f"and the {carry_axes} carry axes a cell has for these inputs"
      if flat
      else "its leaves differ in the size of axis 1, where every leaf "
      "with slots has the same K"
    )
    raise ValueError(
      f"{context}: segment_carries has no slot axis: {why} (leaves "
      f"{listed}). That is the carry of an RNN run without max_segments, "
      f"one per row; {run_with} to get one per segment, (rows, K, ...)"
    )
  for shape in shapes.values():
    check_sizes(shape)
  return jax.tree.map(
    lambda leaf: jnp.asarray(leaf)[packed.rows, packed.slots], segment_carries
  )
