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

from ._torch_compat import make_fx, preserve_node_meta


def to_aten_graph(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``gm`` to aten ops with fake tensors; mutations become explicit copies at the end.

    >>> aten = to_aten_graph(dynamo_gm, example_inputs)   # doctest: +SKIP
    >>> print(aten.code)                                   # doctest: +SKIP
    """

    def run(*args: torch.Tensor) -> object:
        return fx.Interpreter(gm).run(*args)

    with preserve_node_meta():
        aten = make_fx(torch.func.functionalize(run, remove="mutations"), tracing_mode="fake")(*example_inputs)
    # make_fx records autograd's `detach`es of saved outputs and unused tuple items; drop them.
    aten.graph.eliminate_dead_code()
    aten.recompile()
    return aten
