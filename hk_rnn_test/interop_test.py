"""Tests for hk_rnn.interop: each converter against its own framework.

Every source gets random weights (biases included, so that a misplaced
bias shows), is converted, and the hk_rnn model must then give the
framework's own outputs and final states on a variable-length batch. Each
framework's tests are skipped when it is not installed.
"""

import os

# Keras 3 must pick its backend before it is first imported.
os.environ["KERAS_BACKEND"] = "jax"

import collections  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping  # noqa: E402

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl.testing import absltest, parameterized  # noqa: E402

import hk_rnn  # noqa: E402
from hk_rnn_test import test_utils  # noqa: E402

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_FLAX = importlib.util.find_spec("flax") is not None
HAS_KERAS = importlib.util.find_spec("keras") is not None
_NUMBERED_SUFFIX = re.compile(r"_\d+$")

BATCH, TIME, INPUTS, HIDDEN = 3, 5, 3, 4
LENGTHS = np.array([5, 2, 4], np.int32)
VALID = np.arange(TIME) < LENGTHS[:, None]


def _inputs(nan_padding=True):
  """``(BATCH, TIME, INPUTS)``; NaN at padding unless told otherwise."""
  x = np.random.default_rng(0).normal(size=(BATCH, TIME, INPUTS))
  if nan_padding:
    x = np.where(VALID[..., None], x, np.nan)
  return x.astype(np.float32)


def _randomized(tree, seed, scale=0.5):
  """The same nested dicts, in the same key order, with random leaves."""
  rng = np.random.default_rng(seed)

  def walk(node):
    if isinstance(node, Mapping):
      return {key: walk(value) for key, value in node.items()}
    noise = rng.normal(size=np.shape(node)) * scale
    return jnp.asarray(noise, jnp.result_type(node))

  return walk(tree)


def _sorted(params):
  """What ``jax.tree.map`` (or jit, or a checkpoint restore) returns."""
  return jax.tree.map(lambda leaf: leaf, params)


def _cells_step(cell_fns, first_input, chain=True):
  """Params of cells created in order, each applied once (cheap to init).

  Each cell reads the previous one's output, or with ``chain=False`` the
  same input.
  """

  def forward(x):
    y = x
    for make in cell_fns:
      cell = make()
      _, y = cell(cell.initialize_carry(y), y if chain else x)

  return hk.transform(forward).init(jax.random.PRNGKey(0), first_input)


def _stack(cell_fn, num_layers, bidirectional, merge=None):
  """A StackedRNN of ``num_layers`` (Bidirectional) RNNs, by lengths."""

  def forward(x, lengths):
    layers = []
    for _ in range(num_layers):
      if bidirectional:
        layers.append(
          hk_rnn.Bidirectional(
            hk_rnn.RNN(cell_fn()), hk_rnn.RNN(cell_fn()), merge_fn=merge
          )
        )
      else:
        layers.append(hk_rnn.RNN(cell_fn()))
    return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)

  model = test_utils.transform(forward)
  return model, jax.jit(model.apply)


def _assert_valid_close(test, actual, expected):
  """Outputs equal at valid steps; hk_rnn's exactly 0 at padding."""
  np.testing.assert_allclose(
    np.where(VALID[..., None], actual, 0),
    np.where(VALID[..., None], expected, 0),
    atol=1e-5,
    rtol=1e-5,
  )
  test.assertTrue(np.all(np.asarray(actual)[~VALID] == 0))


TORCH_CASES = {
  "lstm_bidirectional": ("LSTM", {}, 2, True, True),
  "gru_bidirectional_no_bias": ("GRU", {}, 2, True, False),
  "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}, 2, False, True),
  "rnn_relu": ("RNN", {"nonlinearity": "relu"}, 1, False, True),
}
HK_RNN_CELL = {
  "LSTM": lambda: hk_rnn.LSTMCell(HIDDEN),
  "GRU": lambda: hk_rnn.GRUCell(HIDDEN),
  "RNN": lambda: hk_rnn.SimpleCell(HIDDEN),
}


@absltest.skipUnless(HAS_TORCH, "needs torch")
class TorchTest(parameterized.TestCase):
  def _module(self, name, options, num_layers, bidirectional, bias, seed=0):
    import torch

    torch.manual_seed(seed)
    module = getattr(torch.nn, name)(
      INPUTS,
      HIDDEN,
      num_layers=num_layers,
      bidirectional=bidirectional,
      bias=bias,
      batch_first=True,
      **options,
    )
    with torch.no_grad():  # not torch's init: biases and all, larger
      for parameter in module.parameters():
        parameter.normal_(0.0, 0.5)
    return module

  def _torch_run(self, module, x):
    import torch
    from torch.nn.utils import rnn as torch_rnn

    packed = torch_rnn.pack_padded_sequence(
      torch.from_numpy(np.nan_to_num(x)),
      torch.from_numpy(LENGTHS.astype(np.int64)),
      batch_first=True,
      enforce_sorted=False,
    )
    with torch.no_grad():
      outputs, state = module(packed)
    outputs, _ = torch_rnn.pad_packed_sequence(
      outputs, batch_first=True, total_length=TIME
    )
    if not isinstance(state, tuple):
      state = (state,)
    return outputs.numpy(), [s.numpy() for s in state]

  def _expected_carries(self, name, state, num_layers, directions):
    """Torch's ``h_n`` (and ``c_n``) as hk_rnn's per-layer carries."""
    carries = []
    for layer in range(num_layers):
      per_direction = []
      for direction in range(directions):
        index = layer * directions + direction
        if name == "LSTM":
          h, c = state
          per_direction.append((c[index], h[index]))
        else:
          per_direction.append(state[0][index])
      carries.append(
        tuple(per_direction) if directions == 2 else per_direction[0]
      )
    return tuple(carries)

  @parameterized.named_parameters(
    (name, *case) for name, case in TORCH_CASES.items()
  )
  def test_matches_torch_on_packed_sequences(
    self, name, options, num_layers, bidirectional, bias
  ):
    module = self._module(name, options, num_layers, bidirectional, bias)
    relu = options.get("nonlinearity") == "relu"
    cell_fn = (
      (lambda: hk_rnn.SimpleCell(HIDDEN, activation_fn=jax.nn.relu))
      if relu
      else HK_RNN_CELL[name]
    )
    model, apply = _stack(cell_fn, num_layers, bidirectional)
    x = _inputs()
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    params = hk_rnn.interop.from_torch(module, params)
    carries, outputs = apply(params, x, LENGTHS)
    expected_outputs, state = self._torch_run(module, x)
    _assert_valid_close(self, outputs, expected_outputs)
    expected = self._expected_carries(
      name, state, num_layers, 2 if bidirectional else 1
    )
    test_utils.tree_allclose(self, carries, expected)

    # A state dict under a prefix, as torch.load gives it, loads the same.
    import torch

    container = torch.nn.Module()
    container.encoder = torch.nn.Module()
    container.encoder.rnn = module
    state_dict = container.state_dict()
    from_state = hk_rnn.interop.from_torch(
      state_dict, params, prefix="encoder.rnn."
    )
    test_utils.tree_allclose(self, from_state, params, atol=0, rtol=0)

  def test_to_torch_round_trip(self):
    module = self._module("LSTM", {}, 2, True, True)
    model, apply = _stack(HK_RNN_CELL["LSTM"], 2, True)
    x = _inputs()
    params = _randomized(model.init(jax.random.PRNGKey(1), x, LENGTHS), 3)
    self.assertIs(hk_rnn.interop.to_torch(params, module), module)
    expected_outputs, state = self._torch_run(module, x)
    carries, outputs = apply(params, x, LENGTHS)
    _assert_valid_close(self, outputs, expected_outputs)
    test_utils.tree_allclose(
      self, carries, self._expected_carries("LSTM", state, 2, 2)
    )
    back = hk_rnn.interop.from_torch(module, _randomized(params, 4))
    test_utils.tree_allclose(self, back, params)

    gru = self._module("GRU", {}, 1, False, False)
    gru_params = _cells_step([HK_RNN_CELL["GRU"]], x[:, 0])
    gru_params = {
      "gru_cell": {
        **_randomized(gru_params, 5)["gru_cell"],
        "b_i": jnp.zeros(3 * HIDDEN),
        "b_h": jnp.zeros(3 * HIDDEN),
      }
    }
    hk_rnn.interop.to_torch(gru_params, gru)
    test_utils.tree_allclose(
      self, hk_rnn.interop.from_torch(gru, gru_params), gru_params
    )
    with self.assertRaisesRegex(
      ValueError,
      r"to_torch: cell 'gru_cell' \(GRUCell\) has non-zero biases but the "
      r"module's layer 0 forward .* has none \(bias=False\)",
    ):
      hk_rnn.interop.to_torch(_randomized(gru_params, 6), gru)

  def test_numeric_order_of_twelve_cells_in_sorted_params(self):
    module = self._module("LSTM", {}, 6, True, True)

    def cell():
      return hk_rnn.LSTMCell(HIDDEN)

    # Six bidirectional layers: cells lstm_cell, lstm_cell_1 ... lstm_cell_11.
    def forward(x):
      for _ in range(6):
        cells = [cell(), cell()]
        x = jnp.concatenate(
          [c(c.initialize_carry(x), x)[1] for c in cells], axis=-1
        )

    params = _sorted(
      hk.transform(forward).init(jax.random.PRNGKey(0), jnp.ones((1, INPUTS)))
    )
    names = list(params)
    self.assertLess(names.index("lstm_cell_10"), names.index("lstm_cell_2"))
    loaded = hk_rnn.interop.from_torch(module, params)
    weights = module.state_dict()
    for layer in range(6):
      for direction, suffix in enumerate(("", "_reverse")):
        index = 2 * layer + direction
        name = f"lstm_cell_{index}" if index else "lstm_cell"
        np.testing.assert_array_equal(
          loaded[name]["w_h"], weights[f"weight_hh_l{layer}{suffix}"].numpy().T
        )

  def test_a_model_holding_an_lstm_names_what_to_pass(self):
    import torch

    class RNNModel(torch.nn.Module):  # PyTorch's word_language_model's shape
      def __init__(self, lstm):
        super().__init__()
        self.encoder = torch.nn.Embedding(10, INPUTS)
        self.rnn = lstm
        self.decoder = torch.nn.Linear(HIDDEN, 10)

    lstm = self._module("LSTM", {}, 2, True, True)
    model = RNNModel(lstm)
    stack, _ = _stack(HK_RNN_CELL["LSTM"], 2, True)
    params = stack.init(jax.random.PRNGKey(1), _inputs(), LENGTHS)
    with self.assertRaisesRegex(
      ValueError,
      r"^from_torch: source must be a torch.nn.LSTM, GRU or RNN or a state "
      r"dict, got RNNModel; it holds an nn.LSTM at 'rnn': pass that module, "
      r"from_torch\(source.rnn, params\), or its state dict under its prefix, "
      r"from_torch\(source.state_dict\(\), params, prefix='rnn.'\)$",
    ):
      hk_rnn.interop.from_torch(model, params)
    with self.assertRaisesRegex(
      ValueError,
      r"^to_torch: module must be a torch.nn.LSTM, GRU or RNN, got RNNModel; "
      r"it holds an nn.LSTM at 'rnn': pass that module, "
      r"to_torch\(params, module.rnn\)$",
    ):
      hk_rnn.interop.to_torch(params, model)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: the state dict holds no weight_ih_l0 under prefix '' .*; "
      r"it holds one under prefix='rnn.'$",
    ):
      hk_rnn.interop.from_torch(model.state_dict(), params)
    # What the messages say works, and gives the module's own weights.
    test_utils.tree_allclose(
      self,
      hk_rnn.interop.from_torch(model.state_dict(), params, prefix="rnn."),
      hk_rnn.interop.from_torch(model.rnn, params),
      atol=0,
      rtol=0,
    )

  def test_mismatches(self):
    import torch

    x = _inputs()
    model, _ = _stack(HK_RNN_CELL["LSTM"], 2, True)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    lstm = self._module("LSTM", {}, 2, True, True)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: the source has 2 recurrent layers, params have 4 "
      r"recurrent cells; cell 'lstm_cell_2' \(LSTMCell\) has no source layer",
    ):
      hk_rnn.interop.from_torch(self._module("LSTM", {}, 1, True, True), params)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: the source has 6 recurrent layers, params have 4 "
      r"recurrent cells; the source's layer 2 forward \(weight_ih_l2\), an "
      r"nn.LSTM has no cell to go to",
    ):
      hk_rnn.interop.from_torch(self._module("LSTM", {}, 3, True, True), params)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: cell 'lstm_cell' \(LSTMCell\) is recurrent cell 0 but the "
      r"source's layer there, layer 0 forward \(weight_ih_l0\), an nn.GRU, "
      r"needs an hk_rnn.GRUCell",
    ):
      hk_rnn.interop.from_torch(self._module("GRU", {}, 2, True, True), params)
    wide = torch.nn.LSTM(INPUTS, HIDDEN + 1, num_layers=2, bidirectional=True)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: cell 'lstm_cell' \(LSTMCell\) does not match the "
      r"source's layer 0 forward .*: its w_i has shape \(3, 16\), the "
      r"source's \(3, 20\) \(the source's layer has input size 3 and 5 "
      r"features, the cell input size 3 and 4 features\)",
    ):
      hk_rnn.interop.from_torch(wide, params)
    projected = torch.nn.LSTM(INPUTS, HIDDEN, proj_size=2)
    with self.assertRaisesRegex(ValueError, r"from_torch: .* proj_size=2"):
      hk_rnn.interop.from_torch(projected, params)
    with self.assertRaisesRegex(
      ValueError, r"from_torch: the source's layer 0 forward .* proj_size > 0"
    ):
      hk_rnn.interop.from_torch(projected.state_dict(), params)
    with self.assertRaisesRegex(ValueError, r"to_torch: .* proj_size=2"):
      hk_rnn.interop.to_torch(params, projected)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: the state dict holds no weight_ih_l0 under prefix "
      r"'rnn.' \(torch's key prefix, dot included\); its keys begin "
      r"weight_ih_l0",
    ):
      hk_rnn.interop.from_torch(lstm.state_dict(), params, prefix="rnn.")
    with self.assertRaisesRegex(
      ValueError, "from_torch: source must be a torch.nn.LSTM, GRU or RNN"
    ):
      hk_rnn.interop.from_torch(torch.nn.Linear(2, 2), params)
    with self.assertRaisesRegex(
      ValueError,
      r"to_torch: cell 'lstm_cell' \(LSTMCell\) is recurrent cell 0 but the "
      r"source's layer there, layer 0 forward \(weight_ih_l0, an nn.GRU\)",
    ):
      hk_rnn.interop.to_torch(params, self._module("GRU", {}, 2, True, True))


def _flax_model(nn):
  class Model(nn.Module):
    """Every linen cell kind; returns every layer's final carry."""

    @nn.compact
    def __call__(self, x, lengths):
      carries = []
      carry, x = nn.Bidirectional(
        nn.RNN(nn.LSTMCell(HIDDEN)),
        nn.RNN(nn.GRUCell(HIDDEN)),
        return_carry=True,
      )(x, seq_lengths=lengths)
      carries.append(carry)
      for cell in (
        nn.OptimizedLSTMCell(HIDDEN),
        nn.SimpleCell(HIDDEN),
        nn.MGUCell(HIDDEN),
      ):
        carry, x = nn.RNN(cell, return_carry=True)(x, seq_lengths=lengths)
        carries.append(carry)
      return tuple(carries), x

  return Model()


def _hk_rnn_flax_twin(x, lengths):
  layers = [
    hk_rnn.Bidirectional(
      hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)), hk_rnn.RNN(hk_rnn.GRUCell(HIDDEN))
    ),
    hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
    hk_rnn.RNN(hk_rnn.SimpleCell(HIDDEN)),
    hk_rnn.RNN(hk_rnn.MGUCell(HIDDEN)),
  ]
  return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)


@absltest.skipUnless(HAS_FLAX, "needs flax")
class FlaxTest(absltest.TestCase):
  def test_matches_flax_with_seq_lengths(self):
    import flax.linen as nn

    flax_model = _flax_model(nn)
    x = _inputs(nan_padding=False)
    variables = flax_model.init(jax.random.PRNGKey(0), x, LENGTHS)
    variables = _randomized(variables, 1)
    expected_carries, expected = flax_model.apply(variables, x, LENGTHS)

    model = test_utils.transform(_hk_rnn_flax_twin)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    loaded = hk_rnn.interop.from_flax(variables, params)
    carries, outputs = jax.jit(model.apply)(loaded, _inputs(), LENGTHS)
    _assert_valid_close(self, outputs, expected)
    test_utils.tree_allclose(self, carries, expected_carries)

    # Sorted params: the same cells get the same weights.
    test_utils.tree_allclose(
      self,
      hk_rnn.interop.from_flax(variables, _sorted(params)),
      _sorted(loaded),
      atol=0,
      rtol=0,
    )
    # Sorted variables: Flax's names (LSTMCell_0, OptimizedLSTMCell_0) do
    # not say which LSTM came first, and the converter says so.
    with self.assertRaisesRegex(
      ValueError,
      r"from_flax: the order of cells 'LSTMCell_0' and 'OptimizedLSTMCell_0' "
      r"\(both of the kind an hk_rnn.LSTMCell takes\) cannot be settled from "
      r"their names: the source's variables have their keys sorted",
    ):
      hk_rnn.interop.from_flax(_sorted(variables), params)
    # The "params" collection alone is accepted too.
    test_utils.tree_allclose(
      self,
      hk_rnn.interop.from_flax(variables["params"], params),
      loaded,
      atol=0,
      rtol=0,
    )

  def test_setup_bidirectional_takes_forward_first(self):
    import flax.linen as nn

    class Model(nn.Module):
      def setup(self):
        self.rnn = nn.Bidirectional(
          nn.RNN(nn.GRUCell(HIDDEN)), nn.RNN(nn.GRUCell(HIDDEN))
        )

      def __call__(self, x):
        return self.rnn(x)

    variables = _sorted(
      Model().init(jax.random.PRNGKey(0), jnp.ones((1, 2, INPUTS)))
    )
    self.assertEqual(
      list(variables["params"]["rnn"]), ["backward_rnn", "forward_rnn"]
    )
    params = _cells_step(
      [HK_RNN_CELL["GRU"]] * 2, jnp.ones((1, INPUTS)), chain=False
    )
    loaded = hk_rnn.interop.from_flax(variables, params)
    rnn = variables["params"]["rnn"]
    np.testing.assert_array_equal(
      loaded["gru_cell"]["w_h"][:, :HIDDEN],
      rnn["forward_rnn"]["cell"]["hr"]["kernel"],
    )
    np.testing.assert_array_equal(
      loaded["gru_cell_1"]["w_h"][:, :HIDDEN],
      rnn["backward_rnn"]["cell"]["hr"]["kernel"],
    )

  def test_mismatches(self):
    import flax.linen as nn

    x = jnp.ones((1, 2, INPUTS))
    no_reset = nn.RNN(nn.MGUCell(HIDDEN, reset_gate=False))
    variables = no_reset.init(jax.random.PRNGKey(0), x)
    params = _cells_step([lambda: hk_rnn.MGUCell(HIDDEN)], x[:, 0])
    with self.assertRaisesRegex(
      ValueError,
      r"from_flax: the source's 'cell' \(Flax MGUCell\) has no bias in "
      r"'hn': an MGUCell\(reset_gate=False\)",
    ):
      hk_rnn.interop.from_flax(variables, params)
    gru = nn.RNN(nn.GRUCell(HIDDEN)).init(jax.random.PRNGKey(0), x)
    with self.assertRaisesRegex(
      ValueError,
      r"from_flax: cell 'mgu_cell' \(MGUCell\) is recurrent cell 0 but the "
      r"source's layer there, 'cell' \(Flax GRUCell\), needs an hk_rnn.GRUCell",
    ):
      hk_rnn.interop.from_flax(gru, params)
    with self.assertRaisesRegex(
      ValueError, "from_flax: the source holds no recurrent layer"
    ):
      hk_rnn.interop.from_flax({"params": {"dense": {"kernel": x}}}, params)


@absltest.skipUnless(HAS_KERAS, "needs keras")
class KerasTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    import keras

    if keras.backend.backend() != "jax":
      self.skipTest("needs Keras on the JAX backend")
    self.keras = keras

  def _layers(self):
    """Bidirectional LSTM, GRU, SimpleRNN: random weights, built."""
    layers = self.keras.layers
    stack = [
      layers.Bidirectional(
        layers.LSTM(HIDDEN, return_sequences=True, return_state=True)
      ),
      layers.GRU(HIDDEN, return_sequences=True, return_state=True),
      layers.SimpleRNN(HIDDEN, return_sequences=True, return_state=True),
    ]
    x = np.zeros((1, 2, INPUTS), np.float32)
    for seed, layer in enumerate(stack):
      x = layer(x)[0]
      layer.set_weights(
        [
          np.random.default_rng(seed).normal(size=w.shape).astype(w.dtype) * 0.5
          for w in layer.get_weights()
        ]
      )
    return stack

  def _keras_run(self, stack, x, mask):
    outputs, bi_h, bi_c, bi_h_back, bi_c_back = stack[0](x, mask=mask)
    carries = [((bi_c, bi_h), (bi_c_back, bi_h_back))]
    for layer in stack[1:]:
      outputs, h = layer(outputs, mask=mask)
      carries.append(h)
    return tuple(carries), outputs

  def test_matches_keras_unpadded_and_masked(self):
    stack = self._layers()

    def forward(x, lengths):
      layers = [
        hk_rnn.Bidirectional(
          hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
          hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
        ),
        hk_rnn.RNN(hk_rnn.GRUCell(HIDDEN)),
        hk_rnn.RNN(hk_rnn.SimpleCell(HIDDEN)),
      ]
      return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)

    model = test_utils.transform(forward)
    x = _inputs(nan_padding=False)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    loaded = hk_rnn.interop.from_keras(stack, params)
    apply = jax.jit(model.apply)

    full = np.full((BATCH,), TIME, np.int32)
    expected_carries, expected = self._keras_run(stack, x, None)
    carries, outputs = apply(loaded, x, full)
    test_utils.tree_allclose(self, outputs, expected)
    test_utils.tree_allclose(self, carries, expected_carries)

    expected_carries, expected = self._keras_run(stack, x, VALID)
    carries, outputs = apply(loaded, _inputs(), LENGTHS)
    _assert_valid_close(self, outputs, expected)
    test_utils.tree_allclose(self, carries, expected_carries)

    # A model holding the layers; sorted params, whose gru_cell now sorts
    # before lstm_cell, are matched kind by kind.
    inputs = self.keras.Input((None, INPUTS))
    y = inputs
    for layer in stack:
      y = layer(y)[0]
    keras_model = self.keras.Model(inputs, y)
    test_utils.tree_allclose(
      self,
      hk_rnn.interop.from_keras(keras_model, _sorted(params)),
      _sorted(loaded),
      atol=0,
      rtol=0,
    )

  def test_rnn_of_cells_gives_each_cell_in_order(self):
    layers = self.keras.layers
    rnn = layers.RNN([layers.LSTMCell(HIDDEN), layers.GRUCell(HIDDEN)])
    rnn.build((1, 2, INPUTS))
    for seed, weight in enumerate(rnn.weights):
      weight.assign(np.random.default_rng(seed).normal(size=weight.shape))
    params = _cells_step(
      [HK_RNN_CELL["LSTM"], HK_RNN_CELL["GRU"]], jnp.ones((1, INPUTS))
    )
    loaded = hk_rnn.interop.from_keras(rnn, params)
    lstm, gru = rnn.cell.cells
    np.testing.assert_allclose(loaded["lstm_cell"]["w_i"], lstm.kernel)
    # Keras's GRU blocks are z, r, h; hk_rnn's r, z, n.
    bias = np.asarray(gru.bias)
    np.testing.assert_allclose(
      loaded["gru_cell"]["b_h"],
      np.concatenate(
        [bias[1, HIDDEN : 2 * HIDDEN], bias[1, :HIDDEN], bias[1, 2 * HIDDEN :]]
      ),
    )

  def test_mismatches(self):
    layers = self.keras.layers
    before = layers.GRU(HIDDEN, reset_after=False)
    before.build((1, 2, INPUTS))
    params = _cells_step([HK_RNN_CELL["GRU"]], jnp.ones((1, INPUTS)))
    with self.assertRaisesRegex(
      ValueError,
      r"from_keras: the source's layer '.*' is a GRU with reset_after=False",
    ):
      hk_rnn.interop.from_keras(before, params)
    unbuilt = layers.GRU(HIDDEN)
    with self.assertRaisesRegex(ValueError, r"from_keras: .* is not built"):
      hk_rnn.interop.from_keras(unbuilt, params)
    lstm = layers.LSTM(HIDDEN)
    lstm.build((1, 2, INPUTS))
    with self.assertRaisesRegex(
      ValueError,
      r"from_keras: cell 'gru_cell' \(GRUCell\) is recurrent cell 0 but the "
      r"source's layer there, layer '.*' \(Keras LSTM\), needs an hk_rnn.LSTMCell",
    ):
      hk_rnn.interop.from_keras(lstm, params)


def _haiku_twin(x, lengths):
  layers = [
    hk_rnn.RNN(hk_rnn.LSTMCell(HIDDEN)),
    hk_rnn.RNN(hk_rnn.SimpleCell(HIDDEN, activation_fn=jax.nn.relu)),
  ]
  return hk_rnn.StackedRNN(layers)(x, seq_lengths=lengths)


def _haiku_deep(x):
  """``hk.DeepRNN`` of ``hk.LSTM`` and ``hk.VanillaRNN``, batch-major."""
  core = hk.DeepRNN([hk.LSTM(HIDDEN), hk.VanillaRNN(HIDDEN)])
  outputs, state = hk.dynamic_unroll(
    core, x, core.initial_state(x.shape[0]), time_major=False
  )
  return state, outputs


class HaikuTest(absltest.TestCase):
  def test_matches_dynamic_unroll_per_length(self):
    x = _inputs(nan_padding=False)
    deep = test_utils.transform(_haiku_deep)
    hk_params = _randomized(deep.init(jax.random.PRNGKey(0), x), 1)
    model = test_utils.transform(_haiku_twin)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    carries, outputs = jax.tree.map(
      np.asarray, jax.jit(model.apply)(loaded, _inputs(), LENGTHS)
    )
    # Haiku's unroll knows no padding: run it on each length's rows alone.
    rows = collections.defaultdict(list)
    for row, length in enumerate(LENGTHS):
      rows[int(length)].append(row)
    for length, members in rows.items():
      (lstm_state, vanilla_state), expected = deep.apply(
        hk_params, x[members, :length]
      )
      np.testing.assert_allclose(
        outputs[members, :length], expected, atol=1e-5, rtol=1e-5
      )
      (c, h), vanilla = jax.tree.map(lambda leaf, m=members: leaf[m], carries)
      test_utils.tree_allclose(
        self,
        (c, h, vanilla),
        (lstm_state.cell, lstm_state.hidden, vanilla_state),
      )
    self.assertTrue(np.all(np.asarray(outputs)[~VALID] == 0))

  def test_numeric_order_of_eleven_sorted_cores(self):
    def deep(x):
      core = hk.DeepRNN([hk.LSTM(HIDDEN) for _ in range(11)])
      return core(x, core.initial_state(1))

    x = jnp.ones((1, HIDDEN))
    hk_params = _sorted(
      _randomized(hk.transform(deep).init(jax.random.PRNGKey(0), x), 0)
    )
    self.assertLess(
      list(hk_params).index("lstm_10/linear"),
      list(hk_params).index("lstm_2/linear"),
    )
    params = _sorted(_cells_step([lambda: hk_rnn.LSTMCell(HIDDEN)] * 11, x))
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    for index in range(11):
      suffix = f"_{index}" if index else ""
      w = hk_params[f"lstm{suffix}/linear"]["w"]
      np.testing.assert_array_equal(
        loaded[f"lstm_cell{suffix}"]["w_h"][:, :HIDDEN], w[HIDDEN:, :HIDDEN]
      )
      b = hk_params[f"lstm{suffix}/linear"]["b"]
      np.testing.assert_allclose(  # the forget block, Haiku's third, plus 1
        loaded[f"lstm_cell{suffix}"]["b"][HIDDEN : 2 * HIDDEN],
        b[2 * HIDDEN : 3 * HIDDEN] + 1,
      )

  def test_dtypes_kept_and_other_entries_untouched(self):
    x = jnp.ones((1, INPUTS))

    def forward(x):
      cell = hk_rnn.SimpleCell(HIDDEN, param_dtype=jnp.bfloat16)
      _, y = cell(cell.initialize_carry(x), x)
      return hk.Linear(2)(y)

    params = hk.transform(forward).init(jax.random.PRNGKey(0), x)
    hk_params = hk.transform(
      lambda x: hk.VanillaRNN(HIDDEN)(x, jnp.zeros((1, HIDDEN)))
    ).init(jax.random.PRNGKey(1), x)
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    self.assertEqual(list(loaded), list(params))
    self.assertIs(loaded["linear"]["w"], params["linear"]["w"])
    self.assertEqual(loaded["simple_cell"]["w_i"].dtype, jnp.bfloat16)
    np.testing.assert_allclose(
      np.asarray(loaded["simple_cell"]["w_i"], np.float32),
      hk_params["vanilla_rnn/linear"]["w"],
      rtol=1e-2,
    )

  def test_gru_points_to_core_cell(self):
    x = jnp.ones((1, INPUTS))
    hk_params = hk.transform(
      lambda x: hk.GRU(HIDDEN)(x, jnp.zeros((1, HIDDEN)))
    ).init(jax.random.PRNGKey(0), x)
    params = _cells_step([HK_RNN_CELL["GRU"]], x)
    with self.assertRaisesRegex(
      ValueError,
      r"from_haiku: the source's 'gru' is an hk.GRU, which computes a "
      r"different GRU .* hk_rnn.CoreCell\(hk.GRU\(...\)\)",
    ):
      hk_rnn.interop.from_haiku(hk_params, params)

  def test_import_hk_rnn_imports_no_framework(self):
    code = (
      "import sys, hk_rnn; from hk_rnn import interop; "
      "hk_rnn.interop.from_torch; "
      "print([m for m in ('torch', 'keras') if m in sys.modules])"
    )
    import subprocess

    result = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    self.assertEqual(result.stdout.strip(), "[]")


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
    cls.x = _inputs()
    cls.reference = _named_stack(None)
    cls.apply = staticmethod(jax.jit(cls.reference.apply))
    cls.default_names = list(
      cls.reference.init(jax.random.PRNGKey(1), cls.x, LENGTHS)
    )

  def _params(self, naming, seed=1):
    """Random params in creation order, and the cells' names in that order."""
    params = _named_stack(naming).init(jax.random.PRNGKey(1), self.x, LENGTHS)
    return _randomized(params, seed), list(params)

  def _as_default_names(self, loaded, names):
    """``loaded`` renamed to the default model's cells, creation order kept."""
    return {
      default: loaded[name]
      for default, name in zip(self.default_names, names, strict=True)
    }

  def _torch_module(self, seed=0):
    import torch

    torch.manual_seed(seed)
    module = torch.nn.LSTM(
      INPUTS, HIDDEN, num_layers=2, bidirectional=True, batch_first=True
    )
    with torch.no_grad():
      for parameter in module.parameters():
        parameter.normal_(0.0, 0.5)
    return module

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
    given = _sorted(params) if sort else params
    if sort and naming != "default":
      self.assertNotEqual(list(given), names)
    torch_run = TorchTest._torch_run
    module = self._torch_module()
    expected, _ = torch_run(None, module, self.x)
    loaded = hk_rnn.interop.from_torch(module, given)
    _, outputs = self.apply(
      self._as_default_names(loaded, names), self.x, LENGTHS
    )
    _assert_valid_close(self, outputs, expected)

    written = hk_rnn.interop.to_torch(given, self._torch_module(seed=1))
    expected, _ = torch_run(None, written, self.x)
    _, outputs = self.apply(
      self._as_default_names(params, names), self.x, LENGTHS
    )
    _assert_valid_close(self, outputs, expected)

  @absltest.skipUnless(HAS_TORCH, "needs torch")
  def test_the_named_model_itself_matches_torch_with_sorted_params(self):
    # The reproduction, with no renaming between.
    model = _named_stack(DIRECTION_NAMINGS["layer_forward"])
    params = _sorted(model.init(jax.random.PRNGKey(1), self.x, LENGTHS))
    module = self._torch_module()
    loaded = hk_rnn.interop.from_torch(module, params)
    _, outputs = model.apply(loaded, self.x, LENGTHS)
    expected, _ = TorchTest._torch_run(None, module, self.x)
    _assert_valid_close(self, outputs, expected)

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
        convert(_sorted(params))

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
    return _randomized(hk.transform(deep).init(jax.random.PRNGKey(0), x), 7)

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
      hk_params = _sorted(hk_params)
    if sort in ("params_sorted", "both_sorted"):
      params = _sorted(params)
    loaded = hk_rnn.interop.from_haiku(hk_params, params)
    test_utils.tree_allclose(self, loaded, _sorted(expected), atol=0, rtol=0)

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

    variables = _randomized(
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
      (_sorted(variables), params),
      (variables, _sorted(params)),
      (_sorted(variables), _sorted(params)),
    ]:
      loaded = hk_rnn.interop.from_flax(given_variables, given_params)
      test_utils.tree_allclose(self, loaded, _sorted(expected), atol=0, rtol=0)

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
      loaded = hk_rnn.interop.from_keras(stack, _sorted(params))
      test_utils.tree_allclose(self, loaded, _sorted(expected), atol=0, rtol=0)


if __name__ == "__main__":
  absltest.main()
