"""Recurrent cells: one step of an RNN, as Haiku modules.

A cell maps ``(carry, inputs) -> (new_carry, outputs)`` for one time step and
builds its own initial carry from one sample step of input. ``hk_rnn.RNN``
scans any cell over a sequence.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src import dropout
from hk_rnn._src.kernels import dispatch

Array = jax.Array
Carry = Any
Initializer = Callable[[Sequence[int], Any], Array]


@dataclasses.dataclass(frozen=True)
class SequenceSteps:
  """What ``RNN`` hands a cell's :meth:`RNNCellBase.fused_sequence`.

  Every array is time-major with one batch axis, like the inputs it goes
  with, ``(time, batch, *features)``.

  Attributes:
    valid: bool ``(time, batch)``, False at padded steps; None: every step
      is valid. A padded step must keep the carry and output zeros.
    reset: bool ``(time, batch)``, True where a packed row's next segment
      starts: the carry restarts from ``reset_carry`` before that step;
      None: never.
    reset_carry: the carry a segment restarts from, shaped like the initial
      carry; None: the initial carry. They differ when streaming.
    recurrent_mask: the recurrent dropout mask, as ``__call__`` takes it;
      None without dropout.
    segment_starts: bool ``(time, batch)``, True at the first step of every
      segment (a row's first step included unless it continues a streamed
      carry); only for cells whose ``takes_segment_starts`` is True, else
      None.
    unroll: the ``unroll`` the user gave ``RNN``, for kernels that scan.
    return_step_carries: also return the carry after every step (``RNN``
      asks for it to return per-segment carries of packed rows).
  """

  valid: Array | None = None
  reset: Array | None = None
  reset_carry: Carry = None
  recurrent_mask: Array | None = None
  segment_starts: Array | None = None
  unroll: int = 1
  return_step_carries: bool = False


class RNNCellBase(hk.Module, abc.ABC):
  """Base class of recurrent cells.

  Subclasses implement ``__call__`` (one step) and ``initialize_carry``.
  Cells that support dropout override ``dropout_masks`` and accept a
  ``recurrent_mask`` keyword in ``__call__``; ``RNN`` then samples the masks
  once per sequence and passes them in.
  """

  @abc.abstractmethod
  def __call__(self, carry: Carry, inputs: Array) -> tuple[Carry, Any]:
    """Runs one step: ``inputs`` is ``(*batch, *features)``, no time axis."""

  @abc.abstractmethod
  def initialize_carry(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> Carry:
    """The initial carry for inputs shaped like ``sample_inputs`` (one step)."""

  @property
  def num_feature_axes(self) -> int:
    """How many trailing axes of one input step are features (1 for dense)."""
    return 1

  @property
  def takes_segment_starts(self) -> bool:
    """Whether the cell computes a segment's first step differently.

    Such a cell (``RGLRUCell``, ``GriffinCell``) accepts a
    ``segment_start`` keyword in ``__call__``, bool ``(*batch,)``, True where
    the step is the first of a sequence (segment); ``RNN`` passes it at every
    step, and ``segment_starts (time, batch)`` to :meth:`fused_sequence`. A
    step called without it is not a first step.
    """
    return False

  def dropout_masks(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> dropout.DropoutMasks:
    """Samples this cell's variational dropout masks (none by default).

    The same ``rng`` always gives the same masks; without it they draw from
    ``hk.next_rng_key()``.
    """
    del sample_inputs, rng
    return dropout.DropoutMasks(None, None)

  def fused_sequence(
    self, inputs: Array, initial_carry: Carry, steps: SequenceSteps
  ) -> tuple[Carry, Any] | tuple[Carry, Any, Carry] | None:
    """The cell over a whole sequence at once, or ``None`` to be stepped.

    ``RNN(..., fused=True)`` (the default) calls this before stepping the
    cell; a cell that can compute a whole sequence faster (a fused kernel, a
    parallel scan) returns ``(final_carry, outputs)``, exactly what stepping
    it under ``RNN``'s masking would give: a padded step keeps the carry and
    outputs zeros, a ``steps.reset`` step restarts from
    ``steps.reset_carry``, ``final_carry`` is the carry after each row's last
    valid step. With ``steps.return_step_carries`` it returns
    ``(final_carry, outputs, step_carries)``, the carry after every step,
    leaves ``(time, batch, ...)`` (their values at padded steps are never
    read). Returning ``None`` (the default, and right for any case it does
    not handle) makes ``RNN`` step the cell. ``RNN`` has zeroed the inputs
    at padded steps and flipped each segment for ``reverse`` already; the
    parameters must be the ones ``__call__`` creates.

    ``inputs`` is ``(time, batch, *features)``; ``initial_carry`` has one
    batch axis; ``steps`` is a :class:`SequenceSteps`.

    >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
    >>> class RunningSum(hk_rnn.RNNCellBase):
    ...   # h' = h + x; over a sequence, a cumulative sum.
    ...   def __call__(self, carry, inputs):
    ...     return carry + inputs, carry + inputs
    ...   def initialize_carry(self, sample_inputs, rng=None):
    ...     return jnp.zeros_like(sample_inputs)
    ...   def fused_sequence(self, inputs, initial_carry, steps):
    ...     if steps.reset is not None or steps.return_step_carries:
    ...       return None                   # packed rows: step the cell
    ...     h = initial_carry + jnp.cumsum(inputs, axis=0)  # padding is 0
    ...     if steps.valid is not None:
    ...       h = jnp.where(steps.valid[..., None], h, 0)
    ...     return initial_carry + inputs.sum(0), h
    >>> def run(x, lengths, fused):
    ...   return hk_rnn.RNN(RunningSum(), fused=fused)(x, seq_lengths=lengths)
    >>> run = hk.transform(run)
    >>> x, lengths = jnp.ones((2, 4, 3)), jnp.array([4, 2])
    >>> fused, stepped = (run.apply({}, None, x, lengths, f) for f in (True, False))
    >>> jax.tree.all(jax.tree.map(jnp.array_equal, fused, stepped))
    True
    >>> fused[0][:, 0]                        # each row's final carry
    Array([4., 2.], dtype=float32)
    """
    del inputs, initial_carry, steps
    return None


def _kernel_options(steps: SequenceSteps) -> dict[str, Any]:
  """``steps`` as the keywords of the ``dispatch`` sequence kernels."""
  return dict(
    valid=steps.valid,
    reset=steps.reset,
    reset_carry=steps.reset_carry,
    recurrent_mask=steps.recurrent_mask,
    unroll=steps.unroll,
    return_step_carries=steps.return_step_carries,
  )


def check_features(features: Any, context: str) -> int:
  """A cell's ``features``, checked to be a positive int."""
  if not isinstance(features, (int, np.integer)) or features <= 0:
    raise ValueError(
      f"{context}: features must be a positive int, got {features!r}"
    )
  return int(features)


def _orthogonal_per_block(num_blocks: int) -> Initializer:
  """Orthogonal ``(F, F)`` blocks side by side: an ``(F, num_blocks*F)`` init."""
  orthogonal = hk.initializers.Orthogonal()

  def init(shape, dtype):
    *rows, columns = shape
    block = (*rows, columns // num_blocks)
    # QR has no low-precision kernels: draw in float32, then cast.
    return jnp.concatenate(
      [orthogonal(block, jnp.float32) for _ in range(num_blocks)], axis=-1
    ).astype(dtype)

  return init


def _ones_then_zeros(shape, dtype):
  """``[1]*F + [0]*F``: a forget-gate bias of one for two-block cells."""
  half = shape[-1] // 2
  return jnp.concatenate(
    [jnp.ones((half,), dtype), jnp.zeros((shape[-1] - half,), dtype)]
  )


LECUN_NORMAL = hk.initializers.VarianceScaling(
  1.0, "fan_in", "truncated_normal"
)


class GatedCell(RNNCellBase):
  """What the built-in cells share: options, parameters, carry, dropout.

  Subclasses set ``_num_blocks`` (gate blocks in the weight matrices) and
  ``_carry_size`` (how many ``(*batch, features)`` arrays the carry holds),
  and implement ``__call__``.
  """

  _num_blocks: int
  _carry_size: int

  def __init__(
    self,
    features: int,
    *,
    gate_fn: Callable[[Array], Array] = jax.nn.sigmoid,
    activation_fn: Callable[[Array], Array] = jnp.tanh,
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
    super().__init__(name=name)
    context = type(self).__name__
    self.features = check_features(features, context)
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    self.w_i_init = w_i_init or LECUN_NORMAL
    self.w_h_init = w_h_init or _orthogonal_per_block(self._num_blocks)
    self.b_init = b_init or jnp.zeros
    self.carry_init = carry_init
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.dropout_rate = dropout.check_rate(
      dropout_rate, "dropout_rate", context
    )
    self.recurrent_dropout_rate = dropout.check_rate(
      recurrent_dropout_rate, "recurrent_dropout_rate", context
    )

  def _compute_dtype(self, inputs_dtype) -> Any:
    if self.dtype is not None:
      return self.dtype
    return jnp.result_type(inputs_dtype, self.param_dtype)

  def _hidden_shape(self, sample_inputs: Array) -> tuple[int, ...]:
    return (*sample_inputs.shape[:-1], self.features)

  def _check_inputs(self, inputs: Array) -> None:
    if inputs.ndim < self.num_feature_axes:
      raise ValueError(
        f"{type(self).__name__}: inputs must have at least "
        f"{self.num_feature_axes} feature axes, got shape {inputs.shape}"
      )

  def _parameter(self, name, shape, init) -> Array:
    return hk.get_parameter(name, tuple(shape), self.param_dtype, init=init)

  def _dense_weights(
    self, input_size: int, dtype: Any | None
  ) -> tuple[Array, Array]:
    """``w_i`` and ``w_h``, cast to ``dtype`` (as stored when ``None``)."""
    width = self._num_blocks * self.features
    w_i = self._parameter("w_i", (input_size, width), self.w_i_init)
    w_h = self._parameter("w_h", (self.features, width), self.w_h_init)
    if dtype is None:
      return w_i, w_h
    return w_i.astype(dtype), w_h.astype(dtype)

  def _has_default_activations(self) -> bool:
    """Whether the fused kernels (σ gates, tanh) compute this cell."""
    return self.gate_fn is jax.nn.sigmoid and self.activation_fn is jnp.tanh

  def initialize_carry(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> Carry:
    """Builds the carry with ``carry_init(shape, dtype)`` (zeros by default).

    Args:
      sample_inputs: one step of input, ``(*batch, *features)``.
      rng: a key for a random ``carry_init``; without it such an initializer
        draws from ``hk.next_rng_key()``.

    Returns:
      The carry; each of its arrays is ``(*batch, *spatial, features)``.
    """
    self._check_inputs(sample_inputs)
    shape = self._hidden_shape(sample_inputs)
    dtype = self._compute_dtype(sample_inputs.dtype)

    def build():
      return tuple(
        jnp.asarray(self.carry_init(shape, dtype), dtype)
        for _ in range(self._carry_size)
      )

    if rng is None:
      leaves = build()
    else:
      with hk.with_rng(rng):
        leaves = build()
    return leaves if self._carry_size > 1 else leaves[0]

  def dropout_masks(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> dropout.DropoutMasks:
    """Samples the input and recurrent masks for one batch of sequences.

    The input mask is shaped like one step of input, the recurrent mask like
    the hidden state ``h``; kept units are scaled by ``1 / (1 - rate)``.
    Draws from ``rng`` when given (the same key gives the same masks), else
    from ``hk.next_rng_key()``, when a rate is non-zero.
    """
    dtype = self._compute_dtype(sample_inputs.dtype)

    def sample():
      return dropout.DropoutMasks(
        inputs=dropout.sample_mask(
          self.dropout_rate, sample_inputs.shape, dtype
        ),
        recurrent=dropout.sample_mask(
          self.recurrent_dropout_rate, self._hidden_shape(sample_inputs), dtype
        ),
      )

    if rng is None:
      if self.dropout_rate or self.recurrent_dropout_rate:
        dropout.require_rng(
          type(self).__name__,
          f"dropout_masks samples masks for {dropout.describe_rates(self)}",
          "pass rng= to dropout_masks, or an rng to apply "
          "(model.apply(params, rng, ...))",
        )
      return sample()
    with hk.with_rng(rng):
      return sample()


def _masked(h: Array, recurrent_mask: Array | None) -> Array:
  return h if recurrent_mask is None else h * recurrent_mask


def _lstm_update(cell: GatedCell, z: Array, c: Array):
  """The LSTM's gates from pre-activations ``z = [z_i, z_f, z_g, z_o]``."""
  i, f, g, o = jnp.split(z, 4, axis=-1)
  new_c = cell.gate_fn(f) * c + cell.gate_fn(i) * cell.activation_fn(g)
  new_h = cell.gate_fn(o) * cell.activation_fn(new_c)
  return (new_c, new_h), new_h


class LSTMCell(GatedCell):
  r"""Long short-term memory cell (Hochreiter & Schmidhuber, 1997).

  .. math::

      z &= x W_i + h W_h + b, \quad z = [z_i, z_f, z_g, z_o] \\
      c' &= \sigma(z_f) \odot c + \sigma(z_i) \odot \tanh(z_g) \\
      h' &= \sigma(z_o) \odot \tanh(c')

  Parameters: ``w_i (in, 4F)``, ``w_h (F, 4F)``, ``b (4F,)``, gate blocks in
  the order i, f, g, o (PyTorch's order). The carry is ``(c, h)``, the output
  is ``h'``. ``gate_fn`` replaces σ and ``activation_fn`` replaces tanh.
  With ``recurrent_dropout_rate`` the masked ``h`` feeds ``W_h``.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def step(x):
  ...   cell = hk_rnn.LSTMCell(features=4)
  ...   return cell(cell.initialize_carry(x), x)
  >>> model = hk.transform(step)
  >>> x = jnp.ones((2, 3))
  >>> (c, h), y = model.apply(model.init(jax.random.key(0), x), None, x)
  >>> c.shape, h.shape, y.shape
  ((2, 4), (2, 4), (2, 4))

  Args:
    features: ``F``, the size of ``c`` and ``h`` (the other arguments are
      keyword-only).
    gate_fn: the gate nonlinearity σ.
    activation_fn: the cell and output nonlinearity (tanh).
    w_i_init: initializer of ``w_i`` (LeCun normal).
    w_h_init: initializer of ``w_h`` (orthogonal per gate block).
    b_init: initializer of ``b`` (zeros).
    carry_init: ``carry_init(shape, dtype)`` for ``c`` and ``h`` (zeros).
    dtype: the computation dtype; by default the promotion of the inputs' and
      the parameters' dtypes.
    param_dtype: the dtype parameters are stored in.
    dropout_rate: variational dropout on the inputs (applied by ``RNN``).
    recurrent_dropout_rate: variational dropout on ``h`` before ``W_h``.
    name: the module name.
  """

  _num_blocks = 4
  _carry_size = 2

  def __call__(
    self,
    carry: tuple[Array, Array],
    inputs: Array,
    *,
    recurrent_mask: Array | None = None,
  ) -> tuple[tuple[Array, Array], Array]:
    """One step: ``inputs (*batch, in)``, carry ``(c, h)`` each ``(*batch, F)``."""
    dtype = self._compute_dtype(inputs.dtype)
    c, h = (part.astype(dtype) for part in carry)
    w_i, w_h = self._dense_weights(inputs.shape[-1], dtype)
    b = self._parameter("b", (4 * self.features,), self.b_init).astype(dtype)
    z = inputs.astype(dtype) @ w_i + _masked(h, recurrent_mask) @ w_h + b
    return _lstm_update(self, z, c)

  def fused_sequence(self, inputs, initial_carry, steps):
    """The whole sequence in the fused LSTM kernel (σ/tanh only)."""
    if not self._has_default_activations():
      return None
    # Same parameters, created in the same order, as ``__call__``'s; passed
    # uncast so that their gradients are accumulated in float32.
    w_i, w_h = self._dense_weights(inputs.shape[-1], None)
    b = self._parameter("b", (4 * self.features,), self.b_init)
    return dispatch.lstm_sequence(
      inputs.astype(self._compute_dtype(inputs.dtype)),
      w_i,
      w_h,
      b,
      tuple(initial_carry),
      **_kernel_options(steps),
    )


class _TwoBiasCell(GatedCell):
  """Base of the cells that keep the biases ``b_i`` and ``b_h`` apart.

  In the GRU and the MGU a gate multiplies the recurrent term before it joins
  the input term.
  """

  def _input_bias_init(self) -> Initializer:
    return self.b_init

  def _biases(self) -> tuple[Array, Array]:
    width = self._num_blocks * self.features
    return (
      self._parameter("b_i", (width,), self._input_bias_init()),
      self._parameter("b_h", (width,), self.b_init),
    )

  def _projections(self, inputs, h, recurrent_mask):
    """``x W_i + b_i`` and ``h_in W_h + b_h``, each split into gate blocks."""
    w_i, w_h = self._dense_weights(inputs.shape[-1], h.dtype)
    b_i, b_h = (b.astype(h.dtype) for b in self._biases())
    from_inputs = inputs.astype(h.dtype) @ w_i + b_i
    from_hidden = _masked(h, recurrent_mask) @ w_h + b_h
    return (
      jnp.split(from_inputs, self._num_blocks, axis=-1),
      jnp.split(from_hidden, self._num_blocks, axis=-1),
    )

  def _two_bias_sequence(self, kernel, inputs, initial_carry, steps):
    """The whole sequence in ``kernel``, a ``dispatch`` one (σ/tanh only)."""
    if not self._has_default_activations():
      return None
    return kernel(
      inputs.astype(self._compute_dtype(inputs.dtype)),
      *self._dense_weights(inputs.shape[-1], None),
      *self._biases(),
      initial_carry,
      **_kernel_options(steps),
    )


class GRUCell(_TwoBiasCell):
  r"""Gated recurrent unit (Cho et al., 2014), in PyTorch's and cuDNN's form.

  .. math::

      r &= \sigma(x W_{ir} + b_{ir} + h W_{hr} + b_{hr}) \\
      z &= \sigma(x W_{iz} + b_{iz} + h W_{hz} + b_{hz}) \\
      n &= \tanh(x W_{in} + b_{in} + r \odot (h W_{hn} + b_{hn})) \\
      h' &= (1 - z) \odot n + z \odot h

  The reset gate applies after the recurrent matmul. Parameters:
  ``w_i (in, 3F)``, ``w_h (F, 3F)``, ``b_i (3F,)``, ``b_h (3F,)``, blocks r,
  z, n. The carry is ``h``, the output ``h'``. With
  ``recurrent_dropout_rate`` the masked ``h`` feeds ``W_h``; the
  interpolation uses the unmasked ``h``.

  Options as for :class:`LSTMCell`; ``b_init`` initialises both biases.
  """

  _num_blocks = 3
  _carry_size = 1

  def __call__(
    self, carry: Array, inputs: Array, *, recurrent_mask: Array | None = None
  ) -> tuple[Array, Array]:
    """One step: ``inputs (*batch, in)``, carry ``h (*batch, F)``."""
    h = carry.astype(self._compute_dtype(inputs.dtype))
    (x_r, x_z, x_n), (h_r, h_z, h_n) = self._projections(
      inputs, h, recurrent_mask
    )
    r = self.gate_fn(x_r + h_r)
    z = self.gate_fn(x_z + h_z)
    n = self.activation_fn(x_n + r * h_n)
    new_h = (1.0 - z) * n + z * h
    return new_h, new_h

  def fused_sequence(self, inputs, initial_carry, steps):
    """The whole sequence in the fused GRU kernel (σ/tanh only)."""
    return self._two_bias_sequence(
      dispatch.gru_sequence, inputs, initial_carry, steps
    )


class SimpleCell(GatedCell):
  r"""Elman RNN cell: :math:`h' = \tanh(x W_i + h W_h + b)`.

  Parameters: ``w_i (in, F)``, ``w_h (F, F)``, ``b (F,)``. The carry is
  ``h``, the output ``h'``. ``activation_fn`` replaces tanh (``gate_fn`` is
  unused). Options as for :class:`LSTMCell`.
  """

  _num_blocks = 1
  _carry_size = 1

  def __call__(
    self, carry: Array, inputs: Array, *, recurrent_mask: Array | None = None
  ) -> tuple[Array, Array]:
    """One step: ``inputs (*batch, in)``, carry ``h (*batch, F)``."""
    dtype = self._compute_dtype(inputs.dtype)
    w_i, w_h = self._dense_weights(inputs.shape[-1], dtype)
    b = self._parameter("b", (self.features,), self.b_init).astype(dtype)
    h = _masked(carry.astype(dtype), recurrent_mask)
    new_h = self.activation_fn(inputs.astype(dtype) @ w_i + h @ w_h + b)
    return new_h, new_h

  def _has_default_activations(self) -> bool:
    return self.activation_fn is jnp.tanh  # gate_fn is unused here

  def fused_sequence(self, inputs, initial_carry, steps):
    """The whole sequence in the fused Elman kernel (tanh only)."""
    if not self._has_default_activations():
      return None
    w_i, w_h = self._dense_weights(inputs.shape[-1], None)
    b = self._parameter("b", (self.features,), self.b_init)
    return dispatch.simple_sequence(
      inputs.astype(self._compute_dtype(inputs.dtype)),
      w_i,
      w_h,
      b,
      initial_carry,
      **_kernel_options(steps),
    )


class MGUCell(_TwoBiasCell):
  r"""Minimal gated unit (Zhou et al., 2016), in Flax's form.

  .. math::

      f &= \sigma(x W_{if} + b_{if} + h W_{hf} + b_{hf}) \\
      n &= \tanh(x W_{in} + b_{in} + f \odot (h W_{hn} + b_{hn})) \\
      h' &= (1 - f) \odot n + f \odot h

  One gate serves as both GRU gates. Parameters: ``w_i (in, 2F)``,
  ``w_h (F, 2F)``, ``b_i (2F,)``, ``b_h (2F,)``, blocks f, n. ``b_i``'s
  forget block starts at one by default (``b_i_init``), ``b_h`` at zero
  (``b_init``). The carry is ``h``, the output ``h'``. Other options as for
  :class:`LSTMCell`.
  """

  _num_blocks = 2
  _carry_size = 1

  def __init__(
    self, features: int, *, b_i_init: Initializer | None = None, **options
  ):
    super().__init__(features, **options)
    self.b_i_init = b_i_init or _ones_then_zeros

  def _input_bias_init(self) -> Initializer:
    return self.b_i_init

  def __call__(
    self, carry: Array, inputs: Array, *, recurrent_mask: Array | None = None
  ) -> tuple[Array, Array]:
    """One step: ``inputs (*batch, in)``, carry ``h (*batch, F)``."""
    h = carry.astype(self._compute_dtype(inputs.dtype))
    (x_f, x_n), (h_f, h_n) = self._projections(inputs, h, recurrent_mask)
    f = self.gate_fn(x_f + h_f)
    n = self.activation_fn(x_n + f * h_n)
    new_h = (1.0 - f) * n + f * h
    return new_h, new_h

  def fused_sequence(self, inputs, initial_carry, steps):
    """The whole sequence in the fused MGU kernel (σ/tanh only)."""
    return self._two_bias_sequence(
      dispatch.mgu_sequence, inputs, initial_carry, steps
    )


_CONV_DIMENSIONS = {1: "W", 2: "HW", 3: "DHW"}


class ConvLSTMCell(GatedCell):
  r"""Convolutional LSTM (Shi et al., 2015): an LSTM whose matmuls are convs.

  .. math::

      z &= W_i * x + W_h * h + b, \quad z = [z_i, z_f, z_g, z_o] \\
      c' &= \sigma(z_f) \odot c + \sigma(z_i) \odot \tanh(z_g) \\
      h' &= \sigma(z_o) \odot \tanh(c')

  where ``*`` is an N-D convolution, stride 1, ``SAME`` padding, channels
  last; N = ``len(kernel_shape)`` (1, 2 or 3). Inputs are
  ``(*batch, *spatial, channels)``; ``c`` and ``h`` are
  ``(*batch, *spatial, F)``. Parameters: ``w_i (*kernel_shape, in, 4F)``,
  ``w_h (*kernel_shape, F, 4F)``, ``b (4F,)``, blocks i, f, g, o.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def step(x):
  ...   cell = hk_rnn.ConvLSTMCell(8, kernel_shape=(3, 3))
  ...   return cell(cell.initialize_carry(x), x)
  >>> model = hk.transform(step)
  >>> x = jnp.ones((2, 5, 5, 3))
  >>> _, y = model.apply(model.init(jax.random.key(0), x), None, x)
  >>> y.shape
  (2, 5, 5, 8)

  Options as for :class:`LSTMCell`; both kernels default to LeCun normal.
  """

  _num_blocks = 4
  _carry_size = 2

  def __init__(self, features: int, kernel_shape: Sequence[int], **options):
    options.setdefault("w_h_init", LECUN_NORMAL)
    super().__init__(features, **options)
    kernel_shape = tuple(int(k) for k in kernel_shape)
    if len(kernel_shape) not in _CONV_DIMENSIONS or min(kernel_shape) <= 0:
      raise ValueError(
        "ConvLSTMCell: kernel_shape must hold 1, 2 or 3 positive sizes, got "
        f"{kernel_shape}"
      )
    self.kernel_shape = kernel_shape

  @property
  def num_feature_axes(self) -> int:
    return len(self.kernel_shape) + 1

  def _conv(self, x: Array, w: Array) -> Array:
    spatial = _CONV_DIMENSIONS[len(self.kernel_shape)]
    lead = x.shape[: x.ndim - self.num_feature_axes]
    flat = x.reshape((math.prod(lead), *x.shape[len(lead) :]))
    y = jax.lax.conv_general_dilated(
      flat,
      w,
      window_strides=(1,) * len(self.kernel_shape),
      padding="SAME",
      dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )
    return y.reshape((*lead, *y.shape[1:]))

  def __call__(
    self,
    carry: tuple[Array, Array],
    inputs: Array,
    *,
    recurrent_mask: Array | None = None,
  ) -> tuple[tuple[Array, Array], Array]:
    """One step: ``inputs (*batch, *spatial, in)``, carry ``(c, h)``."""
    self._check_inputs(inputs)
    dtype = self._compute_dtype(inputs.dtype)
    c, h = (part.astype(dtype) for part in carry)
    width = 4 * self.features
    w_i = self._parameter(
      "w_i", (*self.kernel_shape, inputs.shape[-1], width), self.w_i_init
    ).astype(dtype)
    w_h = self._parameter(
      "w_h", (*self.kernel_shape, self.features, width), self.w_h_init
    ).astype(dtype)
    b = self._parameter("b", (width,), self.b_init).astype(dtype)
    z = (
      self._conv(inputs.astype(dtype), w_i)
      + self._conv(_masked(h, recurrent_mask), w_h)
      + b
    )
    return _lstm_update(self, z, c)
