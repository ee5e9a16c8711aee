"""Keras 3's ``LSTM``, ``GRU`` and ``SimpleRNN`` into hk_rnn params.

``from_keras`` walks layers, models and lists; keras is imported when it is
called.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hk_rnn._src.interop._matching import (
  Params,
  SourceLayer,
  import_framework,
  load_layers,
  one_bias,
  reorder_blocks,
  source_layer,
  two_biases,
)


def _keras_layers(keras, item: Any, layers: list) -> None:
  """Appends the recurrent layers of ``item`` (a layer, model or list)."""
  context = "from_keras"
  if isinstance(item, (list, tuple)):
    for child in item:
      _keras_layers(keras, child, layers)
  elif isinstance(item, keras.layers.Bidirectional):
    _keras_layers(keras, item.forward_layer, layers)
    _keras_layers(keras, item.backward_layer, layers)
  elif isinstance(item, keras.layers.RNN):
    cells = getattr(item.cell, "cells", None) or [item.cell]
    for number, cell in enumerate(cells):
      name = f"'{item.name}'" + (f" cell {number}" if len(cells) > 1 else "")
      layers.append(_keras_cell(keras, cell, name, context))
  elif hasattr(item, "layers"):
    for child in item.layers:
      _keras_layers(keras, child, layers)


def _keras_cell(keras, cell: Any, name: str, context: str) -> SourceLayer:
  if isinstance(cell, keras.layers.LSTMCell):
    kind, order = "lstm", (0, 1, 2, 3)  # i, f, c, o: hk_rnn's order
  elif isinstance(cell, keras.layers.GRUCell):
    if not cell.reset_after:
      raise ValueError(
        f"{context}: the source's layer {name} is a GRU with "
        "reset_after=False (the reset gate before the recurrent matmul), "
        "which hk_rnn's GRUCell does not compute; use reset_after=True"
      )
    kind, order = "gru", (1, 0, 2)  # Keras's z, r, h to r, z, n
  elif isinstance(cell, keras.layers.SimpleRNNCell):
    kind, order = "simple", (0,)
  else:
    raise ValueError(
      f"{context}: the source's layer {name} has a "
      f"{type(cell).__name__}, which has no hk_rnn counterpart (LSTM, "
      "GRU and SimpleRNN do)"
    )
  if not cell.built:
    raise ValueError(
      f"{context}: the source's layer {name} is not built yet; call it on "
      "an input (or build it) first"
    )

  def read(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))

  w_i = reorder_blocks(read(cell.kernel), order)
  w_h = reorder_blocks(read(cell.recurrent_kernel), order)
  bias = read(cell.bias) if cell.use_bias else None
  description = f"layer {name} (Keras {type(cell).__name__[:-4]})"
  if kind == "gru":
    if bias is None:
      arrays = two_biases(w_i, w_h)
    else:
      arrays = two_biases(
        w_i, w_h, reorder_blocks(bias[0], order), reorder_blocks(bias[1], order)
      )
  else:
    arrays = one_bias(
      w_i, w_h, None if bias is None else reorder_blocks(bias, order)
    )
  return source_layer(description, kind, arrays)


def from_keras(layer: Any, params: Params) -> dict[str, dict[str, Any]]:
  """Loads Keras 3 recurrent layers into hk_rnn params.

  ``layer`` is an ``LSTM``, a ``GRU(reset_after=True)``, a ``SimpleRNN``, a
  ``Bidirectional`` of them (forward, then backward), an ``RNN`` of their
  cells, or a model or list whose recurrent layers are taken in order.
  Keras's LSTM gate order is hk_rnn's; its GRU's blocks ``z, r, h`` become
  ``r, z, n`` and its two bias rows ``b_i``, ``b_h``. Activations are the
  user's to match (``activation_fn``, ``gate_fn``). Keras weights are read
  as numpy, so any backend works; the tests use JAX's.

  Args:
    layer: the built Keras layer, model or list.
    params: the hk_rnn model's params.

  Returns:
    A new params dict with the cells' weights replaced (dtypes kept).

  Raises:
    ValueError: ``GRU(reset_after=False)``, a recurrent layer with no
      counterpart, an unbuilt layer, or a number, kind or shape of cells
      that differs (the message names the cell).
  """
  context = "from_keras"
  keras = import_framework("keras", context, "keras")
  layers: list[SourceLayer] = []
  _keras_layers(keras, layer, layers)
  return load_layers(context, layers, params)
