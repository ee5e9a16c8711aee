"""The batch that rnn_test and dropout_test run one RNN on.

Sizes, segment ids (padded, packed) and lengths, random inputs, a
one-RNN model of any of test_utils.CELLS, and its zero carry.
"""

import jax.numpy as jnp
import numpy as np

import hk_rnn
from hk_rnn_test import test_utils

BATCH, TIME, INPUTS, FEATURES = 3, 6, 4, 5
# Row 0 is padded, row 1 packs three segments, row 2 is full.
PACKED_IDS = np.array(
  [[1, 1, 1, 0, 0, 0], [2, 2, 5, 7, 7, 0], [3, 3, 3, 3, 3, 3]], np.int32
)
PADDED_IDS = np.array(
  [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], np.int32
)
LENGTHS = np.array([3, 5, 6], np.int32)


def random_inputs(seed=0, shape=(BATCH, TIME, INPUTS)):
  """Standard-normal float32 inputs of ``shape``, the same for a seed."""
  return jnp.asarray(
    np.random.default_rng(seed).normal(size=shape), jnp.float32
  )


def rnn_fn(kind, **rnn_options):
  """A forward function: an ``RNN(**rnn_options)`` of ``test_utils.CELLS[kind]``
  (``FEATURES`` wide, named "cell"), called on ``inputs, mask``."""

  def forward(inputs, mask=None, **call_options):
    cell = test_utils.CELLS[kind](FEATURES, name="cell")
    return hk_rnn.RNN(cell, **rnn_options)(inputs, mask, **call_options)

  return forward


def zero_carry(kind, batch=BATCH):
  """That cell's all-zero carry for ``batch`` rows."""
  zeros = jnp.zeros((batch, FEATURES), jnp.float32)
  return (zeros, zeros) if kind == "lstm" else zeros
