"""Weights from google-deepmind/recurrentgemma's JAX modules into hk_rnn.

recurrentgemma's ``RGLRU`` becomes an :class:`~hk_rnn.RGLRUCell` and its
``RecurrentBlock`` (with the ``Conv1D`` and ``RGLRU`` inside it) a
:class:`~hk_rnn.GriffinCell`; the two compute the same functions for the
same weights. Sources and cells are matched one to one, in the order they
were created, by the rule of ``_matching.py`` (kept as given unless the keys
are sorted; then read from the names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from hk_rnn._src.interop._matching import (
  Params,
  creation_order,
  is_sorted,
  is_sorted_tree,
  params_collection,
)

_CONTEXT = "from_recurrentgemma"
_GATES = ("input_gate", "a_gate")
_BLOCK_PARTS = ("linear_y", "linear_x", "conv_1d", "rg_lru", "linear_out")
_DENSE_PARTS = ("linear_y", "linear_x", "linear_out")
_KIND_NAMES = {"rglru": "RGLRUCell", "griffin": "GriffinCell"}
_SOURCE_NAMES = {"rglru": "RGLRU", "griffin": "RecurrentBlock"}


@dataclasses.dataclass
class _Unit:
  """One source module or hk_rnn cell: its kind and its weights, by the
  hk_rnn params entry (relative to the cell's module) they belong in."""

  where: str
  kind: str
  entries: dict[str, dict[str, Any]]


def _is_mapping_with(node: Any, keys: set[str]) -> bool:
  return isinstance(node, Mapping) and set(node) == keys


def _source_rglru(node: Mapping, where: str) -> dict[str, dict[str, Any]]:
  if "a_imag_param" in node:
    raise ValueError(
      f"{_CONTEXT}: the source's RGLRU '{where}' is complex "
      "(only_real=False, it has an a_imag_param); RGLRUCell computes the "
      "real RG-LRU only"
    )
  a_param = node["a_param"] if "a_param" in node else node["a_real_param"]
  entries = {"": {"a_param": np.asarray(a_param)}}
  for gate in _GATES:
    entries[f"/~/{gate}"] = {
      "w": np.asarray(node[gate]["w"]),
      "b": np.asarray(node[gate]["b"]),
    }
  return entries


def _is_source_rglru(node: Any) -> bool:
  if not isinstance(node, Mapping):
    return False
  has_a = "a_param" in node or "a_real_param" in node
  return has_a and all(
    _is_mapping_with(node.get(gate), {"w", "b"}) for gate in _GATES
  )


def _is_source_conv(node: Any) -> bool:
  return _is_mapping_with(node, {"w", "b"}) and np.ndim(node["w"]) == 2


def _source_units(tree: Any, path: tuple[str, ...], found: list) -> None:
  where = "/".join(path)
  if isinstance(tree, Mapping) and all(part in tree for part in _BLOCK_PARTS):
    entries = {}
    for part in _DENSE_PARTS:
      entries[f"/~/{part}"] = {
        "w": np.asarray(tree[part]["kernel"]),
        "b": np.asarray(tree[part]["bias"]),
      }
    entries["/~/conv_1d"] = {
      "w": np.asarray(tree["conv_1d"]["w"]),
      "b": np.asarray(tree["conv_1d"]["b"]),
    }
    for key, value in _source_rglru(tree["rg_lru"], f"{where}/rg_lru").items():
      entries[f"/~/rg_lru{key}"] = value
    found.append((path, _Unit(where, "griffin", entries)))
  elif _is_source_rglru(tree):
    found.append((path, _Unit(where, "rglru", _source_rglru(tree, where))))
  elif _is_source_conv(tree) and path:
    raise ValueError(
      f"{_CONTEXT}: the source's Conv1D '{where}' is not inside a "
      "RecurrentBlock; hk_rnn holds this convolution only as part of a "
      "GriffinCell, so pass the variables of the RecurrentBlock around it"
    )
  elif isinstance(tree, Mapping):
    for key, child in tree.items():
      _source_units(child, (*path, str(key)), found)


def _cell_units(params: Params) -> list[_Unit]:
  """The RGLRUCell and GriffinCell modules of hk_rnn params, in order."""
  names = list(params)
  first = {name: index for index, name in enumerate(names)}
  found = []
  # A GriffinCell has no parameters of its own: only its sub-modules' names
  # show it.
  suffix = "/~/linear_y"
  griffin_modules = [n[: -len(suffix)] for n in names if n.endswith(suffix)]
  for module in griffin_modules + names:
    prefix = module + "/~/"
    if all(prefix + part in first for part in _BLOCK_PARTS):
      parts = [f"/~/{part}" for part in _DENSE_PARTS + ("conv_1d",)]
      parts += ["/~/rg_lru"] + [f"/~/rg_lru/~/{gate}" for gate in _GATES]
      kind = "griffin"
    elif set(params.get(module, ())) == {"a_param"} and all(
      prefix + gate in first for gate in _GATES
    ):
      parts = [""] + [f"/~/{gate}" for gate in _GATES]
      kind = "rglru"
    else:
      continue
    entries = {part: params[module + part] for part in parts}
    position = min(first[module + part] for part in parts)
    found.append((position, _Unit(module, kind, entries)))
  griffins = [unit.where for _, unit in found if unit.kind == "griffin"]
  found = [
    (position, unit)
    for position, unit in found
    if not any(unit.where == f"{g}/~/rg_lru" for g in griffins)
  ]
  found.sort(key=lambda item: item[0])
  units = [unit for _, unit in found]
  order = creation_order(
    [tuple(unit.where.split("/")) for unit in units],
    [_KIND_NAMES[unit.kind] for unit in units],
    is_sorted(names),
    _CONTEXT,
    "params",
  )
  return [units[index] for index in order]


def _describe_unit(unit: _Unit, source: bool) -> str:
  if source:
    return f"{_SOURCE_NAMES[unit.kind]} '{unit.where}'"
  return f"cell '{unit.where}' ({_KIND_NAMES[unit.kind]})"


def from_recurrentgemma(
  variables: Any, params: Params
) -> dict[str, dict[str, Any]]:
  """Loads recurrentgemma's ``RGLRU`` and ``RecurrentBlock`` weights.

  Finds every ``RGLRU`` (into an :class:`~hk_rnn.RGLRUCell`: ``a_param``,
  or ``a_real_param`` in recurrentgemma versions that call it so, and the
  ``input_gate`` and ``a_gate`` blocks) and every ``RecurrentBlock`` (into
  a :class:`~hk_rnn.GriffinCell`: the Dense layers' ``kernel``/``bias`` as
  ``w``/``b``, ``conv_1d`` and ``rg_lru`` as they are) in ``variables``, in
  the order they were created, and puts them into the model's cells of
  those kinds, in the order the model created them. A complex RG-LRU
  (``only_real=False``) and a ``Conv1D`` outside a ``RecurrentBlock`` have
  no hk_rnn counterpart: ``ValueError``. recurrentgemma is not needed: the
  variables are plain arrays.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> variables = {"params": {"a_param": jnp.ones(4),
  ...     "input_gate": {"w": jnp.ones((2, 2, 2)), "b": jnp.zeros((2, 2))},
  ...     "a_gate": {"w": jnp.ones((2, 2, 2)), "b": jnp.zeros((2, 2))}}}
  >>> model = hk.transform(lambda x: hk_rnn.RNN(hk_rnn.RGLRUCell(4, num_heads=2))(x))
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 3, 4)))
  >>> params = hk_rnn.interop.from_recurrentgemma(variables, params)
  >>> params["rglru_cell"]["a_param"].tolist()
  [1.0, 1.0, 1.0, 1.0]

  Args:
    variables: what the Flax modules' ``init`` returned (``{"params":
      ...}``), their ``"params"`` collection, or a tree holding several
      (e.g. a whole Griffin model's params).
    params: the hk_rnn model's params.

  Returns:
    A new params dict with those cells' weights replaced (dtypes kept).
  """
  variables = params_collection(
    variables, _CONTEXT, "recurrentgemma's Flax variables"
  )
  if not isinstance(params, Mapping):
    raise ValueError(
      f"{_CONTEXT}: params must be an hk_rnn params dict (what init "
      f"returned), got {type(params).__name__}"
    )
  found: list = []
  _source_units(variables, (), found)
  order = creation_order(
    [path for path, _ in found],
    [_KIND_NAMES[unit.kind] for _, unit in found],
    is_sorted_tree(variables),
    _CONTEXT,
    "the source's variables",
  )
  sources = [found[index][1] for index in order]
  cells = _cell_units(params)
  if not sources:
    raise ValueError(
      f"{_CONTEXT}: the source holds no RGLRU or RecurrentBlock variables"
    )
  if len(sources) != len(cells):
    raise ValueError(
      f"{_CONTEXT}: the source has {len(sources)} RGLRU/RecurrentBlock "
      f"modules ({', '.join(_describe_unit(s, True) for s in sources)}), "
      f"params have {len(cells)} RGLRUCell/GriffinCell cells "
      f"({', '.join(_describe_unit(c, False) for c in cells) or 'none'})"
    )
  loaded = {
    module: dict(entry) if isinstance(entry, Mapping) else entry
    for module, entry in params.items()
  }
  for index, (source, cell) in enumerate(zip(sources, cells, strict=True)):
    if source.kind != cell.kind:
      raise ValueError(
        f"{_CONTEXT}: {_describe_unit(cell, False)} is cell {index}, but the "
        f"source's module there is {_describe_unit(source, True)}, which needs "
        f"an hk_rnn.{_KIND_NAMES[source.kind]}"
      )
    for part, arrays in source.entries.items():
      target = cell.entries[part]
      for key, value in arrays.items():
        have = tuple(np.shape(target[key]))
        if have != value.shape:
          raise ValueError(
            f"{_CONTEXT}: {_describe_unit(cell, False)} does not match the "
            f"source's {_describe_unit(source, True)}: "
            f"'{cell.where}{part}' {key} has shape {have}, the source's "
            f"{value.shape}"
          )
        loaded[cell.where + part][key] = jnp.asarray(
          value, dtype=jnp.result_type(target[key])
        )
  return loaded
