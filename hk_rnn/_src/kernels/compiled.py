r"""Compiled LSTM and GRU sequences on CPU: an optional XLA FFI extension.

The extension ``_cpu_rnn`` (``csrc/cpu_rnn.cc``, built by ``setup.py``)
runs a whole float32 sequence in one custom call: the recurrent product
``h_in W_h`` of every step and the gate math in the same loop, with the
weights re-laid once per call so that each block of hidden units has its
gate columns in one contiguous panel. The work of a step is split by hidden
units among the calling thread and tasks on XLA's own intra-op thread pool
(the FFI hands a handler that pool); units are claimed through an atomic
counter, so a pool thread that is busy or late never holds a step up.

The math is the XLA engine's (:mod:`.xla`), masks and all: at
step ``t``

.. math::

    s &= \mathrm{reset}_t \;?\; s_r : s, \qquad h_{in} = h \odot m \\
    s', y &= \mathrm{cell}(x_t W_i, h_{in}, s), \qquad
    s = \mathrm{valid}_t \;?\; s' : s, \quad
    \mathrm{output}_t = \mathrm{valid}_t \;?\; y : 0

Differentiation uses a hand-written VJP of the same scheme as the XLA
engine's: the input GEMM ``X W_i`` runs in XLA before the call, the forward
call saves the gate-derivative coefficients, a backward call runs the
recursion over the state cotangents with the products ``dZ_t W_hᵀ`` in its
loop, and the weight gradients are single GEMMs in XLA afterwards
(``dW_i = Xᵀ dZ``, ``dW_h = Σ_t h_{in,t}ᵀ dZ_t``). The backward call's own
derivative (a second derivative) is the XLA engine's: its JVP rule
differentiates the engine's VJP. ``jax.vmap`` runs the calls one batch
element after another (``vmap_method="sequential"``).

Only float32 runs here (:func:`refusal` says why anything else does not).

Threads: a call's participants are the calling thread and up to one task
per other core on XLA's pool. When a participant is preempted (the cores
are oversubscribed, say by another busy process) and the caller waits on it
over 0.5 ms, the caller finishes the call alone and the calls of the next
0.2 s run on one thread: on a busy machine one thread loses less than
several waiting for each other at every step. Environment variables, read at
each call: ``HK_RNN_COMPILED_THREADS=n`` caps the participants;
``HK_RNN_COMPILED_ADAPTIVE=0`` turns the one-thread backoff off.
``HK_RNN_COMPILED_ISA=avx2``, read when the library loads, runs the AVX2
code on an AVX-512 machine (tests).

>>> import jax.numpy as jnp
>>> from hk_rnn._src.kernels import compiled
>>> x = jnp.ones((5, 2, 3))
>>> w_i, w_h, b = jnp.ones((3, 16)) / 4, jnp.ones((4, 16)) / 4, jnp.zeros(16)
>>> carry = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))
>>> if compiled.available():
...   (c, h), outputs = compiled.lstm(x, w_i, w_h, b, carry)
... else:
...   outputs = jnp.zeros((5, 2, 4))
>>> outputs.shape
(5, 2, 4)
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from hk_rnn._src.kernels import gates, xla

Array = jax.Array

_LIBRARY_STEM = "_cpu_rnn"
_TARGETS = {
  "hk_rnn_cpu_lstm_forward": "HkRnnCpuLstmForward",
  "hk_rnn_cpu_lstm_backward": "HkRnnCpuLstmBackward",
  "hk_rnn_cpu_gru_forward": "HkRnnCpuGruForward",
  "hk_rnn_cpu_gru_backward": "HkRnnCpuGruBackward",
}
_KINDS = ("lstm", "gru")

_lock = threading.Lock()
# The loaded library, or why it cannot be loaded; None before the first try.
_library: ctypes.CDLL | str | None = None


def library_path() -> str | None:
  """The built extension next to this module, or None."""
  folder = os.path.dirname(os.path.abspath(__file__))
  for suffix in importlib.machinery.EXTENSION_SUFFIXES:
    path = os.path.join(folder, _LIBRARY_STEM + suffix)
    if os.path.exists(path):
      return path
  return None


def _load_library() -> ctypes.CDLL:
  """Loads the extension and registers its FFI targets; raises on failure."""
  path = library_path()
  if path is None:
    raise OSError("not built (python setup.py build_ext --inplace)")
  library = ctypes.CDLL(path)
  library.hk_rnn_cpu_lanes.restype = ctypes.c_int
  lanes = library.hk_rnn_cpu_lanes()
  if lanes == 0:
    raise OSError("this CPU has neither AVX-512 nor AVX2 with FMA")
  for target, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(
      target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
    )
  logging.info(
    "hk_rnn: compiled CPU kernels loaded (%d-lane SIMD, %s)", lanes, path
  )
  return library


def _load_once() -> ctypes.CDLL | str:
  """The library, or why it cannot be used; tried once, logged once."""
  global _library
  with _lock:
    if _library is None:
      try:
        _library = _load_library()
      except Exception as error:  # noqa: BLE001 - any failure means fallback
        _library = str(error)
        logging.info(
          "hk_rnn: the compiled CPU kernels are unavailable, the XLA engine "
          "runs instead (%s)",
          _library,
        )
    return _library


def available() -> bool:
  """Whether the extension is built and loads; never raises."""
  return not isinstance(_load_once(), str)


def lanes() -> int:
  """The SIMD width the extension runs with (16: AVX-512, 8: AVX2), or 0."""
  library = _load_once()
  return 0 if isinstance(library, str) else library.hk_rnn_cpu_lanes()


def refusal(
  kind: str,
  inputs: Array,
  w_i: Array,
  w_h: Array,
  biases: Any,
  initial_carry: Any,
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  recurrent_mask: Array | None = None,
  return_step_carries: bool = False,
) -> str | None:
  """None when :func:`lstm`/:func:`gru` compute this call exactly, else why not.

  Masks, resets, dropout masks and per-step carries are all supported; what
  is refused is the cell kind, a dtype other than float32, a backend other
  than the CPU, or a missing extension.

  Args:
    kind: ``"lstm"`` or ``"gru"`` (others are refused).
    inputs: ``(T, B, D)``.
    w_i: ``(D, G F)``.
    w_h: ``(F, G F)``.
    biases: the bias array, or a sequence of them.
    initial_carry: the carry, an array or a tuple of arrays.
    valid: ``(T, B)`` or None.
    reset: ``(T, B)`` or None.
    recurrent_mask: ``(B, F)`` or None.
    return_step_carries: whether per-step carries are asked for.

  Returns:
    None, or a short reason such as ``"float16 inputs"``.
  """
  del valid, reset, return_step_carries  # all supported
  if kind not in _KINDS:
    return f"no compiled {kind} kernel"
  library = _load_once()
  if isinstance(library, str):
    return "not built" if library.startswith("not built") else library
  if jax.default_backend() != "cpu":
    return f"default backend is {jax.default_backend()}, not cpu"
  named = {"inputs": inputs, "w_i": w_i, "w_h": w_h}
  for index, bias in enumerate(jax.tree.leaves(biases)):
    named[f"bias {index}"] = bias
  for index, part in enumerate(jax.tree.leaves(initial_carry)):
    named[f"carry {index}"] = part
  if recurrent_mask is not None:
    named["recurrent_mask"] = recurrent_mask
  for name, array in named.items():
    dtype = jnp.dtype(array.dtype)
    if dtype != jnp.float32:
      return f"{dtype.name} {name}"
  if jnp.ndim(inputs) != 3:
    return "inputs are not (T, B, D)"
  return None


# ---------------------------------------------------------------------------
# The custom calls.


# What ``auto`` leaves to the XLA engine although this backend computes it:
# the cells, and the SIMD widths, where these kernels measured slower than
# the engine in the realistic benchmark models (docs/speed.md). On AVX-512
# the LSTM measured faster in every case, idle and beside a busy process;
# the GRU's training step was 7 % faster idle but 8 % slower beside a busy
# process. The AVX2 code measured slower than the engine on one thread (57
# against 49 ms for the LSTM training step), so ``auto`` keeps AVX2-only
# machines on XLA until it is measured faster there.
_AUTO_REFUSALS: dict[str, str] = {
  "gru": "measured slower than xla beside a busy process",
}
_AUTO_REFUSALS_AVX2 = "AVX2 only (measured slower than xla there)"


def auto_refusal(kind: str) -> str | None:
  """Why ``auto`` does not choose this backend for ``kind``; None if it does.

  ``auto`` must never be slower than the XLA engine, so it takes these
  kernels only where the benchmarks measured them faster
  (``HK_RNN_KERNELS=compiled`` takes them wherever they apply).
  """
  if kind in _AUTO_REFUSALS:
    return _AUTO_REFUSALS[kind]
  if _AUTO_REFUSALS_AVX2 and lanes() == 8:
    return _AUTO_REFUSALS_AVX2
  return None


def _absent(dtype) -> Array:
  return jnp.zeros((0,), dtype)


def _flags(mask: Array | None) -> Array:
  """A (T, B) bool mask as uint8, or an empty array for None."""
  return _absent(jnp.uint8) if mask is None else mask.astype(jnp.uint8)


def _floats(array: Array | None) -> Array:
  return _absent(jnp.float32) if array is None else array


def _shape(*dims: int, present: bool = True) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(dims if present else (0,), jnp.float32)


def _call(target: str, results, *args):
  return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args)


def _project(inputs: Array, w_i: Array, valid: Array | None):
  """Zeroes padded inputs (NaN there reaches nothing) and returns
  ``(clean_inputs, X W_i)``, the latter ``(T, B, G F)``."""
  if valid is not None:
    inputs = jnp.where(valid[..., None], inputs, 0)
  steps, batch, size = inputs.shape
  projected = jnp.dot(inputs.reshape(steps * batch, size), w_i)
  return inputs, projected.reshape(steps, batch, w_i.shape[1])


def _weight_gradients(inputs, h_in, w_i, d_gx, d_gh):
  """``(dX, dW_i, dW_h)`` as single GEMMs over all steps."""
  steps, batch, size = inputs.shape
  flat = lambda a: a.reshape(steps * batch, a.shape[-1])  # noqa: E731
  flat_x, flat_h, flat_gx, flat_gh = map(flat, (inputs, h_in, d_gx, d_gh))
  d_inputs = jnp.dot(flat_gx, w_i.T).reshape(inputs.shape)
  return d_inputs, jnp.dot(flat_x.T, flat_gx), jnp.dot(flat_h.T, flat_gh)


# LSTM: differentiable arguments (inputs, w_i, w_h, b, c_0, h_0, reset_c,
# reset_h); the rest (valid, reset, mask) are constants of the call.


def _lstm_forward(emit, save, params, constants):
  inputs, w_i, w_h, b, c_0, h_0, reset_c, reset_h = params
  valid, reset, mask = constants
  steps, batch, _ = inputs.shape
  features = w_h.shape[0]
  clean_inputs, projected = _project(inputs, w_i, valid)
  y, c_n, h_n, c_steps, *saved = _call(
    "hk_rnn_cpu_lstm_forward",
    (
      _shape(steps, batch, features),
      _shape(batch, features),
      _shape(batch, features),
      _shape(steps, batch, features, present=emit),
      _shape(steps, batch, 4 * features, present=save),
      _shape(steps, batch, features, present=save),
      _shape(steps, batch, features, present=save),
      _shape(steps, batch, features, present=save),
    ),
    projected,
    w_h,
    b,
    c_0,
    h_0,
    reset_c,
    reset_h,
    _flags(valid),
    _flags(reset),
    _floats(mask),
  )
  outputs = ((c_n, h_n), y, c_steps) if emit else ((c_n, h_n), y)
  return outputs, clean_inputs, saved


def _xla_lstm(emit, params, constants):
  """The XLA engine on the same arguments (for second derivatives)."""
  inputs, w_i, w_h, b, c_0, h_0, reset_c, reset_h = params
  valid, reset, mask = constants
  result = xla.lstm(
    inputs,
    w_i,
    w_h,
    b,
    (c_0, h_0),
    (reset_c, reset_h),
    valid=valid,
    reset=reset,
    recurrent_mask=mask,
    return_step_carries=emit,
  )
  if not emit:
    return result
  final, outputs, (c_steps, _) = result
  return final, outputs, c_steps


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _lstm_gradients(emit, params, constants, residuals, cotangents):
  """The cotangents of ``params`` through the compiled backward call."""
  inputs, w_i, w_h, *_ = params
  valid, reset, mask = constants
  clean_inputs, (coefficients, c_from_h, f_saved, h_in) = residuals
  (d_c_n, d_h_n), d_y, *d_emitted = cotangents
  steps, batch, _ = inputs.shape
  features = w_h.shape[0]
  carry = _shape(batch, features)
  d_z, d_c_0, d_h_0, d_reset_c, d_reset_h = _call(
    "hk_rnn_cpu_lstm_backward",
    (_shape(steps, batch, 4 * features), carry, carry, carry, carry),
    coefficients,
    c_from_h,
    f_saved,
    w_h,
    _floats(mask),
    _flags(valid),
    _flags(reset),
    d_y,
    d_c_n,
    d_h_n,
    d_emitted[0] if d_emitted else _absent(jnp.float32),
  )
  d_inputs, d_w_i, d_w_h = _weight_gradients(clean_inputs, h_in, w_i, d_z, d_z)
  d_b = jnp.sum(d_z, axis=(0, 1))
  return (d_inputs, d_w_i, d_w_h, d_b, d_c_0, d_h_0, d_reset_c, d_reset_h)


@_lstm_gradients.defjvp
def _lstm_gradients_jvp(emit, primals, tangents):
  params, constants, _, cotangents = primals
  d_params, _, _, d_cotangents = tangents
  return _engine_gradients_jvp(
    functools.partial(_xla_lstm, emit),
    constants,
    (params, cotangents),
    (d_params, d_cotangents),
  )


def _engine_gradients_jvp(engine, constants, primals, tangents):
  """JVP of the XLA engine's VJP at ``(params, cotangents)``."""

  def gradients(params, cotangents):
    _, pullback = jax.vjp(lambda p: engine(p, constants), params)
    return pullback(cotangents)[0]

  return jax.jvp(gradients, primals, tangents)


def _residual_tangents(engine, forward, params, constants, d_params):
  """The JVP rule of a saving forward call: the engine's output tangents.

  The residuals' tangents are zeros: their only consumer, the gradient
  call, takes its own derivative from the engine (``_engine_gradients_jvp``)
  and ignores them.
  """
  outputs, residuals = forward(params, constants)
  _, d_outputs = jax.jvp(lambda p: engine(p, constants), (params,), (d_params,))
  return (outputs, residuals), (
    d_outputs,
    jax.tree.map(jnp.zeros_like, residuals),
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _lstm_saving_forward(emit, params, constants):
  """``(outputs, residuals)`` of the forward call that saves residuals."""
  outputs, clean_inputs, saved = _lstm_forward(emit, True, params, constants)
  return outputs, (clean_inputs, tuple(saved))


@_lstm_saving_forward.defjvp
def _lstm_saving_forward_jvp(emit, primals, tangents):
  params, constants = primals
  return _residual_tangents(
    functools.partial(_xla_lstm, emit),
    functools.partial(_lstm_saving_forward, emit),
    params,
    constants,
    tangents[0],
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _lstm_core(emit, params, constants):
  return _lstm_forward(emit, False, params, constants)[0]


def _lstm_core_forward(emit, params, constants):
  outputs, residuals = _lstm_saving_forward(emit, params, constants)
  return outputs, (params, constants, residuals)


def _lstm_core_backward(emit, residuals, cotangents):
  params, constants, saved = residuals
  d_params = _lstm_gradients(emit, params, constants, saved, cotangents)
  return d_params, (None, None, None)


_lstm_core.defvjp(_lstm_core_forward, _lstm_core_backward)


# GRU: differentiable arguments (inputs, w_i, w_h, b_i, b_h, h_0, reset_h).


def _gru_forward(save, params, constants):
  inputs, w_i, w_h, b_i, b_h, h_0, reset_h = params
  valid, reset, mask = constants
  steps, batch, _ = inputs.shape
  features = w_h.shape[0]
  clean_inputs, projected = _project(inputs, w_i, valid)
  y, h_n, *saved = _call(
    "hk_rnn_cpu_gru_forward",
    (
      _shape(steps, batch, features),
      _shape(batch, features),
      _shape(steps, batch, 3 * features, present=save),
      _shape(steps, batch, 3 * features, present=save),
      _shape(steps, batch, features, present=save),
      _shape(steps, batch, features, present=save),
    ),
    projected,
    w_h,
    b_i,
    b_h,
    h_0,
    reset_h,
    _flags(valid),
    _flags(reset),
    _floats(mask),
  )
  return (h_n, y), clean_inputs, saved


def _xla_gru(params, constants):
  inputs, w_i, w_h, b_i, b_h, h_0, reset_h = params
  valid, reset, mask = constants
  return xla.single_carry(
    gates.GRU,
    inputs,
    w_i,
    w_h,
    b_i,
    b_h,
    h_0,
    reset_h,
    valid=valid,
    reset=reset,
    recurrent_mask=mask,
  )


@jax.custom_jvp
def _gru_gradients(params, constants, residuals, cotangents):
  inputs, w_i, w_h, *_ = params
  valid, reset, mask = constants
  clean_inputs, (k_x, k_h, z, h_in) = residuals
  d_h_n, d_y = cotangents
  steps, batch, _ = inputs.shape
  features = w_h.shape[0]
  gates = _shape(steps, batch, 3 * features)
  carry = _shape(batch, features)
  d_gx, d_gh, d_h_0, d_reset_h = _call(
    "hk_rnn_cpu_gru_backward",
    (gates, gates, carry, carry),
    k_x,
    k_h,
    z,
    w_h,
    _floats(mask),
    _flags(valid),
    _flags(reset),
    d_y,
    d_h_n,
  )
  d_inputs, d_w_i, d_w_h = _weight_gradients(
    clean_inputs, h_in, w_i, d_gx, d_gh
  )
  d_b_i = jnp.sum(d_gx, axis=(0, 1))
  d_b_h = jnp.sum(d_gh, axis=(0, 1))
  return (d_inputs, d_w_i, d_w_h, d_b_i, d_b_h, d_h_0, d_reset_h)


@_gru_gradients.defjvp
def _gru_gradients_jvp(primals, tangents):
  params, constants, _, cotangents = primals
  d_params, _, _, d_cotangents = tangents
  return _engine_gradients_jvp(
    _xla_gru, constants, (params, cotangents), (d_params, d_cotangents)
  )


@jax.custom_jvp
def _gru_saving_forward(params, constants):
  outputs, clean_inputs, saved = _gru_forward(True, params, constants)
  return outputs, (clean_inputs, tuple(saved))


@_gru_saving_forward.defjvp
def _gru_saving_forward_jvp(primals, tangents):
  params, constants = primals
  return _residual_tangents(
    _xla_gru, _gru_saving_forward, params, constants, tangents[0]
  )


@jax.custom_vjp
def _gru_core(params, constants):
  return _gru_forward(False, params, constants)[0]


def _gru_core_forward(params, constants):
  outputs, residuals = _gru_saving_forward(params, constants)
  return outputs, (params, constants, residuals)


def _gru_core_backward(residuals, cotangents):
  params, constants, saved = residuals
  return _gru_gradients(params, constants, saved, cotangents), (
    None,
    None,
    None,
  )


_gru_core.defvjp(_gru_core_forward, _gru_core_backward)


# ---------------------------------------------------------------------------
# Entry points (the signatures of the XLA engine's lstm/gru sequences).


def _constants(valid, reset, recurrent_mask):
  as_bool = lambda m: None if m is None else jnp.asarray(m, bool)  # noqa: E731
  return (as_bool(valid), as_bool(reset), recurrent_mask)


def _require(kind, inputs, w_i, w_h, biases, carry, **masks):
  reason = refusal(kind, inputs, w_i, w_h, biases, carry, **masks)
  if reason is not None:
    raise ValueError(f"compiled.{kind}: cannot run this call ({reason})")


def lstm(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: tuple[Array, Array] | None = None,
  recurrent_mask: Array | None = None,
  return_step_carries: bool = False,
):
  r"""An LSTM sequence through the compiled kernel.

  Arguments, semantics and results are those of
  :func:`hk_rnn._src.kernels.dispatch.lstm_sequence`:

  .. math::

      z = x_t W_i + h_{in} W_h + b, \quad
      c' = \sigma(z_f) c + \sigma(z_i) \tanh(z_g), \quad
      h' = \sigma(z_o) \tanh(c')

  Call only where :func:`refusal` returns None (else ``ValueError``).

  Args:
    inputs: ``(T, B, D)`` float32.
    w_i: ``(D, 4F)``, gate blocks i, f, g, o.
    w_h: ``(F, 4F)``.
    b: ``(4F,)``.
    initial_carry: ``(c, h)``, each ``(B, F)``.
    valid: ``(T, B)`` bool, False at padded steps; None: all valid.
    reset: ``(T, B)`` bool, True where a packed row's next segment starts.
    reset_carry: the carry such a segment starts from; None: the initial.
    recurrent_mask: ``(B, F)`` dropout mask on ``h`` before ``W_h``.
    return_step_carries: also return ``(c_steps, h_steps)``, ``(T, B, F)``.

  Returns:
    ``((c, h), outputs)``, or with ``return_step_carries``
    ``((c, h), outputs, (c_steps, outputs))``.
  """
  initial_carry = tuple(initial_carry)
  reset_carry = initial_carry if reset_carry is None else tuple(reset_carry)
  xla.check_shapes(
    "compiled.lstm",
    inputs,
    4,
    w_i,
    w_h,
    {"b": b},
    initial_carry,
    reset_carry,
    valid=valid,
    reset=reset,
    recurrent_mask=recurrent_mask,
  )
  _require(
    "lstm",
    inputs,
    w_i,
    w_h,
    b,
    (*initial_carry, *reset_carry),
    valid=valid,
    reset=reset,
    recurrent_mask=recurrent_mask,
    return_step_carries=return_step_carries,
  )
  params = (inputs, w_i, w_h, b, *initial_carry, *reset_carry)
  result = _lstm_core(
    bool(return_step_carries),
    params,
    _constants(valid, reset, recurrent_mask),
  )
  if not return_step_carries:
    return result
  final, outputs, c_steps = result
  return final, outputs, (c_steps, outputs)


def gru(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b_i: Array,
  b_h: Array,
  initial_carry: Array,
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: Array | None = None,
  recurrent_mask: Array | None = None,
  return_step_carries: bool = False,
):
  r"""A GRU sequence through the compiled kernel.

  Arguments, semantics and results are those of
  :func:`hk_rnn._src.kernels.dispatch.gru_sequence`:

  .. math::

      r = \sigma(x_t W_{ir} + b_{ir} + h_{in} W_{hr} + b_{hr}), \quad
      z = \sigma(\dots), \quad
      n = \tanh(x_t W_{in} + b_{in} + r (h_{in} W_{hn} + b_{hn})), \quad
      h' = (1 - z) n + z h

  Args:
    inputs: ``(T, B, D)`` float32.
    w_i: ``(D, 3F)``, gate blocks r, z, n.
    w_h: ``(F, 3F)``.
    b_i: ``(3F,)``.
    b_h: ``(3F,)``.
    initial_carry: ``h``, ``(B, F)``.
    valid: as for :func:`lstm`.
    reset: as for :func:`lstm`.
    reset_carry: as for :func:`lstm`.
    recurrent_mask: as for :func:`lstm`.
    return_step_carries: also return the outputs as the step carries.

  Returns:
    ``(h, outputs)``, or ``(h, outputs, outputs)`` with
    ``return_step_carries``.
  """
  if reset_carry is None:
    reset_carry = initial_carry
  xla.check_shapes(
    "compiled.gru",
    inputs,
    3,
    w_i,
    w_h,
    {"b_i": b_i, "b_h": b_h},
    (initial_carry,),
    (reset_carry,),
    valid=valid,
    reset=reset,
    recurrent_mask=recurrent_mask,
  )
  _require(
    "gru",
    inputs,
    w_i,
    w_h,
    (b_i, b_h),
    (initial_carry, reset_carry),
    valid=valid,
    reset=reset,
    recurrent_mask=recurrent_mask,
    return_step_carries=return_step_carries,
  )
  h, outputs = _gru_core(
    (inputs, w_i, w_h, b_i, b_h, initial_carry, reset_carry),
    _constants(valid, reset, recurrent_mask),
  )
  if return_step_carries:
    return h, outputs, outputs
  return h, outputs
