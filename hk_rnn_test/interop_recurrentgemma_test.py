"""Tests for hk_rnn.interop.from_recurrentgemma.

The converter runs on variables laid out as recurrentgemma's ``RGLRU`` and
``RecurrentBlock`` make them, built here from hk_rnn params, so no
recurrentgemma is needed. griffin_lru_test compares the cells, loaded by
this converter, with recurrentgemma's own modules where it is installed.
"""

import jax
import jax.numpy as jnp
from absl.testing import absltest

import hk_rnn
from hk_rnn_test import test_utils

WIDTH, HEADS = 4, 2
_GATES = ("input_gate", "a_gate")


def _as_recurrentgemma(params, rglru, block):
  """recurrentgemma's variables for the RGLRUCell at ``rglru`` and the
  GriffinCell at ``block`` of ``params`` (the layout its modules create)."""

  def lru(prefix):
    return {
      "a_param": params[prefix]["a_param"],
      **{gate: dict(params[f"{prefix}/~/{gate}"]) for gate in _GATES},
    }

  def dense(name):
    entry = params[f"{block}/~/{name}"]
    return {"kernel": entry["w"], "bias": entry["b"]}

  return {
    "params": {
      "RGLRU_0": lru(rglru),
      "RecurrentBlock_0": {
        "linear_y": dense("linear_y"),
        "linear_x": dense("linear_x"),
        "linear_out": dense("linear_out"),
        "conv_1d": dict(params[f"{block}/~/conv_1d"]),
        "rg_lru": lru(f"{block}/~/rg_lru"),
      },
    }
  }


class FromRecurrentgemmaTest(absltest.TestCase):
  """The converter on variables laid out as recurrentgemma's modules make
  them (no recurrentgemma needed)."""

  def _params(self, seed, width=WIDTH):
    def forward(x):
      y = hk_rnn.RNN(hk_rnn.RGLRUCell(width, num_heads=HEADS))(x)[1]
      return hk_rnn.RNN(hk_rnn.GriffinCell(width, num_heads=HEADS))(y)

    x = jnp.ones((1, 3, width))
    return test_utils.transform(forward).init(jax.random.key(seed), x)

  def test_round_trip_into_fresh_params(self):
    source = self._params(0)
    variables = _as_recurrentgemma(source, "rglru_cell", "griffin_cell")
    loaded = hk_rnn.interop.from_recurrentgemma(variables, self._params(1))
    test_utils.tree_allclose(self, loaded, source, atol=0, rtol=0)

  def test_mismatches_are_value_errors_naming_the_cell(self):
    source = self._params(0)
    variables = _as_recurrentgemma(source, "rglru_cell", "griffin_cell")
    cases = [
      (self._params(1, width=6), r"'rglru_cell'.*does not match.*\(6,\)"),
      (
        {k: v for k, v in source.items() if not k.startswith("griffin")},
        "2 RGLRU/RecurrentBlock modules.*1 RGLRUCell/GriffinCell",
      ),
    ]
    for params, message in cases:
      with self.assertRaisesRegex(ValueError, message):
        hk_rnn.interop.from_recurrentgemma(variables, params)
    block, lru = (
      variables["params"][k] for k in ("RecurrentBlock_0", "RGLRU_0")
    )
    with self.assertRaisesRegex(
      ValueError, "RecurrentBlock 'a', which needs an hk_rnn.GriffinCell"
    ):
      hk_rnn.interop.from_recurrentgemma({"a": block, "b": lru}, source)
    complex_lru = dict(variables["params"]["RGLRU_0"], a_imag_param=1.0)
    with self.assertRaisesRegex(ValueError, "only_real=False"):
      hk_rnn.interop.from_recurrentgemma({"x": complex_lru}, source)
    conv = variables["params"]["RecurrentBlock_0"]["conv_1d"]
    with self.assertRaisesRegex(ValueError, "Conv1D 'conv' is not inside"):
      hk_rnn.interop.from_recurrentgemma({"conv": conv}, source)


if __name__ == "__main__":
  absltest.main()
