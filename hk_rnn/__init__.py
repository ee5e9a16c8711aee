"""hk_rnn: mask-aware recurrent networks for JAX, as Haiku modules.

Cells run one step; :class:`RNN` scans a cell over padded or packed
sequences; :class:`Bidirectional` runs two RNNs in opposite directions;
:func:`flip_sequences` reverses sequences in place.
"""

from hk_rnn._src.bidirectional import Bidirectional
from hk_rnn._src.cells import (
  ConvLSTMCell,
  GRUCell,
  LSTMCell,
  MGUCell,
  RNNCellBase,
  SimpleCell,
)
from hk_rnn._src.min_cells import (
  LinearRecurrentCell,
  MinGRUCell,
  MinLSTMCell,
)
from hk_rnn._src.rnn import RNN
from hk_rnn._src.sequences import flip_sequences, last_segment_ids
from hk_rnn._src.stacked import StackedRNN

__version__ = "0.1.0"

__all__ = (
  "RNN",
  "Bidirectional",
  "ConvLSTMCell",
  "GRUCell",
  "LSTMCell",
  "LinearRecurrentCell",
  "MGUCell",
  "MinGRUCell",
  "MinLSTMCell",
  "RNNCellBase",
  "SimpleCell",
  "StackedRNN",
  "flip_sequences",
  "last_segment_ids",
)
