"""Checks of what users pass, shared by the modules that take it.

Whether a value can be inspected now (:func:`is_concrete`), arrays and
positive ints checked with errors that name the argument, and how error
messages show shapes and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(value: Any) -> bool:
  """Whether ``value``'s contents can be read on this host now.

  Not for a tracer (under ``jit``, ``vmap``, ``grad``), nor for a global
  ``jax.Array`` of a multi-process run whose shards sit partly on other
  processes' devices: fetching it would fail, and checking only the local
  shards would let one process raise while the others wait for it in a
  collective. Both are checked as traced values are: shapes and dtypes only.
  """
  if isinstance(value, jax.core.Tracer):
    return False
  return not isinstance(value, jax.Array) or value.is_fully_addressable


def describe_shape(shape: Sequence[int]) -> str:
  """A shape for error messages, as a tuple of ints: ``(2, 3)``."""
  return str(tuple(int(d) for d in shape))


def as_array(value: Any, context: str, argument: str) -> Any:
  """``value`` as a jax array (tracers as they are), or a TypeError.

  The error names ``argument`` when ``value`` is no array of numbers (a
  string, None, a dict, a ragged list), where ``jnp.asarray`` would name
  nothing the caller passed.
  """
  if not is_concrete(value) or isinstance(value, jax.Array):
    return value
  try:
    return jnp.asarray(value)
  except (TypeError, ValueError):
    raise TypeError(
      f"{context}: {argument} must be an array of numbers, got "
      f"{type(value).__name__} {abbreviate(value)}"
    ) from None


def abbreviate(value: Any) -> str:
  """``repr(value)`` cut to 60 characters, for error messages."""
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def positive_int(
  value: Any, argument: str, context: str, *, allow_none: bool = False
) -> int | None:
  """``value`` as an int, checked to be positive (or None, if allowed)."""
  if value is None and allow_none:
    return None
  if (
    isinstance(value, (bool, np.bool_))
    or not isinstance(value, (int, np.integer))
    or value < 1
  ):
    expected = "a positive int or None" if allow_none else "a positive int"
    raise ValueError(f"{context}: {argument} must be {expected}, got {value!r}")
  return int(value)
