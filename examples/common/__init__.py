"""Pieces every example trainer shares.

- `parallel`: `jax.distributed` flags, the device mesh, batch sharding.
- `checkpoint`: orbax checkpoints of the whole training state, `--resume`.
- `metrics`: the per-run JSONL metrics file and the PNG of its curves.
- `training`: the shared flags, the optimiser, the train step and the loop.
"""
