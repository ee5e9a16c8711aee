r"""The linear recurrent unit of Orvieto et al. (2023) as an hk_rnn cell.

A complex diagonal recurrence, a :class:`~hk_rnn.LinearRecurrentCell` whose
carry is complex and whose output is read out of it with a real part.
"""

from __future__ import annotations

import math
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

from hk_rnn._src import cells, min_cells

Array = jax.Array


class LRUCell(min_cells.LinearRecurrentCell):
  r"""The linear recurrent unit (Orvieto et al., 2023, "Resurrecting
  Recurrent Neural Networks for Long Sequences").

  .. math::

      \lambda &= \exp(-e^{\nu} + i\, e^{\theta}), \quad
      \gamma = e^{\gamma_{\log}} \\
      h' &= \lambda \odot h + \gamma \odot \big(x (B_{re} + i B_{im})\big) \\
      \text{output} &= \operatorname{Re}\big(h' (C_{re} + i C_{im})\big)
          + d \odot x

  Parameters: ``nu_log``, ``theta_log``, ``gamma_log (N,)``, ``b_re``,
  ``b_im (F, N)``, ``c_re``, ``c_im (N, F)``, ``d (F,)``. Initialisation as
  in the paper: :math:`|\lambda|` uniform in area on the ring
  ``r_min ≤ |λ| ≤ r_max``, its phase uniform in ``[0, max_phase]``,
  :math:`\gamma = \sqrt{1 - |\lambda|^2}`, ``B`` normal with variance
  ``1/(2F)`` per part, ``C`` with variance ``1/N``, ``d`` standard normal.
  Inputs have ``F`` features. The carry ``h (..., N)`` is complex64
  (complex128 when computing in float64); the output has ``F`` real
  features. A segment restarts from the initial carry; no step is special.

  >>> import haiku as hk, jax, jax.numpy as jnp, hk_rnn
  >>> def forward(x, mask):
  ...   return hk_rnn.RNN(hk_rnn.LRUCell(4, state_size=16))(x, mask)
  >>> model = hk.without_apply_rng(hk.transform(forward))
  >>> x, mask = jnp.ones((2, 5, 4)), jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  >>> h, y = model.apply(model.init(jax.random.key(0), x, mask), x, mask)
  >>> h.shape, h.dtype, y.shape, y.dtype
  ((2, 16), dtype('complex64'), (2, 5, 4), dtype('float32'))

  Args:
    features: ``F``, the input and output features; the other arguments
      are keyword-only.
    state_size: ``N``, the size of the complex state; ``features`` by
      default.
    r_min, r_max: the ring :math:`|\lambda|` is initialised on
      (``0 ≤ r_min ≤ r_max ≤ 1``).
    max_phase: the largest initial phase of :math:`\lambda`.
    **options: ``carry_init``, ``dtype``, ``param_dtype``, ``dropout_rate``,
      ``recurrent_dropout_rate`` (must be 0), ``scan_method``, ``name``, as
      for :class:`~hk_rnn.LinearRecurrentCell`.
  """

  _readout_needs_mask = True  # `d ⊙ x` and the readout need no carry

  def __init__(
    self,
    features: int,
    *,
    state_size: int | None = None,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_phase: float = 2 * math.pi,
    **options,
  ):
    super().__init__(features, **options)
    context = type(self).__name__
    self._state_size = (
      self.features
      if state_size is None
      else cells.check_features(state_size, f"{context} (state_size)")
    )
    if not 0 <= r_min <= r_max <= 1:
      raise ValueError(
        f"{context}: r_min and r_max must satisfy 0 <= r_min <= r_max <= 1, "
        f"got {r_min!r} and {r_max!r}"
      )
    if not max_phase > 0:
      raise ValueError(f"{context}: max_phase must be > 0, got {max_phase!r}")
    self.r_min = float(r_min)
    self.r_max = float(r_max)
    self.max_phase = float(max_phase)

  @property
  def state_size(self) -> int:
    return self._state_size

  def _carry_dtype(self, compute_dtype) -> Any:
    if jnp.dtype(compute_dtype) == jnp.float64:
      return jnp.complex128
    return jnp.complex64

  def _real_dtype(self, compute_dtype) -> Any:
    return jnp.finfo(self._carry_dtype(compute_dtype)).dtype

  def _nu_theta_gamma(self) -> tuple[Array, Array, Array]:
    size = (self.state_size,)
    r_min, r_max = self.r_min, self.r_max

    def nu_init(shape, dtype):
      uniform = jax.random.uniform(hk.next_rng_key(), shape, jnp.float32)
      radius_squared = uniform * (r_max**2 - r_min**2) + r_min**2
      return jnp.log(-0.5 * jnp.log(radius_squared)).astype(dtype)

    def theta_init(shape, dtype):
      uniform = jax.random.uniform(hk.next_rng_key(), shape, jnp.float32)
      return jnp.log(self.max_phase * uniform).astype(dtype)

    nu_log = self._parameter("nu_log", size, nu_init)
    theta_log = self._parameter("theta_log", size, theta_init)

    def gamma_init(shape, dtype):
      modulus = jnp.exp(-jnp.exp(nu_log.astype(jnp.float32)))
      return jnp.log(jnp.sqrt(1 - modulus**2)).astype(dtype)

    gamma_log = self._parameter("gamma_log", size, gamma_init)
    return nu_log, theta_log, gamma_log

  def coefficients(self, inputs: Array) -> tuple[Array, Array]:
    r"""``a = λ`` and ``b = γ ⊙ x (B_re + i B_im)``, complex."""
    min_cells.check_input_features(inputs, self.features, type(self).__name__)
    real = self._real_dtype(inputs.dtype)
    nu_log, theta_log, gamma_log = (
      p.astype(real) for p in self._nu_theta_gamma()
    )
    in_scale = 1 / math.sqrt(2 * self.features)
    shape = (self.features, self.state_size)
    b_re, b_im = (
      self._parameter(name, shape, hk.initializers.RandomNormal(in_scale))
      for name in ("b_re", "b_im")
    )
    a = jnp.exp(lax.complex(-jnp.exp(nu_log), jnp.exp(theta_log)))
    gamma = jnp.exp(gamma_log)
    b_real = (inputs @ b_re.astype(inputs.dtype)).astype(real) * gamma
    b_imag = (inputs @ b_im.astype(inputs.dtype)).astype(real) * gamma
    return a, lax.complex(b_real, b_imag)

  def _readout(self, h: Array, inputs: Array, dtype: Any) -> Array:
    """``Re(h (C_re + i C_im)) + d ⊙ x``, in ``dtype``."""
    out_scale = 1 / math.sqrt(self.state_size)
    shape = (self.state_size, self.features)
    c_re, c_im = (
      self._parameter(name, shape, hk.initializers.RandomNormal(out_scale))
      for name in ("c_re", "c_im")
    )
    d = self._parameter("d", (self.features,), hk.initializers.RandomNormal())
    lead = h.shape[:-1]
    real = h.real.dtype
    h_re = h.real.reshape((-1, self.state_size))
    h_im = h.imag.reshape((-1, self.state_size))
    projected = h_re @ c_re.astype(real) - h_im @ c_im.astype(real)
    projected = projected.reshape((*lead, self.features)).astype(dtype)
    return projected + d.astype(dtype) * inputs
