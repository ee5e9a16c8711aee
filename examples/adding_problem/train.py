r"""The adding problem over long, padded sequences: linear recurrences against the GRU.

The adding problem (Hochreiter & Schmidhuber, 1997): every step of a row
holds two channels, a value drawn uniformly from [0, 1] and a marker that is
1 at exactly two steps, one in each half of the row, and 0 elsewhere. The
target is the sum of the two marked values. Rows have random lengths in
[`--seq_length`/2, `--seq_length`] (a padded batch with a mask), so the
model must carry the first value across hundreds of steps and read the
answer from each row's own last step: a linear readout of the RNN's final
carry, which `hk_rnn.RNN` takes after each row's last valid step.

Always predicting 1 gives a mean squared error of 1/6 (0.167); the run
logs held-out MSE with the training seconds spent so far (evaluation
excluded), so runs with different cells compare by wall time:

  python -m examples.adding_problem.train --cell=gru --output_dir=runs/adding_gru
  python -m examples.adding_problem.train --cell=min_gru --output_dir=runs/adding_min_gru
  python -m examples.adding_problem.plot runs/adding_gru runs/adding_min_gru

`--cell=min_gru`, `min_lstm` and `griffin` (Griffin's recurrent block,
`hk_rnn.GriffinCell`) run the whole sequence as a linear recurrence (no
matrix product per step); `gru` and `lstm` in hk_rnn's fused kernels.
`--block` wraps each layer in the papers' residual block (a norm, the
recurrent layer, a gated MLP, residual connections):

  python -m examples.adding_problem.train --cell=griffin --block --output_dir=runs/adding_griffin
"""

import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import hk_rnn
from examples.common import blocks, parallel, training

training.define_flags(
  output_dir="runs/adding_problem",
  num_steps=600,
  batch_size=64,
  learning_rate=3e-3,
  eval_every=50,
  checkpoint_every=600,
)
flags.adopt_module_key_flags(training)
flags.adopt_module_key_flags(parallel)
CELLS = {
  "gru": hk_rnn.GRUCell,
  "lstm": hk_rnn.LSTMCell,
  "min_gru": hk_rnn.MinGRUCell,
  "min_lstm": hk_rnn.MinLSTMCell,
  "griffin": hk_rnn.GriffinCell,
}
_CELL = flags.DEFINE_enum("cell", "min_gru", list(CELLS), "The recurrent cell.")
_BLOCK = flags.DEFINE_bool(
  "block",
  False,
  "Stack the papers' residual blocks (RMSNorm, the recurrent layer, a gated "
  "MLP, residual connections; examples/common/blocks.py) and read the "
  "answer from each row's last output, instead of plain stacked layers "
  "read from the last carry.",
)
_SEQ_LENGTH = flags.DEFINE_integer(
  "seq_length", 512, "The longest row (rows are 1/2 to 1 of it).", lower_bound=4
)
_HIDDEN_SIZE = flags.DEFINE_integer(
  "hidden_size", 128, "Units per layer.", lower_bound=1
)
_NUM_LAYERS = flags.DEFINE_integer(
  "num_layers", 2, "Stacked recurrent layers.", lower_bound=1
)
_EVAL_SIZE = flags.DEFINE_integer(
  "eval_size",
  512,
  "Held-out rows (a multiple of the device count).",
  lower_bound=1,
)
_SOLVED_MSE = flags.DEFINE_float(
  "solved_mse", 0.01, "Held-out MSE counted as solving the task."
)

BASELINE_MSE = 1 / 6  # E[(v1 + v2 - 1)^2] for independent uniform v1, v2


def make_batch(rng: np.random.Generator, size: int, seq_length: int) -> dict:
  """`size` random problems.

  Returns:
    inputs `(size, seq_length, 2)` float32 (value, marker; zeros at padding),
    lengths `(size,)` int32 and targets `(size,)` float32.
  """
  lengths = rng.integers(seq_length // 2, seq_length + 1, size=size)
  values = rng.uniform(size=(size, seq_length))
  first = (rng.uniform(size=size) * (lengths // 2)).astype(int)
  second = lengths // 2 + (rng.uniform(size=size) * (lengths - lengths // 2))
  second = second.astype(int)
  rows = np.arange(size)
  markers = np.zeros((size, seq_length))
  markers[rows, first] = markers[rows, second] = 1.0
  valid = np.arange(seq_length)[None] < lengths[:, None]
  inputs = np.stack([values, markers], -1) * valid[..., None]
  return {
    "inputs": inputs.astype(np.float32),
    "lengths": lengths.astype(np.int32),
    "targets": (values[rows, first] + values[rows, second]).astype(np.float32),
  }


def forward(batch):
  """Predicted sums `(batch,)`: a linear readout of the last layer's carry,
  or with `--block` of the last block's output at each row's last step."""
  if _BLOCK.value:
    _, outputs = blocks.residual_stack(
      batch["inputs"],
      lambda layer: CELLS[_CELL.value](_HIDDEN_SIZE.value),
      num_layers=_NUM_LAYERS.value,
      width=_HIDDEN_SIZE.value,
      seq_lengths=batch["lengths"],
    )
    rows = jnp.arange(outputs.shape[0])
    last = outputs[rows, jnp.maximum(batch["lengths"] - 1, 0)]
    return hk.Linear(1, name="readout")(last)[:, 0]
  layers = [
    hk_rnn.RNN(CELLS[_CELL.value](_HIDDEN_SIZE.value))
    for _ in range(_NUM_LAYERS.value)
  ]
  carries, _ = hk_rnn.StackedRNN(layers)(
    batch["inputs"], seq_lengths=batch["lengths"]
  )
  h = jax.tree.leaves(carries[-1])[-1]  # an LSTM's carry is (c, h)
  return hk.Linear(1, name="readout")(h)[:, 0]


model = hk.without_apply_rng(hk.transform(forward))


def loss_fn(params, carry, batch, rng):
  del rng  # no dropout
  error = model.apply(params, batch) - batch["targets"]
  mse = jnp.mean(error**2)
  return mse, (carry, {"mse": mse})


@jax.jit
def evaluate_batch(params, batch):
  return loss_fn(params, (), batch, None)[1][1]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  parallel.initialize_distributed()
  data_parallel = parallel.DataParallel()
  flags_ = training.FLAGS
  data_parallel.check_divisible("batch_size", flags_.batch_size)
  data_parallel.check_divisible("eval_size", _EVAL_SIZE.value)
  seq_length = _SEQ_LENGTH.value

  def batch_fn(step):
    rng = np.random.default_rng([flags_.seed, 0, step])
    return data_parallel.shard(make_batch(rng, flags_.batch_size, seq_length))

  eval_host = make_batch(
    np.random.default_rng([flags_.seed, 1]), _EVAL_SIZE.value, seq_length
  )
  eval_batch = data_parallel.shard(eval_host)
  # Training seconds so far: wall time since the start, less evaluation.
  clock = {"start": None, "evaluating": 0.0, "solved": None}

  def evaluate(state):
    begin = time.perf_counter()
    if clock["start"] is None:
      clock["start"] = begin
    metrics = {
      k: float(v)
      for k, v in evaluate_batch(state["params"], eval_batch).items()
    }
    metrics["train_seconds"] = begin - clock["start"] - clock["evaluating"]
    if clock["solved"] is None and metrics["mse"] < _SOLVED_MSE.value:
      clock["solved"] = (int(state["step"]), metrics["train_seconds"])
    clock["evaluating"] += time.perf_counter() - begin
    return metrics

  params = model.init(jax.random.PRNGKey(flags_.seed), eval_host)
  optimizer = training.make_optimizer()
  result = training.train(
    name=f"adding_problem ({_CELL.value})",
    state=training.init_state(params, optimizer, data_parallel),
    train_step=training.make_train_step(loss_fn, optimizer),
    batch_fn=batch_fn,
    evaluate=evaluate,
    reference_lines={"mse": (BASELINE_MSE, "always 1")},
  )
  solved = clock["solved"]
  logging.info(
    "%s: held-out MSE %.4f (baseline %.3f) after %d steps, %.0f s training; "
    "%s.",
    _CELL.value,
    result.final_eval["mse"],
    BASELINE_MSE,
    flags_.num_steps,
    result.train_seconds,
    "not solved"
    if solved is None
    else f"MSE < {_SOLVED_MSE.value} first at step {solved[0]} "
    f"({solved[1]:.0f} s)",
  )


if __name__ == "__main__":
  app.run(main)
