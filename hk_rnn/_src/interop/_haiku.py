"""Haiku's ``hk.LSTM`` and ``hk.VanillaRNN`` cores into hk_rnn params.

``from_haiku`` finds the cores by the names Haiku gives them.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any

import numpy as np

from hk_rnn._src.interop._matching import (
  NUMBERED_NAME,
  Params,
  creation_order,
  is_sorted,
  load_layers,
  one_bias,
  reorder_blocks,
  source_layer,
)


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
    base = NUMBERED_NAME.match(path[-1])
    base = base[1] if base else path[-1]
    if base == "gru" and set(entry) == {"w_i", "w_h", "b"}:
      cores.append((path, "hk.GRU", {"": entry}))
    if path[-1] != "linear" or len(path) < 2:
      continue
    core = path[:-1]
    owner = NUMBERED_NAME.match(core[-1])
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
  recognised) and taken in the order the :doc:`naming guide </naming>` gives.
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
  order = creation_order(
    [path for path, _, _ in cores],
    [kind for _, kind, _ in cores],
    is_sorted(list(hk_params)),
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
      w = reorder_blocks(w, order_ifgo)
      b = reorder_blocks(b, order_ifgo).copy()
      b[features : 2 * features] += 1  # hk.LSTM's sigmoid(f + 1)
      arrays = one_bias(w[:-features], w[-features:], b)
      layers.append(source_layer(f"{where} (hk.LSTM)", kind, arrays))
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
      arrays = one_bias(w_i, np.asarray(entries["linear_1"]["w"]), b)
      layers.append(source_layer(f"{where} (hk.VanillaRNN)", kind, arrays))
  return load_layers(
    context, layers, params, source_sorted=is_sorted(list(hk_params))
  )
