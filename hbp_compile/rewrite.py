"""Rewrite stage: replace each detected chain in the aten graph by one ``ChainModule`` call.

Before::

    h1 = add(h0, block0(h0)); h2 = add(h1, block1(h1)); ...; out = epilogue(hL)

After::

    hbp_chain_0 = self.hbp_chain_0(h0, w0, b0, w1, b1, ...); hL = hbp_chain_0[0]; out = epilogue(hL)

The prologue and epilogue stay ordinary aten ops under autograd. Invariants are checked before
(every chain node is still in the graph) and after (no erased node is still read; the graph lints),
and the node order of everything else is preserved so random ops draw in the same order.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence

import torch.fx as fx

from .detect.model import Chain
from .engine.highway import ChainModule
from .engine.program import build_program
from .graph_utils import copy_source_meta, stable_topological_sort


class RewriteError(RuntimeError):
    """An invariant of the rewrite failed; the backend falls back to exact backprop with this reason."""


def chain_side_inputs(chain: Chain) -> tuple[fx.Node, ...]:
    """Every layer's externals, deduplicated, in first-use order: the chain call's inputs after h_0."""
    return tuple(dict.fromkeys(e for layer in chain.layers for e in layer.externals))


def rewrite_chains(gm: fx.GraphModule, chains: Sequence[Chain], *, k: int, gamma: float,
                   backend: str = "eager", recompute: bool = True, tol: float = 0.0,
                   chunk: int | None = None) -> fx.GraphModule:
    """Replace every chain in ``gm`` (in place) with a ``ChainModule`` call and return ``gm``.

    ``backend="inductor"`` makes each chain compile its group functions and scans on first use.
    """
    graph = gm.graph
    present = set(graph.nodes)
    for ci, chain in enumerate(chains):
        inside = {n for layer in chain.layers for n in layer.nodes}
        if not inside <= present:
            raise RewriteError(f"chain {ci} refers to nodes that are not in the graph")
        sides = chain_side_inputs(chain)
        program = build_program(chain, sides, k=k, gamma=gamma, backend=backend, recompute=recompute, tol=tol,
                                chunk=chunk)
        name = f"hbp_chain_{ci}"
        gm.add_submodule(name, ChainModule(program))
        side_outputs = [n for layer in chain.layers for n in layer.side_outputs]
        outputs = [chain.output] + [chain.layers[t - 1].y for t in chain.taps] + side_outputs
        with graph.inserting_before(chain.output):
            call = graph.call_module(name, (chain.h0, *sides))
            copy_source_meta(call, chain.output)
            call.meta["val"] = tuple(o.meta.get("val") for o in outputs)
            for j, old in enumerate(outputs):
                new = graph.call_function(operator.getitem, (call, j))
                new.meta.update(old.meta)
                old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
        for node in reversed(list(n for n in graph.nodes if n in inside)):
            if node.users:
                raise RewriteError(f"{node.format_node()} is still read after the rewrite")
            graph.erase_node(node)
    stable_topological_sort(graph)
    graph.lint()
    gm.recompile()
    return gm
