r"""The residual block of the linear-recurrence papers, around any hk_rnn cell.

Griffin and Hawk (De et al. 2024), the LRU (Orvieto et al. 2023) and minGRU
(Feng et al. 2024) all stack their recurrent layer the same way, as a
pre-norm residual block:

.. math::

    x &\leftarrow x + \text{RNN}(\text{cell})(\text{RMSNorm}(x)) \\
    x &\leftarrow x + \text{MLP}(\text{RMSNorm}(x)),\quad
    \text{MLP}(z) = \big(\operatorname{gelu}(z W_1) \odot z W_2\big) W_3

(the gated MLP of Griffin, hidden width ``mlp_expansion × width``). The
cells' outputs must have ``width`` features, as every hk_rnn cell built
with ``width`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax

import hk_rnn


class GatedMLP(hk.Module):
  """``(gelu(z W_1) ⊙ z W_2) W_3`` with hidden width ``expansion × width``."""

  def __init__(self, width: int, expansion: int, name: str | None = None):
    super().__init__(name=name)
    self.width = width
    self.expansion = expansion

  def __call__(self, z: jax.Array) -> jax.Array:
    hidden = self.expansion * self.width
    gate = jax.nn.gelu(hk.Linear(hidden, name="gate")(z))
    return hk.Linear(self.width, name="out")(gate * hk.Linear(hidden)(z))


class ResidualBlock(hk.Module):
  """One pre-norm residual block: the recurrent layer, then the MLP."""

  def __init__(
    self,
    cell: hk_rnn.RNNCellBase,
    width: int,
    *,
    mlp_expansion: int = 3,
    name: str | None = None,
  ):
    super().__init__(name=name)
    self.rnn = hk_rnn.RNN(cell)
    self.width = width
    self.mlp_expansion = mlp_expansion

  def __call__(self, x: jax.Array, **rnn_arguments: Any):
    """``x (batch, time, width)``; ``rnn_arguments`` go to ``RNN``
    (``seq_lengths``, ``initial_carry``, ``initial_segment_ids``...).
    Returns ``(carry, outputs)``."""
    normed = hk.RMSNorm(axis=-1, name="rnn_norm")(x)
    carry, y = self.rnn(normed, **rnn_arguments)
    x = x + y
    normed = hk.RMSNorm(axis=-1, name="mlp_norm")(x)
    return carry, x + GatedMLP(self.width, self.mlp_expansion)(normed)


def residual_stack(
  x: jax.Array,
  make_cell: Callable[[int], hk_rnn.RNNCellBase],
  *,
  num_layers: int,
  width: int,
  mlp_expansion: int = 3,
  initial_carry: Sequence[Any] | None = None,
  **rnn_arguments: Any,
):
  """``num_layers`` residual blocks over ``x`` projected to ``width``.

  Args:
    x: ``(batch, time, features)``.
    make_cell: ``make_cell(layer) -> cell`` with ``width`` output features.
    num_layers: how many blocks.
    width: the residual stream's width.
    mlp_expansion: the MLP's hidden width over ``width``.
    initial_carry: one carry per layer, or None.
    **rnn_arguments: passed to every layer's ``RNN``.

  Returns:
    ``(carries, outputs)``: a tuple of each layer's final carry, and the
    last block's outputs, normalised, ``(batch, time, width)``.
  """
  x = hk.Linear(width, name="embed_inputs")(x)
  carries = []
  for layer in range(num_layers):
    carry = None if initial_carry is None else initial_carry[layer]
    block = ResidualBlock(
      make_cell(layer),
      width,
      mlp_expansion=mlp_expansion,
      name=f"block_{layer}",
    )
    carry, x = block(x, initial_carry=carry, **rnn_arguments)
    carries.append(carry)
  return tuple(carries), hk.RMSNorm(axis=-1, name="final_norm")(x)
