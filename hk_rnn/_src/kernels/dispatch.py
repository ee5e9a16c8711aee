"""The one place a whole-sequence call picks its backend, and says why.

Backends, fastest first where they apply:

* ``cudnn``: cuDNN's LSTM on a CUDA GPU (:mod:`.cudnn`);
* ``compiled``: the optional compiled CPU kernels (:mod:`.onednn`);
* ``xla``: the fused kernels in JAX (:mod:`.xla`), which run every call.

The choice is made when a function is traced, from the mode:
:func:`use_kernels` if set, else the environment variable ``HK_RNN_KERNELS``
(``auto``, the default; ``xla``; ``compiled``), else ``HK_RNN_ONEDNN=0``
(the older switch) as ``xla``. A function ``jax.jit`` has already traced
keeps the backend it was traced with: after changing the mode, trace again
(a new ``jax.jit`` of the same function reuses JAX's cached trace, so jit a
new function object, or call ``jax.clear_caches()``).

Every choice is recorded for :func:`explain`: one line per sequence call
with the module, the cell, the backend and why each faster one was refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax

Array = jax.Array

MODES = ("auto", "xla", "compiled")
ENVIRONMENT_VARIABLE = "HK_RNN_KERNELS"
_OLD_ENVIRONMENT_VARIABLE = "HK_RNN_ONEDNN"

_override: str | None = None
# The lines ``explain`` collects (None: not collecting) and the module and
# cell of the sequence call being traced.
_explanations: contextvars.ContextVar[list[str] | None] = (
  contextvars.ContextVar("hk_rnn_explanations", default=None)
)
_call_site: contextvars.ContextVar[str | None] = contextvars.ContextVar(
  "hk_rnn_call_site", default=None
)


def _checked_mode(value: Any, source: str) -> str:
  if not isinstance(value, str) or value.strip().lower() not in MODES:
    raise ValueError(
      f"{source} must be one of {', '.join(MODES)}, got {value!r}"
    )
  return value.strip().lower()


class use_kernels:  # noqa: N801 - used as a function and a context manager
  """Sets the kernel mode from Python: ``"auto"``, ``"xla"`` or ``"compiled"``.

  As a plain call the mode stays set (``use_kernels(None)`` goes back to
  ``HK_RNN_KERNELS``); as a context manager it is restored on exit. It
  applies to functions traced afterwards and takes precedence over the
  environment.

  >>> import hk_rnn
  >>> with hk_rnn.use_kernels("xla"):
  ...   pass  # functions traced here run only the XLA fused kernels

  Args:
    name: ``"auto"`` (the compiled CPU kernels where built and supported,
      cuDNN on GPU where supported, else the XLA fused kernels), ``"xla"``
      (never compiled code or cuDNN), ``"compiled"`` (the compiled CPU
      kernels wherever they support the call; a ``RuntimeError`` if they are
      not built), or None.
  """

  def __init__(self, name: str | None):
    global _override
    checked = None if name is None else _checked_mode(name, "use_kernels")
    self._previous = _override
    _override = checked

  def __enter__(self) -> use_kernels:
    return self

  def __exit__(self, *exc_info: Any) -> None:
    global _override
    _override = self._previous


def mode() -> str:
  """The kernel mode in force: ``"auto"``, ``"xla"`` or ``"compiled"``."""
  if _override is not None:
    return _override
  value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
  if value:
    return _checked_mode(value, ENVIRONMENT_VARIABLE)
  old = os.environ.get(_OLD_ENVIRONMENT_VARIABLE, "").strip().lower()
  if old in ("0", "off", "false", "no"):
    return "xla"
  if old in ("1", "on", "true", "yes"):
    return "compiled"
  return "auto"


def _mode_source() -> str:
  if _override is not None:
    return f"use_kernels({_override!r})"
  if os.environ.get(ENVIRONMENT_VARIABLE, "").strip():
    return f"{ENVIRONMENT_VARIABLE}={mode()}"
  return f"{_OLD_ENVIRONMENT_VARIABLE}=0"


@contextlib.contextmanager
def call_site(module: str, cell: Any) -> Iterator[None]:
  """Names the module and cell of the sequence calls traced inside."""
  label = f"{module} ({type(cell).__name__} {cell.module_name!r})"
  token = _call_site.set(label)
  try:
    yield
  finally:
    _call_site.reset(token)


def _record(line: str) -> None:
  lines = _explanations.get()
  if lines is not None:
    lines.append(f"{_call_site.get() or '(no module)'}: {line}")


def record_step_scan(reason: str) -> None:
  """Records a sequence call that steps the cell in ``hk.scan``, and why."""
  _record(f"step scan ({reason})")


def choose(
  kind: str,
  refusals: dict[str, Callable[[], str | None]],
) -> str:
  """The backend for one call, recorded for :func:`explain`.

  Args:
    kind: the cell's kernel, e.g. ``"lstm"``.
    refusals: for each backend faster than ``xla``, fastest first, a
      function giving why it cannot run this call (None: it can).

  Returns:
    The first backend that can run the call in the current mode, else
    ``"xla"``.
  """
  current = mode()
  reasons: dict[str, str] = {}
  chosen = "xla"
  for backend, refusal in refusals.items():
    if current == "xla":
      reasons[backend] = f"off ({_mode_source()})"
      continue
    reason = refusal()
    if reason is None:
      chosen = backend
      break
    reasons[backend] = reason
  if current == "compiled" and "compiled" in reasons:
    from hk_rnn._src.kernels import onednn

    if not onednn.available():
      raise RuntimeError(
        f"{_mode_source()} asks for the compiled CPU kernels, but they "
        f"cannot be used: {reasons['compiled']}. Build them (README, "
        "'optional compiled kernels') or use 'auto'."
      )
  why = "".join(f"; {b}: {r}" for b, r in reasons.items())
  _record(f"{kind} -> {chosen}{why}")
  return chosen


def explain(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[str]:
  """Which kernel each recurrent sequence call in ``fn`` would run, and why.

  Traces ``fn(*args, **kwargs)`` on the arguments' shapes and dtypes
  (``jax.eval_shape``: nothing is computed) in the current kernel mode, and
  returns one line per sequence call: the module's name, the cell, the
  backend chosen, and for each faster backend not chosen, why.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> model = hk.without_apply_rng(hk.transform(
  ...     lambda x: hk_rnn.RNN(hk_rnn.GRUCell(8))(x)))
  >>> x = jnp.zeros((2, 5, 3))
  >>> params = model.init(jax.random.key(0), x)
  >>> with hk_rnn.use_kernels("xla"):
  ...   print(hk_rnn.explain(model.apply, params, x)[0])
  rnn (GRUCell 'gru_cell'): gru -> xla; ...: off (use_kernels('xla'))...

  Args:
    fn: any function, e.g. a transformed model's ``apply``.
    *args: its positional arguments (arrays or ``jax.ShapeDtypeStruct``).
    **kwargs: its keyword arguments.

  Returns:
    The lines, in the order the calls were traced.
  """
  # A function jax.jit has traced on these shapes is not traced again: trace
  # the function it wraps, through a new function object.
  fn = getattr(fn, "__wrapped__", fn)
  lines: list[str] = []
  token = _explanations.set(lines)
  try:
    jax.eval_shape(lambda *a, **k: fn(*a, **k), *args, **kwargs)
  finally:
    _explanations.reset(token)
  return lines


def _refusals(kind, inputs, w_i, w_h, biases, initial_carry, options, cudnn_ok):
  """The faster backends' refusal functions for one call, fastest first."""
  from hk_rnn._src.kernels import cudnn, onednn

  valid, reset, mask, step_carries = (
    options["valid"],
    options["reset"],
    options["recurrent_mask"],
    options["return_step_carries"],
  )

  def cudnn_refusal():
    if kind != "lstm":
      return f"no {kind} kernel"
    if not cudnn_ok:
      return "allow_cudnn=False"
    return cudnn.refusal(
      inputs,
      w_i,
      w_h,
      biases[0],
      initial_carry,
      reset=reset,
      recurrent_mask=mask,
      step_carries=step_carries,
    )

  def compiled_refusal():
    reason = onednn.refusal(
      kind,
      inputs,
      w_h,
      (w_i, *biases, *initial_carry),
      valid=valid,
      reset=reset,
      recurrent_mask=mask,
      step_carries=step_carries,
    )
    if reason is None and mode() == "auto":
      return (
        "oneDNN's OpenMP threads contend with XLA's (slower than xla in "
        "programs with other ops); HK_RNN_KERNELS=compiled uses it"
      )
    return reason

  return {"cudnn": cudnn_refusal, "compiled": compiled_refusal}


def _run(kind, inputs, w_i, w_h, biases, initial_carry, reset_carry, options):
  """Checks one call, picks its backend (:func:`choose`) and runs it."""
  from hk_rnn._src.kernels import cudnn, onednn, xla

  blocks = {"lstm": 4, "gru": 3, "mgu": 2, "simple": 1}[kind]
  carries = (initial_carry, reset_carry)
  if kind != "lstm":
    carries = ((initial_carry,), (reset_carry,))
  names = ("b",) if len(biases) == 1 else ("b_i", "b_h")
  xla.check_shapes(
    f"{kind}_sequence",
    inputs,
    blocks,
    w_i,
    w_h,
    dict(zip(names, biases, strict=True)),
    *carries,
    valid=options["valid"],
    reset=options["reset"],
    recurrent_mask=options["recurrent_mask"],
  )
  allow_cudnn = options.pop("allow_cudnn", True)
  unroll = options.pop("unroll")
  backend = choose(
    kind,
    _refusals(kind, inputs, w_i, w_h, biases, carries[0], options, allow_cudnn),
  )
  if backend == "cudnn":
    return cudnn.lstm(
      inputs, w_i, w_h, biases[0], initial_carry, valid=options["valid"]
    )
  if backend == "compiled":
    run_onednn = onednn.lstm if kind == "lstm" else onednn.gru

    def differentiable(*args):
      *arrays, carry = args
      return _run_xla(kind, *arrays, carry, carry, unroll, {})

    return run_onednn(
      inputs,
      w_i,
      w_h,
      *biases,
      initial_carry,
      fused_kernel=lambda *args: differentiable(*args)[:2],
    )
  return _run_xla(
    kind,
    inputs,
    w_i,
    w_h,
    *biases,
    initial_carry,
    reset_carry,
    unroll,
    options,
  )


def _run_xla(kind, *args):
  """The XLA kernel of ``kind`` on ``(inputs, w_i, w_h, *biases, carries)``."""
  from hk_rnn._src.kernels import gates, xla

  *arrays, initial_carry, reset_carry, unroll, options = args
  options = {k: v for k, v in options.items() if k != "allow_cudnn"}
  if kind == "lstm":
    return xla.lstm(
      *arrays, initial_carry, reset_carry, unroll=unroll, **options
    )
  inputs, w_i, w_h, *biases = arrays
  b_i, b_h = (*biases, None)[:2]
  cell = {"gru": gates.GRU, "mgu": gates.MGU, "simple": gates.SIMPLE}[kind]
  return xla.single_carry(
    cell,
    inputs,
    w_i,
    w_h,
    b_i,
    b_h,
    initial_carry,
    reset_carry,
    unroll=unroll,
    **options,
  )


def lstm_sequence(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: tuple[Array, Array],
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: tuple[Array, Array] | None = None,
  recurrent_mask: Array | None = None,
  unroll: int = 1,
  allow_cudnn: bool = True,
  return_step_carries: bool = False,
) -> tuple[tuple[Array, Array], Array]:
  r"""Runs an LSTM over a whole sequence with a fused VJP.

  .. math::

      z &= x_t W_i + h_{in} W_h + b, \quad z = [z_i, z_f, z_g, z_o] \\
      c' &= \sigma(z_f) c + \sigma(z_i) \tanh(z_g), \quad
      h' = \sigma(z_o) \tanh(c')

  with masking, resets and ``h_in`` as in the module docstring.

  >>> import jax.numpy as jnp
  >>> from hk_rnn._src.kernels import dispatch
  >>> inputs = jnp.ones((5, 2, 3))                     # (time, batch, in)
  >>> w_i, w_h, b = jnp.ones((3, 16)), jnp.ones((4, 16)), jnp.zeros(16)
  >>> carry = (jnp.zeros((2, 4)), jnp.zeros((2, 4)))
  >>> valid = jnp.arange(5)[:, None] < jnp.array([5, 2])  # lengths 5 and 2
  >>> (c, h), outputs = dispatch.lstm_sequence(
  ...     inputs, w_i, w_h, b, carry, valid=valid)
  >>> outputs.shape, bool((outputs[2:, 1] == 0).all())
  ((5, 2, 4), True)

  Args:
    inputs: ``(T, B, D)``.
    w_i: ``(D, 4F)``, gate blocks i, f, g, o.
    w_h: ``(F, 4F)``.
    b: ``(4F,)``.
    initial_carry: ``(c, h)``, each ``(B, F)``.
    valid: ``(T, B)`` bool, False at padded steps; None: all valid.
    reset: ``(T, B)`` bool, True where a row's state restarts from
      ``reset_carry`` (a packed row's next segment); None: never.
    reset_carry: the carry each such segment starts from, shaped like
      ``initial_carry``; None: ``initial_carry``. They differ when a row's
      first segment continues a carry from an earlier chunk of a stream.
    recurrent_mask: ``(B, F)`` dropout mask applied to ``h`` before ``W_h``,
      kept units already scaled by ``1/(1-rate)``.
    unroll: steps per scan iteration.
    allow_cudnn: on a CUDA GPU, run cuDNN's LSTM (``jax.experimental.rnn``)
      where it computes the same thing: no ``reset``, no ``recurrent_mask``,
      float32 throughout, padding only at the end of rows. cuDNN's op has no
      batching rule: pass False to use this inside ``jax.vmap`` on GPU.
    return_step_carries: also return the carry after every step.

  Returns:
    ``((c, h), outputs)``: the carry after each row's last valid step and
    the ``(T, B, F)`` outputs, zero at padded steps. With
    ``return_step_carries``, ``((c, h), outputs, (c_steps, h_steps))`` with
    ``(T, B, F)`` step carries; ``h_steps`` is ``outputs``, so it is 0
    rather than ``h`` at padded steps: only the ``c`` sequence costs extra
    memory.
  """
  initial_carry = tuple(initial_carry)
  reset_carry = initial_carry if reset_carry is None else tuple(reset_carry)
  return _run(
    "lstm",
    inputs,
    w_i,
    w_h,
    (b,),
    initial_carry,
    reset_carry,
    dict(
      valid=valid,
      reset=reset,
      recurrent_mask=recurrent_mask,
      unroll=unroll,
      allow_cudnn=allow_cudnn,
      return_step_carries=return_step_carries,
    ),
  )


def gru_sequence(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b_i: Array,
  b_h: Array,
  initial_carry: Array,
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: Array | None = None,
  recurrent_mask: Array | None = None,
  unroll: int = 1,
  return_step_carries: bool = False,
) -> tuple[Array, Array]:
  r"""Runs a GRU over a whole sequence with a fused VJP.

  .. math::

      r &= \sigma(x_t W_{ir} + b_{ir} + h_{in} W_{hr} + b_{hr}), \quad
      z = \sigma(x_t W_{iz} + b_{iz} + h_{in} W_{hz} + b_{hz}) \\
      n &= \tanh(x_t W_{in} + b_{in} + r (h_{in} W_{hn} + b_{hn})), \quad
      h' = (1 - z) n + z h

  (the interpolation uses the undropped ``h``). Arguments as for
  :func:`lstm_sequence`, with ``w_i (D, 3F)``, ``w_h (F, 3F)``,
  ``b_i (3F,)``, ``b_h (3F,)`` in blocks r, z, n and the carry ``h (B, F)``.

  Returns:
    ``(h, outputs)``; with ``return_step_carries``, ``(h, outputs,
    outputs)``: the outputs are the carry after every step (0 at padding).
  """
  return _run(
    "gru",
    inputs,
    w_i,
    w_h,
    (b_i, b_h),
    initial_carry,
    initial_carry if reset_carry is None else reset_carry,
    dict(
      valid=valid,
      reset=reset,
      recurrent_mask=recurrent_mask,
      unroll=unroll,
      return_step_carries=return_step_carries,
    ),
  )


def mgu_sequence(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b_i: Array,
  b_h: Array,
  initial_carry: Array,
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: Array | None = None,
  recurrent_mask: Array | None = None,
  unroll: int = 1,
  return_step_carries: bool = False,
) -> tuple[Array, Array]:
  r"""Runs a minimal gated unit over a whole sequence with a fused VJP.

  .. math::

      f &= \sigma(x_t W_{if} + b_{if} + h_{in} W_{hf} + b_{hf}) \\
      n &= \tanh(x_t W_{in} + b_{in} + f (h_{in} W_{hn} + b_{hn})), \quad
      h' = (1 - f) n + f h

  (the interpolation uses the undropped ``h``). Arguments as for
  :func:`gru_sequence`, with ``w_i (D, 2F)``, ``w_h (F, 2F)``,
  ``b_i (2F,)``, ``b_h (2F,)`` in blocks f, n.

  Returns:
    ``(h, outputs)``, as :func:`gru_sequence`.
  """
  return _run(
    "mgu",
    inputs,
    w_i,
    w_h,
    (b_i, b_h),
    initial_carry,
    initial_carry if reset_carry is None else reset_carry,
    dict(
      valid=valid,
      reset=reset,
      recurrent_mask=recurrent_mask,
      unroll=unroll,
      return_step_carries=return_step_carries,
    ),
  )


def simple_sequence(
  inputs: Array,
  w_i: Array,
  w_h: Array,
  b: Array,
  initial_carry: Array,
  *,
  valid: Array | None = None,
  reset: Array | None = None,
  reset_carry: Array | None = None,
  recurrent_mask: Array | None = None,
  unroll: int = 1,
  return_step_carries: bool = False,
) -> tuple[Array, Array]:
  r"""Runs an Elman RNN, :math:`h' = \tanh(x_t W_i + h_{in} W_h + b)`, fused.

  Arguments as for :func:`lstm_sequence`, with ``w_i (D, F)``, ``w_h (F, F)``,
  ``b (F,)`` and the carry ``h (B, F)``.

  Returns:
    ``(h, outputs)``, as :func:`gru_sequence`.
  """
  return _run(
    "simple",
    inputs,
    w_i,
    w_h,
    (b,),
    initial_carry,
    initial_carry if reset_carry is None else reset_carry,
    dict(
      valid=valid,
      reset=reset,
      recurrent_mask=recurrent_mask,
      unroll=unroll,
      return_step_carries=return_step_carries,
    ),
  )
