"""The flags, optimiser, train step and loop that every trainer shares.

A trainer supplies a loss function, a pure `batch_fn(step)` and an
`evaluate(state)`; `train` does the rest: the output folder, `--resume`,
checkpoints, the progress bar, the metrics file and the plot. Keeping that in
one place is what keeps each `train.py` about its model and data alone.

The training state is a dict pytree:
  params, opt_state: replicated on every device;
  step: int32 scalar, the number of updates applied so far;
  carry: whatever the loss threads from one step to the next (the char-LM's
    LSTM carry between windows, batch-sharded), `()` when nothing.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax
import tqdm
from absl import app, flags, logging
from jax.experimental import multihost_utils

from examples.common import checkpoint, metrics, parallel

FLAGS = flags.FLAGS

# Flags that may change between a run and its `--resume`: they say how long to
# run and what to record, not what is computed.
_RESUMABLE_FLAGS = frozenset(
  {
    "num_steps",
    "resume",
    "output_dir",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "coordinator_address",
    "num_processes",
    "process_id",
  }
)

# The exit status of a run stopped by SIGTERM or SIGINT after saving its
# checkpoint (EX_TEMPFAIL: "try again later"), for schedulers and scripts to
# tell it from a finished run (0) and from a failed one (1).
EXIT_PREEMPTED = 75

LossFn = Callable[[Any, Any, Mapping[str, jax.Array], jax.Array], Any]


def define_flags(
  *,
  output_dir: str,
  num_steps: int,
  batch_size: int,
  learning_rate: float,
  eval_every: int,
  checkpoint_every: int | None = None,
) -> None:
  """Defines the flags every trainer has, with that trainer's defaults."""
  flags.DEFINE_string(
    "output_dir",
    output_dir,
    "Folder for this run: checkpoints/, metrics.jsonl, curves.png. A run "
    "without --resume starts afresh and clears what an earlier run left.",
  )
  flags.DEFINE_integer(
    "num_steps", num_steps, "Total optimiser steps.", lower_bound=1
  )
  flags.DEFINE_integer(
    "batch_size",
    batch_size,
    "Global batch size (rows), split over all devices; must be divisible by "
    "the number of devices.",
    lower_bound=1,
  )
  flags.DEFINE_float(
    "learning_rate", learning_rate, "Adam learning rate (finite, > 0)."
  )
  flags.register_validator(
    "learning_rate",
    lambda value: math.isfinite(value) and value > 0,
    message="must be a finite number > 0",
  )
  flags.DEFINE_float(
    "max_grad_norm",
    1.0,
    "Clip gradients to this global norm; 0 disables.",
    lower_bound=0.0,
  )
  flags.register_validator(
    "max_grad_norm", math.isfinite, message="must be a finite number >= 0"
  )
  flags.DEFINE_integer("seed", 0, "Seeds parameters, data and dropout.")
  flags.DEFINE_integer(
    "eval_every", eval_every, "Evaluate every N steps.", lower_bound=1
  )
  flags.DEFINE_integer(
    "checkpoint_every",
    checkpoint_every or eval_every,
    "Save a checkpoint every N steps (and always at the last step).",
    lower_bound=1,
  )
  flags.DEFINE_integer(
    "log_every",
    10,
    "Read the losses back from the devices every N steps; each read waits "
    "for the devices, so reading every step slows small models down.",
    lower_bound=1,
  )
  flags.DEFINE_bool(
    "resume",
    False,
    "Continue from the newest checkpoint in --output_dir that reads back "
    "whole, exactly where it stopped (damaged ones are reported and moved to "
    "checkpoints/damaged/); starts afresh (with a warning) when there is "
    "none.",
  )


def user_path(path: str) -> str:
  """`path` as the user meant it, also under `bazel run`.

  `bazel run` starts the binary in its runfiles folder and says where the
  user was in BUILD_WORKING_DIRECTORY; relative paths are taken from there.
  """
  base = os.environ.get("BUILD_WORKING_DIRECTORY", "")
  return os.path.join(base, os.path.expanduser(path))


def check_positive(**values: int | float) -> None:
  """Ends the run with a usage message for any flag that is not > 0."""
  for name, value in values.items():
    if value <= 0:
      raise app.UsageError(f"--{name} must be positive, got {value}.")


def make_optimizer() -> optax.GradientTransformation:
  """Adam, after clipping by global norm when `--max_grad_norm` > 0."""
  adam = optax.adam(FLAGS.learning_rate)
  if FLAGS.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(FLAGS.max_grad_norm), adam)
  return adam


def init_state(
  params: Any,
  optimizer: optax.GradientTransformation,
  data_parallel: parallel.DataParallel,
  carry: Any = (),
) -> dict:
  """The step-0 training state, placed on the devices.

  Args:
    params: freshly initialised parameters (replicated).
    optimizer: the optax optimiser (its state is replicated).
    data_parallel: the device mesh.
    carry: per-row state threaded between steps, batch-sharded.
  """
  return {
    "params": data_parallel.replicate(params),
    "opt_state": data_parallel.replicate(optimizer.init(params)),
    "step": data_parallel.replicate(jax.numpy.zeros((), "int32")),
    "carry": data_parallel.shard(carry),
  }


def make_train_step(
  loss_fn: LossFn, optimizer: optax.GradientTransformation
) -> Callable[[dict, Mapping[str, jax.Array]], tuple[dict, dict]]:
  """One optimiser step around `loss_fn`.

  Args:
    loss_fn: `loss_fn(params, carry, batch, rng) -> (loss, (carry, metrics))`,
      the mean loss over the global batch, the carry for the next step and a
      dict of scalar metrics to log beside the loss.
    optimizer: the optax optimiser.

  Returns:
    `step(state, batch) -> (state, metrics)`, to be jitted by `train`; the
    metrics are `loss_fn`'s, its loss and the gradients' global norm
    (`grad_norm`, checked by `train` and not recorded).
  """
  base_rng = jax.random.PRNGKey(FLAGS.seed)

  def step(state, batch):
    # A key per step, derived from the step itself, makes dropout identical
    # whether the run was resumed or not.
    rng = jax.random.fold_in(base_rng, state["step"])
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (carry, step_metrics)), grads = grad_fn(
      state["params"], state["carry"], batch, rng
    )
    updates, opt_state = optimizer.update(
      grads, state["opt_state"], state["params"]
    )
    new_state = {
      "params": optax.apply_updates(state["params"], updates),
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "carry": carry,
    }
    grad_norm = optax.global_norm(grads)
    return new_state, {"loss": loss, **step_metrics, "grad_norm": grad_norm}

  return step


@dataclasses.dataclass
class Result:
  """What `train` hands back to the trainer for its closing report."""

  state: dict
  step_fn: Callable[[dict, Any], tuple[dict, dict]]
  final_eval: dict[str, float]
  train_seconds: float
  output_dir: str


def _run_config() -> dict:
  """The flag values that a resumed run must share with the original."""
  return {
    name: value
    for module, module_flags in FLAGS.flags_by_module_dict().items()
    # absl files the running script's flags under its path, sys.argv[0].
    if module.startswith("examples") or module == sys.argv[0]
    for name, value in ((f.name, f.value) for f in module_flags)
    if name not in _RESUMABLE_FLAGS
  }


def _fail(message: str) -> None:
  """Ends the run with one error line and exit status 1, no traceback."""
  logging.error("%s", message)
  sys.exit(1)


def _prepare_output_dir(output_dir: str, resume: bool) -> str | None:
  """Creates the run folder; checks or records the run's configuration.

  Returns:
    None when the folder is ready, else the one line saying why not (for
    every process of the run to stop on).
  """
  try:
    os.makedirs(output_dir, exist_ok=True)
    probe = os.path.join(output_dir, ".hk_rnn_write_test")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    return (
      f"--output_dir={FLAGS.output_dir}: cannot write there "
      f"({e.strerror or e}: {e.filename or output_dir})."
    )
  config_path = os.path.join(output_dir, "config.json")
  config = _run_config()
  if resume and os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      saved = json.load(f)
    changed = sorted(k for k in config if saved.get(k) != config[k])
    if changed:
      return (
        "--resume continues a run with the same settings, but these flags "
        "differ from the checkpointed run: "
        + ", ".join(
          f"--{k}={config[k]!r} (was {saved.get(k)!r})" for k in changed
        )
      )
  if not resume:
    stale = os.path.join(output_dir, "checkpoints")
    if os.path.exists(stale):
      logging.warning("Fresh run: removing the old checkpoints in %s.", stale)
      shutil.rmtree(stale)
  with open(config_path, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return None


def _restore(checkpointer: checkpoint.Checkpointer, state: dict) -> dict:
  """`--resume`: the newest whole checkpoint, or `state` when there is none."""
  if checkpointer.latest_step() is None:
    logging.warning(
      "--resume: no checkpoint in %s; starting afresh.", checkpointer.directory
    )
    return state
  try:
    state, damaged = checkpointer.restore_latest(state)
  except checkpoint.NoReadableCheckpointError as e:
    _fail(f"--resume: {e}")
  step = int(state["step"])
  for report in damaged:
    logging.warning("--resume: %s", report)
  if damaged:
    logging.warning(
      "--resume: resumed from step %d instead, the newest checkpoint that "
      "reads back whole.",
      step,
    )
  else:
    logging.info("Resumed from step %d.", step)
  return state


class _StopRequests:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  Inside the `with` block the first signal only sets `signal_name`; the loop
  then saves a checkpoint and exits. A second signal is handled as it would
  have been without this (SIGTERM kills, SIGINT raises KeyboardInterrupt),
  for when saving itself hangs.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.signal_name is None:
      self.signal_name = signal.Signals(signum).name
      return
    signal.signal(signum, self._previous[signum])
    signal.raise_signal(signum)

  def __enter__(self):
    # Python lets only the main thread install handlers.
    if threading.current_thread() is threading.main_thread():
      for signum in self._SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def agreed(self, at_sync_point: bool) -> bool:
    """Whether to stop now; every process of a multi-host run agrees.

    One process checks its own flag every step. Several processes must stop
    at the same step (saving is collective), so they compare flags only at
    `at_sync_point` steps (those where the losses are read back anyway).
    """
    if jax.process_count() == 1:
      return self.signal_name is not None
    if not at_sync_point:
      return False
    received = multihost_utils.process_allgather(
      np.int32(signal.Signals[self.signal_name] if self.signal_name else 0)
    )
    senders = np.flatnonzero(received)
    if not senders.size:
      return False
    # Every process reports the same signal and receiver, whichever got it.
    first = int(senders[0])
    self.signal_name = (
      f"{signal.Signals(int(received[first])).name} to process {first}"
    )
    return True


def _first_non_finite(values: list[dict]) -> int | None:
  """The index of the first step whose loss or gradient norm is not finite."""
  for i, step_values in enumerate(values):
    if not (
      math.isfinite(step_values["loss"])
      and math.isfinite(step_values["grad_norm"])
    ):
      return i
  return None


def _newest_checkpoint_note(directory: str) -> Callable[[], str]:
  """For the "process N is gone" line: where `--resume` would continue."""

  def note():
    # Orbax names a step's folder by its number only once it is complete.
    steps = [int(n) for n in os.listdir(directory) if n.isdigit()]
    where = f"step {max(steps)}" if steps else "the start (none saved yet)"
    return (
      "Restart every process with --resume to continue from the newest "
      f"complete checkpoint, {where}."
    )

  return note


@parallel.stop_when_a_process_is_gone()
def train(
  *,
  name: str,
  state: dict,
  train_step: Callable[[dict, Any], tuple[dict, dict]],
  batch_fn: Callable[[int], Any],
  evaluate: Callable[[dict], Mapping[str, float]],
  reference_lines: Mapping[str, tuple[float, str]] | None = None,
) -> Result:
  """Runs (or resumes) training to `--num_steps` and plots its curves.

  Faults end the run without a traceback:
  - `--resume` restores the newest checkpoint that reads back whole; each
    damaged newer one is reported in one line and moved aside, and when none
    reads back the run ends with exit status 1.
  - A non-finite loss or gradient norm ends the run with exit status 1 and
    one line naming the first such step; no checkpoint is saved after it, so
    the newest one is the last good state.
  - SIGTERM or SIGINT (Ctrl-C): the current step finishes, a checkpoint is
    saved, and the process exits with `EXIT_PREEMPTED` (75); `--resume`
    continues exactly. A second signal stops at once. In a run of several
    processes, a signal to any one of them stops all of them after the same
    step (the next one whose losses are read back, see `--log_every`); each
    saves its part of that step's checkpoint and exits with 75.
  - A process of a multi-process run that dies (SIGKILL, a crash, a lost
    host): the others say which in one line ("process 1 is gone") and exit
    with status 1; the newest complete checkpoint is where `--resume` on
    every process continues.
  - An `--output_dir` that cannot be written ends the run with exit status 1.

  Args:
    name: the trainer's name, for the progress bar and the plot's title.
    state: the initial state from `init_state`.
    train_step: from `make_train_step`; jitted here.
    batch_fn: `batch_fn(step)` -> the device-placed batch for that step, a
      pure function of the step so that a resumed run sees the same data.
    evaluate: `evaluate(state)` -> held-out metrics as Python floats.
    reference_lines: passed to `metrics.plot_curves`.

  Returns:
    The final state, the jitted train step, the last evaluation, the training
    wall time (seconds, without evaluation) and the run folder.
  """
  output_dir = user_path(FLAGS.output_dir)
  num_steps = FLAGS.num_steps
  main = parallel.is_main_process()
  problem = _prepare_output_dir(output_dir, FLAGS.resume) if main else None
  # No process may open the checkpoints before process 0 has cleared them,
  # and when it could not, every process stops.
  if jax.process_count() > 1:
    failed = multihost_utils.process_allgather(np.int32(problem is not None))
    if failed[0] and not main:
      problem = "process 0 could not prepare --output_dir (see its log)."
  if problem:
    _fail(problem)
  checkpointer = checkpoint.Checkpointer(
    os.path.join(output_dir, "checkpoints"), main=main
  )
  parallel.set_restart_note(_newest_checkpoint_note(checkpointer.directory))
  if FLAGS.resume:
    state = _restore(checkpointer, state)
  start = int(state["step"])
  metrics_path = os.path.join(output_dir, "metrics.jsonl")
  writer = (
    metrics.MetricsWriter(metrics_path, start if FLAGS.resume else None)
    if main
    else None
  )

  def record(step, split, values):
    if writer:
      writer.write(step, split, values)

  shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = jax.jit(train_step, out_shardings=(shardings, None))
  final_eval = {}
  if start == 0:
    final_eval = dict(evaluate(state))
    record(0, "eval", final_eval)

  pending = []  # per-step metrics still on the devices
  train_seconds = 0.0
  bar = tqdm.tqdm(
    total=num_steps, initial=start, desc=name, unit="step", disable=not main
  )
  stopped_at = None
  tick = time.perf_counter()
  with _StopRequests() as stop_requests:
    for step in range(start, num_steps):
      state, step_metrics = step_fn(state, batch_fn(step))
      pending.append(step_metrics)
      done = step + 1
      is_last = done == num_steps
      read_back = done % FLAGS.log_every == 0
      stop = not is_last and stop_requests.agreed(read_back)
      do_eval = done % FLAGS.eval_every == 0 or is_last
      do_save = done % FLAGS.checkpoint_every == 0 or is_last or stop
      if read_back or do_eval or do_save:
        values = jax.device_get(pending)
        bad = _first_non_finite(values)
        for i, step_values in enumerate(values[:bad]):
          step_values = dict(step_values)
          del step_values["grad_norm"]
          record(done - len(pending) + 1 + i, "train", step_values)
        if bad is not None:
          bar.close()
          checkpointer.close()  # the saves before this step were good
          last_good = checkpointer.latest_step()
          _fail(
            f"step {done - len(pending) + 1 + bad}: the loss is "
            f"{values[bad]['loss']} and the gradient norm "
            f"{values[bad]['grad_norm']}; stopping. "
            + (
              f"The newest checkpoint (step {last_good}) precedes it; "
              if last_good is not None
              else "No checkpoint was saved; "
            )
            + f"try a --learning_rate below {FLAGS.learning_rate}."
          )
        bar.set_postfix(loss=f"{float(values[-1]['loss']):.4f}")
        bar.update(len(pending))
        pending = []
      if do_eval or do_save:
        # Evaluation and checkpoint writes are not training time.
        train_seconds += time.perf_counter() - tick
        if do_eval:
          final_eval = dict(evaluate(state))
          record(done, "eval", final_eval)
          logging.info(
            "step %d: %s",
            done,
            ", ".join(f"{k}={v:.4f}" for k, v in final_eval.items()),
          )
        if do_save:
          checkpointer.save(done, state)
        tick = time.perf_counter()
      if stop:
        stopped_at = done
        break
    bar.close()
    if start < num_steps and stopped_at is None:
      train_seconds += time.perf_counter() - tick
    elif start == num_steps:
      final_eval = dict(evaluate(state))
    # Still under the handlers: a signal now must not cut the last save short.
    checkpointer.close()
  if writer:
    writer.close()
    png = os.path.join(output_dir, "curves.png")
    metrics.plot_curves(
      metrics.read_records(metrics_path), png, name, reference_lines
    )
    logging.info("Wrote %s and %s.", metrics_path, png)
  if stopped_at is not None:
    logging.warning(
      "%s: stopped after step %d with its checkpoint saved; rerun with "
      "--resume to continue (exit status %d).",
      stop_requests.signal_name,
      stopped_at,
      EXIT_PREEMPTED,
    )
    sys.exit(EXIT_PREEMPTED)
  return Result(state, step_fn, final_eval, train_seconds, output_dir)
