"""Capture-stage pass: replace the RNN/GRU/LSTM calls of a dynamo graph by Highway-BP recurrences.

Dynamo (with ``allow_rnn``) records ``nn.LSTM(x)`` as one ``torch.lstm(input, hx, params, ...)`` call.
Left alone, lowering to aten would unroll it into ``T`` copies of the cell. This pass swaps it for
``highway_rnn``: the same layers, directions, inter-layer dropout and ``batch_first`` handling, with
each layer-direction one ``hbp::recurrence`` node (an opaque op whose backward is Highway-BP) over
the module's very own parameters. Calls it cannot handle (packed sequences, ``proj_size``) stay as
they are, and the reason is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from ..engine.iterate import IterationUsage
from ..graph_utils import module_path
from .cells import CELLS
from .op import recurrence, register_usage  # noqa: F401  (recurrence registers torch.ops.hbp.recurrence)

_MODES = {torch.lstm: "lstm", torch.gru: "gru", torch.rnn_tanh: "rnn_tanh", torch.rnn_relu: "rnn_relu"}
RNN_CALLS = tuple(_MODES)
_MODULE_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn_tanh": "RNN(tanh)", "rnn_relu": "RNN(relu)"}
_CELL_NAMES = {"lstm": "LSTMCell", "gru": "GRUCell", "rnn_tanh": "RNNCell(tanh)", "rnn_relu": "RNNCell(relu)"}


@dataclass(frozen=True)
class Recurrence:
    """One RNN call of a captured graph: swapped for Highway-BP (``reason`` empty) or left as is."""

    mode: str
    module_path: str
    num_layers: int
    bidirectional: bool
    steps: int  # time steps T (0 when unknown)
    reason: str = ""
    cell_loop: bool = False  # a Python loop over a cell module, not an nn.RNN-style module
    formula: str = ""  # the residual of a scan's combine function, as the report writes it
    # the iterations its backward passes ran, all layers and directions together (``hbp_iterations``)
    usage: IterationUsage = field(default_factory=IterationUsage, compare=False, repr=False)

    @property
    def swapped(self) -> bool:
        return not self.reason

    @property
    def num_chains(self) -> int:
        return self.num_layers * (2 if self.bidirectional else 1)

    def describe(self) -> str:
        if self.mode == "scan":
            head = f"torch scan {self.module_path or '?'}"
            if not self.swapped:
                return f"{head}: exact backprop ({self.reason})"
            return f"{head}: T={self.steps}, Highway-BP over time steps, {self.formula}"
        name = f"nn.{_MODULE_NAMES[self.mode]} {self.module_path or '?'}"
        if self.cell_loop:
            name = f"loop over nn.{_CELL_NAMES[self.mode]} {self.module_path or '?'}"
        shape = f"{self.num_layers} layer(s) x {2 if self.bidirectional else 1} direction(s), T={self.steps}"
        if not self.swapped:
            return f"{name}: exact backprop ({self.reason})"
        kind = {"lstm": "diag(f) on c, 0 on h", "gru": "diag(z)"}.get(self.mode, "0 (no residual path)")
        return f"{name}: {shape}, Highway-BP over time steps, K = {kind}"


def highway_rnn(mode: str, k: int, gamma: float, input: Tensor, hx, params, has_biases: bool, num_layers: int,
                dropout: float, train: bool, bidirectional: bool, batch_first: bool, *, tol: float = 0.0,
                backend: str = "eager", usage: str = ""):
    """What ``torch.<mode>(input, hx, params, ...)`` computes, one ``hbp::recurrence`` per layer-direction.

    >>> lstm = torch.nn.LSTM(3, 4, num_layers=2)
    >>> x, h0, c0 = torch.randn(5, 2, 3), torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)
    >>> out, h, c = highway_rnn("lstm", 3, 0.0, x, (h0, c0), list(lstm.parameters()), True, 2, 0.0,
    ...                         True, False, False)
    >>> torch.allclose(out, lstm(x, (h0, c0))[0], atol=1e-6)
    True
    """
    lstm = mode == "lstm"
    h0, c0 = (hx[0], hx[1]) if lstm else (hx, None)
    directions = 2 if bidirectional else 1
    per_layer = 4 if has_biases else 2
    layer_input = input.transpose(0, 1) if batch_first else input
    last_h, last_c = [], []
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            index = layer * directions + direction
            weights = list(params[index * per_layer: (index + 1) * per_layer])
            if not has_biases:
                weights += [None, None]
            state0 = torch.stack([c0[index], h0[index]]) if lstm else h0[index].unsqueeze(0)
            sequence = layer_input if direction == 0 else layer_input.flip(0)
            states, _ = torch.ops.hbp.recurrence(mode, sequence, state0, *weights, k, gamma, False, tol, backend,
                                                 usage)
            out = states[1:, -1]
            outputs.append(out if direction == 0 else out.flip(0))
            last_h.append(states[-1, -1])
            if lstm:
                last_c.append(states[-1, 0])
        layer_input = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if dropout and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, True)
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    if lstm:
        return output, torch.stack(last_h), torch.stack(last_c)
    return output, torch.stack(last_h)


def _why_not(node: fx.Node) -> str:
    args = node.args
    if len(args) != 9 or not isinstance(args[3], bool):
        return "packed sequences are not supported yet"
    params, has_biases, num_layers, bidirectional = args[2], args[3], args[4], args[7]
    per_layer = 4 if has_biases else 2
    if len(params) != per_layer * num_layers * (2 if bidirectional else 1):
        return "LSTM with proj_size is not supported yet"
    return ""


def _steps(node: fx.Node) -> int:
    value = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 3:
        return 0
    return int(value.shape[1] if node.args[8] else value.shape[0])


def swap_recurrences(gm: fx.GraphModule, *, k: int, gamma: float, tol: float = 0.0,
                     backend: str = "eager") -> tuple[Recurrence, ...]:
    """Replace every supported RNN call of dynamo's graph ``gm`` in place; report each one found."""
    found = []
    for node in list(gm.graph.nodes):
        mode = _MODES.get(node.target) if node.op == "call_function" else None
        if mode is None:
            continue
        reason = _why_not(node)
        info = Recurrence(mode, module_path(node), int(node.args[4]) if not reason else 0,
                          bool(node.args[7]) if not reason else False, _steps(node) if not reason else 0, reason)
        found.append(info)
        if reason:
            continue
        assert mode in CELLS
        node.target = highway_rnn
        node.args = (mode, k, gamma, *node.args)
        node.kwargs = {"tol": tol, "backend": backend, "usage": register_usage(info.usage)}
    if any(r.swapped for r in found):
        gm.graph.lint()
        gm.recompile()
    return tuple(found)
