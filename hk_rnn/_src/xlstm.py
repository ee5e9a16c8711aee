r"""xLSTM's recurrent cells (Beck et al. 2024): the sLSTM and the mLSTM.

Both cells gate with an exponential input gate ``i = exp(ĩ)`` and a forget
gate ``f = σ(f̃)``. Products of such gates overflow after a few steps, so
each cell keeps a stabiliser ``m`` in its carry, the running maximum of the
log gate weights, and stores its memory divided by ``exp(m)``:

.. math::

    m' = \max(\log\sigma(\tilde f) + m,\ \tilde\imath), \quad
    i = e^{\tilde\imath - m'}, \quad f = e^{\log\sigma(\tilde f) + m - m'}

so that ``i`` and ``f`` lie in ``[0, 1]`` at every step, however long the
sequence and whatever the gate pre-activations.

* :class:`SLSTMCell` has recurrent weights, so its whole-sequence form is
  the fused-kernel engine of ``kernels/xla.py`` (one input GEMM over all
  steps, a hand-written VJP) with the sLSTM's gate math plugged in
  (``_slstm_step``/``_slstm_backward``).
* :class:`MLSTMCell` has none: its whole sequence is computed chunk by chunk
  (``mlstm_chunkwise``), each chunk as stabilised masked attention and
  the chunks linked through the ``(C, n, m)`` carry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hk_rnn._src import cells, dropout
from hk_rnn._src.kernels import dispatch, gates, xla

Array = jax.Array
Initializer = Callable[[Sequence[int], Any], Array]

# Added to the mLSTM's normaliser, as NX-AI/xlstm does.
MLSTM_EPSILON = 1e-6
# Steps per chunk of MLSTMCell's whole-sequence form: on two CPU cores (B=8,
# T=2048, F=128, 4 heads) 32 took 0.27 s of CPU time per training step, 64
# took 0.33 s and 128 took 0.56 s.
MLSTM_CHUNK_SIZE = 32


def _check_heads(features: int, num_heads: Any, context: str) -> int:
  if not isinstance(num_heads, (int, np.integer)) or num_heads <= 0:
    raise ValueError(
      f"{context}: num_heads must be a positive int, got {num_heads!r}"
    )
  if features % num_heads:
    raise ValueError(
      f"{context}: features must be a multiple of num_heads, got "
      f"features={features} and num_heads={num_heads}"
    )
  return int(num_heads)


def _forget_bias_init(num_blocks: int, forget_block: int) -> Initializer:
  """Zeros, but ``linspace(3, 6)`` in the forget block (NX-AI's small init).

  A forget gate that starts near 1 (σ(3) ≈ 0.95 to σ(6) ≈ 0.998) lets the
  memory hold over many steps from the start of training.
  """

  def init(shape, dtype):
    width = shape[-1] // num_blocks
    blocks = [jnp.zeros((width,), dtype) for _ in range(num_blocks)]
    blocks[forget_block] = jnp.linspace(3.0, 6.0, width, dtype=dtype)
    return jnp.concatenate(blocks)

  return init


def _stabilised_gates(
  i_pre: Array, log_f: Array, m: Array, fresh: Array | None = None
) -> tuple[Array, Array, Array]:
  """``(i, f, m')`` of the stabiliser (module docstring), in the step forms.

  Where ``fresh`` (the sLSTM's ``n = 0``), ``m' = ĩ``.
  """
  m_new = jnp.maximum(log_f + m, i_pre)
  if fresh is None:
    return jnp.exp(i_pre - m_new), jnp.exp(log_f + m - m_new), m_new
  m_new = jnp.where(fresh, i_pre, m_new)
  # f multiplies n = 0 there: 1, as NX-AI's min(f, 1), not e^{u - ĩ},
  # which can overflow.
  decay = jnp.where(fresh, 0.0, log_f + m - m_new)
  return jnp.exp(i_pre - m_new), jnp.exp(decay), m_new


# sLSTM

# The fused engine's internals this module uses, named in this one place so
# that a change of the engine touches only these lines: its cell type (a
# step and a backward step), its whole-sequence entry with the hand-written
# VJP, and two helpers of its gate math.
_EngineCell = gates.GateMath
_engine_sequence = xla.sequence
_activate_gates = gates.activate
_gate_blocks = gates.concat_blocks


def _block_diagonal(w_h: Array) -> Array:
  """``w_h (H, F/H, 4F/H)`` as the dense ``(F, 4F)`` matrix it stands for.

  Row ``k·d + r`` (head k, unit r) holds head k's weights in the columns of
  its own units, ``g·F + k·d + c`` for gate block g: ``h @ dense`` is the
  gate-major ``[ĩ, f̃, z̃, õ]`` of the per-head products. Built with
  differentiable ops, its gradient lands in the blocks.
  """
  heads, size, width = w_h.shape
  per_gate = w_h.reshape(heads, size, 4, width // 4)
  dense = jnp.einsum(
    "krgc,kl->krglc", per_gate, jnp.eye(heads, dtype=w_h.dtype)
  )
  return dense.reshape(heads * size, 4 * heads * size)


def _slstm_recurrent(h: Array, w_h: Array) -> Array:
  """``h (..., F)`` through the block-diagonal ``w_h``: ``(..., 4F)``."""
  heads, size, _ = w_h.shape
  per_head = h.reshape((*h.shape[:-1], heads, size))
  gates = jnp.einsum("...kr,krx->...kx", per_head, w_h)
  gates = gates.reshape((*h.shape[:-1], heads, 4, size))
  return jnp.swapaxes(gates, -3, -2).reshape((*h.shape[:-1], 4 * heads * size))


# The fused engine's step and backward for the sLSTM. With u = logσ(f̃) + m,
# m' = (n = 0 ? ĩ : max(u, ĩ)), i = exp(ĩ - m'), f = exp(u - m') (1 where
# n = 0, and constant there), g = tanh z̃, o = σ(õ), c' = f c + i g,
# n' = f n + i, h' = o c'/n':
#   A = dc' + dh' o/n',  N = dn' - dh' h'/n'
#   d_i = A g + N,  d_f = A c + N n,  D = dm' - d_i i - d_f f_u
#   dĩ = d_i i + (1 - s) D,  du = d_f f_u + s D,  df̃ = du (1 - σ(f̃))
#   dz̃ = A i (1 - g²),  dõ = dh' h' (1 - o)
#   dc = A f,  dn = N f,  dm = du
# where f_u is f where it depends on u and m' (0 where n = 0), and s the
# share of m' that u holds: 1 where u > ĩ, ½ on a tie (jnp.maximum's
# derivative), 0 where ĩ wins or n = 0. u > ĩ exactly where f_u = 1 > i.
#
# As for the LSTM (kernels/gates.py), XLA:CPU runs transcendentals over whole arrays
# much faster than over column slices: the gates take one logistic over the
# whole pre-activation (σ(ĩ) is unused) and one exp over [ĩ - m', u - m'].
# The step saves the gate values as separate (B, F) arrays (column slices of
# a saved (B, 4F) array made the backward scan several times slower) and,
# in the place of gx, the coefficients K of dpre = [dĩ, du, A, dh'] ⊙ K; the
# backward step recomputes c', n' and h' from them with a few
# multiplications and one division.


def _slstm_step(gx, gh, state, save):
  c, n, m, _ = state
  pre = gx + gh
  activations = _activate_gates(pre, (False, False, True, False))
  _, sigmoid_f, g, o = jnp.split(activations, 4, axis=-1)
  i_pre, f_pre, _, _ = jnp.split(pre, 4, axis=-1)
  decayed = jax.nn.log_sigmoid(f_pre) + m
  fresh = n == 0
  m_new = jnp.where(fresh, i_pre, jnp.maximum(decayed, i_pre))
  # On a fresh carry f multiplies n = 0 and is 1 (see _stabilised_gates).
  i, f_u = jnp.split(
    jnp.exp(
      jnp.concatenate(
        [i_pre - m_new, jnp.where(fresh, -jnp.inf, decayed - m_new)], axis=-1
      )
    ),
    2,
    axis=-1,
  )
  f = jnp.where(fresh, 1.0, f_u)
  new_c = f * c + i * g
  new_n = f * n + i
  new_h = o * new_c / new_n
  new_state = (new_c, new_n, m_new, new_h)
  if not save:
    return new_state, new_h, None
  coefficients = jnp.concatenate(
    [jnp.ones_like(i), 1 - sigmoid_f, i * (1 - g * g), new_h * (1 - o)],
    axis=-1,
  )
  return new_state, new_h, (coefficients, i, f_u, g, o, c, n)


def _slstm_backward(residuals, d_state):
  coefficients, i, f_u, g, o, c, n = residuals
  f = jnp.where(n == 0, 1.0, f_u)
  reciprocal = 1 / (f * n + i)
  new_h = o * (f * c + i * g) * reciprocal
  share = jnp.where(f_u == 1, jnp.where(i == 1, 0.5, 1.0), 0.0)
  d_c, d_n, d_m, d_h = d_state
  d_c = d_c + d_h * o * reciprocal
  d_n = d_n - d_h * new_h * reciprocal
  d_i = d_c * g + d_n
  d_f = d_c * c + d_n * n
  d_stabiliser = d_m - d_i * i - d_f * f_u
  d_decayed = d_f * f_u + share * d_stabiliser
  d_i_pre = d_i * i + (1 - share) * d_stabiliser
  d_pre = _gate_blocks(d_i_pre, d_decayed, d_c, d_h) * coefficients
  return d_pre, None, (d_c * f, d_n * f, d_decayed, jnp.zeros_like(d_h))


_SLSTM = _EngineCell(_slstm_step, _slstm_backward)


def _slstm_engine(
  inputs,
  w_i,
  w_h_dense,
  b,
  initial,
  reset_carry,
  valid,
  reset,
  mask,
  unroll,
  emit,
):
  """The engine with the sLSTM's gate math: ``(final, outputs, emitted)``."""
  # No faster backend runs the sLSTM: recorded for ``hk_rnn.explain``.
  dispatch.choose("slstm", {})
  return _engine_sequence(
    _SLSTM,
    unroll,
    emit,
    inputs,
    w_i,
    w_h_dense,
    b,
    None,
    initial,
    reset_carry,
    None if valid is None else jnp.asarray(valid, bool),
    None if reset is None else jnp.asarray(reset, bool),
    mask,
  )


def _lecun_per_head(shape, dtype):
  """Truncated normal with variance ``1/fan_in``, fan_in = F/H (one head)."""
  stddev = 1.0 / math.sqrt(shape[-2])
  return hk.initializers.TruncatedNormal(stddev)(shape, dtype)


class SLSTMCell(cells.GatedCell):
  r"""xLSTM's sLSTM (Beck et al. 2024), as NX-AI/xlstm's reference computes it.

  .. math::

      [\tilde\imath, \tilde f, \tilde z, \tilde o] &= x W_i + h W_h + b \\
      m' &= \max(\log\sigma(\tilde f) + m,\ \tilde\imath), \quad
      i = e^{\tilde\imath - m'}, \quad f = e^{\log\sigma(\tilde f) + m - m'} \\
      c' &= f \odot c + i \odot \tanh(\tilde z), \quad n' = f \odot n + i \\
      h' &= \sigma(\tilde o) \odot c' / n'

  ``c`` and ``n`` are the cell and normaliser states divided by ``e^m``:
  their ratio, hence every ``h``, is what the unstabilised exponential gates
  give, but ``i, f <= 1`` so nothing overflows at any length. Where ``n`` is
  0 (a fresh carry) ``m' = ĩ``, as in NX-AI's code: the first step then
  stores ``i = 1`` rather than a gate that could underflow to 0.

  Parameters: ``w_i (in, 4F)``, ``b (4F,)`` in gate blocks i, f, z, o, and
  the block-diagonal recurrent weight ``w_h (H, F/H, 4F/H)``: head k's
  units ``h[k·F/H : (k+1)·F/H]`` feed only head k's gates, each head's
  columns in blocks i, f, z, o. The carry is ``(c, n, m, h)``, all zero at
  the start; the output is ``h'``. Under ``RNN(fused=True)`` a whole
  sequence runs in the fused kernel (one input GEMM, a hand-written VJP).

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x):
  ...   return hk_rnn.RNN(hk_rnn.SLSTMCell(8, num_heads=2))(x)
  >>> model = hk.without_apply_rng(hk.transform(forward))
  >>> x = jnp.ones((3, 5, 4))                         # (batch, time, in)
  >>> params = model.init(jax.random.key(0), x)
  >>> params["slstm_cell"]["w_h"].shape
  (2, 4, 16)
  >>> (c, n, m, h), y = model.apply(params, x)
  >>> h.shape, y.shape
  ((3, 8), (3, 5, 8))

  Args:
    features: ``F``, the size of ``c``, ``n``, ``m`` and ``h``.
    num_heads: ``H``, the number of diagonal blocks of ``w_h``; divides
      ``F``.
    w_i_init: initializer of ``w_i`` (LeCun normal).
    w_h_init: initializer of ``w_h`` (truncated normal, variance ``H/F``).
    b_init: initializer of ``b`` (zeros; ``linspace(3, 6)`` in the forget
      block).
    carry_init: ``carry_init(shape, dtype)`` for each carry array (zeros).
    dtype: the computation dtype; by default the promotion of the inputs'
      and the parameters' dtypes.
    param_dtype: the dtype parameters are stored in.
    dropout_rate: variational dropout on the inputs (applied by ``RNN``).
    recurrent_dropout_rate: variational dropout on ``h`` before ``W_h``.
    name: the module name.
  """

  _num_blocks = 4
  _carry_size = 4

  def __init__(
    self,
    features: int,
    *,
    num_heads: int = 1,
    w_i_init: Initializer | None = None,
    w_h_init: Initializer | None = None,
    b_init: Initializer | None = None,
    carry_init: Initializer = jnp.zeros,
    dtype: Any | None = None,
    param_dtype: Any = jnp.float32,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    name: str | None = None,
  ):
    super().__init__(
      features,
      w_i_init=w_i_init,
      w_h_init=w_h_init or _lecun_per_head,
      b_init=b_init or _forget_bias_init(4, 1),
      carry_init=carry_init,
      dtype=dtype,
      param_dtype=param_dtype,
      dropout_rate=dropout_rate,
      recurrent_dropout_rate=recurrent_dropout_rate,
      name=name,
    )
    self.num_heads = _check_heads(self.features, num_heads, "SLSTMCell")

  def _weights(self, input_size: int) -> tuple[Array, Array, Array]:
    """``w_i``, ``w_h`` and ``b`` as stored (in ``param_dtype``)."""
    size = self.features // self.num_heads
    w_i = self._parameter("w_i", (input_size, 4 * self.features), self.w_i_init)
    w_h = self._parameter(
      "w_h", (self.num_heads, size, 4 * size), self.w_h_init
    )
    b = self._parameter("b", (4 * self.features,), self.b_init)
    return w_i, w_h, b

  def __call__(
    self,
    carry: tuple[Array, Array, Array, Array],
    inputs: Array,
    *,
    recurrent_mask: Array | None = None,
  ) -> tuple[tuple[Array, Array, Array, Array], Array]:
    """One step: ``inputs (*batch, in)``, carry ``(c, n, m, h)`` each ``(*batch, F)``."""
    self._check_inputs(inputs)
    dtype = self._compute_dtype(inputs.dtype)
    c, n, m, h = (part.astype(dtype) for part in carry)
    w_i, w_h, b = (p.astype(dtype) for p in self._weights(inputs.shape[-1]))
    if recurrent_mask is not None:
      h = h * recurrent_mask
    pre = inputs.astype(dtype) @ w_i + _slstm_recurrent(h, w_h) + b
    i_pre, f_pre, z_pre, o_pre = jnp.split(pre, 4, axis=-1)
    # A fresh carry (n = 0) starts the stabiliser at ĩ: i = 1, f·0 = 0.
    i, f, m_new = _stabilised_gates(
      i_pre, jax.nn.log_sigmoid(f_pre), m, fresh=n == 0
    )
    new_c = f * c + i * jnp.tanh(z_pre)
    new_n = f * n + i
    new_h = jax.nn.sigmoid(o_pre) * new_c / new_n
    return (new_c, new_n, m_new, new_h), new_h

  def fused_sequence(self, inputs, initial_carry, steps):
    """The whole sequence in the fused engine with the sLSTM's gate math."""
    dtype = self._compute_dtype(inputs.dtype)
    # Uncast, so that weight gradients accumulate in float32.
    w_i, w_h, b = self._weights(inputs.shape[-1])
    initial = tuple(initial_carry)
    reset_carry = steps.reset_carry
    reset_carry = initial if reset_carry is None else tuple(reset_carry)
    recurrent_mask = steps.recurrent_mask
    final, outputs, emitted = _slstm_engine(
      inputs.astype(dtype),
      w_i,
      _block_diagonal(w_h),
      b,
      initial,
      reset_carry,
      steps.valid,
      steps.reset,
      None if recurrent_mask is None else recurrent_mask.astype(dtype),
      steps.unroll,
      steps.return_step_carries,
    )
    if not steps.return_step_carries:
      return final, outputs
    # The engine emits (c, n, m) after every step; h after it is the output
    # (0 at padded steps, whose carries are never read).
    return final, outputs, (*emitted, outputs)


# mLSTM


def _mlstm_readout(numerator, normaliser, m, dtype):
  """``h̃ = numerator / (max(|normaliser|, e^{-m}) + ε)``, per head."""
  denominator = jnp.maximum(jnp.abs(normaliser), jnp.exp(-m)) + MLSTM_EPSILON
  return numerator / denominator[..., None].astype(dtype)


def mlstm_chunkwise(
  q: Array,
  k: Array,
  v: Array,
  i_pre: Array,
  f_pre: Array,
  initial_carry: tuple[Array, Array, Array],
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: tuple[Array, Array, Array] | None = None,
  chunk_size: int = MLSTM_CHUNK_SIZE,
  return_step_carries: bool = False,
):
  r"""The mLSTM's recurrence over a whole sequence, chunk by chunk.

  Unrolled, the stabilised step recurrence gives, for step ``t`` of a
  segment that starts from the carry ``(C_0, n_0, m_0)``, with
  ``b_t = Σ_{s≤t} log σ(f̃_s)`` (from the segment's start):

  .. math::

      w_{t0} = b_t + m_0, \quad w_{ts} = b_t - b_s + \tilde\imath_s
      \ (s \le t), \quad m_t = \max(w_{t0}, \max_s w_{ts}) \\
      C_t q_t = e^{w_{t0} - m_t} C_0 q_t
        + \sum_s e^{w_{ts} - m_t} (k_s \cdot q_t)\, v_s

  and ``n_tᵀq_t`` likewise with ``k_s`` for ``v_s``: within a chunk this is
  masked attention with decay weights, and ``m_t`` is exactly the step
  form's stabiliser. Chunks run in sequence, each from the carry the last
  left. The mask keeps each step to its own segment (``reset`` starts one,
  from ``reset_carry``) and drops padded steps, which act as ``f = 1``,
  ``i = 0``: the carry passes them unchanged.

  Args:
    q, k, v: ``(T, B, H, d)``; ``k`` already scaled by ``1/√d``.
    i_pre, f_pre: ``(T, B, H)`` gate pre-activations.
    initial_carry: ``(C (B, H, d, d), n (B, H, d), m (B, H))``.
    valid: ``(T, B)`` bool, False at padded steps (whose inputs must be
      finite); None: all valid.
    reset: ``(T, B)`` bool, True where a segment starts; None: never.
    reset_carry: the carry such a segment starts from (None: the initial).
    chunk_size: steps per chunk.
    return_step_carries: also return the carry after every step.

  Returns:
    ``(final_carry, h̃ (T, B, H, d))``, and with ``return_step_carries``
    the carries after every step, leaves ``(T, B, ...)``. ``h̃`` at padded
    steps is that of the frozen carry (callers zero it).
  """
  steps, batch, heads, _ = q.shape
  dtype = q.dtype
  initial_carry = tuple(initial_carry)
  if reset is not None and reset_carry is None:
    reset_carry = initial_carry
  if valid is None:
    valid = jnp.ones((steps, batch), bool)
  size = max(1, min(chunk_size, steps))
  chunks = -(-steps // size)
  extra = chunks * size - steps

  def split(array, fill):
    if array is None:
      return None
    if extra:
      padding = jnp.full((extra, *array.shape[1:]), fill, array.dtype)
      array = jnp.concatenate([array, padding])
    return array.reshape((chunks, size, *array.shape[1:]))

  log_f = jnp.where(valid[..., None], jax.nn.log_sigmoid(f_pre), 0)
  position = jnp.arange(size)
  causal = position[:, None] >= position[None, :]

  def chunk(carry, chunk_inputs):
    q, k, v, i_pre, log_f, valid, reset = chunk_inputs
    b = jnp.cumsum(log_f, axis=0)  # (L, B, H)
    sources = causal[:, :, None] & valid[None]  # (t, s, B)
    carry_weight = b + carry[2]
    states = [carry]
    if reset is not None:
      # The step each row's segment started at (0: before this chunk).
      start = lax.cummax(jnp.where(reset, position[:, None], 0), axis=0)
      restarted = lax.cummax(reset.astype(jnp.int32), axis=0) > 0  # (L, B)
      sources = sources & (position[None, :, None] >= start[:, None])
      before_start = jnp.take_along_axis(
        b - log_f, jnp.broadcast_to(start[..., None], b.shape), axis=0
      )
      carry_weight = jnp.where(
        restarted[..., None],
        b - before_start + reset_carry[2],
        carry_weight,
      )
      states.append(reset_carry)
    sources = sources[..., None]  # (t, s, B, 1)
    log_weights = b[:, None] - b[None, :] + i_pre[None]  # (t, s, B, H)
    stabiliser = jnp.maximum(
      carry_weight, jnp.max(jnp.where(sources, log_weights, -jnp.inf), axis=1)
    )
    weights = jnp.exp(
      jnp.where(sources, log_weights - stabiliser[:, None], -jnp.inf)
    )
    from_carry = jnp.exp(carry_weight - stabiliser)  # (L, B, H)
    scores = jnp.einsum("tbhd,sbhd->tsbh", q, k) * weights
    numerator = jnp.einsum("tsbh,sbhd->tbhd", scores, v)
    normaliser = jnp.sum(scores, axis=1)

    def carry_term(state):
      c, n, _ = state
      return (
        jnp.einsum("bhad,tbhd->tbha", c, q),
        jnp.einsum("bhd,tbhd->tbh", n, q),
      )

    c_q, n_q = carry_term(states[0])
    if reset is not None:
      reset_c_q, reset_n_q = carry_term(states[1])
      c_q = jnp.where(restarted[..., None, None], reset_c_q, c_q)
      n_q = jnp.where(restarted[..., None], reset_n_q, n_q)
    numerator = numerator + from_carry[..., None] * c_q
    normaliser = normaliser + from_carry * n_q
    h = _mlstm_readout(numerator, normaliser, stabiliser, dtype)

    def carries_at(rows):
      """The carry after steps ``rows`` of this chunk."""
      c, n, _ = states[0]
      if reset is not None:
        pick = restarted[rows]
        c = jnp.where(pick[..., None, None, None], states[1][0], c)
        n = jnp.where(pick[..., None, None], states[1][1], n)
      w, scale = weights[rows], from_carry[rows]
      return (
        jnp.einsum("...sbh,sbha,sbhd->...bhad", w, v, k)
        + scale[..., None, None] * c,
        jnp.einsum("...sbh,sbhd->...bhd", w, k) + scale[..., None] * n,
        stabiliser[rows],
      )

    new_carry = carries_at(size - 1)
    if not return_step_carries:
      return new_carry, h
    return new_carry, (h, carries_at(slice(None)))

  final, outputs = lax.scan(
    chunk,
    tuple(a.astype(dtype) for a in initial_carry),
    (
      split(q, 0),
      split(k, 0),
      split(v, 0),
      split(i_pre, 0),
      split(log_f, 0),
      split(valid, False),
      split(reset, False),
    ),
  )

  def unsplit(leaf):
    return leaf.reshape((chunks * size, *leaf.shape[2:]))[:steps]

  outputs = jax.tree.map(unsplit, outputs)
  if not return_step_carries:
    return final, outputs
  h, step_carries = outputs
  return final, h, step_carries


class MLSTMCell(cells.RNNCellBase):
  r"""xLSTM's mLSTM (Beck et al. 2024): a matrix memory, no recurrent weight.

  With ``F = H·d``, per head (``q, k, v`` of ``d`` features, ``ĩ, f̃``
  scalars):

  .. math::

      q &= x W_q, \quad k = x W_k / \sqrt d, \quad v = x W_v, \quad
      [\tilde\imath, \tilde f] = x W_{if} + b_{if} \\
      m' &= \max(\log\sigma(\tilde f) + m,\ \tilde\imath), \quad
      i = e^{\tilde\imath - m'}, \quad f = e^{\log\sigma(\tilde f) + m - m'} \\
      C' &= f C + i\, v k^\top, \quad n' = f n + i k \\
      \tilde h &= C' q \,/\, (\max(|n'^\top q|, e^{-m'}) + 10^{-6})

  and the output is ``σ(x W_o + b_o) ⊙ h̃`` (heads concatenated). This is
  NX-AI/xlstm's ``recurrent_step_stabilized_simple``. ``C`` and ``n`` are
  stored divided by ``e^m`` (``m`` the running maximum of the log gate
  weights), so ``i, f <= 1`` and nothing overflows; the floor ``e^{-m'}`` is
  1 in unstabilised terms.

  Parameters: ``w_q, w_k, w_v, w_o (in, F)``, ``b_o (F,)``,
  ``w_if (in, 2H)``, ``b_if (2H,)`` (blocks i, f). The carry is
  ``(C (*batch, H, d, d), n (*batch, H, d), m (*batch, H))``, zero at the
  start. Under ``RNN(fused=True)`` a whole sequence is computed
  chunkwise-parallel (``mlstm_chunkwise``), with the step form's
  numbers.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, lengths):
  ...   return hk_rnn.RNN(hk_rnn.MLSTMCell(8, num_heads=2))(
  ...       x, seq_lengths=lengths)
  >>> model = hk.without_apply_rng(hk.transform(forward))
  >>> x, lengths = jnp.ones((3, 5, 4)), jnp.array([5, 2, 0])
  >>> (c, n, m), y = model.apply(model.init(jax.random.key(0), x, lengths),
  ...                            x, lengths)
  >>> c.shape, n.shape, m.shape, y.shape
  ((3, 2, 4, 4), (3, 2, 4), (3, 2), (3, 5, 8))

  Args:
    features: ``F``, the output size; the other arguments are keyword-only.
    num_heads: ``H``; divides ``F``.
    w_init: initializer of ``w_q, w_k, w_v, w_o`` (LeCun normal).
    w_if_init: initializer of ``w_if`` (zeros, as NX-AI's).
    b_init: initializer of ``b_o`` (zeros).
    b_if_init: initializer of ``b_if`` (zeros; ``linspace(3, 6)`` in the
      forget block).
    dtype: the computation dtype; by default the promotion of the inputs'
      and the parameters' dtypes.
    param_dtype: the dtype parameters are stored in.
    dropout_rate: variational dropout on the inputs (applied by ``RNN``).
    recurrent_dropout_rate: must be 0: there is no recurrent weight.
    name: the module name.
  """

  def __init__(
    self,
    features: int,
    *,
    num_heads: int = 1,
    w_init: Initializer | None = None,
    w_if_init: Initializer | None = None,
    b_init: Initializer | None = None,
    b_if_init: Initializer | None = None,
    dtype: Any | None = None,
    param_dtype: Any = jnp.float32,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    name: str | None = None,
  ):
    super().__init__(name=name)
    context = type(self).__name__
    self.features = cells.check_features(features, context)
    self.num_heads = _check_heads(self.features, num_heads, context)
    if recurrent_dropout_rate != 0:
      raise ValueError(
        f"{context}: recurrent_dropout_rate must be 0 (the cell has no "
        f"recurrent weight), got {recurrent_dropout_rate!r}"
      )
    self.w_init = w_init or cells.LECUN_NORMAL
    self.w_if_init = w_if_init or jnp.zeros
    self.b_init = b_init or jnp.zeros
    self.b_if_init = b_if_init or _forget_bias_init(2, 1)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.dropout_rate = dropout.check_rate(
      dropout_rate, "dropout_rate", context
    )
    self.recurrent_dropout_rate = 0.0

  @property
  def head_size(self) -> int:
    """``d = F / H``."""
    return self.features // self.num_heads

  def _compute_dtype(self, inputs_dtype) -> Any:
    if self.dtype is not None:
      return self.dtype
    return jnp.result_type(inputs_dtype, self.param_dtype)

  def _check_inputs(self, inputs: Array) -> None:
    if inputs.ndim < 1:
      raise ValueError(
        f"{type(self).__name__}: inputs must have a feature axis, got shape "
        f"{inputs.shape}"
      )

  def _projections(self, inputs: Array):
    """``q, k, v (..., H, d)``, ``ĩ, f̃ (..., H)``, the output gate ``(..., F)``.

    ``inputs (..., in)`` in the computation dtype; one GEMM for all of them.
    """
    size = inputs.shape[-1]
    features, heads = self.features, self.num_heads

    def weight(name, width, init):
      return hk.get_parameter(name, (size, width), self.param_dtype, init=init)

    def bias(name, width, init):
      return hk.get_parameter(name, (width,), self.param_dtype, init=init)

    w = jnp.concatenate(
      [
        weight("w_q", features, self.w_init),
        weight("w_k", features, self.w_init),
        weight("w_v", features, self.w_init),
        weight("w_o", features, self.w_init),
        weight("w_if", 2 * heads, self.w_if_init),
      ],
      axis=1,
    ).astype(inputs.dtype)
    b = jnp.concatenate(
      [
        jnp.zeros((3 * features,), self.param_dtype),
        bias("b_o", features, self.b_init),
        bias("b_if", 2 * heads, self.b_if_init),
      ]
    ).astype(inputs.dtype)
    lead = inputs.shape[:-1]
    flat = inputs.reshape((-1, size)) @ w + b
    q, k, v, o, gates = jnp.split(flat, np.cumsum([features] * 4), axis=-1)

    def per_head(x):
      return x.reshape((*lead, heads, self.head_size))

    k = k / math.sqrt(self.head_size)
    i_pre, f_pre = jnp.split(gates.reshape((*lead, 2 * heads)), 2, axis=-1)
    return (
      per_head(q),
      per_head(k),
      per_head(v),
      i_pre,
      f_pre,
      jax.nn.sigmoid(o).reshape((*lead, features)),
    )

  def __call__(
    self, carry: tuple[Array, Array, Array], inputs: Array
  ) -> tuple[tuple[Array, Array, Array], Array]:
    """One step: ``inputs (*batch, in)``, carry ``(C, n, m)``."""
    self._check_inputs(inputs)
    dtype = self._compute_dtype(inputs.dtype)
    c, n, m = (part.astype(dtype) for part in carry)
    q, k, v, i_pre, f_pre, gate = self._projections(inputs.astype(dtype))
    i, f, m_new = _stabilised_gates(i_pre, jax.nn.log_sigmoid(f_pre), m)
    new_c = f[..., None, None] * c + i[..., None, None] * (
      v[..., :, None] * k[..., None, :]
    )
    new_n = f[..., None] * n + i[..., None] * k
    h = _mlstm_readout(
      jnp.einsum("...ad,...d->...a", new_c, q),
      jnp.sum(new_n * q, axis=-1),
      m_new,
      dtype,
    )
    output = gate * h.reshape(gate.shape)
    return (new_c, new_n, m_new), output

  def initialize_carry(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> tuple[Array, Array, Array]:
    """Zeros: ``C (*batch, H, d, d)``, ``n (*batch, H, d)``, ``m (*batch, H)``.

    ``rng`` is unused (the carry is not random); it is accepted as by every
    cell.
    """
    del rng
    self._check_inputs(sample_inputs)
    lead = (*sample_inputs.shape[:-1], self.num_heads)
    dtype = self._compute_dtype(sample_inputs.dtype)
    size = self.head_size
    return (
      jnp.zeros((*lead, size, size), dtype),
      jnp.zeros((*lead, size), dtype),
      jnp.zeros(lead, dtype),
    )

  def dropout_masks(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> dropout.DropoutMasks:
    """The input dropout mask (shaped like one step of input), scaled.

    Draws from ``rng`` when given, else from ``hk.next_rng_key()`` when
    ``dropout_rate`` is non-zero. There is never a recurrent mask.
    """
    return dropout.input_masks(
      self.dropout_rate,
      sample_inputs,
      self._compute_dtype(sample_inputs.dtype),
      rng,
    )

  def fused_sequence(self, inputs, initial_carry, steps):
    """The whole sequence chunkwise-parallel (``mlstm_chunkwise``).

    No per-step loop (``steps.unroll`` is unused) and no recurrent weight
    (never a recurrent mask).
    """
    valid, reset = steps.valid, steps.reset
    dtype = self._compute_dtype(inputs.dtype)
    inputs = inputs.astype(dtype)
    if valid is not None:
      valid = jnp.asarray(valid, bool)
      inputs = jnp.where(valid[..., None], inputs, 0)
    q, k, v, i_pre, f_pre, gate = self._projections(inputs)
    dispatch.choose("mlstm chunkwise", {})  # recorded for hk_rnn.explain
    result = mlstm_chunkwise(
      q,
      k,
      v,
      i_pre,
      f_pre,
      initial_carry,
      valid=valid,
      reset=None if reset is None else jnp.asarray(reset, bool),
      reset_carry=steps.reset_carry,
      return_step_carries=steps.return_step_carries,
    )
    final, h = result[:2]
    outputs = gate * h.reshape(gate.shape)
    if valid is not None:
      outputs = jnp.where(valid[..., None], outputs, 0)
    if steps.return_step_carries:
      return final, outputs, result[2]
    return final, outputs
