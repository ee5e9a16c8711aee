r"""Character-level language model: a stacked LSTM trained by truncated BPTT.

The text is cut into `--batch_size` contiguous streams, one per batch row.
Step `s` trains on window `s` of every stream (`--seq_length` characters) and
starts from the LSTM carry that window `s - 1` left behind (`initial_carry=`
of `hk_rnn.RNN`), so the model sees arbitrarily long context while gradients
flow back through one window only. The carry is part of the checkpointed
state, so `--resume` picks up mid-stream exactly.

Held-out text (the last `--eval_fraction` of the corpus, different files from
the training text) is read the same streaming way; its bits per character
(bpc) are compared with the unigram baseline, the entropy of the held-out text
under the training text's character frequencies. At the end the model writes
a sample, continuing `--prime`.

Default corpus: the Python standard library's own `.py` sources, found at run
time (no download). `--text_path` takes any UTF-8 file instead.

  python -m examples.char_lm.train
  python -m examples.char_lm.train --text_path=book.txt --num_steps=5000
  python -m examples.char_lm.train --cell=griffin --output_dir=runs/char_lm_griffin

`--cell=griffin` trains Griffin's residual blocks instead of the LSTM (the
RG-LRU's carry and the convolution's last inputs stream across windows the
same way).
"""

import functools
import math
import os
import random
import sysconfig

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import hk_rnn
from examples.common import blocks, parallel, training

training.define_flags(
  output_dir="runs/char_lm",
  num_steps=1000,
  batch_size=32,
  learning_rate=3e-3,
  eval_every=200,
)
# `--help` lists the shared flags too, not only this file's.
flags.adopt_module_key_flags(training)
flags.adopt_module_key_flags(parallel)
_TEXT_PATH = flags.DEFINE_string(
  "text_path",
  None,
  "A UTF-8 text file to model. Default: the standard library's .py sources.",
)
_MAX_CHARS = flags.DEFINE_integer(
  "max_chars",
  2_000_000,
  "Read at most this many characters of the corpus.",
  lower_bound=1,
)
_EVAL_FRACTION = flags.DEFINE_float(
  "eval_fraction", 0.05, "Fraction of the corpus, at its end, held out."
)
_EVAL_CHARS = flags.DEFINE_integer(
  "eval_chars",
  65_536,
  "Evaluate on at most this many held-out characters (evaluation cost).",
  lower_bound=1,
)
_SEQ_LENGTH = flags.DEFINE_integer(
  "seq_length",
  64,
  "Truncated-BPTT window: characters per row per step.",
  lower_bound=1,
)
_CELL = flags.DEFINE_enum(
  "cell",
  "lstm",
  ["lstm", "griffin"],
  "lstm: stacked LSTM layers; griffin: Griffin's residual blocks "
  "(hk_rnn.GriffinCell inside RMSNorm, a gated MLP and residual "
  "connections, examples/common/blocks.py; --dropout does not apply).",
)
_NUM_LAYERS = flags.DEFINE_integer(
  "num_layers", 2, "Stacked recurrent layers (or blocks).", lower_bound=1
)
_HIDDEN_SIZE = flags.DEFINE_integer(
  "hidden_size", 128, "Units per layer (the blocks' width).", lower_bound=1
)
_EMBED_SIZE = flags.DEFINE_integer(
  "embed_size", 64, "Character embedding size.", lower_bound=1
)
_DROPOUT = flags.DEFINE_float(
  "dropout",
  0.0,
  "Dropout rate on the inputs of every LSTM layer but the first (training "
  "only).",
  lower_bound=0.0,
  upper_bound=0.9,
)
_SAMPLE_LENGTH = flags.DEFINE_integer(
  "sample_length",
  400,
  "Characters to sample at the end; 0 skips sampling.",
  lower_bound=0,
)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.7, "Sampling temperature.")
_PRIME = flags.DEFINE_string(
  "prime",
  "def ",
  "Text the sample continues (its characters must occur in the corpus).",
)

# Standard-library folders left out of the default corpus: third-party code,
# test suites, and codec tables that are mostly escaped byte values.
_SKIPPED_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "encodings"}
)


def stdlib_sources(max_chars: int) -> str:
  """The standard library's `.py` files, concatenated, up to `max_chars`.

  The files are shuffled with a fixed seed, so training and held-out text
  both mix many modules, and the corpus is the same on every run.
  """
  root = sysconfig.get_paths()["stdlib"]
  paths = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
    paths.extend(
      os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")
    )
  random.Random(0).shuffle(paths)
  parts, size = [], 0
  for path in paths:
    if size >= max_chars:
      break
    with open(path, encoding="utf-8", errors="replace") as f:
      parts.append(f.read())
    size += len(parts[-1])
  if not parts:
    raise app.UsageError(
      f"Found no .py files under the standard library ({root}); pass "
      "--text_path=FILE."
    )
  return "".join(parts)[:max_chars]


def load_corpus() -> str:
  """The text named by the flags."""
  if _TEXT_PATH.value is None:
    return stdlib_sources(_MAX_CHARS.value)
  try:
    with open(training.user_path(_TEXT_PATH.value), encoding="utf-8") as f:
      return f.read(_MAX_CHARS.value)
  except (OSError, UnicodeDecodeError) as e:
    raise app.UsageError(
      f"--text_path={_TEXT_PATH.value}: cannot read it as UTF-8 text ({e})."
    ) from e


def encode(text: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (the characters' code points, the text as indices into them)."""
  code_points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  vocab, ids = np.unique(code_points, return_inverse=True)
  return vocab, ids.astype(np.int32)


def to_streams(
  ids: np.ndarray, num_streams: int, seq_length: int
) -> np.ndarray:
  """Cuts `ids` into `num_streams` equal contiguous rows of whole windows.

  Each row holds `num_windows * seq_length + 1` characters: the inputs of
  every window plus the one target after the last.
  """
  num_windows = (len(ids) // num_streams - 1) // seq_length
  if num_windows < 1:
    raise app.UsageError(
      f"{len(ids)} characters cannot fill --batch_size={num_streams} streams "
      f"of one --seq_length={seq_length} window; use more text or smaller "
      "flags."
    )
  length = num_windows * seq_length + 1
  starts = np.arange(num_streams) * (len(ids) // num_streams)
  return np.stack([ids[s : s + length] for s in starts])


def forward(tokens, carry, is_training, *, vocab_size):
  """Logits for the next character and the carry after the last step.

  Args:
    tokens: int32 `(batch, time)` character indices.
    carry: a tuple with one LSTM carry per layer, or None for zeros.
    is_training: applies `--dropout` between layers (needs an rng).
    vocab_size: the number of distinct characters.

  Returns:
    `(logits (batch, time, vocab_size), carry)`.
  """
  x = hk.Embed(vocab_size, _EMBED_SIZE.value)(tokens)
  # A carry passed in continues each row's stream: no step of this window
  # starts a sequence (what GriffinCell's RG-LRU treats differently).
  continues = None
  if carry is not None:
    continues = jnp.ones(tokens.shape[:1], jnp.int32)
  if _CELL.value == "griffin":
    carry, x = blocks.residual_stack(
      x,
      lambda layer: hk_rnn.GriffinCell(_HIDDEN_SIZE.value),
      num_layers=_NUM_LAYERS.value,
      width=_HIDDEN_SIZE.value,
      initial_carry=carry,
      initial_segment_ids=continues,
    )
    return hk.Linear(vocab_size, name="logits")(x), carry
  stack = hk_rnn.StackedRNN(
    [
      hk_rnn.RNN(hk_rnn.LSTMCell(_HIDDEN_SIZE.value, name=f"lstm_{layer}"))
      for layer in range(_NUM_LAYERS.value)
    ],
    dropout_rate=_DROPOUT.value,
  )
  carry, x = stack(x, initial_carry=carry, is_training=is_training)
  return hk.Linear(vocab_size, name="logits")(x), carry


def cross_entropy(logits, targets):
  """Per-position negative log-likelihood in nats."""
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def make_loss_fn(model):
  """The training loss of one window, for `training.make_train_step`."""

  def loss_fn(params, carry, batch, rng):
    # A stream that wraps around to its start begins again from a zero carry.
    def restart(c):
      reset = batch["reset"].reshape((-1,) + (1,) * (c.ndim - 1))
      return jnp.where(reset, jnp.zeros_like(c), c)

    carry = jax.tree.map(restart, carry)
    logits, carry = model.apply(params, rng, batch["inputs"], carry, True)
    loss = cross_entropy(logits, batch["targets"]).mean()
    return loss, (carry, {"bpc": loss / math.log(2)})

  return loss_fn


def make_held_out_bpc(model, seq_length):
  """`bpc(params, streams, zero_carry)` over held-out streams, carry passed on."""

  @jax.jit
  def bpc(params, streams, zero_carry):
    num_windows = (streams.shape[1] - 1) // seq_length

    def windows(x):
      return x.reshape(x.shape[0], num_windows, seq_length).swapaxes(0, 1)

    def window(carry, xs):
      inputs, targets = xs
      logits, carry = model.apply(params, None, inputs, carry, False)
      return carry, cross_entropy(logits, targets).sum()

    _, nll = jax.lax.scan(
      window, zero_carry, (windows(streams[:, :-1]), windows(streams[:, 1:]))
    )
    return (
      nll.sum() / (streams.shape[0] * num_windows * seq_length) / math.log(2)
    )

  return bpc


def unigram_bpc(train_ids, targets, vocab_size):
  """Held-out bpc under the training text's character frequencies.

  Add-one smoothing gives characters unseen in training a finite cost.
  """
  counts = np.bincount(train_ids, minlength=vocab_size) + 1.0
  log2_p = np.log2(counts / counts.sum())
  return float(-log2_p[targets].mean())


def sample(model, params, prime_ids, zero_carry, rng):
  """Continues `prime_ids` for `--sample_length` characters.

  Args:
    model: the transformed `forward`.
    params: trained parameters.
    prime_ids: int32 `(length,)`, the text to continue.
    zero_carry: the carry of a one-row batch before any text.
    rng: the sampling key.

  Returns:
    int32 `(--sample_length,)` sampled character indices.
  """
  temperature = _TEMPERATURE.value
  logits, carry = model.apply(params, None, prime_ids[None], zero_carry, False)

  def step(state, key):
    logits, carry = state
    token = jax.random.categorical(key, logits / temperature)
    logits, carry = model.apply(params, None, token[:, None], carry, False)
    return (logits[:, -1], carry), token[0]

  keys = jax.random.split(rng, _SAMPLE_LENGTH.value)
  return jax.lax.scan(step, (logits[:, -1], carry), keys)[1]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  parallel.initialize_distributed()
  data_parallel = parallel.DataParallel()
  batch_size = training.FLAGS.batch_size
  seq_length = _SEQ_LENGTH.value
  training.check_positive(temperature=_TEMPERATURE.value)
  data_parallel.check_divisible("batch_size", batch_size)
  if not 0 < _EVAL_FRACTION.value < 1:
    raise app.UsageError(
      f"--eval_fraction must lie in (0, 1), got {_EVAL_FRACTION.value}."
    )

  text = load_corpus()
  vocab, ids = encode(text)
  model = hk.transform(functools.partial(forward, vocab_size=len(vocab)))
  # Checked before training, so a typo does not cost a whole run.
  index = {int(c): i for i, c in enumerate(vocab)}
  missing = [c for c in _PRIME.value if ord(c) not in index]
  if missing or not _PRIME.value:
    raise app.UsageError(
      f"--prime={_PRIME.value!r} must be non-empty and use only characters "
      f"of the corpus; these are not: {missing}."
    )
  prime_ids = np.array([index[ord(c)] for c in _PRIME.value], np.int32)
  split = int(len(ids) * (1 - _EVAL_FRACTION.value))
  train_streams = to_streams(ids[:split], batch_size, seq_length)
  eval_streams = to_streams(
    ids[split : split + _EVAL_CHARS.value], batch_size, seq_length
  )
  num_windows = (train_streams.shape[1] - 1) // seq_length
  eval_targets = eval_streams[:, 1:]
  baseline = unigram_bpc(ids[:split], eval_targets, len(vocab))
  logging.info(
    "Corpus: %d characters (%d distinct); training on %d, %d streams of %d "
    "windows; held-out %d. Unigram baseline: %.3f bpc.",
    len(ids),
    len(vocab),
    split,
    batch_size,
    num_windows,
    eval_targets.size,
    baseline,
  )

  dummy = np.zeros((batch_size, seq_length), np.int32)
  params = model.init(
    jax.random.PRNGKey(training.FLAGS.seed), dummy, None, False
  )
  carry_shapes = jax.eval_shape(
    lambda p: model.apply(p, None, dummy, None, False)[1], params
  )
  zero_carry = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), carry_shapes)
  optimizer = training.make_optimizer()
  state = training.init_state(params, optimizer, data_parallel, zero_carry)

  def batch_fn(step):
    window = step % num_windows
    start = window * seq_length
    return data_parallel.shard(
      {
        "inputs": train_streams[:, start : start + seq_length],
        "targets": train_streams[:, start + 1 : start + seq_length + 1],
        "reset": np.full((batch_size,), window == 0),
      }
    )

  placed_eval_streams = data_parallel.shard(eval_streams)
  placed_zero_carry = data_parallel.shard(zero_carry)

  held_out_bpc = make_held_out_bpc(model, seq_length)

  def evaluate(state):
    bpc = held_out_bpc(state["params"], placed_eval_streams, placed_zero_carry)
    return {"bpc": float(bpc)}

  result = training.train(
    name="char_lm",
    state=state,
    train_step=training.make_train_step(make_loss_fn(model), optimizer),
    batch_fn=batch_fn,
    evaluate=evaluate,
    reference_lines={"bpc": (baseline, "unigram (held-out)")},
  )
  logging.info(
    "Held-out %.3f bpc vs unigram %.3f bpc after %d steps (%.0f s training).",
    result.final_eval["bpc"],
    baseline,
    training.FLAGS.num_steps,
    result.train_seconds,
  )

  if _SAMPLE_LENGTH.value > 0 and parallel.is_main_process():
    one_row = jax.tree.map(lambda c: c[:1], zero_carry)
    tokens = jax.jit(functools.partial(sample, model))(
      jax.device_get(result.state["params"]),
      prime_ids,
      one_row,
      jax.random.PRNGKey(training.FLAGS.seed),
    )
    text = _PRIME.value + "".join(chr(vocab[t]) for t in np.asarray(tokens))
    with open(
      os.path.join(result.output_dir, "sample.txt"), "w", encoding="utf-8"
    ) as f:
      f.write(text)
    logging.info("Sample:\n%s", text)


if __name__ == "__main__":
  app.run(main)
