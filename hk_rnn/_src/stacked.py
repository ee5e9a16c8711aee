"""``StackedRNN``: layers of ``RNN`` or ``Bidirectional``, one over the other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from hk_rnn._src import bidirectional as bidirectional_lib
from hk_rnn._src import dropout, layout
from hk_rnn._src import rnn as rnn_lib

Array = jax.Array
Layer = rnn_lib.RNN | bidirectional_lib.Bidirectional


class StackedRNN(hk.Module):
  """Feeds each layer's outputs to the next, masks passed to every layer.

  .. math::

      y_0 = x, \\quad
      y_k = \\mathrm{layer}_k(\\mathrm{drop}(y_{k-1})) \\;[+\\, y_{k-1}
      \\text{ with residual}]

  ``drop`` is ordinary dropout with ``dropout_rate`` on the inputs of every
  layer but the first, when ``is_training`` (as ``torch.nn.LSTM``'s
  ``dropout``). Padded steps stay exactly zero throughout: each layer zeroes
  its outputs there and ignores its inputs there.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, lengths):
  ...   stack = hk_rnn.StackedRNN([
  ...       hk_rnn.RNN(hk_rnn.LSTMCell(8)),
  ...       hk_rnn.Bidirectional(hk_rnn.RNN(hk_rnn.GRUCell(4)),
  ...                            hk_rnn.RNN(hk_rnn.GRUCell(4))),
  ...       hk_rnn.RNN(hk_rnn.LSTMCell(8)),
  ...   ], residual=True)
  ...   return stack(x, seq_lengths=lengths)
  >>> model = hk.transform(forward)
  >>> x, lengths = jnp.ones((2, 5, 8)), jnp.array([5, 2])
  >>> carries, y = model.apply(
  ...     model.init(jax.random.key(0), x, lengths), None, x, lengths)
  >>> len(carries), y.shape
  (3, (2, 5, 8))
  """

  def __init__(
    self,
    layers: Sequence[Layer],
    *,
    dropout_rate: float = 0.0,
    residual: bool = False,
    name: str | None = None,
  ):
    """Configures the stack.

    Args:
      layers: ``RNN`` or ``Bidirectional`` instances, first to last.
      dropout_rate: dropout between layers when training.
      residual: add each layer's input to its output; every layer's output
        width must then equal its input width.
      name: the module name.
    """
    super().__init__(name=name)
    layers = tuple(layers)
    if not layers:
      raise ValueError("StackedRNN: layers must hold at least one layer, got 0")
    for index, layer in enumerate(layers):
      if not isinstance(layer, (rnn_lib.RNN, bidirectional_lib.Bidirectional)):
        raise ValueError(
          f"StackedRNN: layers[{index}] must be an hk_rnn.RNN or "
          f"hk_rnn.Bidirectional, got {type(layer).__name__}"
        )
    for index, layer in enumerate(layers):
      if not layer.return_carry:
        raise ValueError(
          f"StackedRNN: layers[{index}] has return_carry=False, which "
          "StackedRNN ignores (it returns every layer's carry); pass "
          "return_carry=False to the StackedRNN call instead"
        )
      if layer.time_major != layers[0].time_major:
        raise ValueError(
          f"StackedRNN: every layer must share one layout, but layers[0] has "
          f"time_major={layers[0].time_major} and layers[{index}] has "
          f"time_major={layer.time_major}; set it alike on every layer (or "
          "pass time_major= to the StackedRNN call)"
        )
    self.layers = layers
    self.dropout_rate = dropout.check_rate(
      dropout_rate, "dropout_rate", "StackedRNN"
    )
    self.residual = residual

  def __call__(
    self,
    inputs: Array,
    segmentation_mask: Array | None = None,
    *,
    seq_lengths: Array | None = None,
    initial_carry: Sequence[Any] | None = None,
    return_carry: bool = True,
    time_major: bool | None = None,
    is_training: bool = False,
    initial_segment_ids: Array | None = None,
    max_segments: int | None = None,
  ):
    """Runs every layer; arguments as for :class:`RNN`.

    ``initial_carry``, when given, holds one entry per layer (``None`` for
    a layer's own initial carry; a ``(forward, backward)`` pair for a
    ``Bidirectional`` layer).

    ``initial_segment_ids`` streams packed rows through the stack chunk by
    chunk, as for :class:`RNN`: pass the previous chunk's carries as
    ``initial_carry`` and ``hk_rnn.last_segment_ids`` of its mask; each
    layer's carry then continues the segment it belongs to, and every other
    segment starts afresh. Every layer must be a forward ``RNN`` (a
    reversed or bidirectional layer cannot be streamed).

    With ``max_segments`` each layer's carry is per segment, as for
    :class:`RNN` (a ``(forward, backward)`` pair of them for a
    ``Bidirectional`` layer).

    Returns:
      ``(carries, outputs)`` with one carry per layer, or ``outputs`` alone
      without ``return_carry``.
    """
    count = len(self.layers)
    per_layer = (
      f"initial_carry takes one entry per layer ({count} "
      f"layer{'s' if count != 1 else ''}: None for a layer's own, a "
      "(forward, backward) pair for a Bidirectional layer)"
    )
    if initial_carry is None:
      initial_carry = (None,) * len(self.layers)
    elif not isinstance(initial_carry, (tuple, list)) or len(
      initial_carry
    ) != len(self.layers):
      raise layout.InitialCarryMismatch(
        f"StackedRNN: {per_layer}, a tuple or list of {len(self.layers)}; "
        f"got {layout.describe_carry(initial_carry)}"
      )
    if initial_segment_ids is not None:
      for index, layer in enumerate(self.layers):
        if not isinstance(layer, rnn_lib.RNN) or layer.reverse:
          raise ValueError(
            "StackedRNN: initial_segment_ids (streaming) needs every layer "
            f"to be a forward hk_rnn.RNN; got layers[{index}] = "
            + (
              "an RNN with reverse=True"
              if isinstance(layer, rnn_lib.RNN)
              else f"a {type(layer).__name__}"
            )
          )
    first = self.layers[0]
    if time_major is None:
      time_major = first.time_major
    cell = (
      first.cell if isinstance(first, rnn_lib.RNN) else first.forward_rnn.cell
    )
    batch = layout.parse(
      inputs,
      segmentation_mask,
      seq_lengths,
      num_feature_axes=cell.num_feature_axes,
      time_major=time_major,
      max_segments=max_segments,
      initial_segment_ids=initial_segment_ids,
      context="StackedRNN",
    )
    valid = batch.valid_steps()
    carries = []
    outputs = inputs
    for index, (layer, carry) in enumerate(
      zip(self.layers, initial_carry, strict=True)
    ):
      layer_inputs = outputs
      if index and is_training and self.dropout_rate:
        dropout.require_rng(
          "StackedRNN",
          f"is_training=True applies dropout_rate={self.dropout_rate} "
          f"between the layers of StackedRNN {self.module_name!r}",
        )
        layer_inputs = hk.dropout(
          hk.next_rng_key(), self.dropout_rate, layer_inputs
        )
      with layout.initial_carry_context(
        "StackedRNN",
        f"{per_layer}; initial_carry[{index}] does not fit layers[{index}]",
      ):
        carry, layer_outputs = layer.call_parsed(
          layer_inputs, batch, initial_carry=carry, is_training=is_training
        )
      if self.residual:
        if layer_outputs.shape != outputs.shape:
          raise ValueError(
            f"StackedRNN: residual=True needs layers[{index}] to keep its "
            f"input width, {outputs.shape[-1]}; got outputs of width "
            f"{layer_outputs.shape[-1]}"
          )
        # The skip path must not carry padded inputs (NaN included) through.
        if valid is not None:
          features = (1,) * (outputs.ndim - valid.ndim)
          outputs = jnp.where(valid.reshape(valid.shape + features), outputs, 0)
        layer_outputs = layer_outputs + outputs
      outputs = layer_outputs
      carries.append(carry)
    if not return_carry:
      return outputs
    return tuple(carries), outputs
