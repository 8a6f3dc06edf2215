"""Rewrite engine: the ``HighwayChain`` autograd.Function, its per-layer graphs and the scans."""
from .highway import ChainModule, HighwayChain
from .program import ChainProgram, build_program
from .layer_graphs import layer_graph, split_layer_graph
from .scans import reverse_cumsum, reverse_linear_scan

__all__ = [
    "ChainModule",
    "ChainProgram",
    "HighwayChain",
    "build_program",
    "layer_graph",
    "reverse_cumsum",
    "reverse_linear_scan",
    "split_layer_graph",
]
