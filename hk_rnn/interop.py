"""Weight converters between hk_rnn and PyTorch, Flax, Keras and Haiku.

``from_torch``, ``to_torch``, ``from_flax``, ``from_keras`` and
``from_haiku`` take an hk_rnn model's params (what ``init`` returned) and
match its recurrent cells, in the order the model created them, with the
source's recurrent layers; see the :doc:`migration guide </migrating>`.
Each framework is imported only when its converter is called.
"""

from hk_rnn._src.interop._flax import from_flax
from hk_rnn._src.interop._haiku import from_haiku
from hk_rnn._src.interop._keras import from_keras
from hk_rnn._src.interop._recurrentgemma import from_recurrentgemma
from hk_rnn._src.interop._torch import from_torch, to_torch

__all__ = (
  "from_flax",
  "from_haiku",
  "from_keras",
  "from_recurrentgemma",
  "from_torch",
  "to_torch",
)
