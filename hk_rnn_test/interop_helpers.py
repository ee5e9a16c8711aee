"""What the hk_rnn.interop tests share: a variable-length batch, random
weights, the hk_rnn models to load them into, and torch modules to run.

Importing this module sets Keras 3's backend to JAX, which must be chosen
before keras is first imported: every interop test file imports it first.
"""

import os

# Keras 3 must pick its backend before it is first imported.
os.environ["KERAS_BACKEND"] = "jax"

import importlib.util  # noqa: E402
from collections.abc import Mapping  # noqa: E402

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hk_rnn  # noqa: E402
from hk_rnn_test import test_utils  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_FLAX = importlib.util.find_spec("flax") is not None
HAS_KERAS = importlib.util.find_spec("keras") is not None

BATCH, TIME, INPUTS, HIDDEN = 3, 5, 3, 4
LENGTHS = np.array([5, 2, 4], np.int32)
VALID = np.arange(TIME) < LENGTHS[:, None]


def batch_inputs(nan_padding=True):
  """``(BATCH, TIME, INPUTS)``; NaN at padding unless told otherwise."""
  x = np.random.default_rng(0).normal(size=(BATCH, TIME, INPUTS))
  if nan_padding:
    x = np.where(VALID[..., None], x, np.nan)
  return x.astype(np.float32)


def randomized(tree, seed, scale=0.5):
  """The same nested dicts, in the same key order, with random leaves."""
  rng = np.random.default_rng(seed)

  def walk(node):
    if isinstance(node, Mapping):
      return {key: walk(value) for key, value in node.items()}
    noise = rng.normal(size=np.shape(node)) * scale
    return jnp.asarray(noise, jnp.result_type(node))

  return walk(tree)


def key_sorted(params):
  """What ``jax.tree.map`` (or jit, or a checkpoint restore) returns."""
  return jax.tree.map(lambda leaf: leaf, params)


def cells_step(cell_fns, first_input, chain=True):
  """Params of cells created in order, each applied once (cheap to init).

  Each cell reads the previous one's output, or with ``chain=False`` the
  same input.
  """

  def forward(x):
    y = x
    for make in cell_fns:
      cell = make()
      _, y = cell(cell.initialize_carry(y), y if chain else x)

  return hk.transform(forward).init(jax.random.PRNGKey(0), first_input)


def stacked_model(cell_fn, num_layers, bidirectional, merge=None):
  """A StackedRNN of ``num_layers`` (Bidirectional) RNNs, by lengths."""

  def forward(x, lengths):
    layers = []
    for _ in range(num_layers):
      if bidirectional:
        layers.append(
          hk_rnn.Bidirectional(
            hk_rnn.RNN(cell_fn()), hk_rnn.RNN(cell_fn()), merge_fn=merge
          )
        )
      else:
        layers.append(hk_rnn.RNN(cell_fn()))
    return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)

  model = test_utils.transform(forward)
  return model, jax.jit(model.apply)


def assert_valid_close(test, actual, expected):
  """Outputs equal at valid steps; hk_rnn's exactly 0 at padding."""
  np.testing.assert_allclose(
    np.where(VALID[..., None], actual, 0),
    np.where(VALID[..., None], expected, 0),
    atol=1e-5,
    rtol=1e-5,
  )
  test.assertTrue(np.all(np.asarray(actual)[~VALID] == 0))


HK_RNN_CELL = {
  "LSTM": lambda: hk_rnn.LSTMCell(HIDDEN),
  "GRU": lambda: hk_rnn.GRUCell(HIDDEN),
  "RNN": lambda: hk_rnn.SimpleCell(HIDDEN),
}


def torch_run(module, x):
  """``module`` (batch-first) on the padded batch ``x``, as torch packs it:
  outputs zero-padded to ``TIME``, and the final state as a list."""
  import torch
  from torch.nn.utils import rnn as torch_rnn

  packed = torch_rnn.pack_padded_sequence(
    torch.from_numpy(np.nan_to_num(x)),
    torch.from_numpy(LENGTHS.astype(np.int64)),
    batch_first=True,
    enforce_sorted=False,
  )
  with torch.no_grad():
    outputs, state = module(packed)
  outputs, _ = torch_rnn.pad_packed_sequence(
    outputs, batch_first=True, total_length=TIME
  )
  if not isinstance(state, tuple):
    state = (state,)
  return outputs.numpy(), [s.numpy() for s in state]


def torch_module(name, options, num_layers, bidirectional, bias, seed=0):
  """A batch-first ``torch.nn.<name>`` of ``INPUTS`` to ``HIDDEN``, with
  random weights (not torch's init: biases and all, larger)."""
  import torch

  torch.manual_seed(seed)
  module = getattr(torch.nn, name)(
    INPUTS,
    HIDDEN,
    num_layers=num_layers,
    bidirectional=bidirectional,
    bias=bias,
    batch_first=True,
    **options,
  )
  with torch.no_grad():
    for parameter in module.parameters():
      parameter.normal_(0.0, 0.5)
  return module
