r"""The gate math of the cells the fused kernels run: LSTM, GRU, MGU, simple.

Each cell is a :class:`GateMath`: a forward step from the projected input
and the recurrent term, and a backward step that turns the cotangent of the
new state into the cotangents of those two terms. The engines
(:mod:`hk_rnn._src.kernels.xla`, and the compiled backend for the cells it
runs) drive them over a whole sequence.

What profiling XLA:CPU showed (two cores, B=32, F=256) and the code below
follows: inside a scan step, elementwise kernels that XLA does not
vectorise cost as much as the recurrent GEMM; transcendentals over column
slices of an array, and arrays assembled from broadcasts and selects, are
such kernels (a concatenate is cheaper). So the gates take one logistic
over the whole ``(B, G*F)`` pre-activation (``activate``), and the
residuals are laid out so that the engine can overwrite buffers in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
State = tuple[Array, ...]  # the carry as a tuple whose last array is h


class GateMath(NamedTuple):
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


def activate(z: Array, tanh_blocks: tuple[bool, ...]) -> Array:
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


def tanh(x: Array) -> Array:
  """tanh, as ``2σ(2x) - 1`` in float32 (see ``activate``)."""
  if jnp.finfo(x.dtype).bits < 32:
    return jnp.tanh(x)
  return 2 * jax.nn.sigmoid(2 * x) - 1


def concat_blocks(*pieces: Array) -> Array:
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
  activations = activate(gx + gh, (False, False, True, False))
  i, f, g, o = jnp.split(activations, 4, axis=-1)
  new_c = f * c + i * g
  tanh_c = jnp.tanh(new_c)
  new_h = o * tanh_c
  if not save:
    return (new_c, new_h), new_h, None
  # σ' = σ(1-σ) and tanh' = 1 - tanh² = (1 - tanh)(1 + tanh).
  derivatives = (1 - activations) * (
    activations + concat_blocks(*(jnp.full_like(c, k) for k in (0, 0, 1, 0)))
  )
  coefficients = derivatives * concat_blocks(g, c, i, tanh_c)
  return (new_c, new_h), new_h, (coefficients, o * (1 - tanh_c * tanh_c), f)


def _lstm_backward(residuals, d_state):
  coefficients, c_from_h, f = residuals
  d_c, d_h = d_state
  d_c = d_c + d_h * c_from_h
  d_z = concat_blocks(d_c, d_c, d_c, d_h) * coefficients
  return d_z, None, (d_c * f, jnp.zeros_like(d_h))


# GRU, with gh = h_in W_h + b_h, u = gx_n + r gh_n, n = tanh(u) and
# h' = n + z (h - n):
#   dn_pre = dh' (1-z)(1-n²);  d_gx = [dn_pre gh_n r(1-r), dh' (h-n) z(1-z),
#   dn_pre];  d_gh = [the same r and z blocks, dn_pre r];  dh (direct) = dh' z.
# The step saves K_x and K_h with d_gx = [dh']*3 ⊙ K_x, d_gh = [dh']*3 ⊙ K_h.


def _gru_step(gx, gh, state, save):
  (h,) = state
  # σ over all three blocks (the n block's is unused): see ``activate``.
  gates = activate(gx + gh, (False, False, False))
  r, z, _ = jnp.split(gates, 3, axis=-1)
  _, _, x_n = jnp.split(gx, 3, axis=-1)
  _, _, h_n = jnp.split(gh, 3, axis=-1)
  n = tanh(x_n + r * h_n)
  new_h = n + z * (h - n)
  if not save:
    return (new_h,), new_h, None
  d_n = (1 - z) * (1 - n * n)
  d_r = d_n * h_n * r * (1 - r)
  d_z = (h - n) * z * (1 - z)
  residuals = (
    concat_blocks(d_r, d_z, d_n),
    concat_blocks(d_r, d_z, d_n * r),
    z,
  )
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
  d_h_blocks = concat_blocks(*(d_h,) * blocks)
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
  # σ over both blocks (the n block's is unused): see ``activate``.
  gates = activate(gx + gh, (False, False))
  f, _ = jnp.split(gates, 2, axis=-1)
  _, x_n = jnp.split(gx, 2, axis=-1)
  _, h_n = jnp.split(gh, 2, axis=-1)
  n = tanh(x_n + f * h_n)
  new_h = n + f * (h - n)
  if not save:
    return (new_h,), new_h, None
  d_n = (1 - f) * (1 - n * n)
  d_f = ((h - n) + d_n * h_n) * f * (1 - f)
  residuals = (concat_blocks(d_f, d_n), concat_blocks(d_f, d_n * f), f)
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


LSTM = GateMath(_lstm_step, _lstm_backward)
GRU = GateMath(
  _gru_step, _interpolating_backward, separate_recurrent_cotangent=True
)
MGU = GateMath(
  _mgu_step, _interpolating_backward, separate_recurrent_cotangent=True
)
SIMPLE = GateMath(_simple_step, _simple_backward)
