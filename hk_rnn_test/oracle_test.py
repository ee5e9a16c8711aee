"""hk_rnn against PyTorch and Flax on variable-length batches.

Both libraries are optional test extras (``pip install -e .[test]``); each
test class is skipped cleanly when its library is missing. Values and
gradients are compared after mapping the peers' parameters onto ours.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

import hk_rnn
from hk_rnn_test import test_utils

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_FLAX = importlib.util.find_spec("flax") is not None

BATCH, TIME, INPUTS, FEATURES = 4, 7, 3, 5
LENGTHS = np.array([7, 3, 1, 5])
# Fixed random weights for the losses, so every output position counts.
_RNG = np.random.default_rng(42)
INPUT_VALUES = _RNG.normal(size=(BATCH, TIME, INPUTS)).astype(np.float32)
OUTPUT_WEIGHTS = _RNG.normal(size=(BATCH, TIME, 2 * FEATURES)).astype(
  np.float32
)
CARRY_WEIGHTS = _RNG.normal(size=(4, BATCH, FEATURES)).astype(np.float32)
VALID = (np.arange(TIME) < LENGTHS[:, None])[..., None]


def _loss(outputs, carries):
  """Weighted sum of valid outputs and of every final carry array."""
  width = outputs.shape[-1]
  total = jnp.sum(outputs * OUTPUT_WEIGHTS[..., :width] * VALID)
  for weights, carry in zip(CARRY_WEIGHTS, carries, strict=False):
    total = total + jnp.sum(carry * weights)
  return total


def _hk_run(kinds, params, inputs, bidirectional):
  """Runs hk_rnn (one or two directions) on our parameter dicts."""

  def forward(inputs):
    rnns = [
      hk_rnn.RNN(test_utils.CELLS[kind](FEATURES, name=f"cell{i}"))
      for i, kind in enumerate(kinds)
    ]
    if bidirectional:
      carries, outputs = hk_rnn.Bidirectional(*rnns)(
        inputs, seq_lengths=jnp.asarray(LENGTHS)
      )
    else:
      carries, outputs = rnns[0](inputs, seq_lengths=jnp.asarray(LENGTHS))
    return outputs, carries

  outputs, carries = test_utils.transform(forward).apply(params, inputs)
  return outputs, jax.tree.leaves(carries)


@absltest.skipUnless(HAS_TORCH, "PyTorch is not installed")
class TorchOracleTest(parameterized.TestCase):
  """``torch.nn.{LSTM,GRU,RNN}`` fed through ``pack_padded_sequence``."""

  @parameterized.product(
    kind=("lstm", "gru", "simple"), bidirectional=(False, True)
  )
  def test_values_and_gradients(self, kind, bidirectional):
    import torch

    torch.manual_seed(0)
    module_type = {
      "lstm": torch.nn.LSTM,
      "gru": torch.nn.GRU,
      "simple": torch.nn.RNN,
    }[kind]
    module = module_type(
      INPUTS, FEATURES, batch_first=True, bidirectional=bidirectional
    )
    inputs = torch.tensor(INPUT_VALUES, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
      inputs, torch.tensor(LENGTHS), batch_first=True, enforce_sorted=False
    )
    result, state = module(packed)
    outputs, _ = torch.nn.utils.rnn.pad_packed_sequence(
      result, batch_first=True, total_length=TIME
    )
    # Carries in our order: per direction, (c, h) for LSTM, h otherwise.
    h_n, c_n = state if kind == "lstm" else (state, None)
    directions = 2 if bidirectional else 1
    carries = []
    for d in range(directions):
      carries += [c_n[d], h_n[d]] if kind == "lstm" else [h_n[d]]
    width = outputs.shape[-1]
    total = (
      outputs * torch.tensor(OUTPUT_WEIGHTS[..., :width]) * torch.tensor(VALID)
    ).sum()
    for weights, carry in zip(CARRY_WEIGHTS, carries, strict=False):
      total = total + (carry * torch.tensor(weights)).sum()
    total.backward()

    params = {}
    for d in range(directions):
      suffix = "_l0" + ("_reverse" if d else "")
      get = lambda name, s=suffix: getattr(module, name + s)  # noqa: E731
      as_np = lambda t: t.detach().numpy()  # noqa: E731
      cell = {
        "w_i": as_np(get("weight_ih").T),
        "w_h": as_np(get("weight_hh").T),
      }
      if kind == "gru":
        cell.update(b_i=as_np(get("bias_ih")), b_h=as_np(get("bias_hh")))
      else:
        cell["b"] = as_np(get("bias_ih") + get("bias_hh"))
      params[f"cell{d}"] = jax.tree.map(jnp.asarray, cell)
    kinds = [kind] * directions

    def loss(params, inputs):
      return _loss(*_hk_run(kinds, params, inputs, bidirectional))

    ours_outputs, ours_carries = _hk_run(
      kinds, params, jnp.asarray(INPUT_VALUES), bidirectional
    )
    np.testing.assert_allclose(
      ours_outputs, outputs.detach().numpy(), atol=1e-5
    )
    for ours, theirs in zip(ours_carries, carries, strict=True):
      np.testing.assert_allclose(ours, theirs.detach().numpy(), atol=1e-5)

    grads, input_grads = jax.grad(loss, argnums=(0, 1))(
      params, jnp.asarray(INPUT_VALUES)
    )
    np.testing.assert_allclose(input_grads, inputs.grad.numpy(), atol=1e-5)
    for d in range(directions):
      suffix = "_l0" + ("_reverse" if d else "")
      grad_of = lambda name, s=suffix: getattr(module, name + s).grad.numpy()  # noqa: E731
      ours = grads[f"cell{d}"]
      np.testing.assert_allclose(ours["w_i"], grad_of("weight_ih").T, atol=1e-5)
      np.testing.assert_allclose(ours["w_h"], grad_of("weight_hh").T, atol=1e-5)
      if kind == "gru":
        np.testing.assert_allclose(ours["b_i"], grad_of("bias_ih"), atol=1e-5)
        np.testing.assert_allclose(ours["b_h"], grad_of("bias_hh"), atol=1e-5)
      else:
        # One bias of ours stands for torch's two, which get equal gradients.
        np.testing.assert_allclose(ours["b"], grad_of("bias_ih"), atol=1e-5)


def _from_flax(kind, cell_params):
  """Maps a Flax cell's Dense parameters onto our fused layout."""
  kernel = lambda name: cell_params[name]["kernel"]  # noqa: E731
  bias = lambda name: cell_params[name]["bias"]  # noqa: E731
  zeros = jnp.zeros((FEATURES,))
  if kind == "lstm":
    return {
      "w_i": jnp.concatenate([kernel("i" + g) for g in "ifgo"], 1),
      "w_h": jnp.concatenate([kernel("h" + g) for g in "ifgo"], 1),
      "b": jnp.concatenate([bias("h" + g) for g in "ifgo"]),
    }
  gates = "rzn" if kind == "gru" else "fn"
  return {
    "w_i": jnp.concatenate([kernel("i" + g) for g in gates], 1),
    "w_h": jnp.concatenate([kernel("h" + g) for g in gates], 1),
    "b_i": jnp.concatenate([bias("i" + g) for g in gates]),
    "b_h": jnp.concatenate([zeros] * (len(gates) - 1) + [bias("hn")]),
  }


@absltest.skipUnless(HAS_FLAX, "Flax is not installed")
class FlaxOracleTest(parameterized.TestCase):
  """``flax.linen.RNN`` and ``Bidirectional`` with ``seq_lengths``."""

  @parameterized.parameters(
    (("lstm",),), (("gru",),), (("mgu",),), (("lstm", "gru"),)
  )
  def test_values_and_gradients(self, kinds):
    from flax import linen as nn

    flax_cells = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "mgu": nn.MGUCell}
    bidirectional = len(kinds) == 2
    rnns = [nn.RNN(flax_cells[kind](FEATURES)) for kind in kinds]
    model = nn.Bidirectional(*rnns) if bidirectional else rnns[0]
    inputs = jnp.asarray(INPUT_VALUES)
    lengths = jnp.asarray(LENGTHS)
    flax_params = model.init(jax.random.PRNGKey(1), inputs, seq_lengths=lengths)

    def flax_loss(flax_params, inputs):
      carries, outputs = model.apply(
        flax_params, inputs, seq_lengths=lengths, return_carry=True
      )
      return _loss(outputs, jax.tree.leaves(carries))

    def to_ours(flax_params):
      inner = flax_params["params"]
      if bidirectional:
        cells = [inner["forward_rnn"]["cell"], inner["backward_rnn"]["cell"]]
      else:
        cells = [inner["cell"]]
      return {
        f"cell{i}": _from_flax(kind, cell)
        for i, (kind, cell) in enumerate(zip(kinds, cells, strict=True))
      }

    ours = to_ours(flax_params)

    def our_loss(params, inputs):
      return _loss(*_hk_run(kinds, params, inputs, bidirectional))

    carries, outputs = model.apply(
      flax_params, inputs, seq_lengths=lengths, return_carry=True
    )
    our_outputs, our_carries = _hk_run(kinds, ours, inputs, bidirectional)
    np.testing.assert_allclose(our_outputs * VALID, outputs * VALID, atol=1e-5)
    for a, b in zip(our_carries, jax.tree.leaves(carries), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-5)

    flax_grads, flax_input_grads = jax.grad(flax_loss, argnums=(0, 1))(
      flax_params, inputs
    )
    our_grads, our_input_grads = jax.grad(our_loss, argnums=(0, 1))(
      ours, inputs
    )
    np.testing.assert_allclose(our_input_grads, flax_input_grads, atol=1e-5)
    # Where our layout merges two Flax biases, both get the same gradient;
    # compare weights and the input-side biases through the same mapping.
    expected = to_ours(flax_grads)
    for name, cell in our_grads.items():
      for param in ("w_i", "w_h", "b_i"):
        if param in cell:
          np.testing.assert_allclose(
            cell[param], expected[name][param], atol=1e-5
          )
      if "b" in cell:
        np.testing.assert_allclose(cell["b"], expected[name]["b"], atol=1e-5)


if __name__ == "__main__":
  absltest.main()
