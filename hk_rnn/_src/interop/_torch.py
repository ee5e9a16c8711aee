"""PyTorch's ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` into hk_rnn params and back.

``from_torch`` reads a module or a state dict; ``to_torch`` writes params
into a module. torch is imported only when a module is given.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from hk_rnn._src.interop._matching import (
  GATE_BLOCKS,
  Params,
  SourceLayer,
  describe_cell,
  find_cells,
  import_framework,
  is_sorted,
  load_layers,
  match_layers,
  one_bias,
  source_layer,
  two_biases,
)

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
        arrays = two_biases(w_ih.T, w_hh.T, b_ih, b_hh)
      else:
        arrays = one_bias(w_ih.T, w_hh.T, None if b_ih is None else b_ih + b_hh)
      layers.append(
        source_layer(f"{where}, an nn.{_TORCH_NAMES[kind]}", kind, arrays)
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
    return load_layers(context, _torch_layers(source, prefix, None), params)
  torch = import_framework("torch", context, "torch")
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
  return load_layers(
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
  torch = import_framework("torch", context, "torch")
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
  blocks = GATE_BLOCKS[kind]
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
        SourceLayer(
          f"layer {index} {'backward' if reverse else 'forward'} "
          f"(weight_ih{suffix}, an nn.{_TORCH_NAMES[kind]})",
          kind,
          shapes,
        )
      )
  pairs = match_layers(
    layers, find_cells(params, context), context, False, is_sorted(params)
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
              f"{context}: {describe_cell(cell)} has non-zero biases but "
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
