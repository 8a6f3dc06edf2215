"""Capture stage: lower dynamo's torch-level FX graph to a functional aten graph.

The aten graph is what detection reads (every op carries ``torch.Tag``s) and what the rewritten
program executes. No decompositions are applied, so the aten ops are the ones eager mode runs and
the forward stays bit-identical to the original model. ``nn_module_stack`` and ``stack_trace`` are
carried over from dynamo's nodes for readable reports.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx

from ._torch_compat import is_concrete_int, make_fx, outside_dynamo_tracing, preserve_node_meta
from .marks import REQUIRES_GRAD_META_KEY


def _interpreted(gm: fx.GraphModule):
    def run(*args: torch.Tensor) -> object:
        return fx.Interpreter(gm).run(*args)

    return run


def to_aten_graph(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``gm`` to aten ops with fake tensors; mutations become explicit copies at the end.

    >>> aten = to_aten_graph(dynamo_gm, example_inputs)   # doctest: +SKIP
    >>> print(aten.code)                                   # doctest: +SKIP
    """

    # Two passes: torch-level ops to aten first, then functionalize the aten graph. Functionalizing
    # in one pass fails inside torch 2.13 for `F.dropout` on some inputs ("Cannot call numel() on
    # tensor with symbolic sizes/strides"); on an aten graph dropout is already bernoulli + mul.
    with preserve_node_meta(), outside_dynamo_tracing():
        aten = make_fx(_interpreted(gm), tracing_mode="fake")(*example_inputs)
        if any(_is_mutable(node) for node in aten.graph.nodes):
            aten = make_fx(torch.func.functionalize(_interpreted(aten), remove="mutations"),
                           tracing_mode="fake")(*example_inputs)
    # make_fx records autograd's `detach`es of saved outputs and unused tuple items; drop them.
    aten.graph.eliminate_dead_code()
    fold_static_sizes(aten.graph)
    cut_metadata_reads(aten.graph)
    draw_bernoulli_in_memory_order(aten.graph)
    merge_repeated_input_ops(aten.graph)
    aten.recompile()
    return aten



def mark_requires_grad(gm: fx.GraphModule, example_inputs: Sequence[object]) -> None:
    """Record on each placeholder whether its real input requires grad (the fake values traced
    here do not say): detection never takes a value no gradient reaches as a state."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        node.meta[REQUIRES_GRAD_META_KEY] = isinstance(value, torch.Tensor) and value.requires_grad


def _is_mutable(node: fx.Node) -> bool:
    # Functionalizing a graph that has nothing to functionalize is not free of risk: in torch 2.13
    # it rejects some `scan` combine functions ("scan might be aliasing the input or the output").
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable


_SIZE_OPS = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int)


def fold_static_sizes(graph: fx.Graph) -> int:
    """Replace ``sym_size``-style nodes whose value is a plain int by that int.

    Shapes are static here (``dynamic=False``); the nodes would otherwise reach ``vmap``, which has
    no batching rule for them. Returns the number of nodes folded.
    """
    folded = 0
    for node in list(graph.nodes):
        value = node.meta.get("val")
        if node.op == "call_function" and node.target in _SIZE_OPS and is_concrete_int(value):
            value = int(value)
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
            graph.erase_node(node)
            folded += 1
    return folded


_aten = torch.ops.aten
_NEW_FILLED = {_aten.new_ones.default: 1, _aten.new_zeros.default: 0, _aten.new_full.default: None}


def cut_metadata_reads(graph: fx.Graph) -> int:
    """Replace ``x.new_ones(size)``-style ops, which read only ``x``'s dtype and device, by a ``full``
    that reads nothing: in the data-flow graph they were descendants of ``x``, so a constant mask
    built from a state (Funnel's ``cls_mask = pad(h.new_ones(...))``) looked like a layer's
    intermediate read elsewhere, and cut the chain. Returns the number of nodes replaced."""
    replaced = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _NEW_FILLED:
            continue
        source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        out = node.meta.get("val")
        if not isinstance(source, torch.Tensor) or not isinstance(out, torch.Tensor):
            continue
        size = node.args[1]
        fill = _NEW_FILLED[node.target] if node.target is not _aten.new_full.default else node.args[2]
        with graph.inserting_before(node):
            full = graph.call_function(_aten.full.default, (size, fill),
                                       {"dtype": out.dtype, "layout": out.layout, "device": out.device,
                                        "pin_memory": False})
        full.meta = dict(node.meta)
        node.replace_all_uses_with(full)
        graph.erase_node(node)
        replaced += 1
    return replaced


def merge_repeated_input_ops(graph: fx.Graph) -> int:
    """Merge identical pure ops applied to graph inputs (``t(W)`` once per use of a shared weight).

    Without it a weight shared by every layer (an RNN cell's) looks like a different input per layer
    and would be stacked L times instead of broadcast. Random and mutating ops are never merged, nor
    ops without inputs (two ``zeros()`` are two tensors) or ops the graph returns (the outputs
    would alias). Returns the number of nodes merged.
    """
    seen: dict[tuple, fx.Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        tags = node.target.tags
        if torch.Tag.nondeterministic_seeded in tags or node.target._schema.is_mutable:
            continue
        inputs = node.all_input_nodes
        if not inputs or not all(arg.op in ("placeholder", "get_attr") for arg in inputs):
            continue
        if any(user.op == "output" for user in node.users):
            continue
        key = (node.target, repr(node.args), repr(node.kwargs))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def draw_bernoulli_in_memory_order(graph: fx.Graph) -> int:
    """Make functional ``bernoulli.p`` draw in its input's memory order, as eager's in-place one does.

    Eager dropout is ``empty_like(x).bernoulli_(p)``: the mask keeps x's strides and the random
    numbers fill it in memory order. Functionalization turns that into ``bernoulli.p(empty_like(x))``,
    which returns a *contiguous* tensor, so for a transposed x (attention outputs) the same numbers
    land on other elements and the traced forward differs from the model's. Drawing into the
    permutation of x that is contiguous and permuting back restores eager's mask exactly.
    Returns the number of draws rewritten.
    """
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.bernoulli.p:
            continue
        source, drawn = node.args[0].meta.get("val"), node.meta.get("val")
        if not isinstance(source, torch.Tensor) or source.stride() == drawn.stride():
            continue
        # Dims from outermost to innermost in memory; ties (size-1 dims) keep their order.
        order = sorted(range(source.dim()), key=lambda d: (-source.stride(d), d))
        if not source.permute(order).is_contiguous():
            continue  # overlapping or gapped layout: no permutation reproduces eager's order
        inverse = sorted(range(len(order)), key=order.__getitem__)
        with graph.inserting_before(node):
            to_memory = graph.call_function(torch.ops.aten.permute.default, (node.args[0], order))
            draw = graph.call_function(torch.ops.aten.bernoulli.p, (to_memory, *node.args[1:]), node.kwargs)
            back = graph.call_function(torch.ops.aten.permute.default, (draw, inverse))
        for new in (to_memory, draw, back):
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        to_memory.meta["val"] = source.permute(order)
        draw.meta["val"] = torch.empty_like(to_memory.meta["val"])
        back.meta["val"] = draw.meta["val"].permute(inverse)
        node.replace_all_uses_with(back)
        graph.erase_node(node)
        rewritten += 1
    return rewritten
