r"""Seq2seq addition: an encoder-decoder LSTM that learns "123+45" -> "168".

Problems are generated on the fly: each operand has 1 to `--max_digits`
digits (the digit count drawn uniformly, then the value), so sources and
answers have many lengths and the encoder runs on a padded, masked batch.

- Encoder: an LSTM over the source characters; its final carry (after each
  row's own last character, whatever the padding) starts the decoder. With
  `--reverse_source` (default) it reads each source backwards, so the first
  digits of the answer sit close to the last characters it read.
- Decoder, training: teacher forcing. It reads `<go>` and the true answer,
  and learns to predict the answer followed by `<eos>`.
- Decoder, evaluation: greedy decoding, feeding back its own argmax for
  `--max_digits + 2` steps. A problem counts as solved when every answer
  character and the `<eos>` after it are right (exact match).

The held-out problems are a fixed set drawn from its own seed; training draws
fresh problems every step, so a held-out problem may also be trained on by
chance, at the rate of 1 in ~10^(2 * max_digits).

  python -m examples.addition.train
  python -m examples.addition.train --max_digits=4 --num_steps=6000
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils

import hk_rnn
from examples.common import parallel, training

training.define_flags(
  output_dir="runs/addition",
  num_steps=2000,
  batch_size=128,
  learning_rate=3e-3,
  eval_every=250,
)
# `--help` lists the shared flags too, not only this file's.
flags.adopt_module_key_flags(training)
flags.adopt_module_key_flags(parallel)
_MAX_DIGITS = flags.DEFINE_integer(
  "max_digits",
  3,
  "Operands have 1 to this many digits.",
  lower_bound=1,
  upper_bound=18,
)
_HIDDEN_SIZE = flags.DEFINE_integer(
  "hidden_size", 128, "LSTM units.", lower_bound=1
)
_EMBED_SIZE = flags.DEFINE_integer(
  "embed_size", 32, "Character embedding size.", lower_bound=1
)
_REVERSE_SOURCE = flags.DEFINE_bool(
  "reverse_source", True, "The encoder reads each source from its end."
)
_EVAL_SIZE = flags.DEFINE_integer(
  "eval_size",
  1024,
  "Held-out problems (a multiple of the device count).",
  lower_bound=1,
)

PAD, GO, EOS = 0, 1, 2
_CHARS = "0123456789+"
_FIRST_CHAR = 3  # index of "0"; 0-2 are PAD, GO and EOS
VOCAB_SIZE = _FIRST_CHAR + len(_CHARS)


def to_ids(text: str) -> list[int]:
  return [_FIRST_CHAR + _CHARS.index(c) for c in text]


def to_text(ids) -> str:
  """Characters up to the first `<eos>`; other specials are skipped."""
  chars = []
  for i in ids:
    if i == EOS:
      break
    if i >= _FIRST_CHAR:
      chars.append(_CHARS[i - _FIRST_CHAR])
  return "".join(chars)


def make_batch(rng: np.random.Generator, size: int, max_digits: int) -> dict:
  """`size` random problems as padded id arrays and masks.

  Returns:
    source `(size, 2 * max_digits + 1)` and its mask; decoder_inputs
    (`<go>` + answer), targets (answer + `<eos>`) and their mask, each
    `(size, max_digits + 2)`.
  """
  source_length, answer_length = 2 * max_digits + 1, max_digits + 2
  batch = {
    "source": np.zeros((size, source_length), np.int32),
    "decoder_inputs": np.zeros((size, answer_length), np.int32),
    "targets": np.zeros((size, answer_length), np.int32),
  }
  num_digits = rng.integers(1, max_digits + 1, size=(size, 2))
  # Numbers of n digits: [10^(n-1), 10^n), except that 0 is a 1-digit number.
  low = np.where(num_digits == 1, 0, 10 ** (num_digits - 1))
  operands = rng.integers(low, 10**num_digits)
  for row, (a, b) in enumerate(operands):
    source, answer = to_ids(f"{a}+{b}"), to_ids(str(a + b))
    batch["source"][row, : len(source)] = source
    batch["decoder_inputs"][row, : len(answer) + 1] = [GO, *answer]
    batch["targets"][row, : len(answer) + 1] = [*answer, EOS]
  batch["source_mask"] = (batch["source"] != PAD).astype(np.int32)
  batch["target_mask"] = (batch["targets"] != PAD).astype(np.int32)
  return batch


def forward(batch, *, greedy_steps=None):
  """Teacher-forced logits, or greedy predictions when `greedy_steps` is set.

  Both paths build the same modules under the same names, so one set of
  parameters serves both.

  Args:
    batch: a batch from `make_batch` (greedy decoding reads only the source).
    greedy_steps: decode this many steps from the model's own predictions.

  Returns:
    Teacher forcing: logits `(batch, max_digits + 2, VOCAB_SIZE)`.
    Greedy: predicted ids `(batch, greedy_steps)`.
  """
  embed = hk.Embed(VOCAB_SIZE, _EMBED_SIZE.value, name="embed")
  encoder = hk_rnn.RNN(
    hk_rnn.LSTMCell(_HIDDEN_SIZE.value, name="encoder"),
    reverse=_REVERSE_SOURCE.value,
  )
  decoder_cell = hk_rnn.LSTMCell(_HIDDEN_SIZE.value, name="decoder")
  readout = hk.Linear(VOCAB_SIZE, name="readout")

  carry, _ = encoder(embed(batch["source"]), batch["source_mask"])
  if greedy_steps is None:
    _, outputs = hk_rnn.RNN(decoder_cell)(
      embed(batch["decoder_inputs"]),
      batch["target_mask"],
      initial_carry=carry,
    )
    return readout(outputs)
  token = jnp.full(batch["source"].shape[:1], GO)
  predictions = []
  # A handful of steps: a Python loop unrolls it, and calls the cell directly.
  for _ in range(greedy_steps):
    carry, h = decoder_cell(carry, embed(token))
    token = jnp.argmax(readout(h), axis=-1)
    predictions.append(token)
  return jnp.stack(predictions, axis=1)


model = hk.without_apply_rng(hk.transform(forward))


def masked_mean(values, mask):
  return (values * mask).sum() / mask.sum()


def loss_fn(params, carry, batch, rng):
  """Teacher-forced cross-entropy per answer character (and `<eos>`)."""
  del rng  # no dropout
  logits = model.apply(params, batch)
  log_probs = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], -1)[..., 0]
  mask = batch["target_mask"]
  correct = jnp.argmax(logits, -1) == batch["targets"]
  return masked_mean(nll, mask), (
    carry,
    {"char_accuracy": masked_mean(correct, mask)},
  )


@functools.partial(jax.jit, static_argnames="greedy_steps")
def evaluate_batch(params, batch, greedy_steps):
  """Teacher-forced loss and greedy exact-match accuracy of one batch."""
  loss, (_, metrics) = loss_fn(params, (), batch, None)
  predictions = model.apply(params, batch, greedy_steps=greedy_steps)
  mask = batch["target_mask"].astype(bool)
  # Predictions after the true <eos> do not count: decoding stops there.
  solved = jnp.all((predictions == batch["targets"]) | ~mask, axis=-1)
  return {"loss": loss, "exact_match": solved.mean(), **metrics}, predictions


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  parallel.initialize_distributed()
  data_parallel = parallel.DataParallel()
  flags_ = training.FLAGS
  data_parallel.check_divisible("batch_size", flags_.batch_size)
  data_parallel.check_divisible("eval_size", _EVAL_SIZE.value)
  max_digits = _MAX_DIGITS.value

  def batch_fn(step):
    # Training draws from [seed, 0, step], held-out problems from [seed, 1].
    rng = np.random.default_rng([flags_.seed, 0, step])
    return data_parallel.shard(make_batch(rng, flags_.batch_size, max_digits))

  eval_rng = np.random.default_rng([flags_.seed, 1])
  eval_host = make_batch(eval_rng, _EVAL_SIZE.value, max_digits)
  eval_batch = data_parallel.shard(eval_host)

  def evaluate(state):
    metrics, _ = evaluate_batch(state["params"], eval_batch, max_digits + 2)
    return {k: float(v) for k, v in metrics.items()}

  params = model.init(jax.random.PRNGKey(flags_.seed), eval_host)
  optimizer = training.make_optimizer()
  result = training.train(
    name="addition",
    state=training.init_state(params, optimizer, data_parallel),
    train_step=training.make_train_step(loss_fn, optimizer),
    batch_fn=batch_fn,
    evaluate=evaluate,
  )
  _, predictions = evaluate_batch(
    result.state["params"], eval_batch, max_digits + 2
  )
  # A collective: every process takes part, process 0 prints.
  predictions = multihost_utils.process_allgather(predictions, tiled=True)
  for row in range(8 if parallel.is_main_process() else 0):
    question = to_text(eval_host["source"][row])
    answer = to_text(predictions[row])
    truth = to_text(eval_host["targets"][row])
    logging.info(
      "%s = %s (%s)", question, answer, "right" if answer == truth else truth
    )
  logging.info(
    "Held-out exact match %.3f (%d problems) after %d steps (%.0f s training).",
    result.final_eval["exact_match"],
    _EVAL_SIZE.value,
    flags_.num_steps,
    result.train_seconds,
  )


if __name__ == "__main__":
  app.run(main)
