"""Cut a layer's segment out of the aten graph as small standalone FX graphs.

* ``layer_graph``: ``(x, *externals) -> y`` — what the forward runs, once per layer.
* ``split_layer_graph``: ``(x_r, x_g, *externals) -> y`` — the same function with the residual
  path's direct reads of ``x`` fed by ``x_r`` and everything else (the block) by ``x_g``. At
  ``x_r = x_g = x`` it equals the layer; ``∂y/∂x_g`` is the block Jacobian ``J`` and ``∂y/∂x_r`` the
  residual Jacobian ``K``. Taking J's VJP this way never forms ``vjp(f) − K·w`` (no cancellation).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..detect.model import Layer


def _copy_nodes(graph: fx.Graph, nodes, env: dict[fx.Node, fx.Node]) -> None:
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])


def layer_graph(layer: Layer) -> fx.GraphModule:
    """``(x, *externals) -> y`` for one layer, nodes copied with their meta.

    >>> gm = layer_graph(chain.layers[0]); gm(h0, *externals)   # doctest: +SKIP
    """
    graph = fx.Graph()
    env = {layer.x: graph.placeholder("x")}
    env.update({e: graph.placeholder(f"side_{i}") for i, e in enumerate(layer.externals)})
    _copy_nodes(graph, layer.nodes, env)
    graph.output(env[layer.y])
    return fx.GraphModule(torch.nn.Module(), graph, class_name="HbpLayer")


def split_layer_graph(layer: Layer) -> fx.GraphModule:
    """``(x_r, x_g, *externals) -> y``: the block sees ``x_g``, the residual path's direct reads see ``x_r``."""
    graph = fx.Graph()
    x_r, x_g = graph.placeholder("x_r"), graph.placeholder("x_g")
    sides = {e: graph.placeholder(f"side_{i}") for i, e in enumerate(layer.externals)}
    block_env = {layer.x: x_g, **sides}
    _copy_nodes(graph, layer.nodes, block_env)
    # Re-run only the residual path; its reads of block values come from the x_g pass above.
    residual_env = {**block_env, layer.x: x_r}
    _copy_nodes(graph, layer.residual, residual_env)
    graph.output(residual_env[layer.y])
    graph.eliminate_dead_code()
    return fx.GraphModule(torch.nn.Module(), graph, class_name="HbpSplitLayer")
