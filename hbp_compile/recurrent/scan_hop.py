"""Rewrite-stage pass: ``torch._higher_order_ops.scan`` with one carry as a chain of time steps.

``scan(combine, init, xs)`` reaches the aten graph as one ``higher_order.scan`` node whose combine
graph maps ``(carry, *x_t, *additional) -> (carry', *y_t, ...)`` (the extra outputs are what the
HOP's own autograd saves). The combine graph is one layer by construction: its residual path is the
pointwise path from ``carry`` to ``carry'`` (the segment rule's), its outputs ``y_t`` are side outputs
(or taps, when ``y_t`` is the carry itself). The node becomes a ``ChainModule`` call over ``T``
layers of one group — the step inputs stacked, the additional inputs (weights) broadcast — so the
forward loops over one layer graph and the backward is the chain engine's Highway-BP.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..detect.kinds import classify_residual
from ..detect.model import Layer
from ..detect.ops import is_mutating, is_random
from ..detect.segments import residual_path
from ..engine.highway import ChainModule
from ..engine.program import ChainProgram, GroupProgram
from ..engine.layer_graphs import layer_graph, split_layer_graph
from ..engine.layout import StateRuns
from ..graph_utils import closure, inputs, module_path, stable_topological_sort
from .swap import Recurrence

_SCAN = torch.ops.higher_order.scan


def _ancestors_through(node: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """``node``'s ancestors (itself included), not looking past ``stop``."""
    return {node} | closure([node], lambda current: () if current is stop else inputs(current))


def _readout_graph(graph: fx.Graph, value: fx.Node, y: fx.Node) -> fx.GraphModule:
    """``(h_t, *x_t, *additional) -> y_t`` for an output that reads the carry only through ``h_t``."""
    needed = _ancestors_through(value, y)
    readout = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = readout.placeholder(node.name)
    env[y] = next(iter(env.values()))  # the carry's slot holds h_t, the new state
    for node in graph.nodes:
        if node.op == "call_function" and node in needed and node is not y:
            env[node] = readout.node_copy(node, lambda n: env[n])
    readout.output(env[value])
    return fx.GraphModule(torch.nn.Module(), readout, class_name="HbpScanReadout")


def _step_layer(combine: fx.GraphModule, num_outputs: int) -> tuple[Layer, list[object]] | str:
    """The combine graph as one ``Layer`` from ``carry`` to ``carry'``, and per scan output ``y_t``
    how to produce it: ``"carry"`` (a copy of the new state: a tap), a readout graph of the new state
    (a tap too: the loss reads a function of ``h_t``), or a side output node of the layer (it reads
    the block's intermediates). Or why the combine function cannot be a layer."""
    graph = fx.Graph()
    outputs = graph.graph_copy(combine.graph, {})
    graph.output(tuple(outputs[:num_outputs]))
    graph.eliminate_dead_code()
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    (out,) = [n for n in graph.nodes if n.op == "output"]
    y, *ys = out.args[0]
    if any(is_random(n) or is_mutating(n) for n in graph.nodes):
        return "random or mutating ops in the combine function"
    if not isinstance(y, fx.Node) or y.op != "call_function" or any(
            not isinstance(v, fx.Node) or v.op == "placeholder" for v in ys):
        return "the combine function returns an input unchanged"
    x = placeholders[0]
    plans: list[object] = []
    for value in ys:
        if value is y or (value.target is torch.ops.aten.clone.default and value.args[0] is y):
            plans.append("carry")
        elif x not in _ancestors_through(value, y):
            plans.append(_readout_graph(graph, value, y))
        else:
            plans.append(value)
    side_outputs = tuple(dict.fromkeys(v for v in plans if isinstance(v, fx.Node)))
    layer_nodes = set().union(_ancestors_through(y, x), *(_ancestors_through(v, x) for v in side_outputs))
    nodes = [n for n in graph.nodes if n.op == "call_function" and n in layer_nodes]
    residual = residual_path(x, set(nodes), y)
    kind, formula = classify_residual(x, tuple(sorted(residual, key=nodes.index)))
    layer = Layer(
        index=1, x=x, y=y, nodes=tuple(nodes), residual=tuple(n for n in nodes if n in residual),
        externals=tuple(placeholders[1:]), side_outputs=side_outputs,
        kind=kind, formula=formula, group=0, module_path="", signature="",
    )
    return layer, plans


def _readout_loop(readout: fx.GraphModule, states: torch.Tensor, num_xs: int, *inputs: torch.Tensor) -> torch.Tensor:
    """``stack([readout(h_t, *x_t, *additional) for t])``: the same ops per step as the combine ran."""
    xs, additional = inputs[:num_xs], inputs[num_xs:]
    return torch.stack([readout(states[t], *(x[t] for x in xs), *additional) for t in range(states.shape[0])])


def _program(layer: Layer, steps: int, num_xs: int, num_additional: int, k: int, gamma: float,
             tapped: bool, backend: str, tol: float) -> ChainProgram:
    """``tapped``: the scan returns every carry (``y_t`` is the carry itself)."""
    # flat side inputs: x_t of every step for each xs tensor (xs j of step t at j*T + t), then additional
    kinds = [layer.kind] * steps
    runs = StateRuns.from_kinds(kinds)
    stacked = tuple((j, tuple(j * steps + t for t in range(steps))) for j in range(num_xs))
    broadcast = tuple((num_xs + j, num_xs * steps + j) for j in range(num_additional))
    group = GroupProgram(
        layers=tuple(range(steps)), layer_fn=layer_graph(layer), split_fn=split_layer_graph(layer),
        kind=layer.kind, stacked=stacked, broadcast=broadcast, num_draws=0,
        side_differentiable=tuple(True for _ in layer.side_outputs),
        inputs=runs.plan(range(steps)), outputs=runs.plan(range(1, steps + 1)), backend=backend,
    )
    sides = tuple(tuple(j * steps + t for j in range(num_xs)) + tuple(num_xs * steps + j for j in range(num_additional))
                  for t in range(steps))
    return ChainProgram(num_layers=steps, layer_group=(0,) * steps, layer_sides=sides, groups=(group,),
                        taps=tuple(range(1, steps)) if tapped else (), k=k, gamma=gamma, state_runs=runs,
                        backend=backend, tol=tol)


def rewrite_scans(gm: fx.GraphModule, *, k: int, gamma: float, backend: str = "eager",
                  tol: float = 0.0) -> tuple[Recurrence, ...]:
    """Replace every one-carry ``scan`` node of the aten graph ``gm`` in place; report each one."""
    found = []
    for index, node in enumerate([n for n in gm.graph.nodes if n.target is _SCAN]):
        combine_node, init, xs, additional = node.args
        users = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        steps = int(node.meta["val"][1].shape[0]) if len(node.meta["val"]) > 1 else 0
        path = module_path(node)
        why = "" if len(init) == 1 and xs and steps >= 2 else "only scans with one carry and inputs are handled"
        if not why and len(users) != len(node.users):
            why = "the scan's outputs are read as a whole"
        step = _step_layer(getattr(gm, combine_node.target), 1 + max(users, default=0)) if not why else why
        if isinstance(step, str):
            found.append(Recurrence("scan", path, 1, False, steps, reason=step))
            continue
        layer, plans = step
        program = _program(layer, steps, len(xs), len(additional), k, gamma,
                           any(not isinstance(p, fx.Node) for p in plans), backend, tol)
        name = f"hbp_scan_{index}"
        gm.add_submodule(name, ChainModule(program))
        graph = gm.graph
        with graph.inserting_before(node):
            step_inputs = []
            for x in xs:
                unbound = graph.call_function(torch.ops.aten.unbind.int, (x, 0))
                step_inputs += [graph.call_function(operator.getitem, (unbound, t)) for t in range(steps)]
            call = graph.call_module(name, (init[0], *step_inputs, *additional))
            result = graph.call_function(operator.getitem, (call, 0))
            taps = [graph.call_function(operator.getitem, (call, 1 + i)) for i in range(len(program.taps))]
            offset = 1 + len(program.taps)
            per_step = len(layer.side_outputs)
            stacked = {}
            for j, side in enumerate(layer.side_outputs):
                values = [graph.call_function(operator.getitem, (call, offset + t * per_step + j)) for t in range(steps)]
                stacked[side] = graph.call_function(torch.ops.aten.stack.default, (values,))
            states = graph.call_function(torch.ops.aten.stack.default, ([*taps, result],)) if taps else None
            readouts = {}
            for j, plan in enumerate(plans):
                if isinstance(plan, fx.GraphModule):
                    gm.add_submodule(f"{name}_readout_{j}", plan)
                    readout = graph.get_attr(f"{name}_readout_{j}")
                    readouts[j] = graph.call_function(_readout_loop, (readout, states, len(xs), *xs, *additional))
        for position, user in users.items():
            if position == 0:
                user.replace_all_uses_with(result)
            else:
                plan = plans[position - 1]
                value = states if plan == "carry" else readouts[position - 1] if position - 1 in readouts else stacked[plan]
                user.replace_all_uses_with(value)
            graph.erase_node(user)
        graph.erase_node(node)
        found.append(Recurrence("scan", path, 1, False, steps, formula=layer.formula))
    if found:
        graph = gm.graph
        graph.eliminate_dead_code()
        stable_topological_sort(graph)
        graph.lint()
        gm.recompile()
    return tuple(found)
