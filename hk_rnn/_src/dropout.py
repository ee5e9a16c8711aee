"""Variational dropout masks for recurrent cells.

Recurrent dropout keeps one mask per row for the whole sequence (Gal &
Ghahramani, 2016): a unit dropped at the first step stays dropped at every
step. Masks are sampled once, outside the scan, and carried in as scaled
multipliers (0 or ``1 / (1 - rate)``), so that applying one is a single
multiply inside the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

Array = jax.Array


class DropoutMasks(NamedTuple):
  """Multipliers for one sequence batch; ``None`` where that dropout is off.

  Attributes:
    inputs: shaped like one step of input, ``(*batch, *features)``.
    recurrent: shaped like the hidden state fed to the recurrent weights.
  """

  inputs: Array | None
  recurrent: Array | None


def check_rate(rate: float, name: str, context: str) -> float:
  """Validates a dropout rate: a number in ``[0, 1)``."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"{context}: {name} must lie in [0, 1), got {rate!r}")
  return float(rate)


def sample_mask(rate: float, shape: Sequence[int], dtype) -> Array | None:
  """A scaled keep mask (0 or ``1/(1-rate)``), or ``None`` when rate is 0."""
  if rate == 0.0:
    return None
  keep = 1.0 - rate
  kept = jax.random.bernoulli(hk.next_rng_key(), keep, tuple(shape))
  return jnp.where(kept, jnp.asarray(1.0 / keep, dtype), jnp.zeros((), dtype))


def input_masks(
  rate: float, sample_inputs: Array, dtype, rng: jax.Array | None
) -> DropoutMasks:
  """The masks of a cell with no recurrent weight: an input mask only.

  Shaped like one step of input; drawn from ``rng`` when given (the same key
  gives the same mask), else from ``hk.next_rng_key()`` when ``rate`` is
  non-zero.
  """

  def sample():
    return DropoutMasks(sample_mask(rate, sample_inputs.shape, dtype), None)

  if rng is None:
    return sample()
  with hk.with_rng(rng):
    return sample()


TRAINING_FIXES = (
  "pass an rng to apply (model.apply(params, rng, ...), so not under "
  "hk.without_apply_rng), or call with is_training=False"
)


def describe_rates(cell: hk.Module) -> str:
  """``"GRUCell 'gru_cell' (dropout_rate=0.0, ...)"``, for error messages."""
  rates = ", ".join(
    f"{name}={getattr(cell, name)}"
    for name in ("dropout_rate", "recurrent_dropout_rate")
    if hasattr(cell, name)
  )
  return f"{type(cell).__name__} {cell.module_name!r} ({rates})"


def require_rng(context: str, what: str, fixes: str = TRAINING_FIXES) -> None:
  """Raises a ValueError saying what needs an rng, when none was given.

  It looks without drawing a key, so the keys drawn after it are unchanged.

  Args:
    context: the module raising, for the message.
    what: what needs random numbers, e.g. ``"is_training=True applies ..."``.
    fixes: the ways out.
  """
  if hk.maybe_get_rng_sequence_state() is None:
    raise ValueError(
      f"{context}: {what}, which needs an rng, but none was given; {fixes}"
    )
