"""What every converter shares: finding, ordering and loading the cells.

Every converter reads the source's recurrent layers into hk_rnn's layout
(``w_i (in, G*F)``, ``w_h (F, G*F)`` and ``b`` or ``b_i``/``b_h``, gate blocks
in hk_rnn's order), then matches them with the recurrent cells of an hk_rnn
params tree, one to one, in the order the model created its cells.

**Which entries are cells.** A params entry (a module's dict) is a cell when
its parameters have a cell's layout: ``w_i, w_h, b`` with ``w_h`` of width
``4F`` (``LSTMCell``; ``ConvLSTMCell`` when ``w_i`` has more than 2 axes) or
``F`` (``SimpleCell``), ``w_i, w_h, b_i, b_h`` with width ``3F``
(``GRUCell``) or ``2F`` (``MGUCell``). Every other entry is left untouched.

**The order of cells.** Cells are matched in the order the model created
them. A params tree whose keys are not in sorted order is in that order
(``init`` returns it so), and is taken as it is. One whose keys are sorted
may have been sorted since (every ``jax.tree.map``, ``jax.jit`` output,
optax update and checkpoint restore sorts them), so the order is read from
the names, one ``/``-separated component at a time. Names that differ only
in numbers and direction words are instances of one name: Haiku's
numbering (``lstm_cell``, ``lstm_cell_1``, ..., ``lstm_cell_10``, in
numeric order), numbers inside a name (``layer2`` before ``layer10``), and
the direction words ``forward``/``fwd``/``fw`` before
``backward``/``bwd``/``bw`` as whole words anywhere in a name
(``layer0_forward``, ``layer0_backward``, ``fwd1``, ``bwd1``, ``l2_fw``,
``forward_lstm``, ``Layer0Backward``). When two cells of one kind have
names that differ in anything else (``decoder/...`` and ``encoder/...``,
``left0`` and ``right0``), no name tells which came first, and the
converter raises a ``ValueError`` saying how to settle it: pass params as
``init`` returned them, convert one part at a time (the sub-dict of
``params`` that holds it) and merge the results, or name the cells so that
they differ only in numbers and direction words. Cells of different kinds
need no order between them: when the kinds disagree position by position
but each kind has as many cells as the source has layers of it and the
keys are sorted, cells are matched kind by kind (the source's k-th LSTM
with the k-th ``LSTMCell``). The same rule orders the cells of a Flax or
Haiku source.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

Params = Mapping[str, Mapping[str, Any]]

# Gate blocks per kind, and the cell class that holds each kind.
GATE_BLOCKS = {"lstm": 4, "gru": 3, "simple": 1, "mgu": 2, "conv_lstm": 4}
CELL_NAMES = {
  "lstm": "LSTMCell",
  "gru": "GRUCell",
  "simple": "SimpleCell",
  "mgu": "MGUCell",
  "conv_lstm": "ConvLSTMCell",
}
_ONE_BIAS = ("w_i", "w_h", "b")
_TWO_BIASES = ("w_i", "w_h", "b_i", "b_h")


def import_framework(module: str, context: str, package: str):
  """Imports an optional framework, saying how to install it when absent."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise ImportError(
      f"{context} needs {package}, which is not installed: pip install "
      f"{package}"
    ) from error


@dataclasses.dataclass
class SourceLayer:
  """One recurrent layer of a source, in hk_rnn's layout.

  ``arrays`` holds the weights (numpy, hk_rnn's names and gate order), or
  only their shapes when converting into the source (``to_torch``).
  """

  description: str
  kind: str
  shapes: dict[str, tuple[int, ...]]
  arrays: dict[str, np.ndarray] | None = None


def source_layer(description: str, kind: str, arrays: dict[str, np.ndarray]):
  return SourceLayer(
    description,
    kind,
    {key: tuple(np.shape(value)) for key, value in arrays.items()},
    arrays,
  )


@dataclasses.dataclass
class ParamsCell:
  """One recurrent cell of an hk_rnn params tree."""

  module: str
  kind: str
  entry: Mapping[str, Any]


def _cell_kind(entry: Mapping[str, Any]) -> str | None:
  """The cell kind whose layout ``entry`` has, or None."""
  keys = set(entry) if isinstance(entry, Mapping) else set()
  if keys not in (set(_ONE_BIAS), set(_TWO_BIASES)):
    return None
  w_i, w_h = np.shape(entry["w_i"]), np.shape(entry["w_h"])
  if len(w_h) < 2 or len(w_i) != len(w_h) or w_h[-2] == 0:
    return None
  features = w_h[-2]
  blocks, remainder = divmod(w_h[-1], features)
  if remainder or w_i[-1] != w_h[-1]:
    return None
  if keys == set(_ONE_BIAS):
    if len(w_i) > 2 and blocks == 4:
      return "conv_lstm"
    return {4: "lstm", 1: "simple"}.get(blocks) if len(w_i) == 2 else None
  return {3: "gru", 2: "mgu"}.get(blocks) if len(w_i) == 2 else None


NUMBERED_NAME = re.compile(r"^(.*?)_(\d+)$")
# A name's words: runs of digits, and letters split at snake_case and
# camelCase boundaries ("layer0_forward", "fwd1", "l2_bw", "ForwardLSTM").
_NAME_TOKENS = re.compile(r"\d+|[A-Z]+(?![a-z])|[A-Z]?[a-z]+")
# Direction words, forward (0) before backward (1), as whole words.
_DIRECTION_WORDS = {
  "forward": 0,
  "fwd": 0,
  "fw": 0,
  "backward": 1,
  "bwd": 1,
  "bw": 1,
}
_SORTED_KEYS = (
  "have their keys sorted (as jax.tree.map, jit, optax updates and "
  "checkpoint restores leave them), which loses the order the model "
  "created its cells in"
)


def _name_pattern(path: Sequence[str]) -> tuple[tuple[str, ...], tuple]:
  """``(skeleton, rank)`` of a module path (its ``/``-separated components).

  The skeleton is the path with every number replaced by ``#`` and every
  direction word (``forward``/``fwd``/``fw``, ``backward``/``bwd``/``bw``)
  by ``<direction>``; a Haiku instance suffix (``_1``, ``_2``, ...) is
  dropped (no suffix is instance 0). Paths with one skeleton are instances
  of one name, and their rank orders them as they were created: component
  by component, its numbers, then its instance, then forward before
  backward.
  """
  skeleton, rank = [], []
  for component in path:
    numbered = NUMBERED_NAME.match(component)
    base, instance = (
      (numbered[1], int(numbered[2])) if numbered else (component, 0)
    )
    pieces, numbers, directions, end = [], [], [], 0
    for token in _NAME_TOKENS.finditer(base):
      pieces.append(base[end : token.start()])
      end = token.end()
      word = token[0]
      if word.isdigit():
        numbers.append(int(word))
        pieces.append("#")
      elif word.lower() in _DIRECTION_WORDS:
        directions.append(_DIRECTION_WORDS[word.lower()])
        pieces.append("<direction>")
      else:
        pieces.append(word)
    pieces.append(base[end:])
    skeleton.append("".join(pieces))
    rank.append((*numbers, instance, *directions))
  return tuple(skeleton), tuple(rank)


def creation_order(
  paths: Sequence[tuple[str, ...]],
  kinds: Sequence[str],
  keys_sorted: bool,
  context: str,
  whose: str,
) -> list[int]:
  """Indices of ``paths`` (tuples of name components) in creation order.

  Keys that are not in sorted order were never sorted: they are in the
  order the model created its modules, which is kept. Sorted keys may
  have been sorted, so the creation order is read from the names (see
  :func:`_name_pattern`): instances of one name go, among the places they
  hold, in the order of their ranks. When two cells of one kind are not
  instances of one name, or rank the same, no name tells which came first:
  a ``ValueError`` that says how to settle it (``whose`` names the tree:
  "params" or "the source's variables").
  """
  if not keys_sorted:
    return list(range(len(paths)))
  patterns = [_name_pattern(path) for path in paths]
  groups: dict[tuple[str, ...], list[int]] = collections.defaultdict(list)
  for index, (skeleton, _) in enumerate(patterns):
    groups[skeleton].append(index)
  order = list(range(len(paths)))
  for members in groups.values():
    ranked = sorted(members, key=lambda index: patterns[index][1])
    for place, index in zip(members, ranked, strict=True):
      order[place] = index
  by_kind: dict[str, list[int]] = collections.defaultdict(list)
  for index in order:
    by_kind[kinds[index]].append(index)
  for kind, members in by_kind.items():
    for first, second in zip(members[:-1], members[1:], strict=True):
      (skeleton_a, rank_a), (skeleton_b, rank_b) = (
        patterns[first],
        patterns[second],
      )
      if skeleton_a == skeleton_b and rank_a != rank_b:
        continue
      names = f"'{'/'.join(paths[first])}' and '{'/'.join(paths[second])}'"
      why = (
        "read as the same place"
        if skeleton_a == skeleton_b
        else "differ in more than numbers and direction words "
        "(forward/backward, fwd/bwd, fw/bw)"
      )
      raise ValueError(
        f"{context}: the order of cells {names} (both of the kind an "
        f"hk_rnn.{CELL_NAMES.get(kind, kind)} takes) "
        f"cannot be settled from their names: {whose} {_SORTED_KEYS}, and "
        f"these names {why}. Settle it by passing {whose} as init returned "
        "them, or by converting one part at a time (pass the sub-dict of "
        f"{whose} that holds each layer or part, and merge the results), or "
        "by naming the cells so that they differ only in numbers and "
        "direction words (layer0_forward, layer0_backward, layer1_forward, "
        "...)"
      )
  return order


def is_sorted(keys: Sequence[str]) -> bool:
  keys = list(keys)
  return keys == sorted(keys)


def find_cells(params: Params, context: str) -> list[ParamsCell]:
  """The recurrent cells of an hk_rnn params tree, in creation order."""
  if not isinstance(params, Mapping):
    raise ValueError(
      f"{context}: params must be an hk_rnn params dict (what init "
      f"returned), got {type(params).__name__}"
    )
  found = [
    ParamsCell(module, kind, entry)
    for module, entry in params.items()
    if (kind := _cell_kind(entry)) is not None
  ]
  order = creation_order(
    [tuple(cell.module.split("/")) for cell in found],
    [cell.kind for cell in found],
    is_sorted(params),
    context,
    "params",
  )
  return [found[index] for index in order]


def describe_cell(cell: ParamsCell) -> str:
  return f"cell '{cell.module}' ({CELL_NAMES[cell.kind]})"


def _kind_counts(kinds: Sequence[str]) -> str:
  counts = collections.Counter(CELL_NAMES[kind] for kind in kinds)
  return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


# The argument each converter reads its layers from, for its errors.
_SOURCE_ARGUMENT = {
  "from_torch": "source",
  "to_torch": "module",
  "from_flax": "variables",
  "from_keras": "layer",
  "from_haiku": "hk_params",
}


def match_layers(
  layers: Sequence[SourceLayer],
  cells: Sequence[ParamsCell],
  context: str,
  source_sorted: bool,
  params_sorted: bool,
) -> list[tuple[SourceLayer, ParamsCell]]:
  """Pairs source layers with cells; any mismatch is a ValueError."""
  if not layers:
    raise ValueError(
      f"{context}: the source holds no recurrent layer (nothing in "
      f"{_SOURCE_ARGUMENT.get(context, 'it')} is one)"
    )
  if len(layers) != len(cells):
    if len(cells) < len(layers):
      missing = layers[len(cells)]
      what = f"the source's {missing.description} has no cell to go to"
      if cells:
        what += f" (the last cell is '{cells[-1].module}')"
    else:
      what = f"{describe_cell(cells[len(layers)])} has no source layer"
    raise ValueError(
      f"{context}: the source has {len(layers)} recurrent layers, params "
      f"have {len(cells)} recurrent cells; {what}"
    )
  layer_kinds = [layer.kind for layer in layers]
  cell_kinds = [cell.kind for cell in cells]
  if layer_kinds == cell_kinds:
    pairs = list(zip(layers, cells, strict=True))
  elif (source_sorted or params_sorted) and sorted(layer_kinds) == sorted(
    cell_kinds
  ):
    by_kind = collections.defaultdict(list)
    for cell in cells:
      by_kind[cell.kind].append(cell)
    pairs = [(layer, by_kind[layer.kind].pop(0)) for layer in layers]
  else:
    index = next(
      i
      for i, (a, b) in enumerate(zip(layer_kinds, cell_kinds, strict=True))
      if a != b
    )
    raise ValueError(
      f"{context}: {describe_cell(cells[index])} is recurrent cell "
      f"{index} but the source's layer there, {layers[index].description}, "
      f"needs an hk_rnn.{CELL_NAMES[layers[index].kind]} (the source has "
      f"{_kind_counts(layer_kinds)}; params have {_kind_counts(cell_kinds)})"
    )
  for layer, cell in pairs:
    for key, shape in layer.shapes.items():
      have = tuple(np.shape(cell.entry[key]))
      if have != shape:
        raise ValueError(
          f"{context}: {describe_cell(cell)} does not match the source's "
          f"{layer.description}: its {key} has shape {have}, the source's "
          f"{shape} (the source's layer has {_sizes(layer.shapes)}, the "
          f"cell {_sizes_of(cell)})"
        )
  return pairs


def _sizes(shapes: Mapping[str, tuple[int, ...]]) -> str:
  return f"input size {shapes['w_i'][-2]} and {shapes['w_h'][-2]} features"


def _sizes_of(cell: ParamsCell) -> str:
  return _sizes({key: np.shape(value) for key, value in cell.entry.items()})


def load_layers(
  context: str,
  layers: Sequence[SourceLayer],
  params: Params,
  *,
  source_sorted: bool = False,
) -> dict[str, dict[str, Any]]:
  """A copy of ``params`` with the cells' weights taken from ``layers``."""
  cells = find_cells(params, context)
  pairs = match_layers(layers, cells, context, source_sorted, is_sorted(params))
  loaded = {
    module: dict(entry) if isinstance(entry, Mapping) else entry
    for module, entry in params.items()
  }
  for layer, cell in pairs:
    for key, value in layer.arrays.items():
      loaded[cell.module][key] = jnp.asarray(
        value, dtype=jnp.result_type(cell.entry[key])
      )
  return loaded


def reorder_blocks(array: np.ndarray, order: Sequence[int]) -> np.ndarray:
  """Reorders the gate blocks on the last axis of ``array``."""
  parts = np.split(array, len(order), axis=-1)
  return np.concatenate([parts[index] for index in order], axis=-1)


def one_bias(w_i, w_h, b=None) -> dict[str, np.ndarray]:
  """hk_rnn's layout for kinds with one summed bias (LSTM, Simple)."""
  width = w_h.shape[-1]
  b = np.zeros((width,), w_h.dtype) if b is None else b
  return {"w_i": w_i, "w_h": w_h, "b": b}


def two_biases(w_i, w_h, b_i=None, b_h=None) -> dict[str, np.ndarray]:
  width = w_h.shape[-1]
  zeros = np.zeros((width,), w_h.dtype)
  return {
    "w_i": w_i,
    "w_h": w_h,
    "b_i": zeros if b_i is None else b_i,
    "b_h": zeros if b_h is None else b_h,
  }


def is_sorted_tree(tree: Any) -> bool:
  """Whether every mapping in ``tree`` has its keys in sorted order."""
  if not isinstance(tree, Mapping):
    return True
  return is_sorted([str(key) for key in tree]) and all(
    is_sorted_tree(child) for child in tree.values()
  )


def params_collection(variables: Any, context: str, what: str) -> Mapping:
  """The ``"params"`` collection of Flax ``variables``, or ``variables``
  when it is that collection already; a ``ValueError`` naming ``what`` was
  expected when it is no mapping."""
  if isinstance(variables, Mapping) and isinstance(
    variables.get("params"), Mapping
  ):
    variables = variables["params"]
  if not isinstance(variables, Mapping):
    raise ValueError(
      f"{context}: variables must be {what} or their params collection (a "
      f"mapping), got {type(variables).__name__}"
    )
  return variables
