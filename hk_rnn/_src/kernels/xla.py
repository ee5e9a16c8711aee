r"""The XLA engine: whole-sequence kernels in JAX for the gated cells.

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

import jax
import jax.numpy as jnp
from jax import lax

from hk_rnn._src.kernels import gates

Array = jax.Array
State = tuple[Array, ...]  # the carry as a tuple whose last array is h


def _select(pred: Array, on_true: State, on_false: State) -> State:
  """Row-wise ``where``: ``pred (B,)`` picks rows of each ``(B, F)`` array."""
  pred = pred[:, None]
  return tuple(
    jnp.where(pred, a, b) for a, b in zip(on_true, on_false, strict=True)
  )


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
def sequence(
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
  _, _, final_state, (outputs, emitted) = _run_forward(
    cell,
    unroll,
    emit,
    False,
    inputs,
    w_i,
    valid,
    w_h,
    b_i,
    b_h,
    initial_state,
    reset_state,
    reset,
    mask,
  )
  return final_state, outputs, emitted


def _run_forward(
  cell,
  unroll,
  emit,
  save,
  inputs,
  w_i,
  valid,
  w_h,
  b_i,
  b_h,
  initial_state,
  reset_state,
  reset,
  mask,
):
  """The forward scan in the inputs' dtype, saving residuals with ``save``.

  Returns ``(clean_inputs, mask in the inputs' dtype, final_state,
  per-step results of _forward_scan)``.
  """
  dtype = inputs.dtype
  clean_inputs, projected = _prepare(inputs, w_i, valid)
  mask_c = None if mask is None else mask.astype(dtype)
  final_state, per_step = _forward_scan(
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
    save=save,
    emit=emit,
  )
  return clean_inputs, mask_c, final_state, per_step


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
  clean_inputs, mask_c, final_state, per_step = _run_forward(
    cell,
    unroll,
    emit,
    True,
    inputs,
    w_i,
    valid,
    w_h,
    b_i,
    b_h,
    initial_state,
    reset_state,
    reset,
    mask,
  )
  outputs, emitted, residuals, h_in = per_step
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


sequence.defvjp(_sequence_forward, _sequence_backward)


def check_shapes(
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


def lstm(
  inputs,
  w_i,
  w_h,
  b,
  initial_carry,
  reset_carry,
  *,
  valid=None,
  reset=None,
  recurrent_mask=None,
  unroll=1,
  return_step_carries=False,
):
  """The LSTM in XLA; as :func:`~.dispatch.lstm_sequence` (checked there)."""
  final, outputs, emitted = sequence(
    gates.LSTM,
    unroll,
    return_step_carries,
    inputs,
    w_i,
    w_h,
    b,
    None,
    tuple(initial_carry),
    tuple(reset_carry),
    _as_bool(valid),
    _as_bool(reset),
    recurrent_mask,
  )
  if not return_step_carries:
    return final, outputs
  (c_steps,) = emitted
  return final, outputs, (c_steps, outputs)


def single_carry(
  cell,
  inputs,
  w_i,
  w_h,
  b_i,
  b_h,
  initial_carry,
  reset_carry,
  *,
  valid=None,
  reset=None,
  recurrent_mask=None,
  unroll=1,
  return_step_carries=False,
):
  """A cell whose carry is ``h`` (GRU, MGU, simple: ``b_h`` None) in XLA.

  With ``return_step_carries`` the outputs double as the carry after every
  step (0 rather than ``h`` at padded steps), at no extra memory.
  """
  (h,), outputs, _ = sequence(
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
    recurrent_mask,
  )
  if return_step_carries:
    return h, outputs, outputs
  return h, outputs
