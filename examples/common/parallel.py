"""Data parallelism over every device: a 1-D mesh, batches split along it.

Every trainer replicates its parameters and optimiser state on all devices and
splits each batch along its leading axis, so that one `jax.jit` step runs on
all of them and XLA inserts the gradient all-reduce. The same code runs on one
CPU, on `XLA_FLAGS=--xla_force_host_platform_device_count=8`, on a GPU host,
and on several hosts once `--coordinator_address` is given.

Every process builds the same global batch from the seed and the step (the
data pipelines are pure functions of both), and hands JAX only the rows its
own devices hold: no process ever needs another's data.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_COORDINATOR_ADDRESS = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0, for multi-host training; leave unset on one host.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Number of processes (hosts) in a multi-host run."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in [0, --num_processes)."
)

# The name of the one mesh axis, along which batches are split.
DATA_AXIS = "data"


def initialize_distributed() -> None:
  """Joins a multi-host run when `--coordinator_address` is set.

  It must run before anything touches a device, which is why every trainer
  calls it first in `main`.
  """
  if _COORDINATOR_ADDRESS.value is None:
    return
  if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
    raise app.UsageError(
      "--coordinator_address needs --num_processes and --process_id too."
    )
  jax.distributed.initialize(
    coordinator_address=_COORDINATOR_ADDRESS.value,
    num_processes=_NUM_PROCESSES.value,
    process_id=_PROCESS_ID.value,
  )
  logging.info(
    "Process %d of %d joined the run.", jax.process_index(), jax.process_count()
  )


def is_main_process() -> bool:
  """Whether this process writes files, logs metrics and shows progress."""
  return jax.process_index() == 0


class DataParallel:
  """A mesh over all devices, and the placement of state and batches on it."""

  def __init__(self):
    devices = jax.devices()
    self.mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
    self.num_devices = len(devices)
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.batch_sharded = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

  def check_divisible(self, flag_name: str, value: int) -> None:
    """Ends the run with a usage message unless `value` splits evenly."""
    if value % self.num_devices:
      raise app.UsageError(
        f"--{flag_name}={value} must be divisible by the number of devices, "
        f"{self.num_devices} ({jax.devices()[0].platform}); pick a multiple "
        f"of {self.num_devices}."
      )

  def _place(self, tree: Any, sharding: NamedSharding) -> Any:
    def place(value):
      value = np.asarray(value)
      # Each process fills in only the shards its own devices hold.
      return jax.make_array_from_callback(
        value.shape, sharding, lambda index: value[index]
      )

    return jax.tree.map(place, tree)

  def replicate(self, tree: Any) -> Any:
    """Copies every leaf of `tree` onto every device."""
    return self._place(tree, self.replicated)

  def shard(self, batch: Mapping[str, np.ndarray] | Any) -> Any:
    """Splits every leaf of a host-side global batch along its first axis."""
    return self._place(batch, self.batch_sharded)
