"""Graphs whose sizes are symbols: rewritten once per concrete input shape, inside one dynamo graph.

dynamo hands a backend a graph with symbolic sizes when an input's shape changed between calls
(automatic dynamic shapes, ``torch.compile``'s default), under ``dynamic=True`` and for dimensions
marked with ``torch._dynamo.mark_dynamic``. That one graph then serves every later shape, without a
recompile. The pass itself works at concrete shapes: the chains' layers are batched with ``vmap``
over graphs whose sizes are numbers, and its compile-time checks run on real inputs. So the backend
returns a ``PerShape`` for such a graph: on each call it looks up the rewrite made for the inputs'
shapes, and the first call at a new shape captures, rewrites and compiles the graph at that shape.

What this buys over a static graph per shape: dynamo compiles the model once more, not once per
shape, so no shape ever reaches dynamo's recompile limit (past it, a model runs without Highway-BP),
and a Highway-BP artifact never runs at a shape it was not made for (a backend that returned the
static rewrite for a symbolic graph would be handed every later shape). What it does not buy yet:
each new shape still pays the rewrite's compile (its kernels are specialized to sizes).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from ._torch_compat import FakeTensorMode, outside_dynamo_tracing
from .graph_utils import copy_graph

log = logging.getLogger("hbp_compile")

# Rewrites kept per symbolic graph. Each holds compiled kernels; a model fed many distinct shapes
# (unpadded sequence lengths) would otherwise grow without bound. Past it, exact backprop + a warning.
MAX_SHAPES = 64


def symbolic_inputs(gm: fx.GraphModule) -> tuple[int, ...]:
    """Positions of the inputs dynamo traced ``gm`` with symbolic sizes or strides, or as a symbol
    (a size passed as an int): what a call's shapes can change; none for a static graph. The others
    (parameters, buffers) have the sizes dynamo guards on.

    >>> symbolic_inputs(torch.fx.symbolic_trace(lambda x: x + 1))
    ()
    """
    positions = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.SymInt | torch.SymFloat) or isinstance(value, torch.Tensor) and any(
                isinstance(s, torch.SymInt) for s in (*value.shape, *value.stride())):
            positions.append(i)
    return tuple(positions)


def read_scalars(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """Inputs the graph reads as Python numbers (``x.item()`` of a 0-dim tensor input), by position,
    with the nodes that read them. Under ``dynamic=True`` dynamo passes a module's float attributes
    (a LayerNorm's ``eps``) this way; the rewrite takes each as the number it is."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    scalars = {}
    for i, node in enumerate(placeholders):
        value = node.meta.get("example_value")
        reads = [u for u in node.users if u.op == "call_method" and u.target == "item"]
        if reads and isinstance(value, torch.Tensor) and value.dim() == 0:
            scalars[i] = reads
    return scalars


def shape_key(args: Sequence[Any], positions: Sequence[int], scalars: Sequence[int] = ()) -> tuple:
    """What a rewrite is specialized to: the shape and strides of each tensor at ``positions`` (the
    symbolic inputs), the value of each int there, and the value of the ``scalars``."""
    chosen = (args[i] for i in positions)
    key = tuple((tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in chosen)
    return key + tuple(args[i].item() for i in scalars)


def describe_shapes(args: Sequence[Any]) -> str:
    """The input tensors' shapes as the report prints them, parameters and numbers left out.

    >>> describe_shapes([torch.nn.Parameter(torch.ones(2)), torch.ones(3, 4), 7])
    '(3, 4)'
    """
    return ", ".join(str(tuple(a.shape)) for a in args
                     if isinstance(a, torch.Tensor) and a.dim() and not isinstance(a, torch.nn.Parameter))


def concrete_copy(gm: fx.GraphModule, args: Sequence[Any]) -> fx.GraphModule:
    """A copy of dynamo's graph ``gm`` whose ``example_value`` metadata is at the shapes of ``args``:
    the capture passes that read sizes from it (the RNN swaps' step counts) see numbers. The numbers
    it reads from tensor inputs (``read_scalars``) are constants of the copy."""
    concrete = fx.GraphModule(gm, copy_graph(gm.graph))
    for i, reads in read_scalars(concrete).items():
        for read in reads:
            read.replace_all_uses_with(args[i].item())  # type: ignore[arg-type]
            concrete.graph.erase_node(read)
    concrete.recompile()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with outside_dynamo_tracing():
            torch.fx.passes.fake_tensor_prop.FakeTensorProp(concrete, fake_mode).propagate(*args)
    except Exception as exc:  # noqa: BLE001 - without it the passes read no sizes: fewer swaps, never wrong ones
        log.info("hbp_compile: no concrete metadata for a graph with symbolic sizes (%s)", exc)
        for node in concrete.graph.nodes:
            node.meta.pop("example_value", None)
        return concrete
    for node in concrete.graph.nodes:
        if "val" in node.meta:
            node.meta["example_value"] = node.meta["val"]
    return concrete


class PerShape:
    """The callable a backend returns for a graph with symbolic sizes: one rewrite per input shape.

    ``rewrite(graph, args, shapes)`` compiles ``graph`` (a concrete copy of dynamo's) for the real
    inputs ``args`` and returns what runs it; ``shapes`` describes them for the report. ``positions``:
    the graph's ``symbolic_inputs``, the only inputs whose shapes the rewrites are told apart by.

    >>> seen = []
    >>> def backend(gm, example_inputs):
    ...     rewrite = lambda graph, args, shapes: seen.append(shapes) or graph.forward
    ...     return PerShape(gm, rewrite, symbolic_inputs(gm))
    >>> double = torch.compile(lambda x: x * 2, backend=backend, dynamic=True)
    >>> [double(torch.ones(n)).sum().item() for n in (2, 3, 2)], seen
    ([4.0, 6.0, 4.0], ['(2,)', '(3,)'])
    """

    def __init__(self, gm: fx.GraphModule, rewrite: Callable[[fx.GraphModule, Sequence[Any], str], Callable],
                 positions: Sequence[int]):
        self.gm = gm
        self.rewrite = rewrite
        self.by_shape: dict[tuple, Callable] = {}
        self.positions = tuple(positions)  # a parameter's shape cannot change under dynamo's guards
        self.scalars = tuple(read_scalars(gm))
        self._warned_full = False

    def __call__(self, *args: Any) -> Any:
        key = shape_key(args, self.positions, self.scalars)
        run = self.by_shape.get(key)
        if run is None:
            if len(self.by_shape) >= MAX_SHAPES:
                return self._past_the_limit(*args)
            run = self.by_shape[key] = self.rewrite(concrete_copy(self.gm, args), args, describe_shapes(args))
        return run(*args)

    def _past_the_limit(self, *args: Any) -> Any:
        if not self._warned_full:
            self._warned_full = True
            warnings.warn(f"hbp_compile: a graph was rewritten for {MAX_SHAPES} distinct input shapes "
                          "(hbp_compile.shapes.MAX_SHAPES); calls at further shapes train with exact backprop. "
                          "Pad inputs to a few fixed shapes (e.g. bucket sequence lengths)", UserWarning, stacklevel=2)
        return self.gm.forward(*args)
