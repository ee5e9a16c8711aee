"""Whole-sequence kernels for the gated cells, and the one dispatch to them.

* :mod:`.gates`: each cell's gate math, forward and backward step;
* :mod:`.xla`: the engine in JAX (a scan with a hand-written VJP), which
  runs every call;
* :mod:`.cudnn`, :mod:`.onednn`: the faster backends, one file each, for
  the calls they compute exactly;
* :mod:`.dispatch`: the kernel mode (``HK_RNN_KERNELS``,
  :func:`use_kernels`), the choice of backend for each call, and
  :func:`explain`.

The cells call the four ``*_sequence`` functions of :mod:`.dispatch`.
"""
