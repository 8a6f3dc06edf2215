"""Capture-stage pass: a Python loop over ``nn.GRUCell``/``nn.LSTMCell``/``nn.RNNCell`` as one recurrence.

Dynamo unrolls such a loop into ``T`` calls ``torch.lstm_cell(x_t, (h, c), w_ih, w_hh, b_ih, b_hh)``
(``torch.gru_cell(x_t, h, ...)`` ...), each reading the previous call's state. A run of such calls
with the same weights, whose inputs ``x_t`` do not depend on the run itself (teacher forcing, not
autoregressive decoding), becomes one ``hbp::recurrence`` over the stacked inputs with
``step_kernel=True``: the forward still calls the one-step kernel ``T`` times (bit-identical to the
loop), and the backward is Highway-BP over the steps. Every step's state that the program reads
becomes a slice of the recurrence's states (taps). LSTM's state is the pair ``[c, h]``.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..graph_utils import copy_source_meta, descendants, module_path, stable_topological_sort
from .op import recurrence, register_usage  # noqa: F401  (recurrence registers torch.ops.hbp.recurrence)
from .swap import Recurrence

_CELL_CALLS = {torch.lstm_cell: "lstm", torch.gru_cell: "gru", torch.rnn_tanh_cell: "rnn_tanh",
               torch.rnn_relu_cell: "rnn_relu"}
CELL_CALLS = tuple(_CELL_CALLS)


def _state_inputs(call: fx.Node) -> tuple[object, ...]:
    hx = call.args[1]
    return tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)


def _outputs(call: fx.Node) -> dict[int, list[fx.Node]] | None:
    """LSTM: getitem users by index (0 = h, 1 = c); other cells: the call itself is h."""
    if _CELL_CALLS[call.target] != "lstm":
        return {0: [call]}
    found: dict[int, list[fx.Node]] = {0: [], 1: []}
    for user in call.users:
        if user.target is not operator.getitem or user.args[1] not in (0, 1):
            return None
        found[user.args[1]].append(user)
    return found


def _next_call(call: fx.Node) -> fx.Node | None:
    """The one cell call with the same weights whose state input is ``call``'s output state."""
    outputs = _outputs(call)
    if outputs is None:
        return None
    candidates = {u for nodes in outputs.values() for n in nodes for u in n.users if u.target is call.target}
    for nxt in candidates:
        if list(nxt.args[2:]) != list(call.args[2:]):
            continue
        state = _state_inputs(nxt)
        if _CELL_CALLS[call.target] == "lstm":
            if state[0] in outputs[0] and state[1] in outputs[1]:
                return nxt
        elif state[0] is call:
            return nxt
    return None


def _cell_loop_states(mode: str, k: int, gamma: float, inputs: list, state0: tuple, w_ih, w_hh, b_ih, b_hh,
                      tol: float = 0.0, backend: str = "eager", usage: str = ""):
    """All states ``(T+1, m, B, H)`` of the loop (traced by make_fx into stack + one recurrence).
    ``inputs`` is the steps' inputs, or the tensor they are the consecutive rows of."""
    stacked = inputs if isinstance(inputs, torch.Tensor) else torch.stack(list(inputs))
    if mode == "lstm":
        h0, c0 = state0
        first = torch.stack([c0, h0])
    else:
        first = state0[0].unsqueeze(0)
    states, _ = torch.ops.hbp.recurrence(mode, stacked, first, w_ih, w_hh, b_ih, b_hh, k, gamma, True, tol, backend,
                                         usage)
    return states


def swap_cell_loops(gm: fx.GraphModule, *, k: int, gamma: float, min_steps: int = 2,
                    tol: float = 0.0, backend: str = "eager") -> tuple[Recurrence, ...]:
    """Replace every run of ``min_steps`` or more chained cell calls in dynamo's graph ``gm``."""
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CELL_CALLS]
    followers = {nxt for nxt in map(_next_call, calls) if nxt is not None}
    found = []
    for first in calls:
        if first in followers:
            continue
        run = [first]
        while (nxt := _next_call(run[-1])) is not None:
            run.append(nxt)
        mode = _CELL_CALLS[first.target]
        inside = descendants(first)
        if len(run) < min_steps or any(call.args[0] in inside for call in run):
            continue  # too short, or inputs computed from the loop's own states (autoregressive)
        found.append(Recurrence(mode, module_path(first), 1, False, len(run), cell_loop=True))
        _replace(gm.graph, run, mode, k, gamma, tol, backend, register_usage(found[-1].usage))
    if found:
        gm.graph.eliminate_dead_code()
        stable_topological_sort(gm.graph)
        gm.graph.lint()
        gm.recompile()
    return tuple(found)


def _step_inputs(run: list[fx.Node]) -> fx.Node | list:
    """The steps' inputs; when they are ``x[0], x[1], ...`` of all of one ``x`` (``for x_t in x``), ``x``
    itself: stacking the rows back costs a copy, and their T selects a zero-filled gradient each."""
    inputs = [call.args[0] for call in run]
    rows = [(n.args[0], n.args[1]) if isinstance(n, fx.Node) and n.op == "call_function"
            and n.target is operator.getitem and len(n.args) == 2 and isinstance(n.args[1], int) else (None, None)
            for n in inputs]
    source = rows[0][0]
    value = source.meta.get("example_value") if isinstance(source, fx.Node) else None
    if (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == len(run)
            and all(src is source and t == i for i, (src, t) in enumerate(rows))):
        return source
    return inputs


def _replace(graph: fx.Graph, run: list[fx.Node], mode: str, k: int, gamma: float, tol: float,
             backend: str, usage: str) -> None:
    first, last = run[0], run[-1]
    weights = list(first.args[2:]) + [None] * (6 - len(first.args))
    with graph.inserting_after(last):
        states = graph.call_function(
            _cell_loop_states,
            (mode, k, gamma, _step_inputs(run), _state_inputs(first), *weights[:4], tol, backend, usage),
        )
    copy_source_meta(states, first)
    hidden = 1 if mode == "lstm" else 0
    # Each component's steps come from one unbind: its backward stacks the T cotangents once, where a
    # getitem per step would add a zero-filled (T+1, m, B, H) gradient per step (O(T²) work).
    steps: dict[int, fx.Node] = {}
    for t, call in enumerate(run, start=1):
        outputs = _outputs(call)
        assert outputs is not None
        for index, nodes in outputs.items():
            component = hidden if index == 0 else 0
            if component not in steps:
                with graph.inserting_after(states):
                    select = graph.call_function(torch.select, (states, 1, component))
                with graph.inserting_after(select):
                    steps[component] = graph.call_function(torch.unbind, (select,))
            for node in nodes:
                with graph.inserting_after(steps[component]):
                    value = graph.call_function(operator.getitem, (steps[component], t))
                node.replace_all_uses_with(value)
    for call in reversed(run):  # the steps' calls are now unread (each next call was rewired too)
        for node in list(call.users):
            graph.erase_node(node)
        graph.erase_node(call)
