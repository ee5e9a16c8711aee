r"""Cells linear in their carry, computed in parallel over time by ``RNN``.

A :class:`LinearRecurrentCell` updates its carry as
:math:`h' = a \odot h + b` where ``a`` and ``b`` depend on the step's input
alone. Its subclasses write one method, ``coefficients(inputs) -> (a, b)``,
valid for inputs with any leading axes; from it the cell gets both its step
(``__call__``, for ``hk.scan`` and ``RNN(fused=False)``) and a
whole-sequence path: ``RNN(fused=True)`` computes ``a`` and ``b`` for every
step in one pass (one large input GEMM), folds padding and packed
segments into them and runs the recurrence with
:func:`hk_rnn._src.linear_scan.linear_recurrence`.

``MinGRUCell`` and ``MinLSTMCell`` are Feng et al. (2024), "Were RNNs All We
Needed?".
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from hk_rnn._src import cells, dropout, linear_scan

Array = jax.Array
Initializer = Callable[[Sequence[int], Any], Array]


class ParallelCellBase(cells.RNNCellBase):
  """What the cells without a recurrent weight share: their options, the
  computation dtype, parameters, and variational dropout on the inputs
  (there is no recurrent mask). Options as for :class:`LinearRecurrentCell`.
  """

  def __init__(
    self,
    features: int,
    *,
    carry_init: Initializer = jnp.zeros,
    dtype: Any | None = None,
    param_dtype: Any = jnp.float32,
    dropout_rate: float = 0.0,
    recurrent_dropout_rate: float = 0.0,
    scan_method: str = "auto",
    name: str | None = None,
  ):
    super().__init__(name=name)
    context = type(self).__name__
    features = cells.check_features(features, context)
    if recurrent_dropout_rate != 0:
      raise ValueError(
        f"{context}: recurrent_dropout_rate must be 0 (the cell has no "
        f"recurrent weight), got {recurrent_dropout_rate!r}"
      )
    self.features = features
    self.carry_init = carry_init
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.dropout_rate = dropout.check_rate(
      dropout_rate, "dropout_rate", context
    )
    self.recurrent_dropout_rate = 0.0
    self.scan_method = linear_scan.check_method(scan_method, context)

  def _compute_dtype(self, inputs_dtype) -> Any:
    if self.dtype is not None:
      return self.dtype
    return jnp.result_type(inputs_dtype, self.param_dtype)

  def _parameter(self, name, shape, init) -> Array:
    return hk.get_parameter(name, tuple(shape), self.param_dtype, init=init)

  def dropout_masks(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> dropout.DropoutMasks:
    """The input dropout mask (shaped like one step of input), scaled.

    Draws from ``rng`` when given (the same key gives the same mask), else
    from ``hk.next_rng_key()``, when ``dropout_rate`` is non-zero. There is
    never a recurrent mask.
    """
    return dropout.input_masks(
      self.dropout_rate,
      sample_inputs,
      self._compute_dtype(sample_inputs.dtype),
      rng,
    )


class LinearRecurrentCell(ParallelCellBase):
  r"""Base of cells whose update is linear in the carry: :math:`h' = a h + b`.

  Subclasses implement :meth:`coefficients`, which maps inputs with any
  leading axes, ``(..., in)``, to ``(a, b)``, each broadcastable to
  ``(..., F)``; the carry and the output are ``h'``. That one method gives
  the cell its step and, under ``hk_rnn.RNN`` with ``fused=True``, a
  whole-sequence path with every ``RNN`` feature (padding, packed rows,
  reverse, streaming, per-segment carries): no per-step matrix product,
  only an elementwise recurrence in the form ``scan_method`` picks.

  A real-diagonal linear recurrent unit (an LRU without the complex
  numbers), in a few lines:

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> class DiagonalLRU(hk_rnn.LinearRecurrentCell):
  ...   def coefficients(self, inputs):
  ...     nu = hk.get_parameter("nu", (self.features,), init=jnp.zeros)
  ...     w = hk.get_parameter("w", (inputs.shape[-1], self.features),
  ...                          init=hk.initializers.VarianceScaling())
  ...     a = jnp.exp(-jnp.exp(nu))                   # in (0, 1)
  ...     return a, jnp.sqrt(1 - a**2) * (inputs @ w)
  >>> def forward(x, mask):
  ...   return hk_rnn.RNN(DiagonalLRU(8))(x, mask)
  >>> model = hk.without_apply_rng(hk.transform(forward))
  >>> x, mask = jnp.ones((2, 5, 3)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  >>> h, y = model.apply(model.init(jax.random.key(0), x, mask), x, mask)
  >>> h.shape, y.shape
  ((2, 8), (2, 5, 8))

  Args:
    features: ``F``, the size of ``h``; the other arguments are keyword-only.
    carry_init: ``carry_init(shape, dtype)`` for ``h`` (zeros).
    dtype: the computation dtype; by default the promotion of the inputs'
      and the parameters' dtypes.
    param_dtype: the dtype parameters are stored in.
    dropout_rate: variational dropout on the inputs (applied by ``RNN``).
    recurrent_dropout_rate: must be 0: there is no recurrent weight to drop
      into (a ``ValueError`` otherwise).
    scan_method: the form of the whole-sequence recurrence: ``"auto"`` (the
      sequential loop on CPU, the associative scan on GPUs and TPUs; the
      forms, the rule and its measurements are in the
      :doc:`parallel cells guide </parallel_cells>`), or one of
      ``"sequential"``, ``"chunked"``, ``"associative"`` to force it. All
      give the same numbers up to rounding.
    name: the module name.
  """

  @abc.abstractmethod
  def coefficients(self, inputs: Array) -> tuple[Array, Array]:
    """``(a, b)`` of the update ``h' = a * h + b`` for every input given.

    A subclass whose first step of a segment differs (as the RG-LRU's,
    which does not normalise its input there) declares a second argument,
    ``coefficients(self, inputs, segment_starts)``: bool ``(...)``, shaped
    like the inputs' leading axes, True at the first step of a sequence (a
    packed segment; a row's first step unless it continues a streamed
    carry). ``RNN`` then marks those steps, in the step and the
    whole-sequence paths alike, and a step called directly without
    ``segment_start=`` is not a first step.

    Args:
      inputs: ``(..., in)`` in the computation dtype: one step
        ``(*batch, in)`` from ``__call__``, or a whole sequence
        ``(time, batch, in)`` from ``RNN``. Compute elementwise over the
        leading axes (a matmul on the last axis does).

    Returns:
      ``a`` and ``b``, each broadcastable to ``(..., F)``.
    """

  @property
  def takes_segment_starts(self) -> bool:
    """Whether ``coefficients`` takes a ``segment_starts`` argument."""
    return _takes_segment_starts(type(self))

  # Whether `_readout` can be non-zero where the carry is zero (padding).
  _readout_needs_mask = False

  @property
  def state_size(self) -> int:
    """The size of the carry ``h``: ``features`` unless a cell says otherwise."""
    return self.features

  def _carry_dtype(self, compute_dtype) -> Any:
    """The dtype the recurrence runs in: the computation dtype here."""
    return compute_dtype

  def _readout(self, h: Array, inputs: Array, dtype: Any) -> Array:
    """The output from the carries ``h (..., F)`` and the ``inputs`` that
    made them (both with the same leading axes): ``h`` in ``dtype``."""
    del inputs
    return h.astype(dtype)

  def _coefficients(
    self, inputs: Array, segment_starts: Array | None = None
  ) -> tuple[Array, Array, Any]:
    """``coefficients`` broadcast to ``(..., F)`` in the carry dtype, and
    the computation dtype."""
    dtype = self._compute_dtype(inputs.dtype)
    carry_dtype = self._carry_dtype(dtype)
    lead = inputs.shape[:-1]
    # One row per step and batch entry: XLA:CPU runs a matmul over a single
    # leading axis, and the transpose of it in the backward pass, as one
    # GEMM, where several leading axes can fall off its fast path.
    flat = inputs.astype(dtype).reshape((-1, inputs.shape[-1]))
    if self.takes_segment_starts:
      if segment_starts is None:
        segment_starts = jnp.zeros(lead, bool)
      starts = jnp.broadcast_to(jnp.asarray(segment_starts, bool), lead)
      a, b = self.coefficients(flat, segment_starts=starts.reshape(-1))
    else:
      a, b = self.coefficients(flat)
    shape = (math.prod(lead), self.state_size)

    def full(x):
      x = jnp.asarray(x)
      return jnp.broadcast_to(x.astype(carry_dtype), shape).reshape(
        (*lead, self.state_size)
      )

    return full(a), full(b), dtype

  def __call__(
    self,
    carry: Array,
    inputs: Array,
    *,
    segment_start: Array | None = None,
  ) -> tuple[Array, Array]:
    """One step: ``inputs (*batch, in)``, carry ``h (*batch, F)``.

    ``segment_start`` (bool, ``(*batch,)`` or a scalar) marks the first
    step of a sequence, for cells whose ``coefficients`` take
    ``segment_starts``; others ignore it.
    """
    a, b, dtype = self._coefficients(inputs, segment_start)
    new_h = a * carry.astype(a.dtype) + b
    return new_h, self._readout(new_h, inputs.astype(dtype), dtype)

  def initialize_carry(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> Array:
    """``h`` from ``carry_init(shape, dtype)`` (zeros by default).

    Args:
      sample_inputs: one step of input, ``(*batch, in)``.
      rng: a key for a random ``carry_init``; without it such an initializer
        draws from ``hk.next_rng_key()``.

    Returns:
      ``h (*batch, F)`` in the carry dtype (the computation dtype unless
      the cell says otherwise).
    """
    if sample_inputs.ndim < 1:
      raise ValueError(
        f"{type(self).__name__}: inputs must have a feature axis, got shape "
        f"{sample_inputs.shape}"
      )
    shape = (*sample_inputs.shape[:-1], self.state_size)
    dtype = self._carry_dtype(self._compute_dtype(sample_inputs.dtype))
    if rng is None:
      return jnp.asarray(self.carry_init(shape, dtype), dtype)
    with hk.with_rng(rng):
      return jnp.asarray(self.carry_init(shape, dtype), dtype)

  def fused_sequence(
    self,
    inputs: Array,
    initial_carry: Array,
    steps: cells.SequenceSteps,
  ):
    """The whole sequence as one linear recurrence (see the class docstring).

    ``inputs (T, B, in)``; returns ``(final_carry, outputs)`` as the masked
    step loop would, and with ``steps.return_step_carries`` also the carry
    after every step, ``(T, B, F)``. There is never a recurrent mask
    (``recurrent_dropout_rate`` is 0).
    """
    valid = steps.valid
    a, b, dtype = self._coefficients(inputs, steps.segment_starts)
    initial = initial_carry.astype(a.dtype)
    reset_carry = initial if steps.reset_carry is None else steps.reset_carry
    a, b = linear_scan.mask_coefficients(
      a, b, reset=steps.reset, reset_carry=reset_carry
    )
    h, final = linear_scan.masked_linear_recurrence(
      a, b, initial, valid, method=self.scan_method, unroll=steps.unroll
    )
    outputs = self._readout(h, inputs.astype(dtype), dtype)
    if self._readout_needs_mask and valid is not None:
      outputs = jnp.where(valid[..., None], outputs, jnp.zeros((), dtype))
    if steps.return_step_carries:
      # `h` is the carry at every valid step; padded steps' carries are
      # unspecified.
      return final, outputs, h
    return final, outputs


def check_input_features(inputs: Array, size: int, context: str) -> None:
  """Raises unless ``inputs`` has ``size`` features on its last axis."""
  if inputs.ndim < 1 or inputs.shape[-1] != size:
    raise ValueError(
      f"{context}: inputs must have {size} features (the cell's features), "
      f"got {inputs.shape[-1] if inputs.ndim else 'a scalar'}"
    )


@functools.cache
def _takes_segment_starts(cell_type: type) -> bool:
  """Whether ``cell_type.coefficients`` declares ``segment_starts``."""
  parameters = inspect.signature(cell_type.coefficients).parameters
  return "segment_starts" in parameters


class MinGRUCell(LinearRecurrentCell):
  r"""Minimal GRU (Feng et al., 2024): a GRU whose gates see only the input.

  .. math::

      z &= \sigma(x W_{iz} + b_z), \quad
      \tilde h = x W_{ih} + b_h \\
      h' &= (1 - z) \odot h + z \odot \tilde h

  Linear in ``h`` (``a = 1 - z``, ``b = z h̃``), so ``RNN`` runs a whole
  sequence without a per-step matmul (see :class:`LinearRecurrentCell`).
  Parameters: ``w_i (in, 2F)``, ``b (2F,)``, blocks z, h. The carry is ``h``,
  the output ``h'``.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, lengths):
  ...   return hk_rnn.RNN(hk_rnn.MinGRUCell(4))(x, seq_lengths=lengths)
  >>> model = hk.without_apply_rng(hk.transform(forward))
  >>> x, lengths = jnp.ones((2, 6, 3)), jnp.array([6, 2])
  >>> h, y = model.apply(model.init(jax.random.key(0), x, lengths), x, lengths)
  >>> h.shape, y.shape, bool((y[1, 2:] == 0).all())
  ((2, 4), (2, 6, 4), True)

  Args:
    features: ``F``; the other arguments are keyword-only.
    gate_fn: the gate nonlinearity σ.
    activation_fn: applied to ``h̃``; None (the default) is the identity, as
      in the paper.
    w_i_init: initializer of ``w_i`` (LeCun normal).
    w_h_init: must be None: there is no recurrent weight.
    b_init: initializer of ``b`` (zeros).
    **options: the others, as for :class:`LinearRecurrentCell`.
  """

  _blocks = 2

  def __init__(
    self,
    features: int,
    *,
    gate_fn: Callable[[Array], Array] = jax.nn.sigmoid,
    activation_fn: Callable[[Array], Array] | None = None,
    w_i_init: Initializer | None = None,
    w_h_init: Initializer | None = None,
    b_init: Initializer | None = None,
    **options,
  ):
    super().__init__(features, **options)
    if w_h_init is not None:
      raise ValueError(
        f"{type(self).__name__}: w_h_init must be None (the cell has no "
        f"recurrent weight), got {w_h_init!r}"
      )
    self.gate_fn = gate_fn
    self.activation_fn = activation_fn
    self.w_i_init = w_i_init or cells.LECUN_NORMAL
    self.b_init = b_init or jnp.zeros

  def _projection(self, inputs: Array) -> list[Array]:
    """``x W_i + b`` block by block: one ``(..., F)`` array per block.

    One product per block of the weights, rather than splitting one product's
    columns: on XLA:CPU elementwise kernels (the gates' σ above all) over
    column slices of an array run several times slower than over whole
    arrays (see :mod:`hk_rnn._src.kernels.gates`).
    """
    width = self._blocks * self.features
    w_i = self._parameter("w_i", (inputs.shape[-1], width), self.w_i_init)
    b = self._parameter("b", (width,), self.b_init)
    w_i, b = w_i.astype(inputs.dtype), b.astype(inputs.dtype)
    return [
      inputs @ w + c
      for w, c in zip(
        jnp.split(w_i, self._blocks, axis=-1),
        jnp.split(b, self._blocks),
        strict=True,
      )
    ]

  def _candidate(self, pre_activation: Array) -> Array:
    if self.activation_fn is None:
      return pre_activation
    return self.activation_fn(pre_activation)

  def coefficients(self, inputs: Array) -> tuple[Array, Array]:
    """``a = 1 - z`` and ``b = z * h̃``."""
    z_pre, h_pre = self._projection(inputs)
    z = self.gate_fn(z_pre)
    return 1.0 - z, z * self._candidate(h_pre)


class MinLSTMCell(MinGRUCell):
  r"""Minimal LSTM (Feng et al., 2024), with normalised gates.

  .. math::

      f &= \sigma(x W_{if} + b_f), \quad i = \sigma(x W_{ii} + b_i), \quad
      \tilde h = x W_{ih} + b_h \\
      h' &= \frac{f \odot h + i \odot \tilde h}{f + i}

  Linear in ``h``: ``a = f / (f + i)``, ``b = i / (f + i) h̃``. With the
  default σ these are computed as ``a = σ(log σ(z_f) - log σ(z_i))`` and
  ``b = (1 - a) h̃``, the same values, finite even where both gates
  underflow. Parameters: ``w_i (in, 3F)``, ``b (3F,)``, blocks f, i, h. The
  carry is ``h``, the output ``h'``. Options as for :class:`MinGRUCell`.
  """

  _blocks = 3

  def coefficients(self, inputs: Array) -> tuple[Array, Array]:
    """``a = f / (f + i)`` and ``b = i / (f + i) * h̃``."""
    f_pre, i_pre, h_pre = self._projection(inputs)
    if self.gate_fn is jax.nn.sigmoid:
      a = jax.nn.sigmoid(jax.nn.log_sigmoid(f_pre) - jax.nn.log_sigmoid(i_pre))
    else:
      f, i = self.gate_fn(f_pre), self.gate_fn(i_pre)
      a = f / (f + i)
    return a, (1.0 - a) * self._candidate(h_pre)
