"""Tests for hk_rnn.interop.from_torch and to_torch, against PyTorch itself.

Random weights (biases included, so that a misplaced bias shows) are
converted, and the hk_rnn model must then give torch's own outputs and
final states on a variable-length batch (torch's packed sequences). Skipped
when torch is not installed.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils
from hk_rnn_test.interop_helpers import (
  HAS_TORCH,
  HIDDEN,
  HK_RNN_CELL,
  INPUTS,
  LENGTHS,
  assert_valid_close,
  batch_inputs,
  cells_step,
  key_sorted,
  randomized,
  stacked_model,
  torch_module,
  torch_run,
)

TORCH_CASES = {
  "lstm_bidirectional": ("LSTM", {}, 2, True, True),
  "gru_bidirectional_no_bias": ("GRU", {}, 2, True, False),
  "rnn_tanh": ("RNN", {"nonlinearity": "tanh"}, 2, False, True),
  "rnn_relu": ("RNN", {"nonlinearity": "relu"}, 1, False, True),
}


@absltest.skipUnless(HAS_TORCH, "needs torch")
class TorchTest(parameterized.TestCase):
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
    module = torch_module(name, options, num_layers, bidirectional, bias)
    relu = options.get("nonlinearity") == "relu"
    cell_fn = (
      (lambda: hk_rnn.SimpleCell(HIDDEN, activation_fn=jax.nn.relu))
      if relu
      else HK_RNN_CELL[name]
    )
    model, apply = stacked_model(cell_fn, num_layers, bidirectional)
    x = batch_inputs()
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    params = hk_rnn.interop.from_torch(module, params)
    carries, outputs = apply(params, x, LENGTHS)
    expected_outputs, state = torch_run(module, x)
    assert_valid_close(self, outputs, expected_outputs)
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
    module = torch_module("LSTM", {}, 2, True, True)
    model, apply = stacked_model(HK_RNN_CELL["LSTM"], 2, True)
    x = batch_inputs()
    params = randomized(model.init(jax.random.PRNGKey(1), x, LENGTHS), 3)
    self.assertIs(hk_rnn.interop.to_torch(params, module), module)
    expected_outputs, state = torch_run(module, x)
    carries, outputs = apply(params, x, LENGTHS)
    assert_valid_close(self, outputs, expected_outputs)
    test_utils.tree_allclose(
      self, carries, self._expected_carries("LSTM", state, 2, 2)
    )
    back = hk_rnn.interop.from_torch(module, randomized(params, 4))
    test_utils.tree_allclose(self, back, params)

    gru = torch_module("GRU", {}, 1, False, False)
    gru_params = cells_step([HK_RNN_CELL["GRU"]], x[:, 0])
    gru_params = {
      "gru_cell": {
        **randomized(gru_params, 5)["gru_cell"],
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
      hk_rnn.interop.to_torch(randomized(gru_params, 6), gru)

  def test_numeric_order_of_twelve_cells_in_sorted_params(self):
    module = torch_module("LSTM", {}, 6, True, True)

    def cell():
      return hk_rnn.LSTMCell(HIDDEN)

    # Six bidirectional layers: cells lstm_cell, lstm_cell_1 ... lstm_cell_11.
    def forward(x):
      for _ in range(6):
        cells = [cell(), cell()]
        x = jnp.concatenate(
          [c(c.initialize_carry(x), x)[1] for c in cells], axis=-1
        )

    params = key_sorted(
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

    lstm = torch_module("LSTM", {}, 2, True, True)
    model = RNNModel(lstm)
    stack, _ = stacked_model(HK_RNN_CELL["LSTM"], 2, True)
    params = stack.init(jax.random.PRNGKey(1), batch_inputs(), LENGTHS)
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

    x = batch_inputs()
    model, _ = stacked_model(HK_RNN_CELL["LSTM"], 2, True)
    params = model.init(jax.random.PRNGKey(1), x, LENGTHS)
    lstm = torch_module("LSTM", {}, 2, True, True)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: the source has 2 recurrent layers, params have 4 "
      r"recurrent cells; cell 'lstm_cell_2' \(LSTMCell\) has no source layer",
    ):
      hk_rnn.interop.from_torch(torch_module("LSTM", {}, 1, True, True), params)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: the source has 6 recurrent layers, params have 4 "
      r"recurrent cells; the source's layer 2 forward \(weight_ih_l2\), an "
      r"nn.LSTM has no cell to go to",
    ):
      hk_rnn.interop.from_torch(torch_module("LSTM", {}, 3, True, True), params)
    with self.assertRaisesRegex(
      ValueError,
      r"from_torch: cell 'lstm_cell' \(LSTMCell\) is recurrent cell 0 but the "
      r"source's layer there, layer 0 forward \(weight_ih_l0\), an nn.GRU, "
      r"needs an hk_rnn.GRUCell",
    ):
      hk_rnn.interop.from_torch(torch_module("GRU", {}, 2, True, True), params)
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
      hk_rnn.interop.to_torch(params, torch_module("GRU", {}, 2, True, True))


if __name__ == "__main__":
  absltest.main()
