"""hk_rnn: mask-aware recurrent networks for JAX, as Haiku modules."""
