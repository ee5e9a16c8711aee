"""Tests for what every hk_rnn.interop converter shares.

The order of cells: every converter pairs the directions of a
bidirectional stack right on any naming, sorted or not, or says that it
cannot. And importing hk_rnn.interop imports no framework.
"""

import os
import re
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils
from hk_rnn_test.interop_helpers import (
  HAS_FLAX,
  HAS_KERAS,
  HAS_TORCH,
  HIDDEN,
  INPUTS,
  LENGTHS,
  assert_valid_close,
  batch_inputs,
  key_sorted,
  randomized,
  torch_module,
  torch_run,
)

_NUMBERED_SUFFIX = re.compile(r"_\d+$")


# Cell names for a StackedRNN of two Bidirectional LSTM layers: layer i's
# forward and backward cells. ``None`` is Haiku's default naming.
DIRECTION_NAMINGS = {
  "default": None,
  "layer_forward": lambda i, backward: (
    f"layer{i}_{'backward' * backward or 'forward'}"
  ),
  "fwd_bwd": lambda i, backward: f"{'bwd' if backward else 'fwd'}{i}",
  "l_fw_bw": lambda i, backward: f"l{i}_{'bw' if backward else 'fw'}",
  # docs/packing.md's names, reused by every layer: Haiku numbers them.
  "forward_lstm_reused": lambda i, backward: (
    f"{'backward' if backward else 'forward'}_lstm"
  ),
  "camel_case": lambda i, backward: (
    f"Layer{i}{'Backward' if backward else 'Forward'}"
  ),
}
# Names that say the direction with words no rule knows: sorted, the order
# of the layers' cells cannot be read from them.
UNSETTLED_NAMING = lambda i, backward: f"{'right' if backward else 'left'}{i}"  # noqa: E731


def _named_stack(naming):
  """Two Bidirectional LSTM layers whose cells are named by ``naming``."""

  def cell(i, backward):
    name = None if naming is None else naming(i, backward)
    return hk_rnn.LSTMCell(HIDDEN, name=name)

  def forward(x, lengths):
    layers = [
      hk_rnn.Bidirectional(
        hk_rnn.RNN(cell(i, False)), hk_rnn.RNN(cell(i, True))
      )
      for i in range(2)
    ]
    return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)

  return test_utils.transform(forward)


class DirectionNamesTest(parameterized.TestCase):
  """Every converter pairs directions right on any naming, sorted or not.

  ``jax.tree.map`` sorts the keys, which puts ``layer0_backward`` before
  ``layer0_forward``: the converters must read the order from the names or
  say that they cannot. Every check compares with what init's params (in
  creation order) give, and that with torch itself.
  """

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x = batch_inputs()
    cls.reference = _named_stack(None)
    cls.apply = staticmethod(jax.jit(cls.reference.apply))
    cls.default_names = list(
      cls.reference.init(jax.random.PRNGKey(1), cls.x, LENGTHS)
    )

  def _params(self, naming, seed=1):
    """Random params in creation order, and the cells' names in that order."""
    params = _named_stack(naming).init(jax.random.PRNGKey(1), self.x, LENGTHS)
    return randomized(params, seed), list(params)

  def _as_default_names(self, loaded, names):
    """``loaded`` renamed to the default model's cells, creation order kept."""
    return {
      default: loaded[name]
      for default, name in zip(self.default_names, names, strict=True)
    }

  def _torch_module(self, seed=0):
    """A two-layer bidirectional LSTM, as ``_named_stack`` is."""
    return torch_module("LSTM", {}, 2, True, True, seed=seed)

  @parameterized.named_parameters(
    (f"{naming}_{'sorted' if sort else 'as_created'}", naming, sort)
    for naming in DIRECTION_NAMINGS
    for sort in (False, True)
  )
  @absltest.skipUnless(HAS_TORCH, "needs torch")
  def test_from_torch_and_to_torch_match_torch(self, naming, sort):
    params, names = self._params(DIRECTION_NAMINGS[naming])
    if naming != "default":
      naming_fn = DIRECTION_NAMINGS[naming]
      self.assertEqual(  # init's order: layer 0 forward, backward, layer 1...
        [_NUMBERED_SUFFIX.sub("", name) for name in names],
        [naming_fn(i, backward) for i in range(2) for backward in (0, 1)],
      )
    given = key_sorted(params) if sort else params
    if sort and naming != "default":
      self.assertNotEqual(list(given), names)
    module = self._torch_module()
    expected, _ = torch_run(module, self.x)
    loaded = hk_rnn.interop.from_torch(module, given)
    _, outputs = self.apply(
      self._as_default_names(loaded, names), self.x, LENGTHS
    )
    assert_valid_close(self, outputs, expected)

    written = hk_rnn.interop.to_torch(given, self._torch_module(seed=1))
    expected, _ = torch_run(written, self.x)
    _, outputs = self.apply(
      self._as_default_names(params, names), self.x, LENGTHS
    )
    assert_valid_close(self, outputs, expected)

  @absltest.skipUnless(HAS_TORCH, "needs torch")
  def test_the_named_model_itself_matches_torch_with_sorted_params(self):
    # The reproduction, with no renaming between.
    model = _named_stack(DIRECTION_NAMINGS["layer_forward"])
    params = key_sorted(model.init(jax.random.PRNGKey(1), self.x, LENGTHS))
    module = self._torch_module()
    loaded = hk_rnn.interop.from_torch(module, params)
    _, outputs = model.apply(loaded, self.x, LENGTHS)
    expected, _ = torch_run(module, self.x)
    assert_valid_close(self, outputs, expected)

  @parameterized.parameters(False, True)
  def test_unsettled_names_raise_when_sorted(self, sort):
    params, names = self._params(UNSETTLED_NAMING)
    converters = [
      lambda given: hk_rnn.interop.from_haiku(self._haiku_source(), given)
    ]
    if HAS_TORCH:
      converters += [
        lambda given: hk_rnn.interop.from_torch(self._torch_module(), given),
        lambda given: hk_rnn.interop.to_torch(given, self._torch_module()),
      ]
    for convert in converters:
      if not sort:  # init's params are in creation order: they convert
        convert(params)
        continue
      with self.assertRaisesRegex(
        ValueError,
        r"the order of cells 'left1' and 'right0' \(both of the kind an "
        r"hk_rnn.LSTMCell takes\) cannot be settled from their names: params "
        r"have their keys sorted .* Settle it by passing params as init "
        r"returned them, or by converting one part at a time \(pass the "
        r"sub-dict of params that holds each layer or part",
      ):
        convert(key_sorted(params))

  def _haiku_source(self, scopes=None):
    """hk_params of hk.LSTM cores stacked as ``_named_stack``'s cells.

    Two layers of two cores reading the same input, core ``k`` under the
    name scope ``scopes[k]`` when given.
    """

    def deep(x):
      for layer in range(2):
        outputs = []
        for backward in (0, 1):
          core = hk.LSTM(HIDDEN)
          if scopes is not None:
            with hk.name_scope(scopes[2 * layer + backward]):
              core = hk.LSTM(HIDDEN)
          outputs.append(core(x, core.initial_state(1))[0])
        x = jnp.concatenate(outputs, axis=-1)

    x = jnp.ones((1, INPUTS))
    return randomized(hk.transform(deep).init(jax.random.PRNGKey(0), x), 7)

  @parameterized.named_parameters(
    (f"{naming}_{sort}", naming, sort)
    for naming in DIRECTION_NAMINGS
    for sort in ("none_sorted", "source_sorted", "params_sorted", "both_sorted")
  )
  def test_from_haiku_source_and_params_in_any_order(self, naming, sort):
    # Haiku cores under direction-named scopes, into cells named alike.
    naming_fn = DIRECTION_NAMINGS[naming]
    scopes = None
    if naming_fn is not None:
      scopes = [naming_fn(i, backward) for i in range(2) for backward in (0, 1)]
    hk_params = self._haiku_source(scopes)
    params, names = self._params(naming_fn)
    # In creation order on both sides: core k goes to cell k.
    expected = hk_rnn.interop.from_haiku(hk_params, params)
    cores = [path for path in hk_params if path.endswith("linear")]
    for core, name in zip(cores, names, strict=True):
      np.testing.assert_array_equal(
        expected[name]["w_h"][:, :HIDDEN],
        hk_params[core]["w"][-HIDDEN:, :HIDDEN],
      )
    if sort in ("source_sorted", "both_sorted"):
      hk_params = key_sorted(hk_params)
    if sort in ("params_sorted", "both_sorted"):
      params = key_sorted(params)
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    test_utils.tree_allclose(self, loaded, key_sorted(expected), atol=0, rtol=0)

  @absltest.skipUnless(HAS_FLAX, "needs flax")
  def test_from_flax_named_bidirectional_layers_sorted(self):
    import flax.linen as nn

    names = DIRECTION_NAMINGS["layer_forward"]

    class Model(nn.Module):
      @nn.compact
      def __call__(self, x):
        for i in range(2):
          x = nn.Bidirectional(
            nn.RNN(nn.LSTMCell(HIDDEN, name=names(i, False))),
            nn.RNN(nn.LSTMCell(HIDDEN, name=names(i, True))),
          )(x)
        return x

    variables = randomized(
      Model().init(jax.random.PRNGKey(0), jnp.ones((1, 2, INPUTS))), 2
    )
    params, names = self._params(DIRECTION_NAMINGS["layer_forward"])
    expected = hk_rnn.interop.from_flax(variables, params)
    flax_params = variables["params"]
    self.assertEqual(list(flax_params), names)
    for name in names:
      np.testing.assert_array_equal(
        expected[name]["w_h"][:, :HIDDEN], flax_params[name]["hi"]["kernel"]
      )
    for given_variables, given_params in [
      (key_sorted(variables), params),
      (variables, key_sorted(params)),
      (key_sorted(variables), key_sorted(params)),
    ]:
      loaded = hk_rnn.interop.from_flax(given_variables, given_params)
      test_utils.tree_allclose(
        self, loaded, key_sorted(expected), atol=0, rtol=0
      )

  @absltest.skipUnless(HAS_KERAS, "needs keras")
  def test_from_keras_into_sorted_named_params(self):
    import keras

    if keras.backend.backend() != "jax":
      self.skipTest("needs Keras on the JAX backend")
    stack = [
      keras.layers.Bidirectional(
        keras.layers.LSTM(HIDDEN, return_sequences=True)
      )
      for _ in range(2)
    ]
    y = np.zeros((1, 2, INPUTS), np.float32)
    for seed, layer in enumerate(stack):
      y = layer(y)
      layer.set_weights(
        [
          np.random.default_rng(seed).normal(size=w.shape).astype(w.dtype)
          for w in layer.get_weights()
        ]
      )
    for naming in ("layer_forward", "fwd_bwd", "l_fw_bw"):
      params, names = self._params(DIRECTION_NAMINGS[naming])
      expected = hk_rnn.interop.from_keras(stack, params)
      np.testing.assert_allclose(  # layer 0's backward weights, cell 1's
        expected[names[1]]["w_h"],
        keras.ops.convert_to_numpy(
          stack[0].backward_layer.cell.recurrent_kernel
        ),
      )
      loaded = hk_rnn.interop.from_keras(stack, key_sorted(params))
      test_utils.tree_allclose(
        self, loaded, key_sorted(expected), atol=0, rtol=0
      )


class ImportTest(absltest.TestCase):
  def test_import_hk_rnn_imports_no_framework(self):
    code = (
      "import sys, hk_rnn; from hk_rnn import interop; "
      "hk_rnn.interop.from_torch; "
      "print([m for m in ('torch', 'keras') if m in sys.modules])"
    )
    result = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    self.assertEqual(result.stdout.strip(), "[]")


if __name__ == "__main__":
  absltest.main()
