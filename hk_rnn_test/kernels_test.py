"""The kernel mode (``HK_RNN_KERNELS``, ``use_kernels``) and ``explain``."""

import os
from unittest import mock

import haiku as hk
import jax
import jax.numpy as jnp
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn._src.kernels import compiled, dispatch

_X = jax.ShapeDtypeStruct((2, 5, 3), jnp.float32)
_LENGTHS = jax.ShapeDtypeStruct((2,), jnp.int32)


def _model(build):
  """``(apply, params)`` of a transformed model; params from shapes only."""
  model = hk.without_apply_rng(hk.transform(build))
  params = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(_X.shape))
  )
  return model.apply, params


class _CleanMode(parameterized.TestCase):
  """Each test starts in the default mode, with no kernel variable set."""

  def setUp(self):
    super().setUp()
    environment = mock.patch.dict(os.environ)
    environment.start()
    self.addCleanup(environment.stop)
    for variable in ("HK_RNN_KERNELS", "HK_RNN_ONEDNN"):
      os.environ.pop(variable, None)
    self.addCleanup(hk_rnn.use_kernels, None)
    hk_rnn.use_kernels(None)


class ModeTest(_CleanMode):
  def test_default_is_auto(self):
    self.assertEqual(dispatch.mode(), "auto")

  @parameterized.parameters(
    ("HK_RNN_KERNELS", "xla", "xla"),
    ("HK_RNN_KERNELS", " Compiled ", "compiled"),
    ("HK_RNN_KERNELS", "auto", "auto"),
    ("HK_RNN_ONEDNN", "0", "xla"),
    ("HK_RNN_ONEDNN", "1", "compiled"),
    ("HK_RNN_ONEDNN", "auto", "auto"),
  )
  def test_environment(self, variable, value, expected):
    os.environ[variable] = value
    self.assertEqual(dispatch.mode(), expected)

  def test_new_variable_wins_over_the_old_one(self):
    os.environ["HK_RNN_ONEDNN"] = "0"
    os.environ["HK_RNN_KERNELS"] = "auto"
    self.assertEqual(dispatch.mode(), "auto")

  def test_use_kernels_as_a_call_and_as_a_context(self):
    os.environ["HK_RNN_KERNELS"] = "compiled"
    hk_rnn.use_kernels("xla")
    self.assertEqual(dispatch.mode(), "xla")
    with hk_rnn.use_kernels("auto"):
      self.assertEqual(dispatch.mode(), "auto")
    self.assertEqual(dispatch.mode(), "xla")
    hk_rnn.use_kernels(None)
    self.assertEqual(dispatch.mode(), "compiled")

  def test_bad_values_name_their_source(self):
    with self.assertRaisesRegex(
      ValueError, "use_kernels must be one of auto, xla, compiled, got 'fast'"
    ):
      hk_rnn.use_kernels("fast")
    with self.assertRaisesRegex(ValueError, "use_kernels must be one of"):
      hk_rnn.use_kernels(True)
    os.environ["HK_RNN_KERNELS"] = "gpu"
    with self.assertRaisesRegex(
      ValueError, "HK_RNN_KERNELS must be one of auto, xla, compiled"
    ):
      dispatch.mode()

  def test_compiled_mode_without_the_extension_raises(self):
    apply, params = _model(lambda x: hk_rnn.RNN(hk_rnn.LSTMCell(4))(x))
    hk_rnn.use_kernels("compiled")
    with mock.patch.multiple(compiled, _library="not built"):
      with self.assertRaisesRegex(
        RuntimeError, r"use_kernels\('compiled'\) asks for the compiled CPU"
      ):
        jax.eval_shape(apply, params, _X)


class ExplainTest(_CleanMode):
  """As on a machine without the compiled kernels, unless a test says."""

  def setUp(self):
    super().setUp()
    unbuilt = mock.patch.multiple(compiled, _library="not built")
    unbuilt.start()
    self.addCleanup(unbuilt.stop)

  def test_one_line_per_sequence_call_with_module_and_cell(self):
    apply, params = _model(
      lambda x, lengths=None: hk_rnn.Bidirectional(
        hk_rnn.RNN(hk_rnn.LSTMCell(4)), hk_rnn.RNN(hk_rnn.GRUCell(4))
      )(x, seq_lengths=lengths)
    )
    lines = hk_rnn.explain(apply, params, _X, _LENGTHS)
    self.assertLen(lines, 2)
    self.assertRegex(lines[0], r"^rnn \(LSTMCell 'lstm_cell'\): lstm -> xla; ")
    self.assertRegex(lines[1], r"^rnn_1 \(GRUCell 'gru_cell'\): gru -> xla; ")
    self.assertIn("cudnn: not on a CUDA GPU", lines[0])
    self.assertIn("cudnn: no gru kernel", lines[1])
    for line in lines:
      self.assertIn("compiled: not built", line)

  def test_xla_mode_says_where_it_was_set(self):
    apply, params = _model(lambda x: hk_rnn.RNN(hk_rnn.SimpleCell(4))(x))
    with hk_rnn.use_kernels("xla"):
      (line,) = hk_rnn.explain(apply, params, _X)
    self.assertEqual(
      line,
      "rnn (SimpleCell 'simple_cell'): simple -> xla; "
      "cudnn: off (use_kernels('xla')); compiled: off (use_kernels('xla'))",
    )
    os.environ["HK_RNN_KERNELS"] = "xla"
    (line,) = hk_rnn.explain(apply, params, _X)
    self.assertIn("compiled: off (HK_RNN_KERNELS=xla)", line)

  def test_stepped_calls_say_why(self):
    apply, params = _model(
      lambda x: (
        hk_rnn.RNN(hk_rnn.LSTMCell(4), fused=False)(x),
        hk_rnn.RNN(hk_rnn.GRUCell(4), remat="step")(x),
        hk_rnn.RNN(hk_rnn.LSTMCell(4, activation_fn=jax.nn.relu))(x),
      )
    )
    lines = hk_rnn.explain(apply, params, _X)
    self.assertEqual(
      [line.split(": ", 1)[1] for line in lines],
      [
        "step scan (fused=False)",
        "step scan (remat='step')",
        "step scan (the cell has no whole-sequence kernel)",
      ],
    )

  def test_cells_with_their_own_whole_sequence_form_are_listed(self):
    apply, params = _model(
      lambda x: (
        hk_rnn.RNN(hk_rnn.MinGRUCell(4))(x),
        hk_rnn.RNN(hk_rnn.RGLRUCell(3))(x),
      )
    )
    lines = hk_rnn.explain(apply, params, _X)
    self.assertEqual(
      lines,
      [
        "rnn (MinGRUCell 'min_gru_cell'): the cell's own whole-sequence "
        "form (xla)",
        "rnn_1 (RGLRUCell 'rglru_cell'): the cell's own whole-sequence "
        "form (xla)",
      ],
    )

  @mock.patch.multiple(compiled, _library=None)  # the real extension
  def test_auto_takes_the_compiled_kernels_where_built(self):
    if not compiled.available():
      self.skipTest("the compiled kernels are not built")
    apply, params = _model(
      lambda x, lengths=None: hk_rnn.RNN(hk_rnn.LSTMCell(4))(
        x, seq_lengths=lengths
      )
    )
    with mock.patch.object(compiled, "_AUTO_REFUSALS", {}):
      (line,) = hk_rnn.explain(apply, params, _X, _LENGTHS)
    self.assertEqual(
      line,
      "rnn (LSTMCell 'lstm_cell'): lstm -> compiled; cudnn: not on a CUDA GPU",
    )
    refused = {"lstm": "measured slower"}
    with mock.patch.object(compiled, "_AUTO_REFUSALS", refused):
      (line,) = hk_rnn.explain(apply, params, _X, _LENGTHS)
      self.assertIn(
        "lstm -> xla; cudnn: not on a CUDA GPU; compiled: measured slower", line
      )
      hk_rnn.use_kernels("compiled")
      (line,) = hk_rnn.explain(apply, params, _X, _LENGTHS)
      self.assertIn("lstm -> compiled", line)

  @mock.patch.multiple(compiled, _library=None)  # the real extension
  def test_auto_leaves_avx2_machines_on_xla(self):
    if not compiled.available():
      self.skipTest("the compiled kernels are not built")
    apply, params = _model(lambda x: hk_rnn.RNN(hk_rnn.GRUCell(4))(x))
    with mock.patch.object(compiled, "_AUTO_REFUSALS", {}):
      with mock.patch.object(compiled, "lanes", return_value=8):
        (line,) = hk_rnn.explain(apply, params, _X)
        self.assertIn("gru -> xla", line)
        self.assertIn("compiled: AVX2 only (measured slower than xla", line)
      with mock.patch.object(compiled, "lanes", return_value=16):
        (line,) = hk_rnn.explain(apply, params, _X)
        self.assertIn("gru -> compiled", line)

  def test_a_jitted_function_already_traced_is_explained(self):
    apply, params = _model(lambda x: hk_rnn.RNN(hk_rnn.MGUCell(4))(x))
    jitted = jax.jit(apply)
    jax.eval_shape(jitted, params, _X)  # traced once already
    self.assertLen(hk_rnn.explain(jitted, params, _X), 1)
    self.assertLen(hk_rnn.explain(jitted, params, _X), 1)


if __name__ == "__main__":
  absltest.main()
