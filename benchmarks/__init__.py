"""Side-by-side benchmarks of hk_rnn against Flax, Haiku and PyTorch.

Run ``python -m benchmarks.run --help``.
"""
