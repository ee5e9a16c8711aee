"""The per-run metrics file (JSON lines) and the PNG of its curves.

One record per line: `{"step": 100, "split": "train", "loss": 1.23, ...}`.
`split` is "train" or "eval"; every other key is a metric. The plot puts each metric in its own panel, one line
per split, so train and eval curves of the same quantity share axes.
"""

import json
import os
import tempfile
from collections.abc import Mapping, Sequence


def _writable(base: str) -> bool:
  """Whether matplotlib could use ``base/matplotlib``, as it checks."""
  folder = os.path.join(base, "matplotlib")
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError:
    return False
  return os.access(folder, os.W_OK)


def pyplot():
  """matplotlib's pyplot on the file backend, imported when a plot is drawn.

  matplotlib keeps its config and font cache under ``~/.config`` and
  ``~/.cache``; where those cannot be written (Bazel's sandbox, a read-only
  home in a container) it logs a warning on every run and rebuilds its font
  cache. Then, unless ``MPLCONFIGDIR`` is set, it is pointed at a per-user
  folder under the temp dir instead, kept across runs. Imported here, not
  at module load, so that a run that draws nothing never loads it.
  """
  home = os.path.expanduser("~")
  if "MPLCONFIGDIR" not in os.environ and not (
    _writable(
      os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    )
    and _writable(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
    )
  ):
    user = os.getuid() if hasattr(os, "getuid") else "user"
    folder = os.path.join(tempfile.gettempdir(), f"matplotlib-{user}")
    os.makedirs(folder, exist_ok=True)
    os.environ["MPLCONFIGDIR"] = folder
  import matplotlib

  # No display on training machines; the file backend, before pyplot loads.
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  return plt


def read_records(path: str) -> list[dict]:
  """All records of a metrics file, in order; [] when it does not exist."""
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends records to a JSONL file, consistent with a resumed checkpoint."""

  def __init__(self, path: str, resume_step: int | None):
    """Opens `path` for a run starting at `resume_step`.

    Args:
      path: the JSONL file.
      resume_step: the step restored from a checkpoint, or None for a fresh
        run. Records after it were written by a run that stopped before its
        next checkpoint; they are dropped, because the resumed run writes
        those steps again.
    """
    kept = []
    if resume_step is not None:
      kept = [r for r in read_records(path) if r["step"] <= resume_step]
    self._file = open(path, "w", encoding="utf-8")
    self._file.writelines(json.dumps(r) + "\n" for r in kept)

  def write(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    """Appends one record and flushes it, so a crash loses nothing written."""
    record = {"step": step, "split": split}
    record.update({k: float(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def plot_curves(
  records: Sequence[Mapping],
  path: str,
  title: str,
  reference_lines: Mapping[str, tuple[float, str]] | None = None,
) -> None:
  """Draws every metric against the step, one panel each, into a PNG.

  Args:
    records: metrics records as written by `MetricsWriter`.
    path: the PNG to write.
    title: the figure's title.
    reference_lines: metric name -> (value, label) for a dashed horizontal
      line in that metric's panel, e.g. a baseline to beat.
  """
  reference_lines = reference_lines or {}
  series = {}  # metric -> split -> ([steps], [values])
  for record in records:
    for name, value in record.items():
      if name in ("step", "split"):
        continue
      steps, values = series.setdefault(name, {}).setdefault(
        record["split"], ([], [])
      )
      steps.append(record["step"])
      values.append(value)
  names = sorted(series)
  plt = pyplot()
  figure, axes = plt.subplots(
    1, max(len(names), 1), figsize=(4.5 * max(len(names), 1), 3.5)
  )
  axes = [axes] if len(names) <= 1 else list(axes)
  for ax, name in zip(axes, names, strict=False):
    for split, (steps, values) in sorted(series[name].items()):
      # A lone point (a final benchmark, say) would be an invisible line.
      ax.plot(steps, values, label=split, marker="o" if len(steps) == 1 else "")
    if name in reference_lines:
      value, label = reference_lines[name]
      ax.axhline(value, linestyle="--", color="gray", label=label)
    ax.set_xlabel("step")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend()
  figure.suptitle(title)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
