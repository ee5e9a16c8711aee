"""Data parallelism over every device: a 1-D mesh, batches split along it.

Every trainer replicates its parameters and optimiser state on all devices and
splits each batch along its leading axis, so that one `jax.jit` step runs on
all of them and XLA inserts the gradient all-reduce. The same code runs on one
CPU, on `XLA_FLAGS=--xla_force_host_platform_device_count=8`, on a GPU host,
and on several hosts once `--coordinator_address` is given.

Every process builds the same global batch from the seed and the step (the
data pipelines are pure functions of both), and hands JAX only the rows its
own devices hold: no process ever needs another's data.

A run of several processes stops as a whole when one of them dies. Each
process beats a heartbeat into the coordinator's key-value store once a
second and watches the others'. When a collective fails (the usual sign that
a peer is gone) or a peer stays silent for `--peer_timeout` seconds, the
process names the silent peer in one line ("process 1 is gone") and exits
with `EXIT_PEER_GONE`, instead of hanging in the next collective or in JAX's
shutdown barrier. The checkpoints saved so far are whole (orbax renames a
step's folder only once every process has written its part), so every
process can be restarted with `--resume`.
"""

import atexit
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
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
_PEER_TIMEOUT = flags.DEFINE_float(
  "peer_timeout",
  30.0,
  "Multi-process runs: a process that sends no heartbeat for this many "
  "seconds counts as gone, and the others stop (a failed collective names "
  "it sooner). Keep it below JAX's own heartbeat timeout (100 s).",
  lower_bound=2.0,
)

# The exit status of a process that stopped because another one is gone.
EXIT_PEER_GONE = 1

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
  if jax.process_count() > 1:
    global _watch
    _watch = _PeerWatch(
      _COORDINATOR_ADDRESS.value,
      jax.process_index(),
      jax.process_count(),
      _PEER_TIMEOUT.value,
    )
    # atexit runs its handlers last-registered first: this one says
    # "finished" before JAX's own shutdown waits for the other processes.
    atexit.register(_watch.finish)


class _PeerWatch:
  """Heartbeats through the coordinator; stops this process when a peer dies.

  Each process writes a counter under `hk_rnn/heartbeat/<id>` once a second
  from a daemon thread and reads everyone's. A peer whose counter has not
  moved for `timeout` seconds is gone; after a failed collective, a silence
  of `_GRACE` seconds is enough. A process that finished normally writes
  `done` and is no longer watched. When the coordinator itself stops
  answering, process 0 is gone (JAX then aborts this process too, with its
  own message, as soon as its error polling notices).
  """

  _PREFIX = "hk_rnn/heartbeat/"
  _DONE = "done"
  _INTERVAL = 1.0
  _GRACE = 3.0

  def __init__(self, coordinator: str, me: int, count: int, timeout: float):
    # jax.distributed exposes no public handle on its key-value store;
    # orbax and multihost_utils use this same one.
    from jax._src import distributed  # noqa: PLC0415

    self._client = distributed.global_state.client
    self._coordinator = coordinator
    self._me = me
    self._peers = [p for p in range(count) if p != me]
    self._timeout = timeout
    self._collective_failed = threading.Event()
    self._finished = threading.Event()
    self.restart_note: Callable[[], str] = lambda: (
      "Restart every process to run again."
    )
    now = time.monotonic()
    self._last = {p: (None, now) for p in self._peers}
    threading.Thread(target=self._run, name="peer-watch", daemon=True).start()

  def _run(self) -> None:
    beat = 0
    while not self._finished.is_set():
      try:
        self._client.key_value_set(
          f"{self._PREFIX}{self._me}", str(beat), allow_overwrite=True
        )
        values = dict(self._client.key_value_dir_get(self._PREFIX))
      except Exception as e:  # noqa: BLE001 -- any failure: coordinator gone
        if self._finished.is_set():
          return
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        self._stop(
          0,
          f"the coordinator at {self._coordinator} stopped answering "
          f"({first_line[:120]})",
        )
      now = time.monotonic()
      limit = self._GRACE if self._collective_failed.is_set() else self._timeout
      for peer in self._peers:
        value = values.get(f"{self._PREFIX}{peer}")
        if value == self._DONE:
          continue
        if value != self._last[peer][0]:
          self._last[peer] = (value, now)
        elif now - self._last[peer][1] > limit:
          self._stop(
            peer, f"no heartbeat for {now - self._last[peer][1]:.0f} s"
          )
      beat += 1
      self._finished.wait(self._INTERVAL)

  def _stop(self, peer: int, why: str) -> None:
    """Says which process is gone, then ends this one at once."""
    sys.stderr.write("\n")  # off the progress bar's line
    logging.error(
      "process %d is gone (%s); process %d stops too. %s",
      peer,
      why,
      self._me,
      self.restart_note(),
    )
    logging.flush()
    sys.stderr.flush()
    if self._me == 0 and peer != 0:
      # This process serves the coordinator: give the other survivors a
      # moment to say the same before JAX aborts them for its loss.
      time.sleep(2 * self._INTERVAL)
    # Not sys.exit: the main thread may be blocked in a collective or in
    # JAX's shutdown barrier, waiting for the process that is gone.
    os._exit(EXIT_PEER_GONE)

  def collective_failed(self) -> None:
    """Waits for a verdict after a failed collective; returns when none."""
    self._collective_failed.set()
    time.sleep(self._GRACE + 3 * self._INTERVAL)

  def finish(self) -> None:
    """Tells the others that this process ended normally."""
    self._finished.set()
    with contextlib.suppress(Exception):
      self._client.key_value_set(
        f"{self._PREFIX}{self._me}", self._DONE, allow_overwrite=True
      )


_watch: _PeerWatch | None = None


def set_restart_note(note: Callable[[], str]) -> None:
  """What the "process N is gone" line adds: how to continue the run."""
  if _watch is not None:
    _watch.restart_note = note


@contextlib.contextmanager
def stop_when_a_process_is_gone() -> Iterator[None]:
  """Turns a collective that fails because a peer died into one clear line.

  A failed collective in a multi-process run usually means another process
  died; the peer watch then names it and ends this process. An error that no
  silent peer explains is raised as it was.
  """
  try:
    yield
  except Exception:  # a dead peer surfaces as errors of many kinds
    if _watch is None:
      raise
    _watch.collective_failed()
    raise


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
