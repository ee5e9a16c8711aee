"""Shared test helpers: reference recurrences written as plain loops.

The references here know nothing of scans, masks or flips: they run each
sequence (each segment of a packed row) on its own, one step at a time, with
the cell equations written out again. They are differentiable (``jnp``), so
the same loop serves as the oracle for values and for gradients.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import hk_rnn

CELLS = {
  "lstm": hk_rnn.LSTMCell,
  "gru": hk_rnn.GRUCell,
  "simple": hk_rnn.SimpleCell,
  "mgu": hk_rnn.MGUCell,
}
CARRY_SIZE = {"lstm": 2, "gru": 1, "simple": 1, "mgu": 1}


def sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def reference_step(kind, params, carry, x, recurrent_mask=None):
  """One step of cell ``kind`` with its parameters written out by hand."""
  h = carry[1] if kind == "lstm" else carry
  h_in = h if recurrent_mask is None else h * recurrent_mask
  if kind == "lstm":
    c = carry[0]
    z = x @ params["w_i"] + h_in @ params["w_h"] + params["b"]
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
    h = sigmoid(o) * jnp.tanh(c)
    return (c, h), h
  if kind == "simple":
    h = jnp.tanh(x @ params["w_i"] + h_in @ params["w_h"] + params["b"])
    return h, h
  xs = jnp.split(
    x @ params["w_i"] + params["b_i"], 3 if kind == "gru" else 2, -1
  )
  hs = jnp.split(
    h_in @ params["w_h"] + params["b_h"], 3 if kind == "gru" else 2, -1
  )
  if kind == "gru":
    r = sigmoid(xs[0] + hs[0])
    z = sigmoid(xs[1] + hs[1])
    n = jnp.tanh(xs[2] + r * hs[2])
  else:  # mgu
    z = sigmoid(xs[0] + hs[0])
    n = jnp.tanh(xs[1] + z * hs[1])
  h = (1.0 - z) * n + z * h
  return h, h


def segments_of(ids_row):
  """``[(id, [steps...]), ...]`` for one row of segment ids, padding left out."""
  ids_row = np.asarray(ids_row)
  out = []
  for segment in dict.fromkeys(ids_row[ids_row != 0].tolist()):
    out.append(np.flatnonzero(ids_row == segment).tolist())
  return out


def reference_rnn(
  kind,
  params,
  inputs,
  ids,
  initial_carry,
  *,
  reverse=False,
  keep_order=False,
  recurrent_mask=None,
):
  """Runs each segment of each row separately: ``inputs (batch, time, in)``.

  ``initial_carry`` has a leading batch axis; ``ids`` is ``(batch, time)``.
  Returns ``(final_carry, outputs)`` laid out like ``hk_rnn.RNN``'s.
  """
  batch, time = ids.shape
  features = params["w_h"].shape[0]
  finals, rows = [], []
  for b in range(batch):
    row_carry = jax.tree.map(lambda leaf, b=b: leaf[b], initial_carry)
    mask = None if recurrent_mask is None else recurrent_mask[b]
    outputs = [jnp.zeros((features,), inputs.dtype)] * time
    for steps in segments_of(ids[b]):
      order = steps[::-1] if reverse else steps
      carry = jax.tree.map(lambda leaf, b=b: leaf[b], initial_carry)
      for position, t in zip(steps, order, strict=True):
        carry, y = reference_step(kind, params, carry, inputs[b, t], mask)
        outputs[t if keep_order or not reverse else position] = y
      row_carry = carry
    finals.append(row_carry)
    rows.append(jnp.stack(outputs))
  final = jax.tree.map(lambda *leaves: jnp.stack(leaves), *finals)
  return final, jnp.stack(rows)


def random_ids(rng, batch, time, *, packed=False, min_length=0):
  """Random valid segment ids ``(batch, time)``: padding at the end."""
  ids = np.zeros((batch, time), np.int32)
  for b in range(batch):
    length = rng.integers(min_length, time + 1)
    if packed and length > 1:
      cuts = np.sort(
        rng.choice(np.arange(1, length), size=min(2, length - 1), replace=False)
      )
      ids[b, :length] = 1 + np.searchsorted(cuts, np.arange(length), "right")
    else:
      ids[b, :length] = 1
  return ids


def transform(fn):
  """``hk.transform`` with rng-free apply, for deterministic test bodies."""
  return hk.without_apply_rng(hk.transform(fn))


def init_and_apply(fn, *args, seed=0, **kwargs):
  """Initialises ``fn`` on ``args`` and applies it; returns (params, out)."""
  model = transform(fn)
  params = model.init(jax.random.PRNGKey(seed), *args, **kwargs)
  return params, model.apply(params, *args, **kwargs)


def cell_params(params, cell_name):
  """The parameter dict of one cell module, by its name."""
  return params[cell_name]


def tree_allclose(test, actual, expected, atol=1e-5, rtol=1e-5):
  """Asserts two pytrees have the same structure and close leaves."""
  test.assertEqual(jax.tree.structure(actual), jax.tree.structure(expected))
  for a, e in zip(
    jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True
  ):
    np.testing.assert_allclose(
      np.asarray(a, np.float64),
      np.asarray(e, np.float64),
      atol=atol,
      rtol=rtol,
    )


def value_and_grad(model, params, *args, **kwargs):
  """``model.apply``'s results and the gradient of a loss of all of them.

  The loss, ``Σ_n Σ sin((1 + n) · leaf_n)`` over the result's leaves, weighs
  every output and carry array differently, so that a wrong leaf shows.
  """

  def loss(params):
    leaves = jax.tree.leaves(model.apply(params, *args, **kwargs))
    return sum(
      jnp.sum(jnp.sin(leaf * (1 + n))) for n, leaf in enumerate(leaves)
    )

  return model.apply(params, *args, **kwargs), jax.grad(loss)(params)


def weighted_sum_and_grads(model):
  """Jitted ``(params, x, ids, carry, w_out, w_final) -> (final, y, grads)``.

  ``model.apply(params, x, ids, carry)`` gives ``(final, y)``; ``grads`` are
  those of ``Σ w_out·y + Σ w_final·final`` (``w_final`` shaped like
  ``final``, leaf by leaf) with respect to the parameters, ``x`` and the
  initial carry.
  """

  def loss(params, x, ids, carry, w_out, w_final):
    final, outputs = model.apply(params, x, ids, carry)
    total = jnp.sum(w_out * outputs) + sum(
      jnp.sum(w * leaf)
      for w, leaf in zip(
        jax.tree.leaves(w_final), jax.tree.leaves(final), strict=True
      )
    )
    return total, (final, outputs)

  @jax.jit
  def run(params, x, ids, carry, w_out, w_final):
    grads, (final, outputs) = jax.grad(loss, (0, 1, 3), has_aux=True)(
      params, x, ids, carry, w_out, w_final
    )
    return final, outputs, grads

  return run


# Row 0 is full, row 1 packs three segments, row 2 is padded, row 3 empty.
PACKED_IDS = np.array(
  [
    [1, 1, 1, 1, 1, 1, 1],
    [1, 1, 2, 2, 2, 3, 0],
    [4, 4, 4, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
  ],
  np.int32,
)


def inputs_with_bad_padding(shape, seed=0, ids=None):
  """Normal float32 inputs; NaN and ±inf at the padded steps of ``ids``."""
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  if ids is not None:
    for n, (row, t) in enumerate(np.argwhere(ids == 0)):
      x[row, t] = (np.nan, np.inf, -np.inf)[n % 3]
  return x
