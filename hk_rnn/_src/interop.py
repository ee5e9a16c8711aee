"""Weights from PyTorch, Flax, Keras and Haiku into hk_rnn params, and back.

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
_BLOCKS = {"lstm": 4, "gru": 3, "simple": 1, "mgu": 2, "conv_lstm": 4}
_CELL_NAMES = {
  "lstm": "LSTMCell",
  "gru": "GRUCell",
  "simple": "SimpleCell",
  "mgu": "MGUCell",
  "conv_lstm": "ConvLSTMCell",
}
_ONE_BIAS = ("w_i", "w_h", "b")
_TWO_BIASES = ("w_i", "w_h", "b_i", "b_h")


def _import(module: str, context: str, package: str):
  """Imports an optional framework, saying how to install it when absent."""
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise ImportError(
      f"{context} needs {package}, which is not installed: pip install "
      f"{package}"
    ) from error


@dataclasses.dataclass
class _Layer:
  """One recurrent layer of a source, in hk_rnn's layout.

  ``arrays`` holds the weights (numpy, hk_rnn's names and gate order), or
  only their shapes when converting into the source (``to_torch``).
  """

  description: str
  kind: str
  shapes: dict[str, tuple[int, ...]]
  arrays: dict[str, np.ndarray] | None = None


def _layer(description: str, kind: str, arrays: dict[str, np.ndarray]):
  return _Layer(
    description,
    kind,
    {key: tuple(np.shape(value)) for key, value in arrays.items()},
    arrays,
  )


@dataclasses.dataclass
class _Cell:
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


_NUMBERED = re.compile(r"^(.*?)_(\d+)$")
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
    numbered = _NUMBERED.match(component)
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


def _creation_order(
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
        f"hk_rnn.{_CELL_NAMES.get(kind, kind)} takes) "
        f"cannot be settled from their names: {whose} {_SORTED_KEYS}, and "
        f"these names {why}. Settle it by passing {whose} as init returned "
        "them, or by converting one part at a time (pass the sub-dict of "
        f"{whose} that holds each layer or part, and merge the results), or "
        "by naming the cells so that they differ only in numbers and "
        "direction words (layer0_forward, layer0_backward, layer1_forward, "
        "...)"
      )
  return order


def _is_sorted(keys: Sequence[str]) -> bool:
  keys = list(keys)
  return keys == sorted(keys)


def _cells(params: Params, context: str) -> list[_Cell]:
  """The recurrent cells of an hk_rnn params tree, in creation order."""
  if not isinstance(params, Mapping):
    raise ValueError(
      f"{context}: params must be an hk_rnn params dict (what init "
      f"returned), got {type(params).__name__}"
    )
  found = [
    _Cell(module, kind, entry)
    for module, entry in params.items()
    if (kind := _cell_kind(entry)) is not None
  ]
  order = _creation_order(
    [tuple(cell.module.split("/")) for cell in found],
    [cell.kind for cell in found],
    _is_sorted(params),
    context,
    "params",
  )
  return [found[index] for index in order]


def _describe_cell(cell: _Cell) -> str:
  return f"cell '{cell.module}' ({_CELL_NAMES[cell.kind]})"


def _kind_counts(kinds: Sequence[str]) -> str:
  counts = collections.Counter(_CELL_NAMES[kind] for kind in kinds)
  return ", ".join(f"{count} {name}" for name, count in sorted(counts.items()))


# The argument each converter reads its layers from, for its errors.
_SOURCE_ARGUMENT = {
  "from_torch": "source",
  "to_torch": "module",
  "from_flax": "variables",
  "from_keras": "layer",
  "from_haiku": "hk_params",
}


def _match(
  layers: Sequence[_Layer],
  cells: Sequence[_Cell],
  context: str,
  source_sorted: bool,
  params_sorted: bool,
) -> list[tuple[_Layer, _Cell]]:
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
      what = f"{_describe_cell(cells[len(layers)])} has no source layer"
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
      f"{context}: {_describe_cell(cells[index])} is recurrent cell "
      f"{index} but the source's layer there, {layers[index].description}, "
      f"needs an hk_rnn.{_CELL_NAMES[layers[index].kind]} (the source has "
      f"{_kind_counts(layer_kinds)}; params have {_kind_counts(cell_kinds)})"
    )
  for layer, cell in pairs:
    for key, shape in layer.shapes.items():
      have = tuple(np.shape(cell.entry[key]))
      if have != shape:
        raise ValueError(
          f"{context}: {_describe_cell(cell)} does not match the source's "
          f"{layer.description}: its {key} has shape {have}, the source's "
          f"{shape} (the source's layer has {_sizes(layer.shapes)}, the "
          f"cell {_sizes_of(cell)})"
        )
  return pairs


def _sizes(shapes: Mapping[str, tuple[int, ...]]) -> str:
  return f"input size {shapes['w_i'][-2]} and {shapes['w_h'][-2]} features"


def _sizes_of(cell: _Cell) -> str:
  return _sizes({key: np.shape(value) for key, value in cell.entry.items()})


def _load(
  context: str,
  layers: Sequence[_Layer],
  params: Params,
  *,
  source_sorted: bool = False,
) -> dict[str, dict[str, Any]]:
  """A copy of ``params`` with the cells' weights taken from ``layers``."""
  cells = _cells(params, context)
  pairs = _match(layers, cells, context, source_sorted, _is_sorted(params))
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


def _blocks(array: np.ndarray, order: Sequence[int]) -> np.ndarray:
  """Reorders the gate blocks on the last axis of ``array``."""
  parts = np.split(array, len(order), axis=-1)
  return np.concatenate([parts[index] for index in order], axis=-1)


def _one_bias(w_i, w_h, b=None) -> dict[str, np.ndarray]:
  """hk_rnn's layout for kinds with one summed bias (LSTM, Simple)."""
  width = w_h.shape[-1]
  b = np.zeros((width,), w_h.dtype) if b is None else b
  return {"w_i": w_i, "w_h": w_h, "b": b}


def _two_biases(w_i, w_h, b_i=None, b_h=None) -> dict[str, np.ndarray]:
  width = w_h.shape[-1]
  zeros = np.zeros((width,), w_h.dtype)
  return {
    "w_i": w_i,
    "w_h": w_h,
    "b_i": zeros if b_i is None else b_i,
    "b_h": zeros if b_h is None else b_h,
  }


# ------------------------------------------------------------------ PyTorch

_TORCH_KEY = re.compile(
  r"^(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)_l(\d+)(_reverse)?$"
)
_TORCH_KINDS = {4: "lstm", 3: "gru", 1: "simple"}
_TORCH_NAMES = {"lstm": "LSTM", "gru": "GRU", "simple": "RNN"}
_TORCH_MODES = {
  "LSTM": "lstm",
  "GRU": "gru",
  "RNN_TANH": "simple",
  "RNN_RELU": "simple",
}


def _to_numpy(value: Any) -> np.ndarray:
  """A tensor (any device, bfloat16 included) or array as numpy."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    try:
      return value.numpy()
    except TypeError:  # bfloat16 and other dtypes numpy lacks
      return value.float().numpy()
  return np.asarray(value)


def _torch_layers(state: Mapping[str, Any], prefix: str, mode: str | None):
  """Reads ``nn.LSTM``/``GRU``/``RNN`` weights under ``prefix`` into layers."""
  context = "from_torch"
  found: dict[tuple[int, bool], dict[str, Any]] = collections.defaultdict(dict)
  for key, value in state.items():
    if not isinstance(key, str) or not key.startswith(prefix):
      continue
    match = _TORCH_KEY.match(key[len(prefix) :])
    if match:
      found[(int(match[2]), bool(match[3]))][match[1]] = value
  if not found:
    sample = ", ".join(list(map(str, state))[:4])
    prefixes = [
      key[: -len("weight_ih_l0")]
      for key in state
      if isinstance(key, str) and key.endswith("weight_ih_l0")
    ]
    hint = (
      f"; it holds one under prefix={prefixes[0]!r}"
      + (f" (and {len(prefixes) - 1} more)" if len(prefixes) > 1 else "")
      if prefixes
      else ""
    )
    raise ValueError(
      f"{context}: the state dict holds no weight_ih_l0 under prefix "
      f"{prefix!r} (torch's key prefix, dot included); its keys begin "
      f"{sample}{hint}"
    )
  num_layers = max(layer for layer, _ in found) + 1
  bidirectional = any(reverse for _, reverse in found)
  layers = []
  for index in range(num_layers):
    for reverse in (False, True) if bidirectional else (False,):
      suffix = f"_l{index}{'_reverse' if reverse else ''}"
      weights = found.get((index, reverse), {})
      where = (
        f"layer {index} {'backward' if reverse else 'forward'} "
        f"({prefix}weight_ih{suffix})"
      )
      if "weight_hr" in weights:
        raise ValueError(
          f"{context}: the source's {where} has a projection "
          f"({prefix}weight_hr{suffix}: proj_size > 0), which no hk_rnn "
          "cell computes"
        )
      if "weight_ih" not in weights or "weight_hh" not in weights:
        raise ValueError(
          f"{context}: the source's {where} is incomplete: it needs "
          f"{prefix}weight_ih{suffix} and {prefix}weight_hh{suffix}, found "
          f"{sorted(prefix + name + suffix for name in weights)}"
        )
      if ("bias_ih" in weights) != ("bias_hh" in weights):
        raise ValueError(
          f"{context}: the source's {where} needs both {prefix}bias_ih"
          f"{suffix} and {prefix}bias_hh{suffix} or neither"
        )
      w_ih = _to_numpy(weights["weight_ih"])
      w_hh = _to_numpy(weights["weight_hh"])
      hidden = w_hh.shape[1]
      blocks = w_hh.shape[0] // hidden if hidden else 0
      kind = _TORCH_KINDS.get(blocks)
      if kind is None or w_hh.shape[0] != blocks * hidden:
        raise ValueError(
          f"{context}: the source's {where} has weight_hh of shape "
          f"{w_hh.shape}, which is no LSTM (4H, H), GRU (3H, H) or RNN "
          "(H, H)"
        )
      if mode is not None:
        kind = _TORCH_MODES[mode]
      b_ih = b_hh = None
      if "bias_ih" in weights:
        b_ih = _to_numpy(weights["bias_ih"])
        b_hh = _to_numpy(weights["bias_hh"])
      if kind == "gru":
        arrays = _two_biases(w_ih.T, w_hh.T, b_ih, b_hh)
      else:
        arrays = _one_bias(
          w_ih.T, w_hh.T, None if b_ih is None else b_ih + b_hh
        )
      layers.append(
        _layer(f"{where}, an nn.{_TORCH_NAMES[kind]}", kind, arrays)
      )
  return layers


def _torch_submodules_hint(torch, model, call, state_dict_call=None) -> str:
  """Where ``model`` (any torch module) holds its recurrent layers, if any.

  A model that holds an ``nn.LSTM`` (PyTorch's ``word_language_model``
  keeps it at ``model.rnn``) converts through that submodule; ``call`` and
  ``state_dict_call`` spell the call for a submodule's attribute path and
  for a state-dict prefix.
  """
  if not isinstance(model, torch.nn.Module):
    return ""
  found = [
    (name, type(child).__name__)
    for name, child in model.named_modules()
    if name and isinstance(child, torch.nn.RNNBase)
  ]
  if not found:
    return ""

  def attribute_path(name):
    parts = name.split(".")
    if all(part.isidentifier() for part in parts):
      return "." + name
    return f".get_submodule({name!r})"

  held = ", ".join(f"an nn.{kind} at '{name}'" for name, kind in found)
  name = found[0][0]
  hint = f"; it holds {held}: pass that module, {call(attribute_path(name))}"
  if state_dict_call is not None:
    hint += (
      f", or its state dict under its prefix, {state_dict_call(name + '.')}"
    )
  if len(found) > 1:
    hint += ", one recurrent module at a time"
  return hint


def from_torch(
  source: Any, params: Params, *, prefix: str = ""
) -> dict[str, dict[str, Any]]:
  """Loads a PyTorch ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` into hk_rnn params.

  Layer ``k`` of the source goes to the model's ``k``-th recurrent cell (its
  backward direction, when ``bidirectional``, to the next one), so a
  ``StackedRNN`` of ``Bidirectional`` layers takes a bidirectional multi-layer
  module in one call. PyTorch's gate order and GRU are hk_rnn's:
  ``w_i = weight_ih.T``, ``w_h = weight_hh.T``; ``b = bias_ih + bias_hh`` for
  the LSTM and the Elman RNN, ``b_i = bias_ih``, ``b_h = bias_hh`` for the
  GRU; zeros when ``bias=False``. Params carry no activation: for
  ``nn.RNN(nonlinearity="relu")`` build ``SimpleCell(...,
  activation_fn=jax.nn.relu)``. PyTorch's ``dropout`` between layers is
  ``StackedRNN``'s ``dropout_rate``.

  >>> import haiku as hk, jax, jax.numpy as jnp, numpy as np, hk_rnn
  >>> state = {"rnn.weight_ih_l0": np.ones((8, 3), np.float32),
  ...          "rnn.weight_hh_l0": np.ones((8, 2), np.float32)}  # an nn.LSTM
  >>> model = hk.transform(lambda x: hk_rnn.RNN(hk_rnn.LSTMCell(2))(x))
  >>> x = jnp.ones((1, 4, 3))
  >>> params = model.init(jax.random.key(0), x)
  >>> params = hk_rnn.interop.from_torch(state, params, prefix="rnn.")
  >>> params["lstm_cell"]["w_i"].shape, float(params["lstm_cell"]["b"].sum())
  ((3, 8), 0.0)

  Args:
    source: a ``torch.nn.LSTM``, ``torch.nn.GRU`` or ``torch.nn.RNN`` (any
      ``num_layers``, ``bidirectional``, ``bias``), or a state dict (names to
      tensors or arrays, e.g. from ``torch.load``) holding one of them under
      ``prefix``.
    params: the hk_rnn model's params (what ``init`` returned).
    prefix: the module's key prefix in the state dict, dot included
      (``"encoder.rnn."``).

  Returns:
    A new params dict: the cells' weights replaced (their dtypes kept), every
    other entry untouched.

  Raises:
    ValueError: ``proj_size > 0``; no weights under ``prefix``; a number,
      kind or shape of cells that differs from the source's layers (the
      message names the cell).
  """
  context = "from_torch"
  if isinstance(source, Mapping):
    return _load(context, _torch_layers(source, prefix, None), params)
  torch = _import("torch", context, "torch")
  if not isinstance(source, torch.nn.RNNBase):
    raise ValueError(
      f"{context}: source must be a torch.nn.LSTM, GRU or RNN or a state "
      f"dict, got {type(source).__name__}"
      + _torch_submodules_hint(
        torch,
        source,
        lambda path: f"from_torch(source{path}, params)",
        lambda prefix: (
          f"from_torch(source.state_dict(), params, prefix={prefix!r})"
        ),
      )
    )
  if getattr(source, "proj_size", 0) > 0:
    raise ValueError(
      f"{context}: source is an nn.LSTM with proj_size={source.proj_size}; "
      "no hk_rnn cell computes its projection (proj_size must be 0)"
    )
  return _load(
    context, _torch_layers(source.state_dict(), "", source.mode), params
  )


def to_torch(params: Params, module: Any) -> Any:
  """Writes hk_rnn params into a PyTorch ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN``.

  The reverse of :func:`from_torch`, cell for layer in the same order, in
  place (under ``torch.no_grad``), cast to the module's dtype. An LSTM's or
  Elman RNN's single bias ``b`` goes to ``bias_ih``, and ``bias_hh`` is set
  to zero (their sum is what PyTorch computes). A module built with
  ``bias=False`` takes only params whose biases are all zero.

  Args:
    params: the hk_rnn model's params.
    module: the torch module to write into.

  Returns:
    ``module``.

  Raises:
    ValueError: ``proj_size > 0``; a number, kind or shape of cells that
      differs from the module's layers; non-zero biases for ``bias=False``.
  """
  context = "to_torch"
  torch = _import("torch", context, "torch")
  if not isinstance(module, torch.nn.RNNBase):
    raise ValueError(
      f"{context}: module must be a torch.nn.LSTM, GRU or RNN, got "
      f"{type(module).__name__}"
      + _torch_submodules_hint(
        torch, module, lambda path: f"to_torch(params, module{path})"
      )
    )
  if getattr(module, "proj_size", 0) > 0:
    raise ValueError(
      f"{context}: module is an nn.LSTM with proj_size={module.proj_size}; "
      "no hk_rnn cell computes its projection (proj_size must be 0)"
    )
  kind = _TORCH_MODES[module.mode]
  blocks = _BLOCKS[kind]
  hidden = module.hidden_size
  directions = 2 if module.bidirectional else 1
  layers = []
  for index in range(module.num_layers):
    input_size = module.input_size if index == 0 else hidden * directions
    for reverse in (False, True)[:directions]:
      suffix = f"_l{index}{'_reverse' if reverse else ''}"
      shapes = {
        "w_i": (input_size, blocks * hidden),
        "w_h": (hidden, blocks * hidden),
      }
      layers.append(
        _Layer(
          f"layer {index} {'backward' if reverse else 'forward'} "
          f"(weight_ih{suffix}, an nn.{_TORCH_NAMES[kind]})",
          kind,
          shapes,
        )
      )
  pairs = _match(
    layers, _cells(params, context), context, False, _is_sorted(params)
  )
  tensors = dict(module.named_parameters())
  position = 0
  with torch.no_grad():
    for index in range(module.num_layers):
      for reverse in (False, True)[:directions]:
        layer, cell = pairs[position]
        position += 1
        suffix = f"_l{index}{'_reverse' if reverse else ''}"
        entry = {  # writable float32 copies, which torch.from_numpy takes
          key: np.array(jnp.asarray(value, jnp.float32))
          for key, value in cell.entry.items()
        }
        if kind == "gru":
          b_ih, b_hh = entry["b_i"], entry["b_h"]
        else:
          b_ih, b_hh = entry["b"], np.zeros_like(entry["b"])
        if not module.bias:
          if np.any(b_ih) or np.any(b_hh):
            raise ValueError(
              f"{context}: {_describe_cell(cell)} has non-zero biases but "
              f"the module's {layer.description} has none (bias=False)"
            )
        else:
          tensors[f"bias_ih{suffix}"].copy_(torch.from_numpy(b_ih))
          tensors[f"bias_hh{suffix}"].copy_(torch.from_numpy(b_hh))
        tensors[f"weight_ih{suffix}"].copy_(
          torch.from_numpy(np.ascontiguousarray(entry["w_i"].T))
        )
        tensors[f"weight_hh{suffix}"].copy_(
          torch.from_numpy(np.ascontiguousarray(entry["w_h"].T))
        )
  return module


# --------------------------------------------------------------------- Flax

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
  ``backward_rnn``, or a ``ValueError`` when the names cannot tell; see this
  module's docstring for the rule). Flax's
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
  if isinstance(variables, Mapping) and isinstance(
    variables.get("params"), Mapping
  ):
    variables = variables["params"]
  if not isinstance(variables, Mapping):
    raise ValueError(
      f"{context}: variables must be Flax variables or their params "
      f"collection (a mapping), got {type(variables).__name__}"
    )
  found: list = []
  _flax_cells(variables, (), found)
  order = _creation_order(
    [path for path, _, _ in found],
    [kind for _, kind, _ in found],
    _is_sorted_tree(variables),
    context,
    "the source's variables",
  )
  layers = []
  for index in order:
    path, kind, node = found[index]
    where = f"'{'/'.join(path)}' (Flax {_CELL_NAMES[kind]})"
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
      arrays = _two_biases(w_i, w_h, b_i, b_h)
    else:
      arrays = _one_bias(w_i, w_h, b_i + b_h)
    layers.append(_layer(where, kind, arrays))
  return _load(
    context,
    layers,
    params,
    source_sorted=_is_sorted_tree(variables),
  )


def _is_sorted_tree(tree: Any) -> bool:
  """Whether every mapping in ``tree`` has its keys in sorted order."""
  if not isinstance(tree, Mapping):
    return True
  return _is_sorted([str(key) for key in tree]) and all(
    _is_sorted_tree(child) for child in tree.values()
  )


# -------------------------------------------------------------------- Keras


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


def _keras_cell(keras, cell: Any, name: str, context: str) -> _Layer:
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

  w_i = _blocks(read(cell.kernel), order)
  w_h = _blocks(read(cell.recurrent_kernel), order)
  bias = read(cell.bias) if cell.use_bias else None
  description = f"layer {name} (Keras {type(cell).__name__[:-4]})"
  if kind == "gru":
    if bias is None:
      arrays = _two_biases(w_i, w_h)
    else:
      arrays = _two_biases(
        w_i, w_h, _blocks(bias[0], order), _blocks(bias[1], order)
      )
  else:
    arrays = _one_bias(w_i, w_h, None if bias is None else _blocks(bias, order))
  return _layer(description, kind, arrays)


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
  keras = _import("keras", context, "keras")
  layers: list[_Layer] = []
  _keras_layers(keras, layer, layers)
  return _load(context, layers, params)


# -------------------------------------------------------------------- Haiku


def _haiku_cores(hk_params: Params):
  """``(core path, kind, entries)`` of Haiku's LSTM, VanillaRNN and GRU."""
  children: dict[tuple[str, ...], dict[str, Any]] = collections.defaultdict(
    dict
  )
  for module, entry in hk_params.items():
    *parent, last = module.split("/")
    children[tuple(parent)][last] = entry
  cores = []
  for module, entry in hk_params.items():
    path = tuple(module.split("/"))
    base = _NUMBERED.match(path[-1])
    base = base[1] if base else path[-1]
    if base == "gru" and set(entry) == {"w_i", "w_h", "b"}:
      cores.append((path, "hk.GRU", {"": entry}))
    if path[-1] != "linear" or len(path) < 2:
      continue
    core = path[:-1]
    owner = _NUMBERED.match(core[-1])
    owner = owner[1] if owner else core[-1]
    if owner == "lstm":
      cores.append((core, "lstm", children[core]))
    elif owner == "vanilla_rnn":
      cores.append((core, "simple", children[core]))
  return cores


def from_haiku(hk_params: Params, params: Params) -> dict[str, dict[str, Any]]:
  """Loads the params of Haiku's ``hk.LSTM`` and ``hk.VanillaRNN`` cores.

  Cores are found by the names Haiku gives them (``lstm``, ``lstm_1``, ...,
  ``vanilla_rnn``, ..., at any depth; a core given its own ``name=`` is not
  recognised) and taken in the order of this module's docstring.
  ``hk.LSTM`` concatenates ``[x, h]`` into one ``linear`` with gates
  ``i, g, f, o`` and adds 1 to the forget gate's pre-activation; here its
  ``w`` is split into ``w_i`` and ``w_h``, the blocks reordered to
  ``i, f, g, o`` and the 1 folded into ``b``. ``hk.VanillaRNN`` computes
  ``relu(x W_i + b_i + h W_h + b_h)``: pair it with ``SimpleCell(...,
  activation_fn=jax.nn.relu)``. ``hk.GRU`` computes a different GRU (the
  reset gate before the recurrent matmul, and ``h' = z*h + (1-z)*n`` with
  its own gate order), which no hk_rnn cell computes: run it through
  ``hk_rnn.CoreCell(hk.GRU(...))`` instead.

  >>> import haiku as hk, jax, jax.numpy as jnp, numpy as np, hk_rnn
  >>> x = jnp.ones((2, 3))
  >>> def haiku_step(x):
  ...   core = hk.LSTM(4)
  ...   return core(x, core.initial_state(2))
  >>> haiku = hk.transform(haiku_step)
  >>> hk_params = haiku.init(jax.random.key(0), x)
  >>> step = hk.transform(lambda x: hk_rnn.LSTMCell(4)(
  ...     (jnp.zeros((2, 4)), jnp.zeros((2, 4))), x))
  >>> params = hk_rnn.interop.from_haiku(
  ...     hk_params, step.init(jax.random.key(1), x))
  >>> h, _ = haiku.apply(hk_params, None, x)
  >>> _, y = step.apply(params, None, x)
  >>> bool(np.allclose(h, y, atol=1e-6))
  True

  Args:
    hk_params: the Haiku model's params.
    params: the hk_rnn model's params.

  Returns:
    A new params dict with the cells' weights replaced (dtypes kept).

  Raises:
    ValueError: an ``hk.GRU`` in ``hk_params``, or a number, kind or shape
      of cells that differs (the message names the cell).
  """
  context = "from_haiku"
  if not isinstance(hk_params, Mapping):
    raise ValueError(
      f"{context}: hk_params must be a Haiku params dict, got "
      f"{type(hk_params).__name__}"
    )
  cores = _haiku_cores(hk_params)
  order = _creation_order(
    [path for path, _, _ in cores],
    [kind for _, kind, _ in cores],
    _is_sorted(list(hk_params)),
    context,
    "hk_params",
  )
  layers = []
  for index in order:
    path, kind, entries = cores[index]
    where = f"'{'/'.join(path)}'"
    if kind == "hk.GRU":
      raise ValueError(
        f"{context}: the source's {where} is an hk.GRU, which computes a "
        "different GRU from hk_rnn.GRUCell (reset before the recurrent "
        "matmul); run it as hk_rnn.CoreCell(hk.GRU(...)) instead"
      )
    if kind == "lstm":
      w = np.asarray(entries["linear"]["w"])
      b = np.asarray(entries["linear"]["b"])
      features = w.shape[1] // 4
      order_ifgo = (0, 2, 1, 3)  # Haiku's i, g, f, o
      w = _blocks(w, order_ifgo)
      b = _blocks(b, order_ifgo).copy()
      b[features : 2 * features] += 1  # hk.LSTM's sigmoid(f + 1)
      arrays = _one_bias(w[:-features], w[-features:], b)
      layers.append(_layer(f"{where} (hk.LSTM)", kind, arrays))
    else:
      if "linear_1" not in entries:
        raise ValueError(
          f"{context}: the source's {where} (hk.VanillaRNN) has no "
          "hidden_to_hidden 'linear_1'"
        )
      w_i = np.asarray(entries["linear"]["w"])
      b = np.asarray(entries["linear"]["b"])
      if "b" in entries["linear_1"]:  # double_bias=True, Haiku's default
        b = b + np.asarray(entries["linear_1"]["b"])
      arrays = _one_bias(w_i, np.asarray(entries["linear_1"]["w"]), b)
      layers.append(_layer(f"{where} (hk.VanillaRNN)", kind, arrays))
  return _load(
    context, layers, params, source_sorted=_is_sorted(list(hk_params))
  )
