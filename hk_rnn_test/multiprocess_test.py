"""The example trainers run as several processes, as on several hosts.

Each process is started as a user would start one per host: `python -m
examples.<name>.train --coordinator_address=... --num_processes=N
--process_id=i`, here all on this machine with the coordinator on
127.0.0.1 (a free port per run, so parallel tests do not collide) and two CPU
devices per process through XLA_FLAGS. A 2-process x 2-device run must give
the losses of a 1-process x 4-device run, a signal to any one process must
stop all of them at the same saved step, and a killed process must end the
others with one clear line instead of a hang; `--resume` then continues to
the uninterrupted run's losses.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest, parameterized

from hk_rnn_test.trainer_runs import REPO, TINY_FLAGS, checkpoint_steps

_STEPS = 6
_DEVICES = 4  # in all: 1 process x 4, or 2 processes x 2

# Flags for runs of a few seconds; every batch splits over 4 devices.
_FLAGS = {
  **{
    name: [flag for flag in flags if not flag.startswith("--sample_length")]
    for name, flags in TINY_FLAGS.items()
  },
  "adding_problem": [
    "--batch_size=16",
    "--seq_length=16",
    "--hidden_size=8",
    "--num_layers=1",
    "--eval_size=32",
    "--learning_rate=3e-2",
  ],
}
_COMMON = [
  f"--num_steps={_STEPS}",
  "--eval_every=3",
  "--checkpoint_every=2",
  "--log_every=1",
]

# Runs a trainer as `-m` would, but the process whose --process_id is given
# sends itself a signal while it prepares the batch of a given step, so that
# the fault lands at a known step whatever the machine's speed.
# argv: trainer name, process id, step, signal name, then the flags.
_SIGNAL_AT_STEP = """
import os, runpy, signal, sys
from examples.common import training
name, victim, at_step, signal_name = sys.argv[1:5]
sys.argv = [sys.argv[0], *sys.argv[5:]]
if f"--process_id={victim}" in sys.argv:
  train = training.train
  def signalling_train(**kwargs):
    batch_fn = kwargs.pop("batch_fn")
    def signalling_batch_fn(step):
      if step == int(at_step):
        os.kill(os.getpid(), getattr(signal, signal_name))
      return batch_fn(step)
    return train(batch_fn=signalling_batch_fn, **kwargs)
  training.train = signalling_train
runpy.run_module(f"examples.{name}.train", run_name="__main__")
"""
_EXIT_PREEMPTED = 75


def free_port():
  """A TCP port that nothing listens on now (the OS picks it)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(name, output_dir, *args, num_processes, signal_at=None):
  """Runs a trainer as `num_processes` processes sharing `_DEVICES` devices.

  Args:
    name: the trainer.
    output_dir: the run folder, shared by the processes.
    *args: more flags, after the tiny ones.
    num_processes: 1 (no coordinator) or more.
    signal_at: (process id, step, signal name) for a fault, or None.

  Returns:
    A list with, per process, its exit status, its stderr and the seconds
    from the first process's exit to its own.
  """
  env = dict(
    os.environ,
    PYTHONPATH=REPO,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count="
    f"{_DEVICES // num_processes}",
    # As examples_test's runs: a third of a tiny run is compiling, and a
    # resumed run compiles what the interrupted one did.
    JAX_COMPILATION_CACHE_DIR=os.environ.get(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(tempfile.gettempdir(), "hk_rnn_jax_cache"),
    ),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  command = [sys.executable, "-m", f"examples.{name}.train"]
  if signal_at is not None:
    victim, step, signal_name = signal_at
    command = [
      sys.executable,
      "-c",
      _SIGNAL_AT_STEP,
      name,
      str(victim),
      str(step),
      signal_name,
    ]
  flags = [*_FLAGS[name], *_COMMON, f"--output_dir={output_dir}", *args]
  if num_processes > 1:
    flags += [
      f"--coordinator_address=127.0.0.1:{free_port()}",
      f"--num_processes={num_processes}",
    ]
  logs, processes = [], []
  for i in range(num_processes):
    log = tempfile.TemporaryFile("w+", encoding="utf-8")
    process_flags = [f"--process_id={i}"] if num_processes > 1 else []
    processes.append(
      subprocess.Popen(
        [*command, *flags, *process_flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
      )
    )
    logs.append(log)
  exited = {}
  deadline = time.monotonic() + 600
  try:
    while len(exited) < num_processes and time.monotonic() < deadline:
      for i, process in enumerate(processes):
        if i not in exited and process.poll() is not None:
          exited[i] = time.monotonic()
      time.sleep(0.1)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  first = min(exited.values(), default=0.0)
  results = []
  for i, (process, log) in enumerate(zip(processes, logs, strict=True)):
    log.seek(0)
    results.append(
      (process.returncode, log.read(), exited.get(i, deadline) - first)
    )
    log.close()
  return results


def train_losses(output_dir):
  """{step: train loss} from the run's metrics file (each step once)."""
  losses = {}
  with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for record in map(json.loads, f):
      if record["split"] == "train":
        assert record["step"] not in losses, f"step {record['step']} twice"
        losses[record["step"]] = record["loss"]
  return losses


class MultiProcessTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls._references = {}

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def _run(self, name, *args, expect=(0, 0), **kwargs):
    output_dir = kwargs.pop("output_dir", None) or os.path.join(
      tempfile.mkdtemp(dir=self._tmp.name), "run"
    )
    results = run_processes(
      name, output_dir, *args, num_processes=len(expect), **kwargs
    )
    for i, (status, stderr, _) in enumerate(results):
      self.assertEqual(
        status, expect[i], f"process {i} of {name}:\n{stderr[-5000:]}"
      )
    return output_dir, results

  def _reference(self, name):
    """The uninterrupted 1-process x 4-device run's folder and losses."""
    if name not in self._references:
      output_dir, _ = self._run(name, expect=(0,))
      self._references[name] = output_dir, train_losses(output_dir)
    return self._references[name]

  def assertLossesMatch(self, losses, reference):
    self.assertEqual(sorted(losses), sorted(reference))
    for step, loss in reference.items():
      self.assertAlmostEqual(
        losses[step], loss, delta=1e-5 * abs(loss), msg=f"step {step}"
      )

  # The addition trainer's 2 x 2 runs are the signal and kill tests below,
  # whose resumed losses must match its 1 x 4 run. The adding-problem
  # trainer shares that trainer's loop and has no mask; a run of it costs
  # CI time without covering more.
  @parameterized.parameters(("classifier",), ("char_lm",))
  def test_two_processes_match_one(self, name):
    reference_dir, reference = self._reference(name)
    output_dir, results = self._run(name)
    self.assertLossesMatch(train_losses(output_dir), reference)
    # One checkpoint per step, written together, laid out as one process's.
    self.assertEqual(
      checkpoint_steps(output_dir),
      checkpoint_steps(reference_dir),
    )
    for _, stderr, _ in results:
      self.assertNotIn("Traceback", stderr)

  def test_a_signal_to_one_process_stops_all_at_one_step(self):
    _, reference = self._reference("addition")
    # SIGTERM reaches process 1 while it prepares step 3 (counting from 1):
    # both processes finish step 3, save it and exit 75.
    output_dir, results = self._run(
      "addition",
      signal_at=(1, 2, "SIGTERM"),
      expect=(_EXIT_PREEMPTED, _EXIT_PREEMPTED),
    )
    self.assertEqual(sorted(train_losses(output_dir)), [1, 2, 3])
    self.assertEqual(checkpoint_steps(output_dir), [2, 3])
    for _, stderr, _ in results:
      self.assertIn("SIGTERM to process 1: stopped after step 3", stderr)
      self.assertNotIn("Traceback", stderr)
    # Ctrl-C in process 0's terminal while it prepares step 4.
    _, results = self._run(
      "addition",
      "--resume",
      output_dir=output_dir,
      signal_at=(0, 3, "SIGINT"),
      expect=(_EXIT_PREEMPTED, _EXIT_PREEMPTED),
    )
    for _, stderr, _ in results:
      self.assertIn("Resumed from step 3.", stderr)
      self.assertIn("SIGINT to process 0: stopped after step 4", stderr)
    self.assertEqual(checkpoint_steps(output_dir), [3, 4])
    _, results = self._run("addition", "--resume", output_dir=output_dir)
    for _, stderr, _ in results:
      self.assertIn("Resumed from step 4.", stderr)
    self.assertLossesMatch(train_losses(output_dir), reference)

  def test_a_killed_process_ends_the_others_and_resume_continues(self):
    _, reference = self._reference("addition")
    # Process 1 dies while it prepares step 5: process 0 must say so in one
    # line and exit, not wait for it forever.
    output_dir, results = self._run(
      "addition",
      signal_at=(1, 4, "SIGKILL"),
      expect=(1, -9),
    )
    status, stderr, seconds = results[0]
    self.assertLess(seconds, 120)
    self.assertNotIn("Traceback", stderr)
    gone = [line for line in stderr.splitlines() if "is gone" in line]
    self.assertLen(gone, 1, stderr)
    self.assertIn("process 1 is gone", gone[0])
    newest = checkpoint_steps(output_dir)[-1]
    self.assertIn(
      f"continue from the newest complete checkpoint, step {newest}.", gone[0]
    )
    self.assertIn(newest, (2, 4))
    _, results = self._run("addition", "--resume", output_dir=output_dir)
    for _, stderr, _ in results:
      self.assertIn(f"Resumed from step {newest}.", stderr)
    self.assertLossesMatch(train_losses(output_dir), reference)


if __name__ == "__main__":
  absltest.main()
