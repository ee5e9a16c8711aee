r"""The compiled CPU backend: oneDNN's LSTM and GRU, as an optional extension.

The dispatch (:mod:`hk_rnn._src.kernels.dispatch`) hands a sequence to
oneDNN's RNN primitives (those PyTorch's ``nn.LSTM`` and ``nn.GRU`` run on
CPU) when the extension ``_onednn_lstm`` is built next to this file, the
default backend is the CPU, and the call is one oneDNN computes exactly
(:func:`refusal` says why not otherwise):

* every step valid and no packed rows, no recurrent dropout mask, no
  per-step carries;
* float32 inputs, weights, biases and initial carry.

For the LSTM (gate blocks i, f, g, o) the primitive computes, at each step,

.. math::

    [z_i, z_f, z_g, z_o] &= x_t W_i + h W_h + b \\
    c' &= \sigma(z_f) c + \sigma(z_i) \tanh(z_g), \quad
    h' = \sigma(z_o) \tanh(c')

and for the GRU oneDNN's linear-before-reset GRU, hk_rnn's (and PyTorch's)
convention (see :func:`gru`).

Without differentiation, oneDNN's inference primitive runs the sequence.
Under differentiation the default is the XLA kernels' forward and backward
passes, which measured faster than oneDNN 3.2's backward primitive;
``HK_RNN_ONEDNN_TRAINING=1`` runs oneDNN's training forward pass, with its
workspace, and its backward primitive instead. ``jax.vmap`` runs the oneDNN
calls one batch element after another (``vmap_method="sequential"``).
Second derivatives work on the default path (the XLA kernels' VJP is
differentiable), not through oneDNN's backward primitive.

``auto`` mode does not choose this backend: oneDNN's OpenMP team fights
XLA's own thread pool for the cores as soon as any other XLA operation runs
in the same program, which made realistic models slower than the XLA
kernels (docs/performance.md). ``HK_RNN_KERNELS=compiled`` uses it wherever
it computes the call; ``HK_RNN_ONEDNN_THREADS=N`` caps its OpenMP threads
per call (read when tracing; 0, the default, leaves OpenMP's number).

Building the extension needs a C++17 compiler and the pip packages
``onednn-cpu-gomp`` and ``onednn-devel-cpu-gomp`` (``pip install
-e ".[onednn]"``, then ``python setup.py build_ext --inplace``). Without it
this module logs one line, once, and the XLA kernels run.

>>> import jax.numpy as jnp
>>> from hk_rnn._src.kernels import onednn
>>> x = jnp.ones((5, 2, 3))
>>> w_i, w_h, b = jnp.ones((3, 16)), jnp.ones((4, 16)), jnp.zeros(16)
>>> carry = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))
>>> if onednn.supports(x, w_i, w_h, b, carry):
...   (c, h), outputs = onednn.lstm(x, w_i, w_h, b, carry)
... else:
...   (c, h), outputs = carry, jnp.zeros((5, 2, 4))
>>> outputs.shape
(5, 2, 4)
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

Array = jax.Array

TRAINING_VARIABLE = "HK_RNN_ONEDNN_TRAINING"
THREADS_VARIABLE = "HK_RNN_ONEDNN_THREADS"
_LIBRARY_STEM = "_onednn_lstm"
_TARGETS = {
  f"hk_rnn_{cell}_{stage}": f"HkRnn{cell.capitalize()}{stage.capitalize()}"
  for cell in ("lstm", "gru")
  for stage in ("inference", "forward", "backward")
}
_KINDS = {"lstm": 0, "gru": 1}

_lock = threading.Lock()
_training_override: bool | None = None
# The loaded library, or the reason it could not be loaded (a string);
# None before the first attempt.
_library: ctypes.CDLL | str | None = None
_workspace_bytes: dict[tuple[str, int, int, int, int], int] = {}


def set_training(training: bool | None) -> None:
  """Whether differentiated calls run oneDNN's training primitives.

  True: they do; False: the XLA kernels' VJP runs; None: back to
  ``HK_RNN_ONEDNN_TRAINING``. Read when a function is traced.
  """
  global _training_override
  if not any(training is allowed for allowed in (True, False, None)):
    raise ValueError(
      f"onednn.set_training: training must be True, False or None, got "
      f"{training!r}"
    )
  _training_override = training


def _flag(variable: str, default: str) -> str:
  """``"on"``, ``"off"`` or ``"auto"`` from an environment variable."""
  value = os.environ.get(variable, default).strip().lower()
  if value in ("0", "off", "false", "no"):
    return "off"
  if value in ("1", "on", "true", "yes"):
    return "on"
  if value in ("", "auto"):
    return "auto"
  raise ValueError(f"{variable} must be 0, 1 or auto, got {value!r}")


def trains_with_onednn() -> bool:
  """Whether differentiated calls run oneDNN's backward primitive.

  False by default: on the project's machine the fused kernels' backward
  pass was faster (docs/performance.md).
  """
  if _training_override is not None:
    return _training_override
  return _flag(TRAINING_VARIABLE, "0") == "on"


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
  library.hk_rnn_prepare.restype = ctypes.c_int64
  library.hk_rnn_prepare.argtypes = (
    [ctypes.c_int]
    + [ctypes.c_int64] * 4
    + [
      ctypes.c_char_p,
      ctypes.c_size_t,
    ]
  )
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
    "hk_rnn: LSTMs and GRUs on CPU run oneDNN %s (%s)",
    version.value.decode(),
    path,
  )
  return library


def _load_once() -> ctypes.CDLL | str:
  """The library, or why it cannot be used; tried once, logged once."""
  global _library
  with _lock:
    if _library is None:
      try:
        _library = _load()
      except Exception as error:  # noqa: BLE001 - any failure means fallback
        _library = f"{type(error).__name__}: {error}"
        log = logging.info if library_path() is None else logging.warning
        log(
          "hk_rnn: the compiled CPU kernels (oneDNN) are unavailable, using "
          "the XLA kernels (%s)",
          _library,
        )
    return _library


def _get_library() -> ctypes.CDLL | None:
  """The library, or None; in ``"on"`` mode a failure raises instead."""
  library = _load_once()
  return None if isinstance(library, str) else library


def available() -> bool:
  """Whether the extension is built and loads (ignores the switch)."""
  return not isinstance(_load_once(), str)


def _prepare(key: tuple[str, int, int, int, int]) -> int | None:
  """Builds the primitives of ``(cell, T, B, D, F)``; workspace bytes or None."""
  with _lock:
    if key in _workspace_bytes:
      return _workspace_bytes[key]
  library = _get_library()
  if library is None:
    return None
  error = ctypes.create_string_buffer(1024)
  cell, *shape = key
  size = library.hk_rnn_prepare(_KINDS[cell], *shape, error, 1024)
  if size < 0:
    logging.warning(
      "hk_rnn: oneDNN cannot build a %s of (T, B, D, F) = %s, using the "
      "XLA kernels (%s)",
      cell,
      tuple(shape),
      error.value.decode(),
    )
    return None
  with _lock:
    _workspace_bytes[key] = int(size)
  return int(size)


def _supports(cell, inputs, w_h, arrays) -> bool:
  if jax.default_backend() != "cpu":
    return False
  if any(jnp.dtype(a.dtype) != jnp.float32 for a in (inputs, w_h, *arrays)):
    return False
  steps, batch, input_size = inputs.shape
  features = w_h.shape[0]
  if 0 in (steps, batch, input_size, features):
    return False
  return _prepare((cell, steps, batch, input_size, features)) is not None


def supports(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
) -> bool:
  """Whether :func:`lstm` can run this call.

  Checks the default backend, the dtypes (all float32) and
  that oneDNN builds the primitive for these shapes. Masks, resets and
  dropout are the caller's to exclude.

  Args:
    inputs: ``(T, B, D)``.
    w_i: ``(D, 4F)``.
    w_h: ``(F, 4F)``.
    b: ``(4F,)``.
    initial_carry: ``(c, h)``, each ``(B, F)``.
  """
  return _supports("lstm", inputs, w_h, (w_i, b, *initial_carry))


def supports_gru(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b_i: Array,
  b_h: Array,
  initial_carry: Array,
) -> bool:
  """Whether :func:`gru` will run this call; as :func:`supports`.

  Args:
    inputs: ``(T, B, D)``.
    w_i: ``(D, 3F)``.
    w_h: ``(F, 3F)``.
    b_i: ``(3F,)``.
    b_h: ``(3F,)``.
    initial_carry: ``h``, ``(B, F)``.
  """
  return _supports("gru", inputs, w_h, (w_i, b_i, b_h, initial_carry))


def _threads() -> int:
  """``HK_RNN_ONEDNN_THREADS``: oneDNN's OpenMP threads per call, 0: all."""
  value = os.environ.get(THREADS_VARIABLE, "0").strip() or "0"
  if not value.isdigit():
    raise ValueError(
      f"{THREADS_VARIABLE} must be a whole number of threads, got {value!r}"
    )
  return int(value)


def _call(target, results, *args):
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(
    *args, threads=np.int32(_threads())
  )


def _carries(cell, batch, features):
  carry = jax.ShapeDtypeStruct((batch, features), jnp.float32)
  return (carry, carry) if cell == "lstm" else (carry,)


def _results(cell, inputs, w_h):
  steps, batch, _ = inputs.shape
  features = w_h.shape[0]
  outputs = jax.ShapeDtypeStruct((steps, batch, features), jnp.float32)
  return (outputs, *_carries(cell, batch, features))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _run(cell, inputs, w_i, w_h, b, *carry):
  """``(y, *final_carry)`` of one cell in oneDNN's layouts; no workspace."""
  return _call(
    f"hk_rnn_{cell}_inference",
    _results(cell, inputs, w_h),
    inputs,
    w_i,
    w_h,
    b,
    *carry,
  )


def _run_forward(cell, inputs, w_i, w_h, b, *carry):
  steps, batch, input_size = inputs.shape
  size = _prepare((cell, steps, batch, input_size, w_h.shape[0]))
  workspace = jax.ShapeDtypeStruct((size,), np.uint8)
  *results, space = _call(
    f"hk_rnn_{cell}_forward",
    (*_results(cell, inputs, w_h), workspace),
    inputs,
    w_i,
    w_h,
    b,
    *carry,
  )
  return tuple(results), (inputs, w_i, w_h, b, *carry, *results, space)


def _run_backward(cell, saved, cotangents):
  d_y, *d_carry = cotangents
  arguments = saved[: 4 + len(d_carry)]
  gradients = tuple(
    jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in arguments
  )
  return tuple(
    _call(f"hk_rnn_{cell}_backward", gradients, *saved, d_y, *d_carry)
  )


_run.defvjp(_run_forward, _run_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _inference_only(through_onednn, differentiable, *args):
  """``through_onednn(*args)``; under autodiff, ``differentiable``'s VJP.

  Both compute the same function (``differentiable`` is the fused JAX
  kernel): oneDNN's inference primitive runs the primal, the fused kernel
  runs the forward pass that saves residuals and the backward pass.
  """
  del differentiable
  return through_onednn(*args)


def _inference_only_forward(through_onednn, differentiable, *args):
  del through_onednn
  return jax.vjp(differentiable, *args)


def _inference_only_backward(through_onednn, differentiable, pullback, ct):
  del through_onednn, differentiable
  return pullback(ct)


_inference_only.defvjp(_inference_only_forward, _inference_only_backward)


def _lstm(inputs, w_i, w_h, b, initial_carry):
  c, h = initial_carry
  y, c_n, h_n = _run("lstm", inputs, w_i, w_h, b, c, h)
  return (c_n, h_n), y


def _gru(inputs, w_i, w_h, b_i, b_h, initial_carry):
  def swap(w):
    r, z, n = jnp.split(w, 3, axis=-1)
    return jnp.concatenate([z, r, n], axis=-1)

  i_r, i_z, i_n = jnp.split(b_i, 3)
  h_r, h_z, h_n = jnp.split(b_h, 3)
  bias = jnp.concatenate([i_z + h_z, i_r + h_r, i_n, h_n])
  y, h = _run("gru", inputs, swap(w_i), swap(w_h), bias, initial_carry)
  return h, y


def _dispatch(through_onednn, fused_kernel, *args):
  if fused_kernel is None or trains_with_onednn():
    return through_onednn(*args)
  return _inference_only(through_onednn, fused_kernel, *args)


def lstm(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
  *,
  fused_kernel: Callable[..., Any] | None = None,
) -> tuple[tuple[Array, Array], Array]:
  """An unmasked float32 LSTM sequence through oneDNN (see the module doc).

  Call only where :func:`supports` says True. hk_rnn's layouts are
  oneDNN's: nothing is copied on the way in or out.

  Args:
    inputs: ``(T, B, D)``, time-major.
    w_i: ``(D, 4F)``, gate blocks i, f, g, o.
    w_h: ``(F, 4F)``.
    b: ``(4F,)``.
    initial_carry: ``(c, h)``, each ``(B, F)``.
    fused_kernel: the same function of the same arguments in JAX; under
      differentiation its VJP runs instead of oneDNN's training primitives
      unless :func:`trains_with_onednn`. None: always oneDNN's.

  Returns:
    ``((c, h), outputs)``: the final carry and the ``(T, B, F)`` outputs, as
    :func:`hk_rnn._src.kernels.dispatch.lstm_sequence`.
  """
  return _dispatch(
    _lstm, fused_kernel, inputs, w_i, w_h, b, tuple(initial_carry)
  )


def gru(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b_i: Array,
  b_h: Array,
  initial_carry: Array,
  *,
  fused_kernel: Callable[..., Any] | None = None,
) -> tuple[Array, Array]:
  r"""An unmasked float32 GRU sequence through oneDNN's linear-before-reset GRU.

  hk_rnn's GRU (gate blocks r, z, n; :func:`hk_rnn._src.kernels.dispatch.gru_sequence`)
  is oneDNN's ``lbr_gru`` with blocks u = z, r, c~ = n and the four biases
  ``[b_iz + b_hz, b_ir + b_hr, b_in, b_hn]``: the weights' first two
  blocks swap places on the way in (their gradients on the way back).
  Call only where :func:`supports_gru` says True.

  Args:
    inputs: ``(T, B, D)``, time-major.
    w_i: ``(D, 3F)``, gate blocks r, z, n.
    w_h: ``(F, 3F)``.
    b_i: ``(3F,)``.
    b_h: ``(3F,)``.
    initial_carry: ``h``, ``(B, F)``.
    fused_kernel: as for :func:`lstm`.

  Returns:
    ``(h, outputs)``, as :func:`hk_rnn._src.kernels.dispatch.gru_sequence`.
  """
  return _dispatch(
    _gru, fused_kernel, inputs, w_i, w_h, b_i, b_h, initial_carry
  )


def refusal(
  kind, inputs, w_h, arrays, *, valid, reset, recurrent_mask, step_carries
) -> str | None:
  """Why this backend cannot compute exactly this call; None if it can.

  Args:
    kind: ``"lstm"`` or ``"gru"`` (other cells: always refused).
    inputs: ``(T, B, D)``.
    w_h: ``(F, G*F)``.
    arrays: the other weights, the biases and the initial carry.
    valid: the padding mask, or None.
    reset: the packed rows' reset mask, or None.
    recurrent_mask: the recurrent dropout mask, or None.
    step_carries: whether per-step carries are asked for.
  """
  if kind not in _KINDS:
    return f"no {kind} kernel"
  for present, what in (
    (valid is not None, "padding"),
    (reset is not None, "packed rows"),
    (recurrent_mask is not None, "recurrent dropout"),
    (step_carries, "per-step carries (max_segments)"),
  ):
    if present:
      return what
  library = _load_once()
  if isinstance(library, str):
    return "not built" if library_path() is None else f"broken: {library}"
  if jax.default_backend() != "cpu":
    return "not on CPU"
  if not _supports(kind, inputs, w_h, arrays):
    return "not float32, empty, or shapes oneDNN cannot build"
  return None
