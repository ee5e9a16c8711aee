r"""Fused whole-sequence kernels for the LSTM, GRU, MGU and simple cells.

Each kernel runs a whole masked sequence with a hand-written VJP, the scheme
cuDNN and oneDNN use:

* forward: one large GEMM projects every input step at once,
  ``G_x = X W_i`` with ``X`` the ``(T*B, D)`` inputs; the scan then does
  only the recurrent GEMM ``h_in W_h`` and the gate math (bias included),
  and saves for the backward pass the per-step coefficients of the gate
  derivatives;
* backward: a reverse scan carries only the state cotangents (``dh``, ``dc``)
  and emits the gate pre-activation cotangents ``dZ_t``; the parameter
  cotangents are then single large GEMMs over all steps:
  ``dW_i = Xᵀ dZ``, ``dW_h = Σ_t h_in,tᵀ dZ_t``, ``db = Σ_t dZ_t`` and
  ``dX = dZ W_iᵀ``.

Autodiff of a scan instead accumulates ``dW_h`` and ``dW_i`` with a small GEMM
per step and stores every intermediate of the step.

What profiling XLA:CPU showed (two cores, B=32, F=256) and the code below
follows: inside a scan step, elementwise kernels that XLA does not
vectorise cost as much as the recurrent GEMM; transcendentals over column
slices of an array, and arrays assembled from broadcasts and selects, are
such kernels (a concatenate is cheaper). So the gates take one logistic
over the whole ``(B, G*F)`` pre-activation (``_activate``), and the
residuals overwrite the projected inputs, and the gate cotangents the
residuals, in place in buffers the scans carry, instead of each filling a
new ``(T, B, G*F)`` array.

Shapes are time-major with one batch axis: ``inputs (T, B, D)``, carries
``(B, F)``. ``valid`` and ``reset`` are ``(T, B)`` bools (``None``: every step
valid, never reset) and ``recurrent_mask`` is ``(B, F)``, the same at every
step. At step ``t`` each kernel computes

.. math::

    s &= \mathrm{reset}_t \;?\; s_r : s \qquad
        \text{(a packed row's next segment starts afresh)} \\
    h_{in} &= h \odot m \qquad \text{(recurrent dropout, when a mask is given)} \\
    s', y &= \mathrm{cell}(x_t, h_{in}, s) \\
    s &= \mathrm{valid}_t \;?\; s' : s, \qquad
    \mathrm{output}_t = \mathrm{valid}_t \;?\; y : 0

where ``s_r`` is the reset carry (by default the initial carry), and
returns ``(final_carry, outputs (T, B, F))``. Padded steps change nothing:
the kernels zero the inputs there before the input GEMM, so even NaN padding
reaches no value and no gradient.

Computation runs in the dtype of ``inputs`` (weights are cast to it); weight
and bias gradients are accumulated in float32 and every gradient comes back
in its argument's own dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
State = tuple[Array, ...]  # the carry as a tuple whose last array is h


def _select(pred: Array, on_true: State, on_false: State) -> State:
  """Row-wise ``where``: ``pred (B,)`` picks rows of each ``(B, F)`` array."""
  pred = pred[:, None]
  return tuple(
    jnp.where(pred, a, b) for a, b in zip(on_true, on_false, strict=True)
  )


class _Cell(NamedTuple):
  """The gate math one cell plugs into the shared fused engine.

  ``step(gx, gh, state, save)`` takes the projected input ``gx = x W_i + b_i``
  and recurrent term ``gh = h_in W_h (+ b_h)``, both ``(B, G*F)``, and the
  state before the step; it returns ``(new_state, output, residuals)``, the
  residuals (only when ``save``) being whatever ``backward`` needs.

  ``backward(residuals, d_state)`` takes the cotangent of the new state (the
  output's already added to ``h``'s) and returns ``(d_gx, d_gh, d_state)``:
  the cotangents of ``gx``, of ``gh`` (``None`` when equal to ``d_gx``) and
  of the state before the step, not counting the path through ``h_in``.

  The first residual has ``gx``'s shape, and so does the second when
  ``backward`` returns a separate ``d_gh``: the scans overwrite ``gx`` with
  the first and then the first with ``d_gx`` (the second with ``d_gh``) in
  place, which saves two ``(T, B, G*F)`` arrays of memory.
  """

  step: Callable[..., tuple[State, Array, Any]]
  backward: Callable[..., tuple[Array, Array | None, State]]
  separate_recurrent_cotangent: bool = False


def _activate(z: Array, tanh_blocks: tuple[bool, ...]) -> Array:
  """σ on each gate block of ``z (B, G*F)``; tanh on blocks marked True.

  In float32 and wider this is one logistic over the whole array, with
  ``tanh(x) = 2σ(2x) - 1`` for the tanh blocks: XLA:CPU runs a transcendental
  over a whole array several times faster than over column slices of it, and
  inside a scan step this gate math costs as much as the recurrent GEMM. In
  narrower dtypes ``2σ(2x) - 1`` loses the relative precision of small
  values, so those take the sliced route.
  """
  blocks = len(tanh_blocks)
  if jnp.finfo(z.dtype).bits < 32:
    parts = jnp.split(z, blocks, axis=-1)
    return jnp.concatenate(
      [
        jnp.tanh(p) if tanh else jax.nn.sigmoid(p)
        for p, tanh in zip(parts, tanh_blocks, strict=True)
      ],
      axis=-1,
    )
  features = z.shape[-1] // blocks
  scale = jnp.repeat(
    jnp.asarray([2 if tanh else 1 for tanh in tanh_blocks], z.dtype), features
  )
  return jax.nn.sigmoid(z * scale) * scale - (scale - 1)


def _tanh(x: Array) -> Array:
  """tanh, as ``2σ(2x) - 1`` in float32 (see ``_activate``)."""
  if jnp.finfo(x.dtype).bits < 32:
    return jnp.tanh(x)
  return 2 * jax.nn.sigmoid(2 * x) - 1


def _blocks(*pieces: Array) -> Array:
  """``concatenate(pieces, -1)`` for ``(B, F)`` pieces.

  Measured in a scan step on XLA:CPU, a concatenate (a kernel of its own)
  followed by a multiply beats building the same array with broadcasts and
  selects fused into the multiply: those fusions do not vectorise.
  """
  return jnp.concatenate(pieces, axis=-1)


# LSTM. Backward math, with c' = f c + i g and h' = o tanh(c'):
#   dc_total = dc' + dh' o (1 - tanh²c')
#   dz = [dc_total g i(1-i), dc_total c f(1-f), dc_total i (1-g²),
#         dh' tanh(c') o(1-o)],   dc = dc_total f.
# The step saves the coefficients K of dz = [dc_total, dc_total, dc_total,
# dh'] ⊙ K, o (1 - tanh²c') and f: the backward step is then a few
# multiplications around its GEMM, with no transcendental.


def _lstm_step(gx, gh, state, save):
  c, _ = state
  activations = _activate(gx + gh, (False, False, True, False))
  i, f, g, o = jnp.split(activations, 4, axis=-1)
  new_c = f * c + i * g
  tanh_c = jnp.tanh(new_c)
  new_h = o * tanh_c
  if not save:
    return (new_c, new_h), new_h, None
  # σ' = σ(1-σ) and tanh' = 1 - tanh² = (1 - tanh)(1 + tanh).
  derivatives = (1 - activations) * (
    activations + _blocks(*(jnp.full_like(c, k) for k in (0, 0, 1, 0)))
  )
  coefficients = derivatives * _blocks(g, c, i, tanh_c)
  return (new_c, new_h), new_h, (coefficients, o * (1 - tanh_c * tanh_c), f)


def _lstm_backward(residuals, d_state):
  coefficients, c_from_h, f = residuals
  d_c, d_h = d_state
  d_c = d_c + d_h * c_from_h
  d_z = _blocks(d_c, d_c, d_c, d_h) * coefficients
  return d_z, None, (d_c * f, jnp.zeros_like(d_h))


# GRU, with gh = h_in W_h + b_h, u = gx_n + r gh_n, n = tanh(u) and
# h' = n + z (h - n):
#   dn_pre = dh' (1-z)(1-n²);  d_gx = [dn_pre gh_n r(1-r), dh' (h-n) z(1-z),
#   dn_pre];  d_gh = [the same r and z blocks, dn_pre r];  dh (direct) = dh' z.
# The step saves K_x and K_h with d_gx = [dh']*3 ⊙ K_x, d_gh = [dh']*3 ⊙ K_h.


def _gru_step(gx, gh, state, save):
  (h,) = state
  # σ over all three blocks (the n block's is unused): see ``_activate``.
  gates = _activate(gx + gh, (False, False, False))
  r, z, _ = jnp.split(gates, 3, axis=-1)
  _, _, x_n = jnp.split(gx, 3, axis=-1)
  _, _, h_n = jnp.split(gh, 3, axis=-1)
  n = _tanh(x_n + r * h_n)
  new_h = n + z * (h - n)
  if not save:
    return (new_h,), new_h, None
  d_n = (1 - z) * (1 - n * n)
  d_r = d_n * h_n * r * (1 - r)
  d_z = (h - n) * z * (1 - z)
  residuals = (_blocks(d_r, d_z, d_n), _blocks(d_r, d_z, d_n * r), z)
  return (new_h,), new_h, residuals


def _interpolating_backward(residuals, d_state):
  """The GRU's and the MGU's backward step.

  Both end in ``h' = n + g (h - n)`` with a gate ``g`` (``z``, ``f``), and
  their steps save ``(K_x, K_h, g)`` with ``d_gx = [dh', ...] ⊙ K_x`` and
  ``d_gh = [dh', ...] ⊙ K_h``, one ``dh'`` per gate block.
  """
  input_coefficients, recurrent_coefficients, gate = residuals
  (d_h,) = d_state
  blocks = input_coefficients.shape[-1] // d_h.shape[-1]
  d_h_blocks = _blocks(*(d_h,) * blocks)
  return (
    d_h_blocks * input_coefficients,
    d_h_blocks * recurrent_coefficients,
    (d_h * gate,),
  )


# MGU, a GRU whose one gate f serves as both r and z: with
# gh = h_in W_h + b_h, n = tanh(gx_n + f gh_n) and h' = n + f (h - n):
#   dn_pre = dh' (1-f)(1-n²);  df_pre = (dh' (h-n) + dn_pre gh_n) f(1-f);
#   d_gx = [df_pre, dn_pre];  d_gh = [df_pre, dn_pre f];  dh (direct) = dh' f.
# As for the GRU, the step saves K_x and K_h with d_gx = [dh']*2 ⊙ K_x and
# d_gh = [dh']*2 ⊙ K_h, and shares its backward step.


def _mgu_step(gx, gh, state, save):
  (h,) = state
  # σ over both blocks (the n block's is unused): see ``_activate``.
  gates = _activate(gx + gh, (False, False))
  f, _ = jnp.split(gates, 2, axis=-1)
  _, x_n = jnp.split(gx, 2, axis=-1)
  _, h_n = jnp.split(gh, 2, axis=-1)
  n = _tanh(x_n + f * h_n)
  new_h = n + f * (h - n)
  if not save:
    return (new_h,), new_h, None
  d_n = (1 - f) * (1 - n * n)
  d_f = ((h - n) + d_n * h_n) * f * (1 - f)
  residuals = (_blocks(d_f, d_n), _blocks(d_f, d_n * f), f)
  return (new_h,), new_h, residuals


# Simple: h' = tanh(gx + gh), d_gx = dh' (1 - h'²).


def _simple_step(gx, gh, state, save):
  del state
  new_h = jnp.tanh(gx + gh)
  return (new_h,), new_h, ((new_h,) if save else None)


def _simple_backward(residuals, d_state):
  (new_h,) = residuals
  (d_h,) = d_state
  return d_h * (1 - new_h * new_h), None, (jnp.zeros_like(d_h),)


_LSTM = _Cell(_lstm_step, _lstm_backward)
_GRU = _Cell(
  _gru_step, _interpolating_backward, separate_recurrent_cotangent=True
)
_MGU = _Cell(
  _mgu_step, _interpolating_backward, separate_recurrent_cotangent=True
)
_SIMPLE = _Cell(_simple_step, _simple_backward)


def _prepare(inputs, w_i, valid):
  """Zeroes padded inputs and projects all steps: ``X W_i``, ``(T, B, G*F)``.

  The bias is added inside the scan step, where it fuses into the gate
  math, instead of in a pass of its own over the whole projection.
  """
  dtype = inputs.dtype
  if valid is not None:
    # Padding may hold NaN; zeroed here it reaches neither the gate values
    # nor ``dW_i = Xᵀ dZ`` (where NaN * 0 would still be NaN).
    inputs = jnp.where(valid[..., None], inputs, 0)
  steps, batch, _ = inputs.shape
  projected = jnp.dot(
    inputs.reshape(steps * batch, inputs.shape[-1]), w_i.astype(dtype)
  )
  return inputs, projected.reshape(steps, batch, w_i.shape[-1])


def _forward_scan(
  cell,
  unroll,
  projected,
  w_h,
  b_i,
  b_h,
  initial_state,
  reset_state,
  valid,
  reset,
  mask,
  save,
  emit,
):
  """Runs the recurrence over the projected inputs (see the module doc).

  With ``save``, each step's first residual (shaped like its ``gx``)
  overwrites ``gx`` in the ``projected`` buffer, which the scan carries:
  XLA updates a carried buffer in place, so the residuals need no second
  ``(T, B, G*F)`` array. Returns ``(final_state, (outputs, emitted))``, or
  with ``save`` ``(final_state, (outputs, emitted, residuals, h_in))``.
  ``emitted`` holds, with ``emit``, every state array but ``h`` after each
  step, ``(T, B, F)`` each (``h`` is the output); else it is ``()``.
  """

  def step(state, gx, valid_t, reset_t):
    if reset_t is not None:
      state = _select(reset_t, reset_state, state)
    h_in = state[-1] if mask is None else state[-1] * mask
    gh = jnp.dot(h_in, w_h)
    if b_h is not None:
      gh = gh + b_h
    new_state, output, residuals = cell.step(gx + b_i, gh, state, save)
    if valid_t is not None:
      new_state = _select(valid_t, new_state, state)
      output = jnp.where(valid_t[:, None], output, 0)
    emitted = new_state[:-1] if emit else ()
    return new_state, (output, emitted), residuals, h_in

  if not save:

    def body(state, step_inputs):
      new_state, outputs, _, _ = step(state, *step_inputs)
      return new_state, outputs

    return lax.scan(
      body, initial_state, (projected, valid, reset), unroll=unroll
    )

  def saving_body(carry, step_inputs):
    state, buffer = carry
    index, valid_t, reset_t = step_inputs
    gx = lax.dynamic_index_in_dim(buffer, index, keepdims=False)
    new_state, outputs, (first, *rest), h_in = step(state, gx, valid_t, reset_t)
    buffer = lax.dynamic_update_index_in_dim(buffer, first, index, 0)
    return (new_state, buffer), (*outputs, tuple(rest), h_in)

  time = projected.shape[0]
  (final_state, buffer), (outputs, emitted, rest, h_in) = lax.scan(
    saving_body,
    (initial_state, _indexable(projected)),
    (jnp.arange(time), valid, reset),
    unroll=unroll,
  )
  return final_state, (outputs, emitted, (buffer[:time], *rest), h_in)


def _indexable(buffer: Array) -> Array:
  """``buffer``, or a one-step one that no step reads when it has no step.

  A scan traces its body even over no step, and a step's slice of an empty
  buffer is refused at trace time; the caller cuts the result back to
  ``[:time]``.
  """
  if buffer.shape[0]:
    return buffer
  return jnp.zeros((1, *buffer.shape[1:]), buffer.dtype)


def _cast_all(arrays, dtype):
  return tuple(a.astype(dtype) for a in arrays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sequence(
  cell,
  unroll,
  emit,
  inputs,
  w_i,
  w_h,
  b_i,
  b_h,
  initial_state,
  reset_state,
  valid,
  reset,
  mask,
):
  """The fused recurrence; ``b_h`` is ``None`` for single-bias cells.

  Rows start from ``initial_state``, and every later segment of a packed row
  (``reset``) from ``reset_state``. Returns ``(final_state, outputs,
  emitted)``: with ``emit``, ``emitted`` holds the state arrays but ``h``
  after every step (see ``_forward_scan``), else ``()``.
  """
  dtype = inputs.dtype
  _, projected = _prepare(inputs, w_i, valid)
  final_state, (outputs, emitted) = _forward_scan(
    cell,
    unroll,
    projected,
    w_h.astype(dtype),
    b_i.astype(dtype),
    None if b_h is None else b_h.astype(dtype),
    _cast_all(initial_state, dtype),
    _cast_all(reset_state, dtype),
    valid,
    reset,
    None if mask is None else mask.astype(dtype),
    save=False,
    emit=emit,
  )
  return final_state, outputs, emitted


def _sequence_forward(
  cell,
  unroll,
  emit,
  inputs,
  w_i,
  w_h,
  b_i,
  b_h,
  initial_state,
  reset_state,
  valid,
  reset,
  mask,
):
  dtype = inputs.dtype
  clean_inputs, projected = _prepare(inputs, w_i, valid)
  mask_c = None if mask is None else mask.astype(dtype)
  final_state, (outputs, emitted, residuals, h_in) = _forward_scan(
    cell,
    unroll,
    projected,
    w_h.astype(dtype),
    b_i.astype(dtype),
    None if b_h is None else b_h.astype(dtype),
    _cast_all(initial_state, dtype),
    _cast_all(reset_state, dtype),
    valid,
    reset,
    mask_c,
    save=True,
    emit=emit,
  )
  saved = (
    clean_inputs,
    residuals,
    h_in,
    w_i,
    w_h,
    b_i,
    b_h,
    initial_state,
    reset_state,
    valid,
    reset,
    mask_c,
  )
  return (final_state, outputs, emitted), saved


def _sequence_backward(cell, unroll, emit, saved, cotangents):
  (
    inputs,
    residuals,
    h_in,
    w_i,
    w_h,
    b_i,
    b_h,
    initial_state,
    reset_state,
    valid,
    reset,
    mask,
  ) = saved
  d_final_state, d_outputs, d_emitted = cotangents
  dtype = inputs.dtype
  w_h_transposed = w_h.astype(dtype).T
  d_final_state = _cast_all(d_final_state, dtype)
  d_outputs = d_outputs.astype(dtype)

  # As in the forward scan, each step's ``d_gx`` (and ``d_gh``) overwrite
  # its first (and second) residual in the carried buffers.
  in_place = 2 if cell.separate_recurrent_cotangent else 1
  buffers, rest = tuple(residuals[:in_place]), tuple(residuals[in_place:])

  def body(carry, step_inputs):
    d_state, d_initial, buffers = carry
    index, rest_t, d_output, d_emitted_t, valid_t, reset_t = step_inputs
    if emit:
      # An emitted state is the state after this step, kept or not.
      d_state = (
        *(
          a + b.astype(dtype)
          for a, b in zip(d_state[:-1], d_emitted_t, strict=True)
        ),
        d_state[-1],
      )
    residuals_t = (
      *(lax.dynamic_index_in_dim(b, index, keepdims=False) for b in buffers),
      *rest_t,
    )
    d_new = (*d_state[:-1], d_state[-1] + d_output)
    if valid_t is not None:
      # A padded step's output and new state were discarded: its cotangents
      # are exactly zero (residuals there are finite: the inputs were zeroed).
      d_new = _select(valid_t, d_new, tuple(map(jnp.zeros_like, d_new)))
    d_gx, d_gh, d_previous = cell.backward(residuals_t, d_new)
    d_h_in = jnp.dot(d_gx if d_gh is None else d_gh, w_h_transposed)
    if mask is not None:
      d_h_in = d_h_in * mask
    d_previous = (*d_previous[:-1], d_previous[-1] + d_h_in)
    if valid_t is not None:
      # ... and the state it left untouched passes its cotangent through.
      d_previous = _select(valid_t, d_previous, d_state)
    if reset_t is not None:
      zeros = tuple(map(jnp.zeros_like, d_previous))
      d_initial = tuple(
        a + b
        for a, b in zip(
          d_initial, _select(reset_t, d_previous, zeros), strict=True
        )
      )
      d_previous = _select(reset_t, zeros, d_previous)
    buffers = tuple(
      lax.dynamic_update_index_in_dim(b, d, index, 0)
      for b, d in zip(buffers, (d_gx, d_gh)[:in_place], strict=True)
    )
    return (d_previous, d_initial, buffers), None

  d_initial = (
    None if reset is None else tuple(map(jnp.zeros_like, d_final_state))
  )
  time = d_outputs.shape[0]
  (d_state, d_initial, (d_gx, *d_gh)), _ = lax.scan(
    body,
    (d_final_state, d_initial, tuple(map(_indexable, buffers))),
    (
      jnp.arange(d_outputs.shape[0]),
      rest,
      d_outputs,
      d_emitted if emit else None,
      valid,
      reset,
    ),
    reverse=True,
    unroll=unroll,
  )
  d_gx = d_gx[:time]
  d_gh = d_gh[0][:time] if d_gh else None
  if d_initial is None:
    d_initial = tuple(map(jnp.zeros_like, d_state))

  steps, batch, _ = inputs.shape
  flat = lambda a: a.reshape(steps * batch, a.shape[-1])  # noqa: E731
  d_gx = flat(d_gx)
  d_gh = d_gx if d_gh is None else flat(d_gh)
  f32 = jnp.float32
  d_w_i = jnp.dot(flat(inputs).T, d_gx, preferred_element_type=f32)
  d_w_h = jnp.dot(flat(h_in).T, d_gh, preferred_element_type=f32)
  d_inputs = jnp.dot(d_gx, w_i.astype(dtype).T).reshape(inputs.shape)
  d_b_i = jnp.sum(d_gx, axis=0, dtype=f32)
  d_b_h = None if b_h is None else jnp.sum(d_gh, axis=0, dtype=f32)
  return (
    d_inputs,
    d_w_i.astype(w_i.dtype),
    d_w_h.astype(w_h.dtype),
    d_b_i.astype(b_i.dtype),
    None if b_h is None else d_b_h.astype(b_h.dtype),
    tuple(
      d.astype(s.dtype) for d, s in zip(d_state, initial_state, strict=True)
    ),
    tuple(
      d.astype(s.dtype) for d, s in zip(d_initial, reset_state, strict=True)
    ),
    None,
    None,
    None,
  )


_sequence.defvjp(_sequence_forward, _sequence_backward)


def _check(
  name, inputs, blocks, w_i, w_h, biases, initial_state, reset_state, **masks
):
  """Raises ``ValueError`` on shapes the kernels cannot run."""
  if inputs.ndim != 3:
    raise ValueError(
      f"{name}: inputs must be (time, batch, features), got {inputs.shape}"
    )
  steps, batch, input_size = inputs.shape
  features = w_h.shape[0]
  width = blocks * features
  expected = {
    "w_i": ((input_size, width), w_i.shape),
    "w_h": ((features, width), w_h.shape),
  }
  for key, bias in biases.items():
    expected[key] = ((width,), bias.shape)
  for key, state in (
    ("initial_carry", initial_state),
    ("reset_carry", reset_state),
  ):
    for index, part in enumerate(state):
      expected[f"{key}[{index}]"] = ((batch, features), part.shape)
  for key, value in masks.items():
    if value is not None:
      shape = (batch, features) if key == "recurrent_mask" else (steps, batch)
      expected[key] = (shape, value.shape)
  for key, (want, got) in expected.items():
    if tuple(got) != want:
      raise ValueError(f"{name}: {key} must have shape {want}, got {got}")


def _as_bool(mask):
  return None if mask is None else jnp.asarray(mask, bool)


def lstm_sequence(
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
  unroll: int = 1,
  allow_cudnn: bool = True,
  return_step_carries: bool = False,
) -> tuple[tuple[Array, Array], Array]:
  r"""Runs an LSTM over a whole sequence with a fused VJP.

  .. math::

      z &= x_t W_i + h_{in} W_h + b, \quad z = [z_i, z_f, z_g, z_o] \\
      c' &= \sigma(z_f) c + \sigma(z_i) \tanh(z_g), \quad
      h' = \sigma(z_o) \tanh(c')

  with masking, resets and ``h_in`` as in the module docstring.

  >>> import jax.numpy as jnp
  >>> from hk_rnn._src import fused
  >>> inputs = jnp.ones((5, 2, 3))                     # (time, batch, in)
  >>> w_i, w_h, b = jnp.ones((3, 16)), jnp.ones((4, 16)), jnp.zeros(16)
  >>> carry = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))
  >>> valid = jnp.arange(5)[:, None] < jnp.array([5, 2])  # lengths 5 and 2
  >>> (c, h), outputs = fused.lstm_sequence(
  ...     inputs, w_i, w_h, b, carry, valid=valid)
  >>> outputs.shape, bool((outputs[2:, 1] == 0).all())
  ((5, 2, 4), True)

  Args:
    inputs: ``(T, B, D)``.
    w_i: ``(D, 4F)``, gate blocks i, f, g, o.
    w_h: ``(F, 4F)``.
    b: ``(4F,)``.
    initial_carry: ``(c, h)``, each ``(B, F)``.
    valid: ``(T, B)`` bool, False at padded steps; None: all valid.
    reset: ``(T, B)`` bool, True where a row's state restarts from
      ``reset_carry`` (a packed row's next segment); None: never.
    reset_carry: the carry each such segment starts from, shaped like
      ``initial_carry``; None: ``initial_carry``. They differ when a row's
      first segment continues a carry from an earlier chunk of a stream.
    recurrent_mask: ``(B, F)`` dropout mask applied to ``h`` before ``W_h``,
      kept units already scaled by ``1/(1-rate)``.
    unroll: steps per scan iteration.
    allow_cudnn: on a CUDA GPU, run cuDNN's LSTM (``jax.experimental.rnn``)
      where it computes the same thing: no ``reset``, no ``recurrent_mask``,
      float32 throughout, padding only at the end of rows. cuDNN's op has no
      batching rule: pass False to use this inside ``jax.vmap`` on GPU.
    return_step_carries: also return the carry after every step.

  Returns:
    ``((c, h), outputs)``: the carry after each row's last valid step and
    the ``(T, B, F)`` outputs, zero at padded steps. With
    ``return_step_carries``, ``((c, h), outputs, (c_steps, h_steps))`` with
    ``(T, B, F)`` step carries; ``h_steps`` is ``outputs``, so it is 0
    rather than ``h`` at padded steps: only the ``c`` sequence costs extra
    memory.
  """
  initial_carry = tuple(initial_carry)
  reset_carry = initial_carry if reset_carry is None else tuple(reset_carry)
  _check(
    "lstm_sequence",
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
  if (
    allow_cudnn
    and not return_step_carries
    and _cudnn_supports(
      inputs, w_i, w_h, b, initial_carry, reset, recurrent_mask, _platform()
    )
  ):
    return cudnn_lstm(inputs, w_i, w_h, b, initial_carry, valid=valid)
  # On CPU, oneDNN's LSTM primitive where it computes exactly this call
  # (an optional compiled extension: hk_rnn/_src/onednn.py).
  if (
    not return_step_carries
    and valid is None
    and reset is None
    and recurrent_mask is None
  ):
    from hk_rnn._src import onednn

    if onednn.supports(inputs, w_i, w_h, b, initial_carry):
      return onednn.lstm(
        inputs,
        w_i,
        w_h,
        b,
        initial_carry,
        fused_kernel=lambda x, w_i, w_h, b, carry: _sequence(
          _LSTM,
          unroll,
          False,
          x,
          w_i,
          w_h,
          b,
          None,
          carry,
          carry,
          None,
          None,
          None,
        )[:2],
      )
  final, outputs, emitted = _sequence(
    _LSTM,
    unroll,
    return_step_carries,
    inputs,
    w_i,
    w_h,
    b,
    None,
    initial_carry,
    reset_carry,
    _as_bool(valid),
    _as_bool(reset),
    recurrent_mask,
  )
  if not return_step_carries:
    return final, outputs
  (c_steps,) = emitted
  return final, outputs, (c_steps, outputs)


def _single_carry_sequence(
  name,
  cell,
  blocks,
  inputs,
  w_i,
  w_h,
  biases,
  initial_carry,
  reset_carry,
  valid,
  reset,
  mask,
  unroll,
  return_step_carries,
):
  """Checks and runs a kernel of ``blocks`` gate blocks whose carry is ``h``.

  ``biases`` maps argument names to arrays: ``b`` alone, or ``b_i`` then
  ``b_h``. ``reset_carry`` None means ``initial_carry``. With
  ``return_step_carries`` the outputs double as the carry after every step
  (0 rather than ``h`` at padded steps), at no extra memory.
  """
  if reset_carry is None:
    reset_carry = initial_carry
  _check(
    name,
    inputs,
    blocks,
    w_i,
    w_h,
    biases,
    (initial_carry,),
    (reset_carry,),
    valid=valid,
    reset=reset,
    recurrent_mask=mask,
  )
  b_i, b_h = (*biases.values(), None)[:2]
  (h,), outputs, _ = _sequence(
    cell,
    unroll,
    False,
    inputs,
    w_i,
    w_h,
    b_i,
    b_h,
    (initial_carry,),
    (reset_carry,),
    _as_bool(valid),
    _as_bool(reset),
    mask,
  )
  if return_step_carries:
    return h, outputs, outputs
  return h, outputs


def gru_sequence(
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
  unroll: int = 1,
  return_step_carries: bool = False,
) -> tuple[Array, Array]:
  r"""Runs a GRU over a whole sequence with a fused VJP.

  .. math::

      r &= \sigma(x_t W_{ir} + b_{ir} + h_{in} W_{hr} + b_{hr}), \quad
      z = \sigma(x_t W_{iz} + b_{iz} + h_{in} W_{hz} + b_{hz}) \\
      n &= \tanh(x_t W_{in} + b_{in} + r (h_{in} W_{hn} + b_{hn})), \quad
      h' = (1 - z) n + z h

  (the interpolation uses the undropped ``h``). Arguments as for
  :func:`lstm_sequence`, with ``w_i (D, 3F)``, ``w_h (F, 3F)``,
  ``b_i (3F,)``, ``b_h (3F,)`` in blocks r, z, n and the carry ``h (B, F)``.

  Returns:
    ``(h, outputs)``; with ``return_step_carries``, ``(h, outputs,
    outputs)``: the outputs are the carry after every step (0 at padding).
  """
  # On CPU, oneDNN's linear-before-reset GRU where it computes exactly this
  # call (an optional compiled extension: hk_rnn/_src/onednn.py).
  if (
    not return_step_carries
    and valid is None
    and reset is None
    and recurrent_mask is None
  ):
    from hk_rnn._src import onednn

    _check(
      "gru_sequence",
      inputs,
      3,
      w_i,
      w_h,
      {"b_i": b_i, "b_h": b_h},
      (initial_carry,),
      (initial_carry,),
    )
    if onednn.supports_gru(inputs, w_i, w_h, b_i, b_h, initial_carry):

      def fused_kernel(x, w_i, w_h, b_i, b_h, h):
        (h,), outputs, _ = _sequence(
          _GRU,
          unroll,
          False,
          x,
          w_i,
          w_h,
          b_i,
          b_h,
          (h,),
          (h,),
          None,
          None,
          None,
        )
        return h, outputs

      return onednn.gru(
        inputs, w_i, w_h, b_i, b_h, initial_carry, fused_kernel=fused_kernel
      )
  return _single_carry_sequence(
    "gru_sequence",
    _GRU,
    3,
    inputs,
    w_i,
    w_h,
    {"b_i": b_i, "b_h": b_h},
    initial_carry,
    reset_carry,
    valid,
    reset,
    recurrent_mask,
    unroll,
    return_step_carries,
  )


def mgu_sequence(
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
  unroll: int = 1,
  return_step_carries: bool = False,
) -> tuple[Array, Array]:
  r"""Runs a minimal gated unit over a whole sequence with a fused VJP.

  .. math::

      f &= \sigma(x_t W_{if} + b_{if} + h_{in} W_{hf} + b_{hf}) \\
      n &= \tanh(x_t W_{in} + b_{in} + f (h_{in} W_{hn} + b_{hn})), \quad
      h' = (1 - f) n + f h

  (the interpolation uses the undropped ``h``). Arguments as for
  :func:`gru_sequence`, with ``w_i (D, 2F)``, ``w_h (F, 2F)``,
  ``b_i (2F,)``, ``b_h (2F,)`` in blocks f, n.

  Returns:
    ``(h, outputs)``, as :func:`gru_sequence`.
  """
  return _single_carry_sequence(
    "mgu_sequence",
    _MGU,
    2,
    inputs,
    w_i,
    w_h,
    {"b_i": b_i, "b_h": b_h},
    initial_carry,
    reset_carry,
    valid,
    reset,
    recurrent_mask,
    unroll,
    return_step_carries,
  )


def simple_sequence(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: Array,
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: Array | None = None,
  recurrent_mask: Array | None = None,
  unroll: int = 1,
  return_step_carries: bool = False,
) -> tuple[Array, Array]:
  r"""Runs an Elman RNN, :math:`h' = \tanh(x_t W_i + h_{in} W_h + b)`, fused.

  Arguments as for :func:`lstm_sequence`, with ``w_i (D, F)``, ``w_h (F, F)``,
  ``b (F,)`` and the carry ``h (B, F)``.

  Returns:
    ``(h, outputs)``, as :func:`gru_sequence`.
  """
  return _single_carry_sequence(
    "simple_sequence",
    _SIMPLE,
    1,
    inputs,
    w_i,
    w_h,
    {"b": b},
    initial_carry,
    reset_carry,
    valid,
    reset,
    recurrent_mask,
    unroll,
    return_step_carries,
  )


# cuDNN dispatch. ``jax.experimental.rnn.lstm`` takes batch-major inputs,
# ``(layers, B, F)`` carries, int32 lengths and every parameter in one flat
# float32 vector laid out as PyTorch's ``nn.LSTM``: ``W_ih (4F, D)``,
# ``W_hh (4F, F)``, then ``b_ih (4F,)``, ``b_hh (4F,)``, gate blocks i, f, g,
# o -- our order, transposed, with a second bias. It supports float32 only,
# one sequence per row with padding at the end, and no dropout mask on h.


def _platform() -> str:
  """``"cuda"``, ``"rocm"`` or the default backend's name."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  version = getattr(jax.devices()[0].client, "platform_version", "")
  return "rocm" if "rocm" in str(version).lower() else "cuda"


def _cudnn_supports(
  inputs, w_i, w_h, b, initial_carry, reset, recurrent_mask, platform
) -> bool:
  """Whether cuDNN's LSTM computes exactly this call (see above)."""
  arrays = (inputs, w_i, w_h, b, *initial_carry)
  return (
    platform == "cuda"
    and reset is None
    and recurrent_mask is None
    and all(a.dtype == jnp.float32 for a in arrays)
  )


def cudnn_lstm_weights(w_i: Array, w_h: Array, b: Array) -> Array:
  """Packs ``w_i (D, 4F)``, ``w_h (F, 4F)``, ``b (4F,)`` for cuDNN.

  Returns the flat vector ``[w_iᵀ, w_hᵀ, b, 0]`` (row-major): cuDNN's two
  biases are added, so ours goes in the first and the second is zero.
  Differentiable: the flat gradient maps back through the transposes.
  """
  return jnp.concatenate(
    [w_i.T.reshape(-1), w_h.T.reshape(-1), b, jnp.zeros_like(b)]
  )


def cudnn_lstm(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
  *,
  valid: Array | None = None,
  lstm_fn: Callable[..., tuple[Array, Array, Array]] | None = None,
) -> tuple[tuple[Array, Array], Array]:
  """:func:`lstm_sequence` without resets or dropout, through cuDNN.

  ``valid`` must mark a prefix of each row (padding at the end), as
  ``hk_rnn.RNN`` guarantees. ``lstm_fn`` replaces
  ``jax.experimental.rnn.lstm`` (same signature), which only lowers on CUDA;
  tests pass a CPU reference.
  """
  if lstm_fn is None:
    from jax.experimental import rnn

    lstm_fn = rnn.lstm
  steps, batch, input_size = inputs.shape
  features = w_h.shape[0]
  c_0, h_0 = initial_carry
  if valid is None:
    lengths = jnp.full((batch,), steps, jnp.int32)
  else:
    valid = jnp.asarray(valid, bool)
    inputs = jnp.where(valid[..., None], inputs, 0)
    lengths = jnp.sum(valid, axis=0, dtype=jnp.int32)
  # cuDNN wants at least one step per row; an empty row runs one step on
  # zeros whose results are then discarded (and so get no gradient).
  outputs, h_n, c_n = lstm_fn(
    jnp.swapaxes(inputs, 0, 1),
    h_0[None],
    c_0[None],
    cudnn_lstm_weights(w_i, w_h, b),
    jnp.maximum(lengths, 1),
    input_size=input_size,
    hidden_size=features,
    num_layers=1,
    dropout=0.0,
    bidirectional=False,
  )
  outputs = jnp.swapaxes(outputs, 0, 1)
  if valid is not None:
    outputs = jnp.where(valid[..., None], outputs, 0)
  empty = (lengths == 0)[:, None]
  final = (jnp.where(empty, c_0, c_n[0]), jnp.where(empty, h_0, h_n[0]))
  return final, outputs
