r"""Plots held-out MSE against training seconds for adding-problem runs.

  python -m examples.adding_problem.plot runs/adding_gru runs/adding_min_gru \
      --out=docs/adding_problem.png

Each argument is a run folder of `examples.adding_problem.train`; its
`config.json` names the cell, its `metrics.jsonl` holds the evaluations.
"""

import json
import os

from absl import app, flags

from examples.common import metrics

_OUT = flags.DEFINE_string("out", "adding_problem.png", "The PNG to write.")


def curve(run_dir: str) -> tuple[str, list[float], list[float]]:
  """The run's cell and its (training seconds, held-out MSE) points."""
  with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  label = f"{config['cell']} (T={config['seq_length']})"
  records = metrics.read_records(os.path.join(run_dir, "metrics.jsonl"))
  evals = [r for r in records if r["split"] == "eval"]
  return label, [r["train_seconds"] for r in evals], [r["mse"] for r in evals]


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("Give at least one run folder.")
  plt = metrics.pyplot()

  figure, axis = plt.subplots(figsize=(6, 3.5))
  for run_dir in argv[1:]:
    label, seconds, mse = curve(run_dir)
    axis.plot(seconds, mse, marker=".", label=label)
  axis.axhline(1 / 6, color="gray", linestyle="--", label="always 1")
  axis.set_yscale("log")
  axis.set_xlabel("training seconds (evaluation excluded)")
  axis.set_ylabel("held-out MSE")
  axis.set_title("Adding problem")
  axis.legend()
  figure.tight_layout()
  figure.savefig(_OUT.value, dpi=120)


if __name__ == "__main__":
  app.run(main)
