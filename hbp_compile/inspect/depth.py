"""The sequential depth of a backward, as the longest path of its dependency DAG (networkx).

Nodes are block VJPs (one per layer and pass) and scan steps. Backprop's VJPs form one chain of
length L. Highway-BP's iteration runs the L block VJPs side by side (they only read the previous
iterate ``w``), then a Hillis–Steele scan whose step ``s`` combines positions ``i`` and ``i + 2^s``;
the depth is the longest path counted in VJPs, and the scan steps on that path.
"""
from __future__ import annotations

import networkx as nx


def _longest(graph: nx.DiGraph) -> tuple[int, int]:
    path = nx.dag_longest_path(graph, weight="cost", default_weight=0)
    # edge cost = the cost of the node it enters: VJPs weigh far more than scan steps
    vjps = sum(1 for node in path if node[0] == "vjp")
    return vjps, sum(1 for node in path if node[0] == "scan" and node[2] > 0)  # level 0 only adds ``a``


def _add(graph: nx.DiGraph, source: tuple, target: tuple) -> None:
    graph.add_edge(source, target, cost=1000 if target[0] == "vjp" else 1)


def backprop_dag(num_layers: int) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_node(("vjp", 0, num_layers))
    for i in range(num_layers, 1, -1):
        _add(graph, ("vjp", 0, i), ("vjp", 0, i - 1))
    return graph


def highway_dag(num_layers: int, k: int) -> nx.DiGraph:
    """``min(k, L)`` iterations plus the final weight VJP; states 0..L."""
    graph = nx.DiGraph()
    n = num_layers + 1

    def scan(it: int, inputs: dict[int, tuple]) -> dict[int, tuple]:
        current = {i: ("scan", it, 0, i) for i in range(n)}
        for i, node in current.items():
            graph.add_node(node)
            if i in inputs:
                _add(graph, inputs[i], node)
        offset, step = 1, 1
        while offset < n:
            nxt = {i: ("scan", it, step, i) for i in range(n)}
            for i in range(n):
                _add(graph, current[i], nxt[i])
                if i + offset < n:
                    _add(graph, current[i + offset], nxt[i])
            current, offset, step = nxt, offset * 2, step + 1
        return current

    w = scan(0, {})
    for it in range(1, min(k, num_layers) + 1):
        vjps = {i - 1: ("vjp", it, i) for i in range(1, n)}  # v_{i-1} = w_i J_i
        for state, node in vjps.items():
            _add(graph, w[state + 1], node)
        w = scan(it, vjps)
    for i in range(1, n):
        _add(graph, w[i], ("vjp", "final", i))
    return graph


def backward_depths(num_layers: int, k: int) -> tuple[int, int, int]:
    """(backprop VJPs, Highway-BP VJPs, scan steps on Highway-BP's longest path).

    >>> backward_depths(8, 3)
    (8, 4, 16)
    """
    bp, _ = _longest(backprop_dag(num_layers))
    hbp, scans = _longest(highway_dag(num_layers, k))
    return bp, hbp, scans
