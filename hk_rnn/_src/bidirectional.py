"""``Bidirectional``: a forward and a backward RNN over the same sequences."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from hk_rnn._src import layout
from hk_rnn._src import rnn as rnn_lib

Array = jax.Array


def concatenate_features(forward: Any, backward: Any) -> Any:
  """The default ``merge_fn``: concatenation on the last axis, leaf by leaf."""
  return jax.tree.map(
    lambda f, b: jnp.concatenate([f, b], axis=-1), forward, backward
  )


class Bidirectional(hk.Module):
  """Runs one RNN forward and another backward, and merges their outputs.

  The backward RNN reads each sequence (each segment of a packed row) from
  its last valid step to its first; its outputs are put back in input order
  before ``merge_fn(forward_outputs, backward_outputs)`` combines them
  (concatenation on the last axis by default). The two RNNs may use
  different cells.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, mask):
  ...   bi = hk_rnn.Bidirectional(hk_rnn.RNN(hk_rnn.LSTMCell(8)),
  ...                             hk_rnn.RNN(hk_rnn.GRUCell(4)))
  ...   return bi(x, mask)
  >>> model = hk.transform(forward)
  >>> x, mask = jnp.ones((2, 5, 3)), jnp.array([[1, 1, 1, 0, 0], [1] * 5])
  >>> ((fc, fh), bh), y = model.apply(
  ...     model.init(jax.random.key(0), x, mask), None, x, mask)
  >>> y.shape
  (2, 5, 12)

  The forward carry is the one after each row's last valid step; the
  backward carry the one after the row's last segment has been read back to
  its first step. Padded steps output zeros from both directions. With
  ``max_segments`` both are per segment (see :class:`RNN`).

  ``Bidirectional`` decides the layout and the directions: it passes its
  ``time_major`` to both RNNs, runs ``forward_rnn`` forward and
  ``backward_rnn`` reversed with its outputs in input order, and always
  reads both carries. An inner RNN built with a setting that would then be
  silently dropped — ``time_major=True`` while ``Bidirectional`` has
  ``time_major=False``, ``reverse=True`` on ``forward_rnn``, or
  ``return_carry=False`` — is rejected with a ``ValueError`` saying where
  the setting belongs. Everything else of each RNN (``unroll``, ``fused``,
  ``remat``, its cell) applies as set.
  """

  def __init__(
    self,
    forward_rnn: rnn_lib.RNN,
    backward_rnn: rnn_lib.RNN,
    *,
    merge_fn: Callable[[Any, Any], Any] | None = None,
    time_major: bool = False,
    return_carry: bool = True,
    name: str | None = None,
  ):
    """Configures the layer.

    Args:
      forward_rnn: the RNN run in input order.
      backward_rnn: the RNN run over each sequence reversed; its own
        ``reverse``/``keep_order`` settings are overridden.
      merge_fn: combines ``(forward_outputs, backward_outputs)``; concatenates
        on the last axis by default.
      time_major: inputs are ``(time, *batch, ...)``.
      return_carry: return ``((forward_carry, backward_carry), outputs)``;
        else only outputs.
      name: the module name.
    """
    super().__init__(name=name)
    for argument, value in (
      ("forward_rnn", forward_rnn),
      ("backward_rnn", backward_rnn),
    ):
      if not isinstance(value, rnn_lib.RNN):
        raise ValueError(
          f"Bidirectional: {argument} must be an hk_rnn.RNN, got "
          f"{type(value).__name__}"
        )
    for argument, rnn in (
      ("forward_rnn", forward_rnn),
      ("backward_rnn", backward_rnn),
    ):
      if rnn.time_major and not time_major:
        raise ValueError(
          f"Bidirectional: {argument} has time_major=True, which "
          "Bidirectional decides for both directions; pass "
          "time_major=True to Bidirectional instead (got "
          "Bidirectional(time_major=False))"
        )
      if not rnn.return_carry:
        raise ValueError(
          f"Bidirectional: {argument} has return_carry=False, which "
          "Bidirectional ignores (it reads both carries); pass "
          "return_carry=False to Bidirectional instead"
        )
    if forward_rnn.reverse:
      raise ValueError(
        "Bidirectional: forward_rnn has reverse=True, but Bidirectional runs "
        "it in input order; build it with reverse=False (backward_rnn is "
        "the one run reversed)"
      )
    self.forward_rnn = forward_rnn
    self.backward_rnn = backward_rnn
    self.merge_fn = merge_fn or concatenate_features
    self.time_major = time_major
    self.return_carry = return_carry

  def __call__(
    self,
    inputs: Array,
    segmentation_mask: Array | None = None,
    *,
    seq_lengths: Array | None = None,
    initial_carry: tuple[Any, Any] | None = None,
    return_carry: bool | None = None,
    time_major: bool | None = None,
    is_training: bool = False,
    max_segments: int | None = None,
  ):
    """Runs both directions; arguments as for :class:`RNN`.

    ``initial_carry``, when given, is a ``(forward, backward)`` pair. With
    ``max_segments`` K each carry is per segment, ``(*batch, K, ...)``:
    slot k of the forward carry holds the carry after the row's k-th segment,
    and of the backward carry the carry after that segment has been read
    back to its first step.

    Returns:
      ``((forward_carry, backward_carry), outputs)``, or ``outputs`` alone
      without ``return_carry``.
    """
    return_carry = self.return_carry if return_carry is None else return_carry
    time_major = self.time_major if time_major is None else time_major
    batch = layout.parse(
      inputs,
      segmentation_mask,
      seq_lengths,
      num_feature_axes=self.forward_rnn.cell.num_feature_axes,
      time_major=time_major,
      max_segments=max_segments,
      context="Bidirectional",
    )
    backward_axes = self.backward_rnn.cell.num_feature_axes
    if backward_axes != self.forward_rnn.cell.num_feature_axes:
      layout.Layout.of(inputs, backward_axes, time_major, "Bidirectional")
    carries, outputs = self.call_parsed(
      inputs, batch, initial_carry=initial_carry, is_training=is_training
    )
    return (carries, outputs) if return_carry else outputs

  def call_parsed(
    self,
    inputs: Array,
    batch: layout.Batch,
    *,
    initial_carry: tuple[Any, Any] | None = None,
    is_training: bool = False,
  ) -> tuple[tuple[Any, Any], Any]:
    """Runs both directions over a batch parsed already.

    As :meth:`RNN.call_parsed`: the entry point for ``StackedRNN``.
    Returns ``((forward_carry, backward_carry), outputs)``.
    """
    forward_carry = backward_carry = None
    if initial_carry is not None:
      if (
        not isinstance(initial_carry, (tuple, list)) or len(initial_carry) != 2
      ):
        raise layout.InitialCarryMismatch(
          "Bidirectional: initial_carry must be one (forward, backward) "
          "pair, a carry for each direction's RNN; got "
          + layout.describe_carry(initial_carry)
        )
      forward_carry, backward_carry = initial_carry
    pair = "initial_carry is one (forward, backward) pair"
    with layout.initial_carry_context(
      "Bidirectional", f"{pair}; its forward carry does not fit forward_rnn"
    ):
      forward_carry, forward_outputs = self.forward_rnn.call_parsed(
        inputs,
        batch,
        initial_carry=forward_carry,
        reverse=False,
        keep_order=False,
        is_training=is_training,
      )
    with layout.initial_carry_context(
      "Bidirectional", f"{pair}; its backward carry does not fit backward_rnn"
    ):
      backward_carry, backward_outputs = self.backward_rnn.call_parsed(
        inputs,
        batch,
        initial_carry=backward_carry,
        reverse=True,
        keep_order=True,
        is_training=is_training,
      )
    outputs = self.merge_fn(forward_outputs, backward_outputs)
    return (forward_carry, backward_carry), outputs
