r"""Griffin's RG-LRU and recurrent block (De et al. 2024) as hk_rnn cells.

:class:`RGLRUCell` is the real-gated linear recurrent unit, a
:class:`~hk_rnn.LinearRecurrentCell` whose first step of a segment differs
from the others (it does not normalise its input). :class:`GriffinCell` is
the recurrent block of Griffin and Hawk: two dense branches, a short causal
convolution and the RG-LRU, with the convolution's last inputs in the carry.
Both compute what google-deepmind/recurrentgemma's JAX modules (``RGLRU``,
``Conv1D``, ``RecurrentBlock``) compute for the same weights, with
``segment_pos == 0`` at the first step of every segment.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from hk_rnn._src import cells, min_cells

Array = jax.Array
Initializer = Callable[[Sequence[int], Any], Array]

# recurrentgemma bounds the derivative of √x at this value.
_SQRT_MAX_GRADIENT = 1000.0


@jax.custom_vjp
def bounded_sqrt(x: Array) -> Array:
  r"""``√x`` whose derivative is at most 1000: ``1 / (2 √max(x, 1/(4·1000²)))``.

  Near ``x = 0`` the true derivative ``1/(2√x)`` is unbounded; the RG-LRU's
  ``√(1 − a²)`` reaches it when ``a → 1``, which in low precision gives NaN
  gradients. The value is the exact square root.

  >>> round(float(jax.grad(bounded_sqrt)(0.0)))
  1000
  """
  return jnp.sqrt(x)


def _bounded_sqrt_forward(x):
  return jnp.sqrt(x), x


def _bounded_sqrt_backward(x, cotangent):
  floor = 1.0 / (4.0 * _SQRT_MAX_GRADIENT**2)
  clipped = jnp.maximum(x, jnp.asarray(floor, x.dtype))
  return (cotangent * 0.5 / jnp.sqrt(clipped),)


bounded_sqrt.defvjp(_bounded_sqrt_forward, _bounded_sqrt_backward)


def ring_init(min_radius: float, max_radius: float) -> Initializer:
  """``a_param`` such that ``a = exp(−softplus(a_param))`` (its value with
  the gate at 1/8, i.e. ``c·r = 1``) lies uniformly in area on the ring
  ``min_radius ≤ |a| ≤ max_radius``: recurrentgemma's initialisation."""

  def init(shape, dtype):
    uniform = jax.random.uniform(hk.next_rng_key(), shape, jnp.float32)
    log_radius = 0.5 * jnp.log(
      uniform * (max_radius**2 - min_radius**2) + min_radius**2 + 1e-8
    )
    # softplus(p) = −log_radius  ⇔  p = log(exp(−log_radius) − 1).
    return jnp.log(jnp.expm1(-log_radius)).astype(dtype)

  return init


class BlockDiagonalLinear(hk.Module):
  """``x·W + b`` with ``W`` block-diagonal: ``w (H, F/H, F/H)``, ``b (H, F/H)``.

  The input's last axis is cut into ``H`` blocks, each multiplied by its own
  square matrix.
  """

  def __init__(
    self,
    num_blocks: int,
    *,
    w_init: Initializer,
    param_dtype: Any,
    name: str | None = None,
  ):
    super().__init__(name=name)
    self.num_blocks = num_blocks
    self.w_init = w_init
    self.param_dtype = param_dtype

  def __call__(self, inputs: Array) -> Array:
    heads = self.num_blocks
    size = inputs.shape[-1] // heads
    w = hk.get_parameter(
      "w", (heads, size, size), self.param_dtype, init=self.w_init
    )
    b = hk.get_parameter("b", (heads, size), self.param_dtype, init=jnp.zeros)
    w, b = w.astype(inputs.dtype), b.astype(inputs.dtype)
    if heads == 1:  # one plain GEMM: XLA:CPU's fast path
      return inputs @ w[0] + b[0]
    flat = inputs.reshape((-1, heads, size))
    outputs = jnp.matmul(jnp.swapaxes(flat, 0, 1), w)  # (heads, rows, size)
    outputs = jnp.swapaxes(outputs, 0, 1) + b
    return outputs.reshape(inputs.shape)


def _check_positive(value: Any, name: str, context: str) -> int:
  if (
    isinstance(value, (bool, np.bool_))
    or not isinstance(value, (int, np.integer))
    or value < 1
  ):
    raise ValueError(f"{context}: {name} must be a positive int, got {value!r}")
  return int(value)


def _check_divides(num_heads: int, width: int, name: str, context: str):
  if width % num_heads:
    raise ValueError(
      f"{context}: num_heads must divide {name} = {width}, got "
      f"num_heads={num_heads}"
    )


_FAN_IN_NORMAL = hk.initializers.VarianceScaling(1.0, "fan_in", "normal")


class RGLRUCell(min_cells.LinearRecurrentCell):
  r"""Griffin's real-gated linear recurrent unit (De et al., 2024).

  .. math::

      i &= \sigma(x W_x + b_x), \quad r = \sigma(x W_a + b_a)
          \quad \text{(block-diagonal, per head)} \\
      \log a &= -c\, r \odot \operatorname{softplus}(\Lambda) \\
      h' &= a \odot h + \sqrt{1 - a^2} \odot (i \odot x)

  At the first step of a sequence (a packed segment, a row's first step)
  the input is not normalised, :math:`h' = a \odot h_0 + i \odot x`; with
  the default zero carry that is recurrentgemma's reset step,
  :math:`h' = i \odot x`. The derivative of :math:`\sqrt{1 - a^2}` is bounded
  as recurrentgemma bounds it (``bounded_sqrt``). ``RNN`` marks the
  first steps (see :attr:`takes_segment_starts`); to continue a streamed
  sequence, pass ``initial_segment_ids`` so that the chunk's first step is
  not taken for a new start.

  Parameters: ``a_param (F,)`` (:math:`\Lambda`, recurrentgemma's
  ``a_param``), and sub-modules ``input_gate`` and ``a_gate``, each
  ``w (H, F/H, F/H)``, ``b (H, F/H)``. Inputs have ``F`` features. The carry
  ``h (..., F)`` is float32 whatever the computation dtype (float64 when
  computing in float64); the output is ``h'`` in the computation dtype.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, mask):
  ...   return hk_rnn.RNN(hk_rnn.RGLRUCell(8, num_heads=2))(x, mask)
  >>> model = hk.without_apply_rng(hk.transform(forward))
  >>> x, mask = jnp.ones((2, 5, 8)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  >>> params = model.init(jax.random.key(0), x, mask)
  >>> h, y = model.apply(params, x, mask)
  >>> h.shape, y.shape, params["rglru_cell/~/input_gate"]["w"].shape
  ((2, 8), (2, 5, 8), (2, 4, 4))

  Args:
    features: ``F``; the other arguments are keyword-only.
    num_heads: ``H``, the number of diagonal blocks of the gates.
    c: the constant :math:`c` (8 in the paper).
    min_radius, max_radius: ``a_param`` is drawn so that
      :math:`e^{-\operatorname{softplus}(\Lambda)}` is uniform in area on this
      ring (``ring_init``).
    w_init: initializer of the gates' ``w`` (normal, variance 1/fan-in).
    **options: ``carry_init``, ``dtype``, ``param_dtype``, ``dropout_rate``,
      ``recurrent_dropout_rate`` (must be 0), ``scan_method``, ``name``, as
      for :class:`~hk_rnn.LinearRecurrentCell`.
  """

  def __init__(
    self,
    features: int,
    *,
    num_heads: int = 1,
    c: float = 8.0,
    min_radius: float = 0.9,
    max_radius: float = 0.999,
    w_init: Initializer | None = None,
    **options,
  ):
    super().__init__(features, **options)
    context = type(self).__name__
    self.num_heads = _check_positive(num_heads, "num_heads", context)
    _check_divides(self.num_heads, self.features, "features", context)
    if not 0 <= min_radius <= max_radius < 1:
      raise ValueError(
        f"{context}: min_radius and max_radius must satisfy 0 <= min_radius "
        f"<= max_radius < 1, got {min_radius!r} and {max_radius!r}"
      )
    self.c = float(c)
    self.min_radius = float(min_radius)
    self.max_radius = float(max_radius)
    w_init = w_init or _FAN_IN_NORMAL
    self.input_gate = BlockDiagonalLinear(
      self.num_heads,
      w_init=w_init,
      param_dtype=self.param_dtype,
      name="input_gate",
    )
    self.a_gate = BlockDiagonalLinear(
      self.num_heads, w_init=w_init, param_dtype=self.param_dtype, name="a_gate"
    )

  def _carry_dtype(self, compute_dtype) -> Any:
    # recurrentgemma accumulates the recurrence in float32 whatever the
    # activations' dtype.
    return jnp.promote_types(jnp.float32, compute_dtype)

  def coefficients(
    self, inputs: Array, segment_starts: Array
  ) -> tuple[Array, Array]:
    r"""``a`` and ``b = √(1−a²)·i·x``, ``b = i·x`` at first steps."""
    min_cells.check_input_features(inputs, self.features, type(self).__name__)
    a_param = self._parameter(
      "a_param",
      (self.features,),
      ring_init(self.min_radius, self.max_radius),
    ).astype(inputs.dtype)
    input_gate = jax.nn.sigmoid(self.input_gate(inputs))
    a_gate = jax.nn.sigmoid(self.a_gate(inputs))
    log_a = -self.c * a_gate * jax.nn.softplus(a_param)
    a, a_squared = jnp.exp(log_a), jnp.exp(2 * log_a)
    multiplier = bounded_sqrt(1 - a_squared)
    multiplier = jnp.where(
      segment_starts[..., None], jnp.ones((), multiplier.dtype), multiplier
    )
    return a, (inputs * input_gate) * multiplier


class _CausalConv(hk.Module):
  """The parameters of :class:`GriffinCell`'s convolution: ``w (K, L)``,
  ``b (L,)``; ``w[K − 1]`` weighs the current step, ``w[0]`` the oldest."""

  def __init__(self, width: int, lru_width: int, param_dtype, name=None):
    super().__init__(name=name)
    self.width = width
    self.lru_width = lru_width
    self.param_dtype = param_dtype

  def __call__(self, dtype) -> tuple[Array, Array]:
    w = hk.get_parameter(
      "w",
      (self.width, self.lru_width),
      self.param_dtype,
      init=hk.initializers.VarianceScaling(0.01, "fan_in", "normal"),
    )
    b = hk.get_parameter(
      "b", (self.lru_width,), self.param_dtype, init=jnp.zeros
    )
    return w.astype(dtype), b.astype(dtype)


def _segment_taps(u, initial_history, reset_history, reset):
  """What the convolution sees at every step, looking back 0, 1, ... K−1.

  ``u (T, B, L)`` in processing order; ``initial_history`` and
  ``reset_history`` ``(B, K−1, L)`` (oldest first) are what precedes a
  row's first step and a segment that starts at a ``reset`` step. Tap ``j``
  at step ``t`` is ``u[t − j]`` when that step is in ``t``'s segment, else
  the history entry it reaches back to: never a value of another segment,
  exactly as the step loop sees it.

  Returns a list of ``K`` arrays ``(T, B, L)``, tap 0 (the step itself)
  first.
  """
  time = u.shape[0]
  depth = initial_history.shape[1]
  # The row's history, then its steps: tap j is this shifted by j steps.
  extended = jnp.concatenate([jnp.swapaxes(initial_history, 0, 1), u])
  taps = [
    extended[depth - lag : depth - lag + time] for lag in range(depth + 1)
  ]
  if reset is None or not depth:
    return taps
  steps = jnp.arange(time)[:, None]
  last = lax.cummax(jnp.where(reset, steps, -1), axis=0)
  since = (steps - last)[..., None]  # steps since the segment's reset
  started = (last >= 0)[..., None]  # the segment started at a reset
  for lag in range(1, depth + 1):
    # A tap that reaches `lag - since` steps before the reset reads the
    # reset history's entry `depth - (lag - since)`.
    for entry in range(depth - lag, depth):
      reaches = started & (since == entry - depth + lag)
      taps[lag] = jnp.where(reaches, reset_history[:, entry], taps[lag])
  return taps


class GriffinCell(min_cells.ParallelCellBase):
  r"""Griffin's and Hawk's recurrent block (De et al., 2024) as one cell.

  .. math::

      y &= \operatorname{gelu}(x W_y + b_y), \quad u = x W_x + b_x \\
      v_t &= \textstyle\sum_{k=0}^{K-1} w_k \odot u_{t-K+1+k} + b
          \quad \text{(within the segment)} \\
      h_t &= \text{RG-LRU}(v)_t, \quad
      \text{output} = (h_t \odot y_t) W_{out} + b_{out}

  ``gelu`` is the tanh approximation (``jax.nn.gelu``'s default, as
  recurrentgemma). The convolution's taps never reach into a previous
  segment: before a segment's first step they read the carry's history
  (zeros by default). Sub-modules ``linear_y``, ``linear_x``
  (``hk.Linear``, ``w (in, L)``, ``b (L,)``), ``conv_1d`` (``w (K, L)``,
  ``b (L,)``), ``rg_lru`` (:class:`RGLRUCell`) and ``linear_out``
  (``w (L, width)``, ``b (width,)``).

  The carry is ``(conv_state (..., K−1, L), h (..., L))``: ``conv_state``
  holds the last ``K − 1`` values of ``u``, oldest first (recurrentgemma's
  ``conv1d_state``), ``h`` is the RG-LRU's (``rg_lru_state``, float32). So
  padding, packed rows, reverse, streaming (with ``initial_segment_ids``),
  ``max_segments`` and ``Bidirectional`` work as for any cell. With
  ``RNN(fused=True)`` the dense layers run over all steps at once, then the
  masked convolution and one linear scan.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, mask):
  ...   return hk_rnn.RNN(hk_rnn.GriffinCell(6, lru_width=8))(x, mask)
  >>> model = hk.without_apply_rng(hk.transform(forward))
  >>> x, mask = jnp.ones((2, 5, 6)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  >>> params = model.init(jax.random.key(0), x, mask)
  >>> (conv_state, h), y = model.apply(params, x, mask)
  >>> conv_state.shape, h.shape, y.shape
  ((2, 3, 8), (2, 8), (2, 5, 6))

  Args:
    width: the output features (and, in Griffin, the input's).
    num_heads: the RG-LRU's heads.
    lru_width: ``L``, the width of the convolution and the RG-LRU; ``width``
      by default.
    conv_width: ``K``, the convolution's taps.
    final_w_init_variance_scale: scales the variance of ``linear_out``'s
      initial weights (1, as recurrentgemma's default).
    **options: ``carry_init`` (both carry parts), ``dtype``,
      ``param_dtype``, ``dropout_rate`` (on the inputs),
      ``recurrent_dropout_rate`` (must be 0), ``scan_method``, ``name``.
  """

  def __init__(
    self,
    width: int,
    *,
    num_heads: int = 1,
    lru_width: int | None = None,
    conv_width: int = 4,
    final_w_init_variance_scale: float = 1.0,
    **options,
  ):
    super().__init__(width, **options)
    context = type(self).__name__
    self.width = self.features
    self.lru_width = (
      self.width
      if lru_width is None
      else _check_positive(lru_width, "lru_width", context)
    )
    self.conv_width = _check_positive(conv_width, "conv_width", context)
    self.num_heads = _check_positive(num_heads, "num_heads", context)
    _check_divides(self.num_heads, self.lru_width, "lru_width", context)
    dense = functools.partial(hk.Linear, w_init=_FAN_IN_NORMAL)
    self.linear_y = dense(self.lru_width, name="linear_y")
    self.linear_x = dense(self.lru_width, name="linear_x")
    self.linear_out = hk.Linear(
      self.width,
      w_init=hk.initializers.VarianceScaling(
        final_w_init_variance_scale, "fan_in", "normal"
      ),
      name="linear_out",
    )
    self.conv_1d = _CausalConv(
      self.conv_width, self.lru_width, self.param_dtype, name="conv_1d"
    )
    self.rg_lru = RGLRUCell(
      self.lru_width,
      num_heads=self.num_heads,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      scan_method=self.scan_method,
      name="rg_lru",
    )

  @property
  def takes_segment_starts(self) -> bool:
    return True

  def initialize_carry(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> tuple[Array, Array]:
    """``(conv_state (*batch, K−1, L), h (*batch, L))`` from ``carry_init``
    (zeros by default); ``conv_state`` in the computation dtype, ``h`` in
    float32 (float64 when computing in float64)."""
    if sample_inputs.ndim < 1:
      raise ValueError(
        f"{type(self).__name__}: inputs must have a feature axis, got shape "
        f"{sample_inputs.shape}"
      )
    batch = sample_inputs.shape[:-1]
    dtype = self._compute_dtype(sample_inputs.dtype)

    def build():
      conv_shape = (*batch, self.conv_width - 1, self.lru_width)
      conv_state = jnp.asarray(self.carry_init(conv_shape, dtype), dtype)
      h_dtype = self.rg_lru._carry_dtype(dtype)  # noqa: SLF001
      h_shape = (*batch, self.lru_width)
      return conv_state, jnp.asarray(self.carry_init(h_shape, h_dtype), h_dtype)

    if rng is None:
      return build()
    with hk.with_rng(rng):
      return build()

  def _branches(self, inputs: Array) -> tuple[Array, Array, Any]:
    """``y``, ``u`` (one GEMM each over all leading axes), and the dtype."""
    dtype = self._compute_dtype(inputs.dtype)
    lead = inputs.shape[:-1]
    flat = inputs.astype(dtype).reshape((-1, inputs.shape[-1]))
    y = jax.nn.gelu(self.linear_y(flat))
    u = self.linear_x(flat)
    return (
      y.reshape((*lead, self.lru_width)),
      u.reshape((*lead, self.lru_width)),
      dtype,
    )

  def _output(self, h: Array, y: Array, dtype: Any) -> Array:
    lead = h.shape[:-1]
    joined = (h.astype(dtype) * y).reshape((-1, self.lru_width))
    return self.linear_out(joined).reshape((*lead, self.width))

  def __call__(
    self,
    carry: tuple[Array, Array],
    inputs: Array,
    *,
    segment_start: Array | None = None,
  ) -> tuple[tuple[Array, Array], Array]:
    """One step: ``inputs (*batch, in)``; ``segment_start`` (bool,
    ``(*batch,)``) marks a sequence's first step (``RNN`` passes it)."""
    conv_state, h = carry
    y, u, dtype = self._branches(inputs)
    w, b = self.conv_1d(dtype)
    window = jnp.concatenate([conv_state.astype(dtype), u[..., None, :]], -2)
    v = jnp.sum(window * w, axis=-2) + b
    new_h, lru_output = self.rg_lru(h, v, segment_start=segment_start)
    return (window[..., 1:, :], new_h), self._output(lru_output, y, dtype)

  def fused_sequence(
    self,
    inputs: Array,
    initial_carry: tuple[Array, Array],
    steps: cells.SequenceSteps,
  ):
    """Dense layers over all steps, the masked convolution, one scan.

    ``inputs (T, B, in)``; returns what the masked step loop would. There
    is never a recurrent mask (``recurrent_dropout_rate`` is 0).
    """
    valid, reset = steps.valid, steps.reset
    time, batch = inputs.shape[:2]
    if not time:
      return None  # the step loop handles an empty sequence
    initial_history, initial_h = initial_carry
    reset_history, reset_h = (
      initial_carry if steps.reset_carry is None else steps.reset_carry
    )
    y, u, dtype = self._branches(inputs)
    w, b = self.conv_1d(dtype)
    taps = _segment_taps(
      u, initial_history.astype(dtype), reset_history.astype(dtype), reset
    )
    v = b + sum(
      w[self.conv_width - 1 - lag] * tap for lag, tap in enumerate(taps)
    )
    lru = self.rg_lru.fused_sequence(
      v, initial_h, dataclasses.replace(steps, reset_carry=reset_h)
    )
    final_h, lru_outputs = lru[:2]
    outputs = self._output(lru_outputs, y, dtype)
    if valid is not None:
      outputs = jnp.where(valid[..., None], outputs, jnp.zeros((), dtype))
    # The history after step t is taps K−2, ..., 0 at t, oldest first; the
    # final one is read at each row's last valid step.
    rows = jnp.arange(batch)
    last = jnp.full((batch,), time - 1)
    if valid is not None:
      count = valid.sum(axis=0)
      last = jnp.maximum(count - 1, 0)
    final_history = jnp.stack(
      [tap[last, rows] for tap in taps[-2::-1]], axis=-2
    ).reshape(initial_history.shape)
    if valid is not None:
      final_history = jnp.where(
        (count > 0)[:, None, None], final_history, initial_history.astype(dtype)
      )
    final = (final_history.astype(initial_history.dtype), final_h)
    if not steps.return_step_carries:
      return final, outputs
    histories = jnp.stack(taps[-2::-1], axis=-2).reshape(
      (time, *initial_history.shape)
    )
    return final, outputs, (histories, lru[2])
