"""hk_rnn: mask-aware recurrent networks for JAX, as Haiku modules.

Cells run one step; :class:`RNN` scans a cell over padded or packed
sequences; :class:`Bidirectional` runs two RNNs in opposite directions;
:func:`flip_sequences` reverses sequences in place; :func:`pack_sequences`
packs variable-length sequences into rows and :func:`unpack_sequences` /
:func:`unpack_segments` read each one's outputs and carry back.
:class:`CoreCell` and :class:`CellCore` adapt Haiku cores and hk_rnn cells
to each other; :mod:`hk_rnn.interop` converts weights from PyTorch, Flax,
Keras and Haiku. :func:`use_kernels` picks the kernel backends and
:func:`explain` says which one each recurrent call runs.
"""

from hk_rnn import interop
from hk_rnn._src.bidirectional import Bidirectional
from hk_rnn._src.cells import (
  ConvLSTMCell,
  GRUCell,
  LSTMCell,
  MGUCell,
  RNNCellBase,
  SequenceSteps,
  SimpleCell,
)
from hk_rnn._src.cores import CellCore, CoreCell
from hk_rnn._src.griffin import GriffinCell, RGLRUCell
from hk_rnn._src.kernels.dispatch import explain, use_kernels
from hk_rnn._src.lru import LRUCell
from hk_rnn._src.min_cells import (
  LinearRecurrentCell,
  MinGRUCell,
  MinLSTMCell,
)
from hk_rnn._src.packing import (
  PackedSequences,
  pack_sequences,
  unpack_segments,
  unpack_sequences,
)
from hk_rnn._src.rnn import RNN
from hk_rnn._src.sequences import flip_sequences, last_segment_ids
from hk_rnn._src.stacked import StackedRNN
from hk_rnn._src.xlstm import MLSTMCell, SLSTMCell

__version__ = "0.1.0"

__all__ = (
  "RNN",
  "Bidirectional",
  "CellCore",
  "ConvLSTMCell",
  "CoreCell",
  "GRUCell",
  "GriffinCell",
  "LRUCell",
  "LSTMCell",
  "LinearRecurrentCell",
  "MGUCell",
  "MLSTMCell",
  "MinGRUCell",
  "MinLSTMCell",
  "PackedSequences",
  "RGLRUCell",
  "RNNCellBase",
  "SLSTMCell",
  "SequenceSteps",
  "SimpleCell",
  "StackedRNN",
  "explain",
  "flip_sequences",
  "interop",
  "last_segment_ids",
  "pack_sequences",
  "unpack_segments",
  "unpack_sequences",
  "use_kernels",
)
