"""Compile stage: hand the rewritten program to Inductor, or run it as it is (``backend="eager"``).

What Inductor compiles, each once whatever the depth L (DESIGN.md §6):

* the prologue and epilogue around the chains: the rewritten aten graph goes through
  ``torch.compile`` (dynamo → aot_autograd → Inductor); each chain call and each recurrence is a
  graph break, so the code around it is compiled with its ordinary autograd backward;
* per group, the layer function that the chain's forward calls L times;
* per group, the batched split-layer forward ``vmap(split)``; aot_autograd partitions it into a
  forward and a backward graph, and the backward graph is the batched VJP that every Highway-BP
  iteration calls (the forward is not rerun per iteration);
* the reverse scans along the residual path.

Random ops use eager's generator (Inductor's ``fallback_random``), so a compiled forward draws the
same dropout masks as the model does in eager mode. Every function is compiled under a code object
of its own: dynamo caches per code object and, past ``recompile_limit`` entries, silently runs
eager, which would happen to a shared one (``vmap``'s wrapper) after a few groups.
"""
from __future__ import annotations

import itertools
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

INDUCTOR_OPTIONS = {"fallback_random": True}

_fresh_ids = itertools.count()


def fresh_function(fn: Callable[..., Any], name: str = "hbp_fn") -> Callable[..., Any]:
    """A function calling ``fn`` whose code object is new, so that dynamo gives it its own cache.

    >>> f = fresh_function(abs, "my_abs")
    >>> f(-2), f.__name__.startswith("my_abs")
    (2, True)
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    code = call.__code__.replace(co_name=f"{name}_{next(_fresh_ids)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def compile_function(fn: Callable[..., Any], backend: str, name: str = "hbp_fn") -> Callable[..., Any]:
    """``fn`` compiled by Inductor (static shapes, one graph), or ``fn`` itself for ``"eager"``.

    >>> compile_function(abs, "eager") is abs
    True
    """
    if backend == "eager":
        return fn
    return torch.compile(fresh_function(fn, name), backend="inductor", dynamic=False, fullgraph=True,
                         options=INDUCTOR_OPTIONS)


@torch.compiler.disable
def _run_opaque(target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # A graph break: dynamo runs this call as it is, between two compiled graphs.
    return target(*args, **kwargs)


def compile_rewritten(gm: fx.GraphModule, backend: str) -> Callable[..., Any]:
    """The forward of the rewritten aten graph ``gm``, with everything outside the chains and the
    recurrences compiled by Inductor. ``gm`` itself is left as it is (the dumps print it)."""
    if backend == "eager":
        return gm.forward
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        # ChainModule.forward is a graph break already; the recurrence custom op is one node that
        # aot_autograd would trace the Python backward of: keep it out of the compiled graphs.
        if node.op == "call_function" and node.target is torch.ops.hbp.recurrence.default:
            node.args = (node.target, *node.args)
            node.target = _run_opaque
    compiled = torch.compile(fresh_function(fx.GraphModule(gm, graph), "hbp_graph"), backend="inductor",
                             dynamic=False, options=INDUCTOR_OPTIONS)

    def run(*args: Any) -> Any:
        with warnings.catch_warnings():
            # Dynamo reads `.grad` of every tensor it resumes with after a graph break, and the
            # chain's outputs are not leaves: torch warns about its own read, which is harmless.
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            return compiled(*args)

    return run
