"""The scan engine: one cell over a whole batch of sequences.

:func:`scan_cell` is the one mask-handling code path of hk_rnn: every
module that runs a cell over a sequence (``RNN``, and through it
``Bidirectional`` and ``StackedRNN``) comes here with the batch
:func:`hk_rnn._src.layout.parse` parsed. It runs the cell's whole-sequence
kernel (:meth:`RNNCellBase.fused_sequence`) where the cell has one, else
steps the cell in ``hk.scan``; both honour padding, packed rows, reverse,
streaming and per-segment carries in the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from hk_rnn._src import cells as cells_lib
from hk_rnn._src import layout, sequences
from hk_rnn._src.kernels import dispatch

Array = jax.Array
Carry = Any


def _select_rows(pred: Array, on_true: Any, on_false: Any) -> Any:
  """Row-wise ``where`` over two pytrees whose leaves lead with ``pred``'s axis."""

  def select(a, b):
    return jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b)

  return jax.tree.map(select, on_true, on_false)


def scan_cell(
  cell: cells_lib.RNNCellBase,
  inputs: Array,
  initial_carry: Carry,
  batch: layout.Batch,
  *,
  reverse: bool,
  keep_order: bool,
  recurrent_mask: Array | Callable[[], Array] | None,
  unroll: int,
  fused: bool,
  remat: str | None = None,
  reset_carry: Carry | None = None,
) -> tuple[Carry, Any]:
  """Runs ``cell`` over time-major ``inputs (time, batch, *features)``.

  This is the one mask-handling code path of hk_rnn. With the segment ids
  ``batch.ids (time, batch)``, at every step:

  * a step that starts a segment (``reset``) first replaces the carry with
    ``reset_carry`` (``initial_carry`` unless streaming), so packed sequences
    never see each other;
  * a padded step (``~valid``) keeps the carry and outputs exactly zero;
  * padded inputs are zeroed once up front, so that NaN or inf there cannot
    reach any value or gradient through the cell.

  When streaming (``batch.streaming``), ``batch.continued (batch,)`` marks
  rows whose first segment continues the carry passed in; their first step
  is not a reset (without a mask, every row continues it). For cells that
  take segment starts (``cell.takes_segment_starts``), the first step of
  every segment is marked, a row's first step included unless it continues
  the carry passed in. ``reverse`` flips each segment in place before the
  scan (the ids are unchanged by such a flip) and, with ``keep_order``,
  flips the outputs back. ``recurrent_mask`` is a mask, or a function
  sampling it inside each step. ``remat`` recomputes activations in the
  backward pass: per step, or per chunk of about sqrt(time) steps.

  With ``batch.max_segments`` K, the returned carry is per segment, every
  leaf ``(batch, K, ...)``: slot k holds the carry after the row's k-th
  segment (by position), read from the carries after every step at the step
  that ends the segment (the same step in either direction, see
  ``sequences.segment_end_steps``); empty slots hold ``initial_carry``.
  Only packed rows need those per-step carries (one extra carry per step,
  less what the outputs already hold); otherwise slot 0 is the final carry.
  """
  ids, max_segments = batch.ids, batch.max_segments
  reset_carry = initial_carry if reset_carry is None else reset_carry
  step_carries = max_segments is not None and batch.packed
  valid = reset = None
  if ids is not None:
    valid = ids != 0
    inputs = jnp.where(
      valid.reshape(valid.shape + (1,) * (inputs.ndim - 2)), inputs, 0
    )
    if batch.packed:
      reset = sequences.segment_starts(ids, axis=0)
      if batch.continued is not None:
        reset = reset.at[0].set(reset[0] & ~batch.continued)
  starts = None
  if cell.takes_segment_starts:
    starts = _first_steps(batch, inputs.shape[:2])
  if reverse:
    inputs = sequences.flip_tree(inputs, ids, axis=0)

  steps = cells_lib.SequenceSteps(
    valid=valid,
    reset=reset,
    reset_carry=reset_carry,
    segment_starts=starts,
    unroll=unroll,
    return_step_carries=step_carries,
  )

  def fused_kernel(inputs, carry, steps):
    """The cell's whole-sequence kernel from ``carry``, or None without one.

    Returns ``(final_carry, outputs)``, or with ``step_carries``
    ``(final_carry, (outputs, carries after every step))``.
    """
    steps = dataclasses.replace(
      steps, recurrent_mask=_resolve_mask(recurrent_mask)
    )
    recorded = dispatch.recorded_lines()
    result = cell.fused_sequence(inputs, carry, steps)
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
    result = kernel(inputs, initial_carry, steps)
  elif not fused:
    dispatch.record_step_scan("fused=False")
  elif remat == "step":
    dispatch.record_step_scan("remat='step'")
  if result is None:
    result = _step_scan(
      cell, inputs, initial_carry, steps, recurrent_mask, remat, kernel
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


def _first_steps(batch: layout.Batch, time_batch: tuple[int, int]) -> Array:
  """True at the first step of every segment, ``(time, batch)``.

  A row's first step counts unless the row continues the carry passed in:
  ``batch.continued`` rows (streaming with a mask), or every row when
  streaming without one. Segments flipped in place keep their positions,
  so this holds in processing order with ``reverse`` too.
  """
  if batch.ids is None:
    starts = jnp.zeros(time_batch, bool).at[0].set(not batch.carry_continues)
  else:
    starts = sequences.segment_starts(batch.ids, axis=0)
  if batch.continued is not None:
    starts = starts.at[0].set(starts[0] & ~batch.continued)
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
  cell, inputs, initial_carry, steps, recurrent_mask, remat, kernel
):
  """The generic path: ``hk.scan`` over the cell's own step.

  ``steps`` is what :func:`scan_cell` computed (its ``recurrent_mask``
  unset: ``recurrent_mask`` here is the mask or the function sampling it).
  With ``remat="chunked"``, each chunk runs in ``kernel(inputs, carry,
  steps)`` (the cell's fused kernel, None when off) where it gives a
  result. With ``steps.return_step_carries`` the outputs are ``(outputs,
  carries after every step)``.
  """
  reset_carry, step_carries = steps.reset_carry, steps.return_step_carries
  unroll = steps.unroll

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
    per_step = (inputs, steps.valid, steps.reset, steps.segment_starts)
    return hk.scan(step, initial_carry, per_step, unroll=unroll)

  # Save only the carry at chunk boundaries; recompute inside each chunk.
  time, batch = inputs.shape[:2]
  chunk = max(1, math.isqrt(time - 1) + 1) if time > 1 else 1
  chunks = -(-time // chunk)
  extra = chunks * chunk - time
  valid = steps.valid
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
      x, chunk_valid, chunk_reset, chunk_starts = chunk_inputs
      chunk_steps = dataclasses.replace(
        steps, valid=chunk_valid, reset=chunk_reset, segment_starts=chunk_starts
      )
      result = kernel(x, carry, chunk_steps)
      if result is not None:
        return result
    return hk.scan(step, carry, chunk_inputs, unroll=unroll)

  final_carry, outputs = hk.scan(
    run_chunk,
    initial_carry,
    (
      split(inputs, 0),
      split(valid, False),
      split(steps.reset, False),
      split(steps.segment_starts, False),
    ),
  )
  outputs = jax.tree.map(
    lambda leaf: leaf.reshape((chunks * chunk, *leaf.shape[2:]))[:time],
    outputs,
  )
  return final_carry, outputs
