"""Tests for hk_rnn.Bidirectional."""

import itertools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils

BATCH, TIME, INPUTS = 3, 6, 4
PACKED_IDS = np.array(
  [[1, 1, 1, 0, 0, 0], [2, 2, 5, 7, 7, 0], [3, 3, 3, 3, 3, 3]], np.int32
)


def _inputs(shape=(BATCH, TIME, INPUTS)):
  return jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)


def _bidirectional(**options):
  def forward(inputs, mask=None, **call_options):
    bi = hk_rnn.Bidirectional(
      hk_rnn.RNN(hk_rnn.LSTMCell(5, name="forward")),
      hk_rnn.RNN(hk_rnn.GRUCell(3, name="backward")),
      **options,
    )
    return bi(inputs, mask, **call_options)

  return forward


class BidirectionalTest(parameterized.TestCase):
  @parameterized.parameters(False, True)
  def test_matches_two_reference_directions(self, time_major):
    inputs, ids = _inputs(), PACKED_IDS
    params, ((fwd_carry, bwd_carry), outputs) = test_utils.init_and_apply(
      _bidirectional(time_major=time_major),
      inputs.transpose(1, 0, 2) if time_major else inputs,
      jnp.asarray(ids.T if time_major else ids),
    )
    if time_major:
      outputs = outputs.transpose(1, 0, 2)
    zeros = lambda n: jnp.zeros((BATCH, n))  # noqa: E731
    expected_fwd = test_utils.reference_rnn(
      "lstm", params["forward"], inputs, ids, (zeros(5), zeros(5))
    )
    expected_bwd = test_utils.reference_rnn(
      "gru",
      params["backward"],
      inputs,
      ids,
      zeros(3),
      reverse=True,
      keep_order=True,
    )
    test_utils.tree_allclose(self, fwd_carry, expected_fwd[0])
    test_utils.tree_allclose(self, bwd_carry, expected_bwd[0])
    test_utils.tree_allclose(
      self, outputs, jnp.concatenate([expected_fwd[1], expected_bwd[1]], -1)
    )

  def test_backward_direction_starts_at_last_valid_step(self):
    """With a running-sum backward cell, step t sees the sum from t to the end."""
    ids = np.array([[1, 1, 1, 0, 0, 0]], np.int32)
    inputs = jnp.asarray(np.arange(6.0).reshape(1, 6, 1))

    def forward(inputs, mask):
      bi = hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.SimpleCell(1, activation_fn=lambda z: z, name="f")),
        hk_rnn.RNN(hk_rnn.SimpleCell(1, activation_fn=lambda z: z, name="b")),
      )
      return bi(inputs, mask)

    ones = {
      name: {
        "w_i": jnp.ones((1, 1)),
        "w_h": jnp.ones((1, 1)),
        "b": jnp.zeros((1,)),
      }
      for name in ("f", "b")
    }
    (_, bwd_carry), outputs = test_utils.transform(forward).apply(
      ones, inputs, jnp.asarray(ids)
    )
    np.testing.assert_allclose(outputs[0, :, 0], [0, 1, 3, 0, 0, 0])
    np.testing.assert_allclose(outputs[0, :, 1], [3, 3, 2, 0, 0, 0])
    np.testing.assert_allclose(bwd_carry[0], [3])

  def test_merge_fn_and_return_carry(self):
    inputs = _inputs()

    def forward(inputs, mask):
      bi = hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.GRUCell(3, name="a")),
        hk_rnn.RNN(hk_rnn.GRUCell(3, name="b")),
        merge_fn=lambda f, b: f - b,
        return_carry=False,
      )
      return bi(inputs, mask)

    params, merged = test_utils.init_and_apply(
      forward, inputs, jnp.asarray(PACKED_IDS)
    )
    concatenated = test_utils.transform(
      lambda x, m: hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.GRUCell(3, name="a")),
        hk_rnn.RNN(hk_rnn.GRUCell(3, name="b")),
      )(x, m)[1]
    ).apply(params, inputs, jnp.asarray(PACKED_IDS))
    np.testing.assert_allclose(
      merged, concatenated[..., :3] - concatenated[..., 3:], rtol=1e-6
    )

  def test_seq_lengths_and_initial_carry(self):
    inputs = _inputs()
    lengths = jnp.array([0, 4, 6])
    start = (
      (jnp.ones((BATCH, 5)), jnp.ones((BATCH, 5))),
      jnp.full((BATCH, 3), 0.5),
    )
    params, ((fwd, bwd), outputs) = test_utils.init_and_apply(
      _bidirectional(), inputs, seq_lengths=lengths, initial_carry=start
    )
    # The empty row keeps both initial carries and outputs zeros.
    np.testing.assert_array_equal(fwd[0][0], 1.0)
    np.testing.assert_array_equal(bwd[0], 0.5)
    np.testing.assert_array_equal(outputs[0], 0.0)
    expected_bwd = test_utils.reference_rnn(
      "gru",
      params["backward"],
      inputs,
      np.array([[0] * 6, [1, 1, 1, 1, 0, 0], [1] * 6]),
      start[1],
      reverse=True,
      keep_order=True,
    )
    test_utils.tree_allclose(self, bwd, expected_bwd[0])
    test_utils.tree_allclose(self, outputs[..., 5:], expected_bwd[1])

  def test_gradients_under_jit(self):
    inputs, mask = _inputs(), jnp.asarray(PACKED_IDS)
    model = test_utils.transform(_bidirectional())
    params = model.init(jax.random.PRNGKey(0), inputs, mask)

    def loss(params, inputs):
      return jnp.sum(model.apply(params, inputs, mask)[1] ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, inputs)
    eager = jax.grad(loss, argnums=(0, 1))(params, inputs)
    test_utils.tree_allclose(self, grads, eager, atol=1e-5)
    np.testing.assert_array_equal(grads[1][PACKED_IDS == 0], 0.0)


class BidirectionalBadInputTest(parameterized.TestCase):
  @parameterized.named_parameters(
    (
      "mask_shape",
      dict(segmentation_mask=jnp.ones((BATCH, TIME - 1), int)),
      r"Bidirectional: segmentation_mask must have shape \(\*batch, time\) = "
      r"\(3, 6\), got \(3, 5\)",
    ),
    (
      "both",
      dict(
        segmentation_mask=jnp.ones((BATCH, TIME), int),
        seq_lengths=jnp.ones((BATCH,), int),
      ),
      "Bidirectional: pass either segmentation_mask or seq_lengths",
    ),
    (
      "lengths_value",
      dict(seq_lengths=jnp.array([1, 2, 9])),
      r"Bidirectional: seq_lengths must lie in \[0, time\] = \[0, 6\], got 9",
    ),
    (
      "carry_not_pair",
      dict(initial_carry=jnp.zeros((BATCH, 3))),
      r"Bidirectional: initial_carry must be one \(forward, backward\) pair",
    ),
    (
      "carry_shape",
      dict(
        initial_carry=(
          (jnp.zeros((3, 5)), jnp.zeros((3, 5))),
          jnp.zeros((3, 4)),
        )
      ),
      "initial_carry must match the cell's carry",
    ),
  )
  def test_raises(self, options, message):
    def forward(x):
      return hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.LSTMCell(5)), hk_rnn.RNN(hk_rnn.GRUCell(3))
      )(x, **options)

    with self.assertRaisesRegex(ValueError, message):
      hk.transform(forward).init(jax.random.PRNGKey(0), _inputs())

  def test_inner_settings_are_honoured_or_rejected(self):
    """Every inner setting Bidirectional overrides, in every combination."""
    inputs, mask = _inputs(), jnp.asarray(PACKED_IDS)
    settings = ("time_major", "reverse", "keep_order", "return_carry")
    reference = None
    for outer_time_major in (False, True):
      for which in ("forward_rnn", "backward_rnn"):
        for values in itertools.product((False, True), repeat=len(settings)):
          inner = dict(zip(settings, values, strict=True))
          rejected = (
            (inner["time_major"] and not outer_time_major)
            or not inner["return_carry"]
            or (which == "forward_rnn" and inner["reverse"])
          )

          def forward(x, m, inner=inner, which=which, tm=outer_time_major):
            rnns = {
              "forward_rnn": hk_rnn.RNN(hk_rnn.LSTMCell(5, name="f")),
              "backward_rnn": hk_rnn.RNN(hk_rnn.GRUCell(3, name="b")),
            }
            cell = rnns[which].cell
            rnns[which] = hk_rnn.RNN(cell, **inner)
            return hk_rnn.Bidirectional(**rnns, time_major=tm)(x, m)

          x, m = (
            (inputs, mask)
            if not outer_time_major
            else (
              jnp.swapaxes(inputs, 0, 1),
              mask.T,
            )
          )
          model = test_utils.transform(forward)
          if rejected:
            moved = next(
              name
              for name, bad in (
                ("time_major", inner["time_major"] and not outer_time_major),
                ("return_carry", not inner["return_carry"]),
                ("reverse", inner["reverse"]),
              )
              if bad
            )
            with self.assertRaisesRegex(
              ValueError, f"Bidirectional: {which} has {moved}="
            ):
              model.init(jax.random.PRNGKey(0), x, m)
            continue
          params = model.init(jax.random.PRNGKey(0), x, m)
          result = model.apply(params, x, m)
          if outer_time_major:
            result = (result[0], jnp.swapaxes(result[1], 0, 1))
          if reference is None:
            reference = result
          test_utils.tree_allclose(self, result, reference)

  def test_time_major_inner_rnns_with_time_major_bidirectional(self):
    # The case a user hit: inner RNNs time-major, Bidirectional not.
    with self.assertRaisesRegex(
      ValueError, "pass time_major=True to Bidirectional instead"
    ):
      hk.transform(
        lambda x: hk_rnn.Bidirectional(
          hk_rnn.RNN(hk_rnn.LSTMCell(4), time_major=True),
          hk_rnn.RNN(hk_rnn.LSTMCell(4), time_major=True),
        )(x)
      ).init(jax.random.PRNGKey(0), jnp.zeros((5, 2, 3)))

  def test_rnns_must_be_rnns(self):
    with self.assertRaisesRegex(
      ValueError, "backward_rnn must be an hk_rnn.RNN"
    ):
      hk.transform(
        lambda: hk_rnn.Bidirectional(
          hk_rnn.RNN(hk_rnn.GRUCell(2)), hk_rnn.GRUCell(2)
        )
      ).init(None)


if __name__ == "__main__":
  absltest.main()
