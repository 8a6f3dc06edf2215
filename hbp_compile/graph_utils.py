"""Graph utilities every stage shares: walks, copies, node order, where a node came from.

One home for each, so that a stage that edits or reads a graph does not grow its own variant.
"""
from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable

import torch.fx as fx


def closure(starts: Iterable[fx.Node], step: Callable[[fx.Node], Iterable[fx.Node]],
            keep: Callable[[fx.Node], bool] = lambda node: True) -> set[fx.Node]:
    """The nodes reached from ``starts`` by repeated ``step`` (``users`` or ``inputs``), through the
    nodes ``keep`` accepts; a start is in the result only if it is reached again.

    >>> g = fx.symbolic_trace(lambda x: (x + 1) * 2).graph
    >>> x = next(iter(g.nodes))
    >>> sorted(n.name for n in closure([x], users))
    ['add', 'mul', 'output']
    """
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        for nxt in step(stack.pop()):
            if nxt not in seen and keep(nxt):
                seen.add(nxt)
                stack.append(nxt)
    return seen


def users(node: fx.Node) -> Iterable[fx.Node]:
    """The nodes reading ``node`` (a ``closure`` step downstream)."""
    return node.users


def inputs(node: fx.Node) -> Iterable[fx.Node]:
    """The nodes ``node`` reads (a ``closure`` step upstream)."""
    return node.all_input_nodes


def descendants(*nodes: fx.Node) -> set[fx.Node]:
    """Every value computed from any of ``nodes`` (not the nodes themselves, unless one reads another)."""
    return closure(nodes, users)


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph``, outputs included, to edit while the original stays as it is.

    >>> gm = fx.symbolic_trace(lambda x: x + 1)
    >>> copy_graph(gm.graph) is not gm.graph, len(copy_graph(gm.graph).nodes) == len(gm.graph.nodes)
    (True, True)
    """
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


SOURCE_META_KEYS = ("nn_module_stack", "stack_trace")


def copy_source_meta(to: fx.Node, source: fx.Node) -> None:
    """Give a node that replaces ``source`` its place in the model (module path, stack trace): what the
    report, the dumps and dynamo's error messages show for it."""
    to.meta.update({key: source.meta[key] for key in SOURCE_META_KEYS if key in source.meta})


def module_path(node: fx.Node) -> str:
    """The innermost ``nn.Module`` path that produced ``node`` ('' when unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return _clean_dynamo_path(str(path))


_DYNAMO_ROOT = re.compile(r"^(L\['[^']*'\]\.?|L__[a-z]+___|self\.)")


def _clean_dynamo_path(path: str) -> str:
    # dynamo spells `self.layers[0].fc` as L['self'].layers[0].fc (the name is forward's first argument)
    return _DYNAMO_ROOT.sub("", path)


def stable_topological_sort(graph: fx.Graph) -> None:
    """Reorder ``graph`` topologically, keeping the original order wherever it is already legal."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [(index[n], n) for n in nodes if waiting[n] == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, node = heapq.heappop(ready)
        ordered.append(node)
        for user in node.users:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (index[user], user))
    if len(ordered) != len(nodes):
        raise RuntimeError("the rewritten graph has a cycle")
    for prev, node in zip(ordered, ordered[1:]):
        prev.append(node)
