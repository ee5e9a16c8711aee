"""Haiku cores as hk_rnn cells, and hk_rnn cells as Haiku cores.

``CoreCell`` lets any ``hk.RNNCore`` run under ``hk_rnn.RNN`` (masks, packed
rows, reverse, streaming); ``CellCore`` lets any hk_rnn cell run under
``hk.dynamic_unroll``, ``hk.static_unroll``, ``hk.DeepRNN`` and
``hk.ResetCore``. The two differ only in argument order and in how the
initial state is asked for: a cell builds it from one sample step of input,
a core from a batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src import cells as cells_lib
from hk_rnn._src import checks

Array = jax.Array


class CoreCell(cells_lib.RNNCellBase):
  """Runs an ``hk.RNNCore`` as an hk_rnn cell.

  ``cell(carry, x) = core(x, carry)[::-1]``: the core's state is the carry,
  its output the output. ``RNN`` steps it like any cell, so masks, packed
  rows, ``reverse``/``keep_order``, streaming and ``Bidirectional``/
  ``StackedRNN`` all work with ``hk.LSTM``, ``hk.GRU``, ``hk.VanillaRNN``,
  ``hk.DeepRNN`` or a core of your own. The initial carry is
  ``core.initial_state(batch_size)``.

  Inputs may have any number of batch axes: they are flattened into the one
  batch axis Haiku's cores expect (added when there is none) and restored
  afterwards, so every leaf of the core's state must lead with the batch
  axis (true of Haiku's cores). The core has no fused kernel and no dropout
  (``is_training`` changes nothing).

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, mask):
  ...   rnn = hk_rnn.RNN(hk_rnn.CoreCell(hk.LSTM(4)))
  ...   return rnn(x, mask)
  >>> model = hk.transform(forward)
  >>> x, mask = jnp.ones((2, 5, 3)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  >>> state, y = model.apply(model.init(jax.random.key(0), x, mask), None, x, mask)
  >>> state.hidden.shape, y.shape, bool((y[0, 3:] == 0).all())
  ((2, 4), (2, 5, 4), True)
  """

  def __init__(
    self,
    core: hk.RNNCore,
    *,
    num_feature_axes: int = 1,
    name: str | None = None,
  ):
    """Wraps ``core``.

    Args:
      core: the ``hk.RNNCore`` to run, ``core(inputs, state) -> (outputs,
        state)`` on inputs with one batch axis.
      num_feature_axes: how many trailing axes of one input step are
        features (1 for dense cores, 3 for ``hk.Conv2DLSTM``).
      name: the module name.
    """
    super().__init__(name=name)
    if not isinstance(core, hk.RNNCore):
      raise ValueError(
        f"CoreCell: core must be an hk.RNNCore, got {type(core).__name__}"
      )
    self.core = core
    self._num_feature_axes = checks.positive_int(
      num_feature_axes, "num_feature_axes", "CoreCell"
    )

  @property
  def num_feature_axes(self) -> int:
    return self._num_feature_axes

  def _batch_shape(self, inputs: Array, argument: str) -> tuple[int, ...]:
    inputs = checks.as_array(inputs, "CoreCell", argument)
    if np.ndim(inputs) < self._num_feature_axes:
      raise ValueError(
        f"CoreCell: {argument} must have at least {self._num_feature_axes} "
        f"feature axes, got shape {tuple(np.shape(inputs))}"
      )
    return tuple(np.shape(inputs))[: np.ndim(inputs) - self._num_feature_axes]

  def initialize_carry(
    self, sample_inputs: Array, rng: jax.Array | None = None
  ) -> Any:
    """``core.initial_state(batch_size)``, reshaped to the batch axes.

    Args:
      sample_inputs: one step of input, ``(*batch, *features)``.
      rng: a key for a core whose initial state is random; without it the
        core draws from ``hk.next_rng_key()``.

    Returns:
      The core's state; each leaf is ``(*batch, ...)``.
    """
    batch_shape = self._batch_shape(sample_inputs, "sample_inputs")
    size = math.prod(batch_shape)
    if rng is None:
      state = self.core.initial_state(size)
    else:
      with hk.with_rng(rng):
        state = self.core.initial_state(size)
    return jax.tree.map(
      lambda leaf: jnp.reshape(leaf, (*batch_shape, *leaf.shape[1:])), state
    )

  def __call__(self, carry: Any, inputs: Array) -> tuple[Any, Any]:
    """One step: ``inputs (*batch, *features)``, returns ``(state, outputs)``."""
    inputs = checks.as_array(inputs, "CoreCell", "inputs")
    batch_shape = self._batch_shape(inputs, "inputs")
    size = math.prod(batch_shape)
    rank = len(batch_shape)
    flat_inputs = jnp.reshape(inputs, (size, *inputs.shape[rank:]))
    flat_carry = jax.tree.map(
      lambda leaf: jnp.reshape(leaf, (size, *leaf.shape[rank:])), carry
    )
    outputs, state = self.core(flat_inputs, flat_carry)

    def restore(leaf):
      return jnp.reshape(leaf, (*batch_shape, *leaf.shape[1:]))

    return jax.tree.map(restore, state), jax.tree.map(restore, outputs)


class CellCore(hk.RNNCore):
  """Runs an hk_rnn cell as an ``hk.RNNCore``.

  ``core(x, state) = cell(state, x)[::-1]``, and
  ``core.initial_state(batch_size)`` is ``cell.initialize_carry`` of a zero
  sample step ``(batch_size, *input_shape)`` (no batch axis when
  ``batch_size`` is None). It works wherever Haiku takes a core:
  ``hk.dynamic_unroll``, ``hk.static_unroll``, ``hk.DeepRNN``,
  ``hk.ResetCore``. Haiku's unrolls know no padding: use ``hk_rnn.RNN`` for
  masks and packed rows. The cell's dropout is not applied (``RNN`` samples
  its masks).

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x):                                # (time, batch, features)
  ...   core = hk.DeepRNN([hk_rnn.CellCore(hk_rnn.LSTMCell(4)), jax.nn.relu,
  ...                      hk_rnn.CellCore(hk_rnn.GRUCell(2))])
  ...   return hk.dynamic_unroll(core, x, core.initial_state(x.shape[1]))
  >>> model = hk.transform(forward)
  >>> x = jnp.ones((5, 2, 3))
  >>> y, ((c, h), g) = model.apply(model.init(jax.random.key(0), x), None, x)
  >>> y.shape, c.shape, g.shape
  ((5, 2, 2), (2, 4), (2, 2))
  """

  def __init__(
    self,
    cell: cells_lib.RNNCellBase,
    *,
    input_shape: Sequence[int] | None = None,
    name: str | None = None,
  ):
    """Wraps ``cell``.

    Args:
      cell: the hk_rnn cell to run.
      input_shape: one step's feature shape (``cell.num_feature_axes``
        sizes), needed only where the carry depends on it: for
        ``ConvLSTMCell``, ``(*spatial, channels)``.
      name: the module name.
    """
    super().__init__(name=name)
    if not isinstance(cell, cells_lib.RNNCellBase):
      raise ValueError(
        f"CellCore: cell must be an hk_rnn.RNNCellBase, got "
        f"{type(cell).__name__}"
      )
    axes = cell.num_feature_axes
    if input_shape is None:
      if axes != 1:
        raise ValueError(
          f"CellCore: input_shape (one step's {axes} feature sizes) is "
          f"needed for {type(cell).__name__}, whose carry depends on it; "
          "got None"
        )
      input_shape = (1,)  # A dense cell's carry does not depend on it.
    else:
      given = input_shape
      input_shape = tuple(given) if isinstance(given, Sequence) else (given,)
      if len(input_shape) != axes or not all(
        isinstance(size, (int, np.integer)) and size > 0 for size in input_shape
      ):
        raise ValueError(
          f"CellCore: input_shape must hold {axes} positive sizes for "
          f"{type(cell).__name__}, got {checks.abbreviate(given)}"
        )
    self.cell = cell
    self.input_shape = tuple(int(size) for size in input_shape)

  def __call__(self, inputs: Array, prev_state: Any) -> tuple[Any, Any]:
    """One step: returns ``(outputs, next_state)``, Haiku's order."""
    inputs = checks.as_array(inputs, "CellCore", "inputs")
    if inputs.ndim < self.cell.num_feature_axes:
      raise ValueError(
        f"CellCore: inputs must have {self.cell.num_feature_axes} feature "
        f"axes for {type(self.cell).__name__}, got shape {inputs.shape}"
      )
    self._check_state(prev_state, inputs)
    state, outputs = self.cell(prev_state, inputs)
    return outputs, state

  def _check_state(self, prev_state: Any, inputs: Array) -> None:
    """Refuses a state that is not the cell's carry for ``inputs``.

    (Under ``hk.dynamic_unroll`` a mismatch would surface as a scan error
    about carry types, naming nothing the caller passed.)
    """
    sample = jax.ShapeDtypeStruct(inputs.shape, inputs.dtype)
    # A throwaway key: only shapes are computed.
    expected = hk.eval_shape(
      lambda s: self.cell.initialize_carry(s, rng=jax.random.PRNGKey(0)),
      sample,
    )
    shapes = jax.tree.map(lambda leaf: tuple(np.shape(leaf)), prev_state)
    wanted = jax.tree.map(lambda leaf: tuple(leaf.shape), expected)
    if shapes != wanted:
      raise ValueError(
        f"CellCore: prev_state must be the cell's carry for inputs of shape "
        f"{tuple(inputs.shape)} (initial_state(batch_size) with the inputs' "
        f"batch size), shapes {wanted}; got {shapes}"
      )

  def initial_state(self, batch_size: int | None) -> Any:
    """The cell's initial carry for ``batch_size`` rows (none when None)."""
    if batch_size is not None and (
      isinstance(batch_size, (bool, np.bool_))
      or not isinstance(batch_size, (int, np.integer))
      or batch_size < 0
    ):
      raise ValueError(
        "CellCore: initial_state's batch_size must be an int >= 0 or None, "
        f"got {checks.abbreviate(batch_size)}"
      )
    batch = () if batch_size is None else (int(batch_size),)
    dtype = getattr(self.cell, "dtype", None) or jnp.float32
    sample = jnp.zeros((*batch, *self.input_shape), dtype)
    return self.cell.initialize_carry(sample)
