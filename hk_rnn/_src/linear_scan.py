r"""Linear recurrences ``h_t = a_t ⊙ h_{t-1} + b_t`` over a whole sequence.

A cell whose update is linear in its carry (``MinGRUCell``, ``MinLSTMCell``,
an LRU) computes ``a_t`` and ``b_t`` from the inputs alone, for every step at
once; what remains is this elementwise recurrence, which needs no matrix
product per step and so can run in several forms:

* ``"sequential"``: a ``lax.scan``, one step per iteration, O(T) work in T
  dependent iterations;
* ``"chunked"``: the time axis cut into about sqrt(T) chunks of about
  sqrt(T) steps; one scan over the position within a chunk runs every chunk
  at once (from a zero carry, also accumulating the product of the ``a``s),
  a short scan over the chunks then gives each chunk's true starting carry,
  and one elementwise pass adds it in. O(T) work in about 2 sqrt(T)
  iterations;
* ``"associative"``: ``lax.associative_scan`` with the composition
  :math:`(a_1, b_1) \circ (a_2, b_2) = (a_1 a_2,\ a_2 b_1 + b_2)`,
  O(T log T) work in O(log T) depth: the form for accelerators.

No form divides by a product of gates (the "cumulative product, then
divide" trick overflows once the product underflows), so with
``|a| <= 1``, which the gated cells guarantee, every intermediate stays
bounded at any length: a product of many gates may underflow to 0, which
is the value it approximates.

The gradient is written by hand (``jax.custom_vjp``): the cotangent of a
linear recurrence is the same recurrence run backwards,
:math:`\lambda_t = \bar h_t + a_{t+1} \lambda_{t+1}`, which the same form
computes; then :math:`\bar b_t = \lambda_t`,
:math:`\bar a_t = \lambda_t h_{t-1}` and :math:`\bar h_{-1} = a_0 \lambda_0`.
Only ``a`` and the outputs are kept for it.

Padding and packed segments fold into the coefficients
(:func:`mask_coefficients`): a padded step keeps the carry (``a = 1``,
``b = 0``); a step that restarts from a reset carry ``r`` forgets the past
(``a = 0``) and takes ``b = a_t r + b_t``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

METHODS = ("auto", "associative", "chunked", "sequential")


def choose_method(time: int, platform: str | None = None) -> str:
  """The form ``"auto"`` stands for, by platform.

  Measured on XLA:CPU (``benchmarks/linear.py``, ``docs/parallel_cells.md``),
  the sequential loop is the fastest form at every length and width tried
  (T = 256 to 4096, B·F = 32 to 4096): the recurrence is bound by memory
  traffic there, and the loop reads and writes each array once, where the
  other forms make several passes. On GPUs and TPUs, where one step of the
  loop leaves most of the chip idle, the associative scan's O(log T) depth
  is the standard choice (not measured here: no accelerator was available).

  >>> choose_method(4096, "cpu"), choose_method(16, "gpu")
  ('sequential', 'associative')

  Args:
    time: the number of steps (kept so that a length rule can be added).
    platform: ``"cpu"``, ``"gpu"``, ``"tpu"``...; the default backend's when
      None.

  Returns:
    ``"sequential"`` on CPU, ``"associative"`` elsewhere.
  """
  del time
  platform = jax.default_backend() if platform is None else platform
  return "sequential" if platform == "cpu" else "associative"


def check_method(method: str, context: str) -> str:
  if method not in METHODS:
    raise ValueError(
      f"{context}: scan_method must be one of {METHODS}, got {method!r}"
    )
  return method


def mask_coefficients(
  a: Array,
  b: Array,
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: Array | None = None,
) -> tuple[Array, Array]:
  """Folds padding and segment restarts into ``a`` and ``b``.

  The step loop this reproduces first replaces the carry with
  ``reset_carry`` where ``reset``, then keeps it unchanged where not
  ``valid``. ``jnp.where`` (never a multiply by a 0/1 mask) sets the padded
  coefficients, so non-finite values there reach neither ``a``, ``b`` nor
  their gradients.

  >>> a, b = jnp.full((3, 1, 1), 0.5), jnp.ones((3, 1, 1))
  >>> valid = jnp.array([[True], [True], [False]])
  >>> reset = jnp.array([[False], [True], [False]])
  >>> a, b = mask_coefficients(a, b, valid=valid, reset=reset,
  ...                          reset_carry=jnp.full((1, 1), 4.0))
  >>> a.ravel().tolist(), b.ravel().tolist()
  ([0.5, 0.0, 1.0], [1.0, 3.0, 0.0])

  Args:
    a: ``(T, B, *F)``.
    b: ``(T, B, *F)``.
    valid: ``(T, B)`` bool, False at padded steps; None: all valid.
    reset: ``(T, B)`` bool, True where a row restarts from ``reset_carry``;
      None: never.
    reset_carry: ``(B, *F)``; needed with ``reset``.

  Returns:
    ``(a, b)`` of the same shapes.
  """

  def rows(mask):
    return mask.reshape(mask.shape + (1,) * (a.ndim - 2))

  if reset is not None:
    restart = rows(reset)
    b = jnp.where(restart, a * reset_carry.astype(a.dtype) + b, b)
    a = jnp.where(restart, jnp.zeros((), a.dtype), a)
  if valid is not None:
    keep = rows(valid)
    a = jnp.where(keep, a, jnp.ones((), a.dtype))
    b = jnp.where(keep, b, jnp.zeros((), b.dtype))
  return a, b


def linear_recurrence(
  a: Array,
  b: Array,
  initial: Array,
  *,
  method: str = "auto",
  unroll: int = 1,
) -> Array:
  r"""Every :math:`h_t = a_t \odot h_{t-1} + b_t` along axis 0, from ``initial``.

  >>> a = jnp.array([[0.5], [0.5], [1.0]])
  >>> b = jnp.array([[1.0], [1.0], [0.0]])
  >>> h = linear_recurrence(a, b, jnp.array([2.0]), method="sequential")
  >>> h.ravel().tolist()
  [2.0, 2.0, 2.0]
  >>> h = linear_recurrence(a, b, jnp.array([0.0]), method="associative")
  >>> h.ravel().tolist()
  [1.0, 1.5, 1.5]

  Args:
    a: ``(T, *shape)``, or anything that broadcasts to ``b``'s shape.
    b: ``(T, *shape)``.
    initial: ``h_{-1}``, ``shape``.
    method: ``"sequential"``, ``"chunked"``, ``"associative"`` (see the
      module docstring), or ``"auto"`` for :func:`choose_method`'s pick.
    unroll: scan steps per iteration in the sequential and chunked forms.

  Returns:
    ``h (T, *shape)``: ``h[t]`` is the carry after step ``t``. Every form
    computes the same values (up to rounding) and gradients.
  """
  a, b, initial, method = _coefficients(
    a, b, initial, method, "linear_recurrence"
  )
  if not b.shape[0]:
    return b
  return _recurrence(method, int(unroll), a, b, initial)


def _coefficients(a, b, initial, method, context):
  """Checks ``method`` and brings ``a``, ``b``, ``initial`` to one dtype and
  ``b``'s shape; ``"auto"`` becomes :func:`choose_method`'s pick."""
  check_method(method, context)
  b = jnp.asarray(b)
  dtype = jnp.result_type(a, b, initial)
  a = jnp.broadcast_to(jnp.asarray(a, dtype), b.shape)
  b = b.astype(dtype)
  initial = jnp.broadcast_to(jnp.asarray(initial, dtype), b.shape[1:])
  if method == "auto" and b.shape[0]:
    method = choose_method(b.shape[0])
  return a, b, initial, method


def masked_linear_recurrence(
  a: Array,
  b: Array,
  initial: Array,
  valid: Array | None,
  *,
  method: str = "auto",
  unroll: int = 1,
) -> tuple[Array, Array]:
  r"""The recurrence with padded steps skipped: ``(outputs, final)``.

  Where ``valid[t]`` is False the carry is kept and the output is 0
  (padding, which must only follow a row's valid steps, as in ``RNN``):
  :func:`linear_recurrence` of ``mask_coefficients(a, b, valid=valid)``,
  outputs zeroed at padding. The sequential form applies the mask inside
  its loop (forward and backward), which saves the full-size passes that
  masking the coefficients and outputs would take.

  >>> a, b = jnp.full((3, 1), 0.5), jnp.ones((3, 1))
  >>> valid = jnp.array([[True], [True], [False]])
  >>> outputs, final = masked_linear_recurrence(
  ...     a, b, jnp.zeros((1,)), valid, method="sequential")
  >>> outputs.ravel().tolist(), final.tolist()
  ([1.0, 1.5, 0.0], [1.5])

  Args:
    a: ``(T, B, *F)``, or anything that broadcasts to ``b``'s shape.
    b: ``(T, B, *F)``.
    initial: ``(B, *F)``.
    valid: ``(T, B)`` bool; None: every step valid.
    method, unroll: as for :func:`linear_recurrence`.

  Returns:
    ``outputs (T, B, *F)``, zero at padded steps, and the carry after the
    last step, ``(B, *F)`` (``initial`` when ``T = 0``).
  """
  a, b, initial, method = _coefficients(
    a, b, initial, method, "masked_linear_recurrence"
  )
  dtype = b.dtype
  if not b.shape[0]:
    return b, initial
  if valid is None:
    h = _recurrence(method, int(unroll), a, b, initial)
    return h, h[-1]
  valid = jnp.asarray(valid, bool)
  if method == "sequential":
    keep = valid.reshape(valid.shape + (1,) * (b.ndim - 2)).astype(dtype)
    return _masked_sequential(int(unroll), a, b, initial, keep)
  a, b = mask_coefficients(a, b, valid=valid)
  h = _recurrence(method, int(unroll), a, b, initial)
  rows = valid.reshape(valid.shape + (1,) * (b.ndim - 2))
  return jnp.where(rows, h, jnp.zeros((), dtype)), h[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _masked_sequential(unroll, a, b, initial, keep):
  return _masked_sequential_forward(unroll, a, b, initial, keep)[0]


def _masked_sequential_forward(unroll, a, b, initial, keep):
  """``keep (T, B, 1...)`` is 1.0 at valid steps, 0.0 at padded ones.

  Padding is only ever at the end of a row, so the carry before a valid
  step is the previous output (or ``initial``): the outputs are all the
  backward pass keeps.
  """

  def step(h, inputs):
    a_t, b_t, keep_t = inputs
    new_h = a_t * h + b_t
    kept = keep_t != 0  # `!=`, not `>`: complex carries have no order
    return jnp.where(kept, new_h, h), jnp.where(kept, new_h, 0)

  final, outputs = lax.scan(step, initial, (a, b, keep), unroll=unroll)
  return (outputs, final), (a, outputs, initial, keep)


def _masked_sequential_backward(unroll, saved, cotangents):
  a, outputs, initial, keep = saved
  outputs_bar, final_bar = cotangents

  def step(carry_bar, inputs):
    a_t, outputs_bar_t, keep_t = inputs
    # The cotangent of this step's new h; zero at padding, where the carry
    # passes through unchanged.
    new_h_bar = keep_t * (outputs_bar_t + carry_bar)
    carry_bar = jnp.where(keep_t != 0, a_t * new_h_bar, carry_bar)
    return carry_bar, new_h_bar

  initial_bar, b_bar = lax.scan(
    step, final_bar, (a, outputs_bar, keep), reverse=True, unroll=unroll
  )
  h_before = jnp.concatenate([initial[None], outputs[:-1]])
  return b_bar * h_before, b_bar, initial_bar, jnp.zeros_like(keep)


_masked_sequential.defvjp(
  lambda unroll, *args: _masked_sequential_forward(unroll, *args),
  _masked_sequential_backward,
)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recurrence(method, unroll, a, b, initial):
  return _FORMS[method](a, b, initial, unroll)


def _recurrence_forward(method, unroll, a, b, initial):
  h = _FORMS[method](a, b, initial, unroll)
  return h, (a, h, initial)


def _recurrence_backward(method, unroll, saved, h_bar):
  a, h, initial = saved
  lam = _BACKWARD_FORMS.get(method, _reversed)(method, a, h_bar, unroll)
  h_before = jnp.concatenate([initial[None], h[:-1]])
  return lam * h_before, lam, a[0] * lam[0]


def _reversed(method, a, h_bar, unroll):
  """``lambda_t = h_bar_t + a_{t+1} lambda_{t+1}`` (``lambda_T = 0``).

  The forward recurrence on the time-reversed cotangents, each coefficient
  moved one step earlier.
  """
  a_next = jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])
  flip = functools.partial(jnp.flip, axis=0)
  zeros = jnp.zeros(a.shape[1:], a.dtype)
  return flip(_FORMS[method](flip(a_next), flip(h_bar), zeros, unroll))


def _sequential_backward(method, a, h_bar, unroll):
  """:func:`_reversed` as one reverse scan: no flipped or shifted copies."""
  del method

  def step(carry, step_inputs):
    lam, a_after = carry
    a_t, h_bar_t = step_inputs
    lam = h_bar_t + a_after * lam
    return (lam, a_t), lam

  zeros = jnp.zeros(a.shape[1:], a.dtype)
  _, lam = lax.scan(
    step, (zeros, zeros), (a, h_bar), reverse=True, unroll=unroll
  )
  return lam


_recurrence.defvjp(_recurrence_forward, _recurrence_backward)


def _sequential(a, b, initial, unroll):
  def step(h, coefficients):
    a_t, b_t = coefficients
    h = a_t * h + b_t
    return h, h

  _, h = lax.scan(step, initial, (a, b), unroll=unroll)
  return h


def _compose(earlier, later):
  a_1, b_1 = earlier
  a_2, b_2 = later
  return a_1 * a_2, a_2 * b_1 + b_2


def _associative(a, b, initial, unroll):
  del unroll
  # Fold h_{-1} into the first step; the b half of the scan is then h.
  b = b.at[0].add(a[0] * initial)
  _, h = lax.associative_scan(_compose, (a, b))
  return h


def chunk_length(time: int) -> int:
  """The chunked form's chunk length: about sqrt(time), at least 1."""
  return max(1, math.isqrt(max(time - 1, 0)) + 1)


def _chunked(a, b, initial, unroll):
  time = a.shape[0]
  chunk = chunk_length(time)
  chunks = -(-time // chunk)
  extra = chunks * chunk - time
  if extra:  # identity steps (a = 1, b = 0) fill the last chunk
    a = jnp.concatenate([a, jnp.ones((extra, *a.shape[1:]), a.dtype)])
    b = jnp.concatenate([b, jnp.zeros((extra, *b.shape[1:]), b.dtype)])

  def by_position(x):  # (chunks * chunk, ...) -> (chunk, chunks, ...)
    return jnp.swapaxes(x.reshape((chunks, chunk, *x.shape[1:])), 0, 1)

  def local_step(state, coefficients):
    h, product = state
    a_t, b_t = coefficients
    h, product = a_t * h + b_t, a_t * product
    return (h, product), (h, product)

  # Every chunk from a zero carry, all chunks at once; `product` is the
  # product of the a's since the chunk's start, bounded by max |a|.
  zeros = jnp.zeros((chunks, *a.shape[1:]), a.dtype)
  (h_end, product_end), (h_local, products) = lax.scan(
    local_step,
    (zeros, jnp.ones_like(zeros)),
    (by_position(a), by_position(b)),
    unroll=unroll,
  )

  def across(h, chunk_summary):
    product, h_local_end = chunk_summary
    return product * h + h_local_end, h

  # The carry entering each chunk.
  _, starts = lax.scan(across, initial, (product_end, h_end))
  h = h_local + products * starts[None]
  h = jnp.swapaxes(h, 0, 1).reshape((chunks * chunk, *a.shape[1:]))
  return h[:time]


_BACKWARD_FORMS = {"sequential": _sequential_backward}
_FORMS = {
  "sequential": _sequential,
  "chunked": _chunked,
  "associative": _associative,
}
