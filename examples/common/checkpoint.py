"""Orbax checkpoints of a whole training state, so that `--resume` is exact.

A trainer's state is one pytree: parameters, optimiser state, the step and
whatever else the next step reads (the char-LM's carry between windows). The
data pipelines are pure functions of the seed and the step, so restoring this
pytree is all it takes to continue as if the run had never stopped.

Saving is atomic: on a local (POSIX) file system orbax writes each step into a
`<step>.orbax-checkpoint-tmp-*` folder and renames it to `<step>` only once
every file is written, and it never lists the temporary folders as steps, so
a kill during a save leaves nothing that `--resume` would pick.

Once a save has finished, a list of its files and their sizes is written
beside them (`hk_rnn_files.json`). Restoring checks that list first, so that
a truncated or deleted file is reported by name, then reads the state back
and checks that it is finite; when a checkpoint fails, the next newest one is
tried. Once one reads back whole, the damaged newer ones are moved to
`damaged/<step>` beside the step folders, out of orbax's sight, so that the
resumed run can save those steps again.
"""

import json
import logging as std_logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

_FILE_LIST = "hk_rnn_files.json"
_DAMAGED = "damaged"


class _OrbaxInfoFilter:
  """Drops orbax's INFO records: it logs a dozen lines per save."""

  def filter(self, record) -> bool:
    return record.levelno > std_logging.INFO or ("orbax" not in record.pathname)


logging.get_absl_handler().addFilter(_OrbaxInfoFilter())


class NoReadableCheckpointError(Exception):
  """Every checkpoint in the folder is damaged; the message says how."""


class _Damaged(Exception):
  """One checkpoint is damaged; the message names the file and the fault."""


@jax.jit
def _finite_leaves(tree: Any) -> list[jax.Array]:
  # One replicated scalar per leaf, readable on every host even when the
  # leaf is sharded; integer leaves are finite by construction.
  return [
    jnp.all(jnp.isfinite(leaf))
    if jnp.issubdtype(leaf.dtype, jnp.inexact)
    else jnp.array(True)
    for leaf in jax.tree.leaves(tree)
  ]


def _agreed_problem(problem: str | None) -> str | None:
  """Whether a checkpoint is damaged, as every process of the run sees it.

  Each process reads its own part of a checkpoint; when one of them fails,
  all must skip the checkpoint together, or their collectives would pair up
  different steps.
  """
  if jax.process_count() == 1:
    return problem
  failed = multihost_utils.process_allgather(np.int32(problem is not None))
  if problem is None and failed.any():
    problem = f"unreadable on process {int(np.argmax(failed))} (see its log)"
  return problem


def _files_of(step_dir: str) -> dict[str, int]:
  """Every file under `step_dir` (but the file list) -> its size in bytes."""
  sizes = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative != _FILE_LIST:
        sizes[relative] = os.path.getsize(path)
  return sizes


def _summarise(error: Exception, step_dir: str) -> str:
  """One line from a (multi-page) orbax or TensorStore error.

  Orbax wraps TensorStore's error, which names what it failed to read (the
  array, the file or database); the innermost error is the one to report.
  """
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = str(error).strip() or type(error).__name__
  line = text.splitlines()[0].replace(step_dir + os.sep, "")
  if len(line) > 240:
    line = line[:237] + "..."
  return f"{type(error).__name__}: {line}"


class Checkpointer:
  """Saves and restores one training-state pytree under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2, main: bool = True):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the numbered step folders go.
      max_to_keep: older checkpoints beyond this many are deleted.
      main: whether this process writes the file lists and moves damaged
        checkpoints aside (process 0 of a multi-host run; the folder is
        shared).
    """
    self._directory = os.path.abspath(directory)
    self._main = main
    self._manager = ocp.CheckpointManager(
      self._directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep),
    )
    self._unlisted = None  # a save whose file list is not written yet

  @property
  def directory(self) -> str:
    return self._directory

  def step_dir(self, step: int) -> str:
    """The folder of step `step`'s checkpoint."""
    return os.path.join(self._directory, str(step))

  def latest_step(self) -> int | None:
    """The step of the newest checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts writing `state` as `step`; the write finishes in the background.

    A save that is still running is waited for first (orbax would wait for
    it anyway), so that its file list can be written.
    """
    self._write_file_list()
    if self._manager.save(step, args=ocp.args.StandardSave(state)):
      self._unlisted = step

  def _write_file_list(self) -> None:
    """Waits for the running save, then lists its files beside them."""
    self._manager.wait_until_finished()
    step, self._unlisted = self._unlisted, None
    if step is None or not self._main or not os.path.isdir(self.step_dir(step)):
      return
    sizes = _files_of(self.step_dir(step))
    path = os.path.join(self.step_dir(step), _FILE_LIST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(sizes, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)

  def _check_files(self, step: int) -> None:
    """Raises `_Damaged` when a listed file is missing or changed size."""
    step_dir = self.step_dir(step)
    path = os.path.join(step_dir, _FILE_LIST)
    if not os.path.exists(path):
      return  # stopped between the save and its list: reading back decides
    try:
      with open(path, encoding="utf-8") as f:
        listed = json.load(f)
    except (OSError, ValueError) as e:
      raise _Damaged(f"{_FILE_LIST}: unreadable ({e})") from None
    found = _files_of(step_dir)
    for name, size in sorted(listed.items()):
      if name not in found:
        raise _Damaged(f"{name}: missing")
      if found[name] != size:
        raise _Damaged(
          f"{name}: {found[name]} bytes, {size} when it was written"
        )

  def _restore(self, step: int, abstract: Any) -> Any:
    problem = None
    try:
      self._check_files(step)
      state = self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract)
      )
    except _Damaged as e:
      problem = str(e)
    except Exception as e:  # orbax and TensorStore raise many kinds
      problem = _summarise(e, self.step_dir(step))
    problem = _agreed_problem(problem)
    if problem:
      raise _Damaged(problem)
    paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(state)]
    for path, finite in zip(paths, _finite_leaves(state), strict=True):
      if not finite:
        raise _Damaged(f"{jax.tree_util.keystr(path)}: non-finite values")
    return state

  def _move_aside(self, step: int) -> str:
    """Moves a damaged checkpoint out of orbax's sight; returns where."""
    target = os.path.join(self._directory, _DAMAGED, str(step))
    if self._main:
      if os.path.exists(target):
        shutil.rmtree(target)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(self.step_dir(step), target)
    return target

  def restore_latest(self, like: Any) -> tuple[Any, list[str]]:
    """Restores the newest checkpoint that reads back whole.

    `like` is a freshly initialised state placed on the devices, so restored
    arrays land replicated or sharded exactly as the train step expects.
    Damaged checkpoints are moved to `damaged/` (so that the resumed run can
    save the same steps again) and each is reported in one line.

    Returns:
      The restored state and the lines reporting damaged checkpoints, newest
      first ([] when the newest one was whole).

    Raises:
      NoReadableCheckpointError: when there is a checkpoint but none reads
        back whole.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    reports, damaged = [], []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._restore(step, abstract)
      except _Damaged as e:
        reports.append(
          f"checkpoint step {step} ({self.step_dir(step)}) is damaged: {e}"
        )
        damaged.append(step)
        continue
      # Only now, so that a run that finds nothing to resume from leaves the
      # folder as it was and says the same again when rerun.
      for i, bad in enumerate(damaged):
        reports[i] += f"; moved to {self._move_aside(bad)}"
      if damaged:
        self._manager.reload()
      return state, reports
    raise NoReadableCheckpointError(
      f"no checkpoint in {self._directory} reads back "
      "whole:\n  " + "\n  ".join(reports)
    )

  def close(self) -> None:
    """Waits for pending writes, then releases the manager."""
    self._write_file_list()
    self._manager.close()
