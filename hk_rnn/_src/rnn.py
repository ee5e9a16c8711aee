"""``RNN``: scans a cell over a sequence, honouring padding and packing."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src import cells as cells_lib
from hk_rnn._src import dropout, packing, sequences
from hk_rnn._src.kernels import dispatch

Array = jax.Array
Carry = Any


def _select_rows(pred: Array, on_true: Any, on_false: Any) -> Any:
  """Row-wise ``where`` over two pytrees whose leaves lead with ``pred``'s axis."""

  def select(a, b):
    return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

  return jax.tree.map(select, on_true, on_false)


REMAT_MODES = (None, "step", "chunked")
DROPOUT_SAMPLING = ("once", "per_step")


def scan_cell(
  cell: cells_lib.RNNCellBase,
  inputs: Array,
  initial_carry: Carry,
  ids: Array | None,
  *,
  packed: bool,
  reverse: bool,
  keep_order: bool,
  recurrent_mask: Array | Callable[[], Array] | None,
  unroll: int,
  fused: bool,
  remat: str | None = None,
  reset_carry: Carry | None = None,
  continued: Array | None = None,
  carry_continues: bool = False,
  max_segments: int | None = None,
) -> tuple[Carry, Any]:
  """Runs ``cell`` over time-major ``inputs (time, batch, *features)``.

  This is the one mask-handling code path of hk_rnn. With segment ids
  ``ids (time, batch)``, at every step:

  * a step that starts a segment (``reset``) first replaces the carry with
    ``reset_carry`` (``initial_carry`` unless streaming), so packed sequences
    never see each other;
  * a padded step (``~valid``) keeps the carry and outputs exactly zero;
  * padded inputs are zeroed once up front, so that NaN or inf there cannot
    reach any value or gradient through the cell.

  ``continued (batch,)`` marks rows whose first segment continues the carry
  passed in (streaming); their first step is not a reset.
  ``carry_continues`` says that every row continues the carry passed in
  (streaming without a mask). For cells that take segment starts
  (``cell.takes_segment_starts``), the first step of every segment is
  marked, a row's first step included unless it continues the carry passed
  in. ``reverse`` flips
  each segment in place before the scan (the ids are unchanged by such a
  flip) and, with ``keep_order``, flips the outputs back.
  ``recurrent_mask`` is a mask, or a function sampling it inside each step.
  ``remat`` recomputes activations in the backward pass: per step, or per
  chunk of about sqrt(time) steps.

  With ``max_segments`` K, the returned carry is per segment, every leaf
  ``(batch, K, ...)``: slot k holds the carry after the row's k-th segment
  (by position), read from the carries after every step at the step that
  ends the segment (the same step in either direction, see
  ``sequences.segment_end_steps``); empty slots hold ``initial_carry``.
  Only packed rows need those per-step carries (one extra carry per step,
  less what the outputs already hold); otherwise slot 0 is the final carry.
  """
  reset_carry = initial_carry if reset_carry is None else reset_carry
  step_carries = max_segments is not None and packed
  valid = reset = None
  if ids is not None:
    valid = ids != 0
    inputs = jnp.where(
      valid.reshape(valid.shape + (1,) * (inputs.ndim - 2)), inputs, 0
    )
    if packed:
      reset = sequences.segment_starts(ids, axis=0)
      if continued is not None:
        reset = reset.at[0].set(reset[0] & ~continued)
  starts = None
  if cell.takes_segment_starts:
    starts = _first_steps(ids, inputs.shape[:2], continued, carry_continues)
  if reverse:
    inputs = sequences.flip_tree(inputs, ids, axis=0)

  def fused_kernel(inputs, carry, valid, reset, starts):
    """The cell's fused kernel from ``carry``, or None where it has none.

    Returns ``(final_carry, outputs)``, or with ``step_carries``
    ``(final_carry, (outputs, carries after every step))``.
    """
    options = {"return_step_carries": True} if step_carries else {}
    if starts is not None:
      options["segment_starts"] = starts
    recorded = dispatch.recorded_lines()
    result = cell._fused_sequence(  # noqa: SLF001 - the cell's own kernel
      inputs,
      carry,
      unroll,
      reset_carry=reset_carry,
      valid=valid,
      reset=reset,
      recurrent_mask=_resolve_mask(recurrent_mask),
      **options,
    )
    if result is None:
      dispatch.record_step_scan("the cell has no whole-sequence kernel")
    elif dispatch.recorded_lines() == recorded:
      dispatch.record_cells_own_kernel()
    if result is None or not step_carries:
      return result
    final_carry, outputs, carries = result
    return final_carry, (outputs, carries)

  kernel = fused_kernel if fused else None
  result = None
  if kernel is not None and remat is None:
    result = kernel(inputs, initial_carry, valid, reset, starts)
  elif not fused:
    dispatch.record_step_scan("fused=False")
  elif remat == "step":
    dispatch.record_step_scan("remat='step'")
  if result is None:
    result = _step_scan(
      cell,
      inputs,
      initial_carry,
      reset_carry,
      valid,
      reset,
      starts,
      recurrent_mask,
      unroll,
      remat,
      kernel,
      step_carries,
    )
  final_carry, outputs = result
  if step_carries:
    outputs, carries = outputs
    final_carry = _segment_carries(carries, ids, initial_carry, max_segments)
  elif max_segments is not None:
    final_carry = _one_segment_carries(final_carry, initial_carry, max_segments)
  if reverse and keep_order:
    outputs = sequences.flip_tree(outputs, ids, axis=0)
  return final_carry, outputs


def _first_steps(ids, time_batch, continued, carry_continues) -> Array:
  """True at the first step of every segment, ``(time, batch)``.

  A row's first step counts unless the row continues the carry passed in:
  ``continued`` rows (streaming with a mask), or every row with
  ``carry_continues``. Segments flipped in place keep their positions, so
  this holds in processing order with ``reverse`` too.
  """
  if ids is None:
    starts = jnp.zeros(time_batch, bool).at[0].set(not carry_continues)
  else:
    starts = sequences.segment_starts(ids, axis=0)
  if continued is not None:
    starts = starts.at[0].set(starts[0] & ~continued)
  return starts


def _segment_carries(carries, ids, initial_carry, max_segments):
  """Each row's carry after each of its segments, ``(batch, K, ...)``.

  ``carries`` holds the carry after every step, leaves ``(time, batch,
  ...)``; slots with no segment take ``initial_carry``.
  """
  ends = sequences.segment_end_steps(ids, max_segments)
  rows = jnp.arange(ends.shape[0])[:, None]
  present = ends >= 0

  def gather(leaf, initial):
    picked = leaf[jnp.maximum(ends, 0), rows]
    where = present.reshape(present.shape + (1,) * (picked.ndim - 2))
    return jnp.where(where, picked, initial[:, None].astype(picked.dtype))

  return jax.tree.map(gather, carries, initial_carry)


def _one_segment_carries(final_carry, initial_carry, max_segments):
  """Per-segment carries of rows that hold one segment: it is slot 0."""

  def expand(final, initial):
    rest = jnp.broadcast_to(
      initial[:, None].astype(final.dtype),
      (initial.shape[0], max_segments - 1, *initial.shape[1:]),
    )
    return jnp.concatenate([final[:, None], rest], axis=1)

  return jax.tree.map(expand, final_carry, initial_carry)


def _resolve_mask(recurrent_mask):
  """The mask itself, or the one its sampling function draws."""
  return recurrent_mask() if callable(recurrent_mask) else recurrent_mask


def _step_scan(
  cell,
  inputs,
  initial_carry,
  reset_carry,
  valid,
  reset,
  starts,
  recurrent_mask,
  unroll,
  remat,
  kernel,
  step_carries,
):
  """The generic path: ``hk.scan`` over the cell's own step.

  With ``remat="chunked"``, each chunk runs in ``kernel(inputs, carry,
  valid, reset, starts)`` (the cell's fused kernel, None when off) where it
  gives a result. With ``step_carries`` the outputs are ``(outputs, carries
  after every step)``.
  """

  def step(carry, step_inputs):
    x, is_valid, is_reset, is_start = step_inputs
    if is_reset is not None:
      carry = _select_rows(is_reset, reset_carry, carry)
    options = {}
    if recurrent_mask is not None:
      options["recurrent_mask"] = _resolve_mask(recurrent_mask)
    if is_start is not None:
      options["segment_start"] = is_start
    new_carry, outputs = cell(carry, x, **options)
    if is_valid is not None:
      new_carry = _select_rows(is_valid, new_carry, carry)
      outputs = _select_rows(
        is_valid, outputs, jax.tree.map(jnp.zeros_like, outputs)
      )
    return new_carry, ((outputs, new_carry) if step_carries else outputs)

  if remat == "step":
    step = hk.remat(step)
  if remat != "chunked":
    return hk.scan(
      step, initial_carry, (inputs, valid, reset, starts), unroll=unroll
    )

  # Save only the carry at chunk boundaries; recompute inside each chunk.
  time, batch = inputs.shape[:2]
  chunk = max(1, math.isqrt(time - 1) + 1) if time > 1 else 1
  chunks = -(-time // chunk)
  extra = chunks * chunk - time
  if valid is None:
    valid = jnp.ones((time, batch), bool)

  def split(array, fill):
    if array is None:
      return None
    padding = jnp.full((extra, *array.shape[1:]), fill, array.dtype)
    array = jnp.concatenate([array, padding]) if extra else array
    return array.reshape((chunks, chunk, *array.shape[1:]))

  @hk.remat
  def run_chunk(carry, chunk_inputs):
    # A chunk starts from the carry the previous one left; its packed
    # segments still restart from `reset_carry`.
    if kernel is not None:
      result = kernel(chunk_inputs[0], carry, *chunk_inputs[1:])
      if result is not None:
        return result
    return hk.scan(step, carry, chunk_inputs, unroll=unroll)

  final_carry, outputs = hk.scan(
    run_chunk,
    initial_carry,
    (
      split(inputs, 0),
      split(valid, False),
      split(reset, False),
      split(starts, False),
    ),
  )
  outputs = jax.tree.map(
    lambda leaf: leaf.reshape((chunks * chunk, *leaf.shape[2:]))[:time],
    outputs,
  )
  return final_carry, outputs


class RNN(hk.Module):
  """Runs a recurrent cell over sequences, respecting padding and packing.

  ``RNN`` applies one :class:`RNNCellBase` step by step with ``hk.scan``:

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, mask):
  ...   return hk_rnn.RNN(hk_rnn.LSTMCell(16))(x, mask)
  >>> model = hk.transform(forward)
  >>> x = jnp.ones((2, 5, 3))                        # (batch, time, features)
  >>> mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  >>> params = model.init(jax.random.key(0), x, mask)
  >>> (c, h), y = model.apply(params, None, x, mask)
  >>> c.shape, y.shape
  ((2, 16), (2, 5, 16))

  **Padding and packing.** ``segmentation_mask`` is shaped like the inputs
  without their feature axes: 0 marks padding (only at the end of a row), a
  non-zero value is the id of the sequence a step belongs to. A row may pack
  several sequences (``[1, 1, 2, 2, 2]``); each starts from the initial
  carry. ``seq_lengths`` (one sequence per row) is the Flax-style
  alternative. Padded steps output exactly zero, leave the carry untouched,
  and their input values (NaN included) reach no output, carry or gradient.
  ``final_carry`` is the carry after each row's last valid step; for a
  packed row, that of its last segment.

  >>> _, y = model.apply(params, None, x, None)       # no padding
  >>> def by_length(x, lengths):
  ...   return hk_rnn.RNN(hk_rnn.LSTMCell(16))(x, seq_lengths=lengths)
  >>> lengths = jnp.array([3, 5])
  >>> _, y = hk.transform(by_length).apply(params, None, x, lengths)
  >>> bool((y[0, 3:] == 0).all())
  True

  **Reverse.** ``reverse=True`` runs each sequence (each segment) from its
  last valid step to its first. Outputs come back in processing order (each
  sequence reversed in place, padding still at the end) unless
  ``keep_order=True`` puts them back in input order. The final carry is then
  the one after the row's last segment has been read back to its first step.

  **Layouts.** Inputs are ``(*batch, time, *features)``, or
  ``(time, *batch, *features)`` with ``time_major=True``; any number of batch
  axes, none included; ``*features`` has ``cell.num_feature_axes`` axes.

  **Dropout.** With ``is_training=True`` the cell's ``dropout_rate`` and
  ``recurrent_dropout_rate`` apply, with masks sampled once per row and reused
  at every step (variational dropout); this needs an rng in ``apply``.

  **Dtypes.** The carry has the cell's compute dtype (its ``dtype``, else
  that of the inputs and parameters together). An ``initial_carry`` of
  another dtype is cast to it on the way in, so with ``dtype=jnp.bfloat16``
  a float32 carry is rounded to bfloat16 first, and a row of length 0
  returns that rounded value, not the one given. A carry passed in the
  cell's dtype comes back from such a row bit for bit.

  >>> def half(x, lengths, carry):
  ...   cell = hk_rnn.GRUCell(2, dtype=jnp.bfloat16)
  ...   return hk_rnn.RNN(cell)(x, seq_lengths=lengths, initial_carry=carry)
  >>> half = hk.transform(half)
  >>> x, lengths = jnp.ones((1, 3, 2)), jnp.array([0])
  >>> carry = jnp.full((1, 2), 1.001)                # float32
  >>> params = half.init(jax.random.key(0), x, lengths, carry)
  >>> half.apply(params, None, x, lengths, carry)[0]  # rounded, then kept
  Array([[1, 1]], dtype=bfloat16)

  **Speed.** Cells that have a fused whole-sequence kernel (``LSTMCell``,
  ``GRUCell``, ``MGUCell``, ``SimpleCell`` with their default activations)
  use it when ``fused=True`` (the default); ``fused=False`` always runs the
  cell step by step. Both give the same numbers.

  Mask and length *values* are validated when they are concrete; under
  ``jax.jit`` they are traced and cannot be checked, so a malformed mask
  there gives unspecified results.
  """

  def __init__(
    self,
    cell: cells_lib.RNNCellBase,
    *,
    time_major: bool = False,
    return_carry: bool = True,
    reverse: bool = False,
    keep_order: bool = False,
    unroll: int = 1,
    fused: bool = True,
    remat: str | None = None,
    dropout_sampling: str = "once",
    name: str | None = None,
  ):
    """Configures the layer; call arguments of the same name override these.

    Args:
      cell: the cell applied at every step.
      time_major: inputs are ``(time, *batch, ...)`` instead of
        ``(*batch, time, ...)``.
      return_carry: return ``(final_carry, outputs)``; else only outputs.
      reverse: process each sequence from its end to its start.
      keep_order: with ``reverse``, return outputs in input order.
      unroll: scan steps unrolled per loop iteration (``lax.scan``'s).
      fused: use the cell's whole-sequence kernel where it has one.
      remat: trade compute for memory in training: ``"step"`` recomputes
        each step's activations in the backward pass (stepping the cell),
        ``"chunked"`` keeps only the carry every ~sqrt(time) steps and
        recomputes a chunk at a time (in the fused kernel where the cell has
        one).
      dropout_sampling: how the recurrent dropout mask reaches each step:
        ``"once"`` samples it before the scan and closes over it,
        ``"per_step"`` regenerates the same mask inside every step from a
        fixed key. Same numbers and cost (measured in the
        :doc:`speed guide </speed>`, "What remat and dropout sampling
        cost").
      name: the module name.
    """
    super().__init__(name=name)
    if not isinstance(cell, cells_lib.RNNCellBase):
      raise ValueError(
        f"RNN: cell must be an hk_rnn.RNNCellBase, got {type(cell).__name__}"
      )
    if int(unroll) < 1:
      raise ValueError(f"RNN: unroll must be a positive int, got {unroll!r}")
    self.cell = cell
    self.time_major = time_major
    self.return_carry = return_carry
    self.reverse = reverse
    self.keep_order = keep_order
    if remat not in REMAT_MODES:
      raise ValueError(
        f"RNN: remat must be one of {REMAT_MODES}, got {remat!r}"
      )
    if dropout_sampling not in DROPOUT_SAMPLING:
      raise ValueError(
        f"RNN: dropout_sampling must be one of {DROPOUT_SAMPLING}, got "
        f"{dropout_sampling!r}"
      )
    self.unroll = int(unroll)
    self.fused = fused
    self.remat = remat
    self.dropout_sampling = dropout_sampling

  def __call__(
    self,
    inputs: Array,
    segmentation_mask: Array | None = None,
    *,
    seq_lengths: Array | None = None,
    initial_carry: Carry | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
    is_training: bool = False,
    initial_segment_ids: Array | None = None,
    max_segments: int | None = None,
  ):
    """Runs the cell over ``inputs``.

    Args:
      inputs: floating point, ``(*batch, time, *features)`` (``(time,
        *batch, *features)`` when time-major); embed token ids first.
      segmentation_mask: integer or bool ``(*batch, time)`` (``(time,
        *batch)``); 0 is padding, other values are segment ids.
      seq_lengths: integer ``(*batch,)``; the alternative to a mask.
      initial_carry: the carry every sequence starts from, shaped like
        ``cell.initialize_carry(inputs[..., 0, :])`` and cast to its dtype
        (see Dtypes above); the cell's own by default.
      return_carry, time_major, reverse, keep_order: override the
        constructor's.
      is_training: apply the cell's dropout (needs an rng).
      initial_segment_ids: for streaming a long sequence in chunks, integer
        ``(*batch,)``: the segment each row's ``initial_carry`` belongs to
        (``hk_rnn.last_segment_ids`` of the previous chunk's mask). A row's
        first segment continues from ``initial_carry`` when its id matches;
        every other segment (at the chunk's start or in its middle) starts
        from the cell's own initial carry. Without it every segment starts
        from ``initial_carry``, one in the middle of the chunk included. Not
        with ``reverse``. For cells that treat a sequence's first step
        differently (``cell.takes_segment_starts``: ``RGLRUCell``,
        ``GriffinCell``), a row's first step is such a first step unless it
        continues the incoming carry, so streaming them needs this argument
        (with no mask, any value makes every row continue).
      max_segments: return the carry of every segment instead of each row's
        last: with an int K every leaf of the returned carry gains an axis
        of size K after the batch axes, ``(*batch, K, ...)``. Slot k holds
        the carry after the row's k-th segment by position (0-based; with
        ``reverse``, after it has been read back to its first step); slots
        past a row's segments hold ``initial_carry``. With ``seq_lengths``
        or no mask a row is one segment (slot 0). A concrete mask with more
        segments in a row than K is an error; under ``jit`` the extra
        segments are left out.

    Returns:
      ``(final_carry, outputs)``, or ``outputs`` alone without
      ``return_carry``. ``outputs`` is laid out like ``inputs`` with the
      cell's output features; ``final_carry`` is per segment with
      ``max_segments``.
    """
    return_carry = self.return_carry if return_carry is None else return_carry
    time_major = self.time_major if time_major is None else time_major
    reverse = self.reverse if reverse is None else reverse
    keep_order = self.keep_order if keep_order is None else keep_order
    layout = Layout.of(inputs, self.cell.num_feature_axes, time_major, "RNN")
    ids = sequences.segment_ids(
      segmentation_mask,
      seq_lengths,
      batch_shape=layout.batch_shape,
      time=layout.time,
      time_major=time_major,
      context="RNN",
      feature_shape=layout.feature_shape,
    )
    max_segments = sequences.check_max_segments(max_segments, "RNN")
    if max_segments is not None and segmentation_mask is not None:
      sequences.check_segment_count(
        ids, max_segments, time_major=time_major, context="RNN"
      )
    packed = segmentation_mask is not None and sequences.has_packed_rows(
      segmentation_mask, axis=layout.time_axis
    )
    inputs = layout.to_scan(inputs)
    if ids is not None:
      ids = layout.to_scan(ids, features=False)
    # One step's shape and dtype (not inputs[0]: the time axis may be empty).
    sample = jnp.zeros(inputs.shape[1:], inputs.dtype)
    if initial_carry is None:
      initial_carry = self.cell.initialize_carry(sample)
    else:
      initial_carry = layout.carry_to_scan(
        check_initial_carry(self.cell, initial_carry, layout, "RNN")
      )
    reset_carry = continued = None
    carry_continues = False
    if initial_segment_ids is not None:
      if reverse:
        raise ValueError(
          "RNN: initial_segment_ids (streaming) needs reverse=False, got "
          "reverse=True"
        )
      continued = _continued_rows(initial_segment_ids, ids, layout)
      carry_continues = ids is None
      if continued is not None:
        packed = True
        reset_carry = self.cell.initialize_carry(sample)
    inputs, recurrent_mask = self._dropout(sample, inputs, is_training)
    with dispatch.call_site(self.module_name, self.cell):
      final_carry, outputs = scan_cell(
        self.cell,
        inputs,
        initial_carry,
        ids,
        packed=packed,
        reverse=reverse,
        keep_order=keep_order,
        recurrent_mask=recurrent_mask,
        unroll=self.unroll,
        fused=self.fused,
        remat=self.remat,
        reset_carry=reset_carry,
        continued=continued,
        carry_continues=carry_continues,
        max_segments=max_segments,
      )
    outputs = layout.from_scan(outputs)
    if not return_carry:
      return outputs
    return layout.carry_from_scan(final_carry), outputs

  def _dropout(self, sample, inputs, is_training):
    """Applies input dropout; returns the inputs and the recurrent mask."""
    if not is_training:
      return inputs, None
    cell = self.cell
    if not (
      getattr(cell, "dropout_rate", 0)
      or getattr(cell, "recurrent_dropout_rate", 0)
    ):
      return inputs, None
    dropout.require_rng(
      "RNN",
      f"is_training=True applies the dropout of {dropout.describe_rates(cell)}",
    )
    key = hk.next_rng_key()
    masks = cell.dropout_masks(sample, rng=key)
    if masks.inputs is not None:
      inputs = inputs * masks.inputs
    if masks.recurrent is None or self.dropout_sampling == "once":
      return inputs, masks.recurrent
    return inputs, lambda: cell.dropout_masks(sample, rng=key).recurrent


def _continued_rows(initial_segment_ids, ids, layout) -> Array | None:
  """Rows whose first step continues the segment of the incoming carry."""
  previous = jnp.asarray(initial_segment_ids)
  if tuple(previous.shape) != layout.batch_shape or not jnp.issubdtype(
    previous.dtype, jnp.integer
  ):
    raise ValueError(
      "RNN: initial_segment_ids must be an integer array of shape "
      f"(*batch,) = {layout.batch_shape}, got {previous.dtype} "
      f"{tuple(previous.shape)}"
    )
  if ids is None:
    return None  # One unbroken sequence per row: the carry always continues.
  return ids[0] == previous.reshape(layout.batch_size)


class Layout:
  """Moves arrays between the user's layout and the scan's.

  The scan runs time-major with exactly one batch axis:
  ``(time, batch, *features)``, where ``batch`` flattens all batch axes (a
  size-1 axis when there are none).
  """

  def __init__(self, batch_shape, time, feature_shape, dtype, time_major):
    self.num_feature_axes = len(feature_shape)
    self.batch_shape = tuple(batch_shape)
    self.time = time
    self.feature_shape = tuple(feature_shape)
    self.dtype = dtype
    self.time_major = time_major
    self.time_axis = 0 if time_major else len(self.batch_shape)
    self.batch_size = math.prod(self.batch_shape)

  @classmethod
  def of(cls, inputs, num_feature_axes, time_major, context) -> Layout:
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
      layout = (
        "(time, *batch, *features)"
        if time_major
        else ("(*batch, time, *features)")
      )
      raise ValueError(
        f"{context}: inputs must be {layout} with {num_feature_axes} "
        f"feature axes for this cell, so at least {num_feature_axes + 1} "
        f"axes; got shape {tuple(shape)}"
      )
    split = len(shape) - num_feature_axes
    lead, feature_shape = shape[:split], shape[split:]
    batch_shape = lead[1:] if time_major else lead[:-1]
    time = lead[0] if time_major else lead[-1]
    return cls(
      batch_shape, time, feature_shape, jnp.result_type(inputs), time_major
    )

  def to_scan(self, array: Array, features: bool = True) -> Array:
    array = jnp.moveaxis(jnp.asarray(array), self.time_axis, 0)
    trailing = self.feature_shape if features else ()
    return array.reshape((self.time, self.batch_size, *trailing))

  def from_scan(self, tree: Any) -> Any:
    def restore(leaf):
      leaf = leaf.reshape((self.time, *self.batch_shape, *leaf.shape[2:]))
      return jnp.moveaxis(leaf, 0, self.time_axis)

    return jax.tree.map(restore, tree)

  def carry_to_scan(self, carry: Carry) -> Carry:
    return jax.tree.map(
      lambda leaf: leaf.reshape(
        (self.batch_size, *leaf.shape[len(self.batch_shape) :])
      ),
      carry,
    )

  def carry_from_scan(self, carry: Carry) -> Carry:
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
      f"*features), got {type(inputs).__name__} "
      f"{sequences.abbreviate(inputs)}"
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
  cell: cells_lib.RNNCellBase, initial_carry: Carry, layout, context: str
) -> Carry:
  """Checks a user's carry against the cell's own, casting its dtypes."""
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
