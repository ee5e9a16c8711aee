"""Flax linen's recurrent cells into hk_rnn params (``from_flax``).

The variables are plain arrays: Flax itself is not imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hk_rnn._src.interop._matching import (
  CELL_NAMES,
  Params,
  creation_order,
  is_sorted_tree,
  load_layers,
  one_bias,
  params_collection,
  source_layer,
  two_biases,
)

_FLAX_LAYOUTS = {
  # The sub-module names of each linen cell, in hk_rnn's gate order.
  "lstm": (("ii", "if", "ig", "io"), ("hi", "hf", "hg", "ho")),
  "gru": (("ir", "iz", "in"), ("hr", "hz", "hn")),
  "mgu": (("if", "in"), ("hf", "hn")),
  "simple": (("i",), ("h",)),
}


def _flax_kind(node: Any) -> str | None:
  if not isinstance(node, Mapping):
    return None
  for kind, (inputs, hidden) in _FLAX_LAYOUTS.items():
    if set(node) == set(inputs) | set(hidden) and all(
      isinstance(node[name], Mapping) and "kernel" in node[name]
      for name in node
    ):
      return kind
  return None


def _flax_cells(tree: Any, path: tuple[str, ...], found: list) -> None:
  kind = _flax_kind(tree)
  if kind is not None:
    found.append((path, kind, tree))
  elif isinstance(tree, Mapping):
    for key, child in tree.items():
      _flax_cells(child, (*path, str(key)), found)


def from_flax(variables: Any, params: Params) -> dict[str, dict[str, Any]]:
  """Loads the params of Flax linen cells into hk_rnn params.

  Finds every ``LSTMCell``, ``OptimizedLSTMCell`` (the same parameters),
  ``GRUCell``, ``SimpleCell`` and ``MGUCell`` in ``variables``, inside
  ``nn.RNN``, ``nn.Bidirectional`` or any module, in the order Flax created
  them (as Flax's ``init`` returned the variables; sorted variables by
  Flax's names: ``RNN_2`` before ``RNN_10``, ``forward_rnn`` before
  ``backward_rnn``, or a ``ValueError`` when the names cannot tell; see the
  :doc:`naming guide </naming>` for the rule). Flax's
  separate gate kernels are concatenated in hk_rnn's order; each gate's
  bias sits on its input or its hidden side in Flax, and goes to ``b`` (the
  sum) or to ``b_i``/``b_h`` as the cell computes it. Options the parameters
  cannot show are the user's to match: activations (``activation_fn``),
  ``SimpleCell(residual=True)`` (no counterpart), ``MGUCell``'s
  ``reset_gate=False`` (no counterpart; recognised by its missing ``hn``
  bias, a ``ValueError``).

  Args:
    variables: what Flax's ``init`` returned (``{"params": ...}``) or its
      ``"params"`` collection.
    params: the hk_rnn model's params.

  Returns:
    A new params dict with the cells' weights replaced (dtypes kept).
  """
  context = "from_flax"
  variables = params_collection(variables, context, "Flax variables")
  found: list = []
  _flax_cells(variables, (), found)
  order = creation_order(
    [path for path, _, _ in found],
    [kind for _, kind, _ in found],
    is_sorted_tree(variables),
    context,
    "the source's variables",
  )
  layers = []
  for index in order:
    path, kind, node = found[index]
    where = f"'{'/'.join(path)}' (Flax {CELL_NAMES[kind]})"
    if kind == "mgu" and "bias" not in node["hn"]:
      raise ValueError(
        f"{context}: the source's {where} has no bias in 'hn': an "
        "MGUCell(reset_gate=False), which hk_rnn's MGUCell does not compute"
      )
    inputs, hidden = _FLAX_LAYOUTS[kind]

    def gather(names, node=node):
      kernels = [np.asarray(node[name]["kernel"]) for name in names]
      dtype = kernels[0].dtype
      biases = [
        np.asarray(node[name]["bias"])
        if "bias" in node[name]
        else np.zeros((kernel.shape[-1],), dtype)
        for name, kernel in zip(names, kernels, strict=True)
      ]
      return np.concatenate(kernels, -1), np.concatenate(biases, -1)

    w_i, b_i = gather(inputs)
    w_h, b_h = gather(hidden)
    if kind in ("gru", "mgu"):
      arrays = two_biases(w_i, w_h, b_i, b_h)
    else:
      arrays = one_bias(w_i, w_h, b_i + b_h)
    layers.append(source_layer(where, kind, arrays))
  return load_layers(
    context,
    layers,
    params,
    source_sorted=is_sorted_tree(variables),
  )
