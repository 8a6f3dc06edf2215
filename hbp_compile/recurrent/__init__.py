"""Recurrences: RNN/GRU/LSTM time steps as the chain (see docs/recurrences.md).

* ``swap``: ``nn.RNN``/``nn.GRU``/``nn.LSTM`` calls -> ``hbp::recurrence`` per layer and direction;
* ``cell_loops``: Python loops over ``nn.*Cell`` -> one ``hbp::recurrence``;
* ``op``: the custom op, its forward kernels and its Highway-BP backward;
* ``cells``: the cells' split steps and hand-written VJPs over all steps at once.
"""
from .cell_loops import swap_cell_loops
from .swap import Recurrence, highway_rnn, swap_recurrences

__all__ = ["Recurrence", "highway_rnn", "swap_cell_loops", "swap_recurrences"]
