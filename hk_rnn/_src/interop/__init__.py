"""The weight converters of :mod:`hk_rnn.interop`, one module per framework.

* :mod:`._matching`: what every converter shares: which params entries are
  recurrent cells, the order the model created them in, and the pairing of
  a source's layers with them;
* :mod:`._torch` (``from_torch``, ``to_torch``), :mod:`._flax`,
  :mod:`._keras`, :mod:`._haiku` and :mod:`._recurrentgemma`: each reads its
  framework's recurrent layers into hk_rnn's layout.

Each framework is imported only inside the converter that needs it.
"""
