"""Orbax checkpoints of a whole training state, so that `--resume` is exact.

A trainer's state is one pytree: parameters, optimiser state, the step and
whatever else the next step reads (the char-LM's carry between windows). The
data pipelines are pure functions of the seed and the step, so restoring this
pytree is all it takes to continue as if the run had never stopped.
"""

import logging as std_logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class _OrbaxInfoFilter:
  """Drops orbax's INFO records: it logs a dozen lines per save."""

  def filter(self, record) -> bool:
    return record.levelno > std_logging.INFO or ("orbax" not in record.pathname)


logging.get_absl_handler().addFilter(_OrbaxInfoFilter())


class Checkpointer:
  """Saves and restores one training-state pytree under `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the numbered step folders go.
      max_to_keep: older checkpoints beyond this many are deleted.
    """
    self._manager = ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep),
    )

  def latest_step(self) -> int | None:
    """The step of the newest checkpoint, or None when there is none."""
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts writing `state` as `step`; the write finishes in the background."""
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore_latest(self, like: Any) -> Any:
    """Restores the newest checkpoint with the shapes and shardings of `like`.

    `like` is a freshly initialised state placed on the devices, so restored
    arrays land replicated or sharded exactly as the train step expects.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(
      self.latest_step(), args=ocp.args.StandardRestore(abstract)
    )

  def close(self) -> None:
    """Waits for pending writes, then releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
