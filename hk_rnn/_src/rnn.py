"""``RNN``: scans a cell over a sequence, honouring padding and packing.

The module resolves its options, has :func:`hk_rnn._src.layout.parse` check
the call once and hands the parsed batch to the scan engine,
:func:`hk_rnn._src.scan.scan_cell`.
"""

from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from hk_rnn._src import cells as cells_lib
from hk_rnn._src import dropout, layout, scan
from hk_rnn._src.kernels import dispatch

Array = jax.Array
Carry = Any


REMAT_MODES = (None, "step", "chunked")
DROPOUT_SAMPLING = ("once", "per_step")


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
    batch = layout.parse(
      inputs,
      segmentation_mask,
      seq_lengths,
      num_feature_axes=self.cell.num_feature_axes,
      time_major=time_major,
      max_segments=max_segments,
      initial_segment_ids=initial_segment_ids,
      context="RNN",
    )
    final_carry, outputs = self.call_parsed(
      inputs,
      batch,
      initial_carry=initial_carry,
      reverse=reverse,
      keep_order=keep_order,
      is_training=is_training,
    )
    return (final_carry, outputs) if return_carry else outputs

  def call_parsed(
    self,
    inputs: Array,
    batch: layout.Batch,
    *,
    initial_carry: Carry | None = None,
    reverse: bool | None = None,
    keep_order: bool | None = None,
    is_training: bool = False,
  ) -> tuple[Carry, Any]:
    """Runs the cell over ``inputs`` for a batch parsed already.

    The one entry point for the modules that run RNNs (``Bidirectional``,
    ``StackedRNN``): they check the user's mask and options once, as
    ``RNN.__call__`` does, and call this with the parsed batch; ``inputs``
    may be another array over the same sequences (a layer's outputs). Users
    call the module instead. Returns ``(final_carry, outputs)``.
    """
    reverse = self.reverse if reverse is None else reverse
    keep_order = self.keep_order if keep_order is None else keep_order
    inputs_layout = layout.Layout.of(
      inputs, self.cell.num_feature_axes, batch.time_major, "RNN"
    )
    inputs = inputs_layout.to_scan(inputs)
    # One step's shape and dtype (not inputs[0]: the time axis may be empty).
    sample = jnp.zeros(inputs.shape[1:], inputs.dtype)
    if initial_carry is None:
      initial_carry = self.cell.initialize_carry(sample)
    else:
      initial_carry = inputs_layout.carry_to_scan(
        layout.check_initial_carry(
          self.cell, initial_carry, inputs_layout, "RNN"
        )
      )
    reset_carry = None
    if batch.streaming:
      if reverse:
        raise ValueError(
          "RNN: initial_segment_ids (streaming) needs reverse=False, got "
          "reverse=True"
        )
      if batch.continued is not None:
        reset_carry = self.cell.initialize_carry(sample)
    inputs, recurrent_mask = self._dropout(sample, inputs, is_training)
    with dispatch.call_site(self.module_name, self.cell):
      final_carry, outputs = scan.scan_cell(
        self.cell,
        inputs,
        initial_carry,
        batch,
        reverse=reverse,
        keep_order=keep_order,
        recurrent_mask=recurrent_mask,
        unroll=self.unroll,
        fused=self.fused,
        remat=self.remat,
        reset_carry=reset_carry,
      )
    outputs = inputs_layout.from_scan(outputs)
    return inputs_layout.carry_from_scan(final_carry), outputs

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
