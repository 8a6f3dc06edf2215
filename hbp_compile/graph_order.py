"""Node order helpers shared by the stages that edit graphs (the recurrence swap, the chain rewrite)."""
from __future__ import annotations

import heapq

import torch.fx as fx


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
