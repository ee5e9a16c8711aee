"""cuDNN's LSTM on a CUDA GPU, through ``jax.experimental.rnn``.

``jax.experimental.rnn.lstm`` takes batch-major inputs, ``(layers, B, F)``
carries, int32 lengths and every parameter in one flat float32 vector laid
out as PyTorch's ``nn.LSTM``: ``W_ih (4F, D)``, ``W_hh (4F, F)``, then
``b_ih (4F,)``, ``b_hh (4F,)``, gate blocks i, f, g, o -- our order,
transposed, with a second bias. It supports float32 only, one sequence per
row with padding at the end, and no dropout mask on ``h``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _platform() -> str:
  """``"cuda"``, ``"rocm"`` or the default backend's name."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  version = getattr(jax.devices()[0].client, "platform_version", "")
  return "rocm" if "rocm" in str(version).lower() else "cuda"


def refusal(
  inputs,
  w_i,
  w_h,
  b,
  initial_carry,
  *,
  reset,
  recurrent_mask,
  step_carries=False,
  platform=None,
) -> str | None:
  """Why cuDNN's LSTM cannot compute exactly this call; None if it can.

  ``platform`` (default: this process's, :func:`_platform`) is for tests.
  """
  platform = platform or _platform()
  if platform != "cuda":
    return "not on a CUDA GPU"
  if reset is not None:
    return "packed rows"
  if recurrent_mask is not None:
    return "recurrent dropout"
  if step_carries:
    return "per-step carries (max_segments)"
  arrays = (inputs, w_i, w_h, b, *initial_carry)
  if any(a.dtype != jnp.float32 for a in arrays):
    return "not float32"
  return None


def lstm_weights(w_i: Array, w_h: Array, b: Array) -> Array:
  """Packs ``w_i (D, 4F)``, ``w_h (F, 4F)``, ``b (4F,)`` for cuDNN.

  Returns the flat vector ``[w_iᵀ, w_hᵀ, b, 0]`` (row-major): cuDNN's two
  biases are added, so ours goes in the first and the second is zero.
  Differentiable: the flat gradient maps back through the transposes.
  """
  return jnp.concatenate(
    [w_i.T.reshape(-1), w_h.T.reshape(-1), b, jnp.zeros_like(b)]
  )


def lstm(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
  *,
  valid: Array | None = None,
  lstm_fn: Callable[..., tuple[Array, Array, Array]] | None = None,
) -> tuple[tuple[Array, Array], Array]:
  """:func:`~hk_rnn._src.kernels.dispatch.lstm_sequence` without resets or dropout, through cuDNN.

  ``valid`` must mark a prefix of each row (padding at the end), as
  ``hk_rnn.RNN`` guarantees. ``lstm_fn`` replaces
  ``jax.experimental.rnn.lstm`` (same signature), which only lowers on CUDA;
  tests pass a CPU reference.
  """
  if lstm_fn is None:
    from jax.experimental import rnn

    lstm_fn = rnn.lstm
  steps, batch, input_size = inputs.shape
  features = w_h.shape[0]
  c_0, h_0 = initial_carry
  if valid is None:
    lengths = jnp.full((batch,), steps, jnp.int32)
  else:
    valid = jnp.asarray(valid, bool)
    inputs = jnp.where(valid[..., None], inputs, 0)
    lengths = jnp.sum(valid, axis=0, dtype=jnp.int32)
  # cuDNN wants at least one step per row; an empty row runs one step on
  # zeros whose results are then discarded (and so get no gradient).
  outputs, h_n, c_n = lstm_fn(
    jnp.swapaxes(inputs, 0, 1),
    h_0[None],
    c_0[None],
    lstm_weights(w_i, w_h, b),
    jnp.maximum(lengths, 1),
    input_size=input_size,
    hidden_size=features,
    num_layers=1,
    dropout=0.0,
    bidirectional=False,
  )
  outputs = jnp.swapaxes(outputs, 0, 1)
  if valid is not None:
    outputs = jnp.where(valid[..., None], outputs, 0)
  empty = (lengths == 0)[:, None]
  final = (jnp.where(empty, c_0, c_n[0]), jnp.where(empty, h_0, h_n[0]))
  return final, outputs
