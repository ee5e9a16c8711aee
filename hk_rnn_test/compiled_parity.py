"""Shared by the compiled-kernel tests: random calls, and parity checks.

:func:`check_parity` runs one call of the compiled kernel and of the XLA
engine on the same random arguments and compares values and gradients; the
tests call it in this process and, for the AVX2 build, in a subprocess.
"""

import jax
import jax.numpy as jnp
import numpy as np

from hk_rnn._src.kernels import compiled, gates, xla

GATES = {"lstm": 4, "gru": 3}
# F = 19: one full SIMD group and a partial one (16 + 3 or 8 + 8 + 3 lanes).
T, B, D, F = 6, 3, 5, 19


def random_arguments(kind, steps=T, batch=B, inputs=D, features=F, seed=0):
  """``(x, w_i, w_h, biases, carry, reset_carry, valid, reset, mask)``."""
  rng = np.random.default_rng(seed)

  def normal(*shape, scale=1.0):
    return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

  width = GATES[kind] * features
  x = normal(steps, batch, inputs)
  w_i = normal(inputs, width, scale=0.5)
  w_h = normal(features, width, scale=0.4)
  if kind == "lstm":
    biases = (normal(width, scale=0.3),)
    carry = (normal(batch, features, scale=0.5), normal(batch, features))
    reset_carry = (normal(batch, features), normal(batch, features))
  else:
    biases = (normal(width, scale=0.3), normal(width, scale=0.3))
    carry = normal(batch, features)
    reset_carry = normal(batch, features)
  lengths = rng.integers(0, steps + 1, size=batch)
  valid = jnp.asarray(np.arange(steps)[:, None] < lengths[None, :])
  reset = jnp.asarray(rng.random((steps, batch)) < 0.3)
  mask = jnp.asarray((rng.random((batch, features)) < 0.75) / 0.75, jnp.float32)
  return x, w_i, w_h, biases, carry, reset_carry, valid, reset, mask


def engine(kind):
  """The XLA engine with the kernel's signature (reset_carry optional)."""
  if kind == "lstm":

    def run(x, w_i, w_h, b, carry, reset_carry=None, **options):
      reset_carry = carry if reset_carry is None else reset_carry
      return xla.lstm(x, w_i, w_h, b, carry, reset_carry, **options)

    return run

  def run_gru(x, w_i, w_h, b_i, b_h, carry, reset_carry=None, **options):
    reset_carry = carry if reset_carry is None else reset_carry
    return xla.single_carry(
      gates.GRU, x, w_i, w_h, b_i, b_h, carry, reset_carry, **options
    )

  return run_gru


def kernel(kind):
  return compiled.lstm if kind == "lstm" else compiled.gru


# name -> which optional arguments the call passes.
CASES = {
  "plain": {},
  "lengths": {"valid": True},
  "packed": {"valid": True, "reset": True, "reset_carry": True},
  "packed_same_carry": {"reset": True},
  "dropout": {"recurrent_mask": True},
  "step_carries": {"valid": True, "reset": True, "return_step_carries": True},
  "everything": {
    "valid": True,
    "reset": True,
    "reset_carry": True,
    "recurrent_mask": True,
    "return_step_carries": True,
  },
}


def loss_and_gradients(kind, fn, case, args, nan_padding=False):
  """A jitted loss over every result, and its gradient in every argument."""
  x, w_i, w_h, biases, carry, reset_carry, valid, reset, mask = args
  options = CASES[case]
  keywords = {}
  if options.get("valid"):
    keywords["valid"] = valid
    if nan_padding:
      x = jnp.where(valid[..., None], x, jnp.nan)
  if options.get("reset"):
    keywords["reset"] = reset
  if options.get("recurrent_mask"):
    keywords["recurrent_mask"] = mask
  if options.get("return_step_carries"):
    keywords["return_step_carries"] = True

  def loss(x, w_i, w_h, biases, carry, reset_carry):
    more = dict(keywords)
    if options.get("reset_carry"):
      more["reset_carry"] = reset_carry
    results = fn(x, w_i, w_h, *biases, carry, **more)
    leaves = jax.tree.leaves(results)
    # Different weights per result, so that no cotangent is symmetric.
    value = sum(
      jnp.sum(jnp.sin(leaf * (1 + 0.1 * index)))
      for index, leaf in enumerate(leaves)
    )
    return value, results

  grad = jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))
  (_, results), gradients = grad(x, w_i, w_h, biases, carry, reset_carry)
  return results, gradients


def assert_trees_close(actual, expected, tolerance=2e-5):
  actual_leaves, actual_tree = jax.tree.flatten(actual)
  expected_leaves, expected_tree = jax.tree.flatten(expected)
  assert actual_tree == expected_tree, (actual_tree, expected_tree)
  for a, e in zip(actual_leaves, expected_leaves, strict=True):
    np.testing.assert_allclose(a, e, rtol=tolerance, atol=tolerance)


def check_parity(kind, case, **sizes):
  """Raises unless kernel and engine agree in values and gradients."""
  args = random_arguments(kind, **sizes)
  got = loss_and_gradients(kind, kernel(kind), case, args)
  want = loss_and_gradients(kind, engine(kind), case, args)
  assert_trees_close(got, want)
