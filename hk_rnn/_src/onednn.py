r"""oneDNN's fused LSTM on CPU, through an optional compiled extension.

:func:`hk_rnn._src.fused.lstm_sequence` hands a plain LSTM sequence to
oneDNN's RNN primitive (the one PyTorch's ``nn.LSTM`` runs on CPU) when the
extension ``_onednn_lstm`` is built next to this file, the default backend
is the CPU, and the call is one oneDNN computes exactly:

* every step valid and no packed rows (``valid`` and ``reset`` None), no
  recurrent dropout mask;
* float32 inputs, weights, bias and initial carry.

Anything else runs the fused JAX kernels, with the same numbers. The
primitive computes, for each step ``t`` (gate blocks i, f, g, o),

.. math::

    [z_i, z_f, z_g, z_o] &= x_t W_i + h W_h + b \\
    c' &= \sigma(z_f) c + \sigma(z_i) \tanh(z_g), \quad
    h' = \sigma(z_o) \tanh(c')

A forward pass without gradients runs the primitive for inference; under
differentiation the forward pass also fills oneDNN's workspace, and the
backward pass is oneDNN's backward primitive. ``jax.vmap`` runs the calls
one batch element after another (``vmap_method="sequential"``).

The switch: the environment variable ``HK_RNN_ONEDNN`` (``0``: never,
``1``: always where supported, raising if the extension cannot be loaded;
unset or ``auto``: when it loads), or :func:`set_enabled` from Python, which
takes precedence. Either is read when a function is traced: functions
``jax.jit`` has already compiled keep the path they were traced with.

Building the extension needs a C++17 compiler and the pip packages
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` (``pip install
-e ".[onednn]"``, then ``python setup.py build_ext --inplace``); see
``docs/performance.md``. Without it this module only logs one line, once,
and ``lstm_sequence`` runs the fused JAX kernels.

>>> import jax.numpy as jnp
>>> from hk_rnn._src import onednn
>>> x = jnp.ones((5, 2, 3))
>>> w_i, w_h, b = jnp.ones((3, 16)), jnp.ones((4, 16)), jnp.zeros(16)
>>> carry = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))
>>> isinstance(onednn.supports(x, w_i, w_h, b, carry), bool)
True
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

Array = jax.Array

ENVIRONMENT_VARIABLE = "HK_RNN_ONEDNN"
_LIBRARY_STEM = "_onednn_lstm"
_TARGETS = {
  "hk_rnn_lstm_inference": "HkRnnLstmInference",
  "hk_rnn_lstm_forward": "HkRnnLstmForward",
  "hk_rnn_lstm_backward": "HkRnnLstmBackward",
}

_lock = threading.Lock()
_override: bool | None = None
# The loaded library, or the reason it could not be loaded (a string);
# None before the first attempt.
_library: ctypes.CDLL | str | None = None
_workspace_bytes: dict[tuple[int, int, int, int], int] = {}


def set_enabled(enabled: bool | None) -> None:
  """Forces the oneDNN path on (True) or off (False); None: back to default.

  The default is the ``HK_RNN_ONEDNN`` environment variable (see the module
  docstring). Applies to functions traced afterwards.

  Args:
    enabled: True, False or None.
  """
  global _override
  if enabled not in (True, False, None):
    raise ValueError(
      f"onednn.set_enabled: enabled must be True, False or None, got "
      f"{enabled!r}"
    )
  _override = enabled


def _mode() -> str:
  """``"on"``, ``"off"`` or ``"auto"``."""
  if _override is not None:
    return "on" if _override else "off"
  value = os.environ.get(ENVIRONMENT_VARIABLE, "auto").strip().lower()
  if value in ("0", "off", "false", "no"):
    return "off"
  if value in ("1", "on", "true", "yes"):
    return "on"
  if value in ("", "auto"):
    return "auto"
  raise ValueError(
    f"{ENVIRONMENT_VARIABLE} must be 0, 1 or auto, got {value!r}"
  )


def library_path() -> str | None:
  """The built extension next to this module, or None if it is not built."""
  folder = os.path.dirname(os.path.abspath(__file__))
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = os.path.join(folder, _LIBRARY_STEM + suffix)
    if os.path.exists(path):
      return path
  return None


def _load() -> ctypes.CDLL:
  """Loads the extension and registers its FFI targets; raises on failure."""
  path = library_path()
  if path is None:
    raise OSError(
      f"the extension {_LIBRARY_STEM} is not built (python setup.py "
      "build_ext --inplace, see docs/performance.md)"
    )
  library = ctypes.CDLL(path)
  library.hk_rnn_onednn_check.restype = ctypes.c_int
  library.hk_rnn_onednn_check.argtypes = [
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_char_p,
    ctypes.c_size_t,
  ]
  library.hk_rnn_lstm_prepare.restype = ctypes.c_int64
  library.hk_rnn_lstm_prepare.argtypes = [ctypes.c_int64] * 4 + [
    ctypes.c_char_p,
    ctypes.c_size_t,
  ]
  version = ctypes.create_string_buffer(32)
  error = ctypes.create_string_buffer(1024)
  if library.hk_rnn_onednn_check(version, 32, error, 1024) != 0:
    raise OSError(
      f"oneDNN {version.value.decode()} has no working CPU engine here: "
      f"{error.value.decode()}"
    )
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(
      target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
    )
  logging.info(
    "hk_rnn: LSTMs on CPU run oneDNN %s (%s)", version.value.decode(), path
  )
  return library


def _get_library() -> ctypes.CDLL | None:
  """The library, loading it on first use; None (logged once) if it fails.

  In ``"on"`` mode a failure raises instead.
  """
  global _library
  with _lock:
    if _library is None:
      try:
        _library = _load()
      except Exception as error:  # noqa: BLE001 - any failure means fallback
        _library = f"{type(error).__name__}: {error}"
        log = logging.info if library_path() is None else logging.warning
        log(
          "hk_rnn: oneDNN LSTM unavailable, using the fused JAX kernels (%s)",
          _library,
        )
    library = _library
  if isinstance(library, str):
    if _mode() == "on":
      raise RuntimeError(
        f"{ENVIRONMENT_VARIABLE}=1 (or onednn.set_enabled(True)) but the "
        f"oneDNN extension cannot be used: {library}"
      )
    return None
  return library


def available() -> bool:
  """Whether the extension is built and loads (ignores the switch)."""
  return _get_library() is not None


def _prepare(shape: tuple[int, int, int, int]) -> int | None:
  """Builds the primitives of ``(T, B, D, F)``; the workspace bytes or None."""
  with _lock:
    if shape in _workspace_bytes:
      return _workspace_bytes[shape]
  library = _get_library()
  if library is None:
    return None
  error = ctypes.create_string_buffer(1024)
  size = library.hk_rnn_lstm_prepare(*shape, error, 1024)
  if size < 0:
    logging.warning(
      "hk_rnn: oneDNN cannot build an LSTM of (T, B, D, F) = %s, using the "
      "fused JAX kernels (%s)",
      shape,
      error.value.decode(),
    )
    return None
  with _lock:
    _workspace_bytes[shape] = int(size)
  return int(size)


def supports(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
) -> bool:
  """Whether :func:`lstm` will run this call (after the switch).

  Checks the switch, the default backend, the dtypes (all float32) and
  that oneDNN builds the primitive for these shapes. Masks, resets and
  dropout are the caller's to exclude.

  Args:
    inputs: ``(T, B, D)``.
    w_i: ``(D, 4F)``.
    w_h: ``(F, 4F)``.
    b: ``(4F,)``.
    initial_carry: ``(c, h)``, each ``(B, F)``.
  """
  if _mode() == "off" or jax.default_backend() != "cpu":
    return False
  arrays = (inputs, w_i, w_h, b, *initial_carry)
  if any(jnp.dtype(a.dtype) != jnp.float32 for a in arrays):
    return False
  steps, batch, input_size = inputs.shape
  features = w_h.shape[0]
  if 0 in (steps, batch, input_size, features):
    return False
  return _prepare((steps, batch, input_size, features)) is not None


def _call(target, results, *args):
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args)


def _structs(inputs, w_h):
  steps, batch, _ = inputs.shape
  features = w_h.shape[0]
  f32 = jnp.float32
  outputs = jax.ShapeDtypeStruct((steps, batch, features), f32)
  carry = jax.ShapeDtypeStruct((batch, features), f32)
  return outputs, carry


@jax.custom_vjp
def _lstm(inputs, w_i, w_h, b, c, h):
  outputs, carry = _structs(inputs, w_h)
  y, c_n, h_n = _call(
    "hk_rnn_lstm_inference",
    (outputs, carry, carry),
    inputs,
    w_i,
    w_h,
    b,
    c,
    h,
  )
  return (c_n, h_n), y


def _lstm_forward(inputs, w_i, w_h, b, c, h):
  outputs, carry = _structs(inputs, w_h)
  steps, batch, input_size = inputs.shape
  size = _prepare((steps, batch, input_size, w_h.shape[0]))
  workspace = jax.ShapeDtypeStruct((size,), np.uint8)
  y, c_n, h_n, space = _call(
    "hk_rnn_lstm_forward",
    (outputs, carry, carry, workspace),
    inputs,
    w_i,
    w_h,
    b,
    c,
    h,
  )
  saved = (inputs, w_i, w_h, b, c, h, y, c_n, h_n, space)
  return ((c_n, h_n), y), saved


def _lstm_backward(saved, cotangents):
  (d_c_n, d_h_n), d_y = cotangents
  inputs, w_i, w_h, b, c, h = saved[:6]
  results = tuple(
    jax.ShapeDtypeStruct(a.shape, jnp.float32)
    for a in (inputs, w_i, w_h, b, c, h)
  )
  return tuple(
    _call("hk_rnn_lstm_backward", results, *saved, d_y, d_c_n, d_h_n)
  )


_lstm.defvjp(_lstm_forward, _lstm_backward)


def lstm(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
) -> tuple[tuple[Array, Array], Array]:
  """An unmasked float32 LSTM sequence through oneDNN (see the module doc).

  Call only where :func:`supports` says True.

  Args:
    inputs: ``(T, B, D)``, time-major.
    w_i: ``(D, 4F)``, gate blocks i, f, g, o.
    w_h: ``(F, 4F)``.
    b: ``(4F,)``.
    initial_carry: ``(c, h)``, each ``(B, F)``.

  Returns:
    ``((c, h), outputs)``: the final carry and the ``(T, B, F)`` outputs, as
    :func:`hk_rnn._src.fused.lstm_sequence`.
  """
  c, h = initial_carry
  return _lstm(inputs, w_i, w_h, b, c, h)
