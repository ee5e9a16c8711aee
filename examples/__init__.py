"""Example trainers for hk_rnn; run each as `python -m examples.<name>.train`.

This file makes `examples` a regular package, so that it wins over any
namespace package of the same name that a dependency leaves in site-packages.
"""
