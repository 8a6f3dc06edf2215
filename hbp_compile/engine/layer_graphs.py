"""Cut a layer's segment out of the aten graph as small standalone FX graphs.

* ``layer_graph``: ``(x, *externals) -> y`` — what the forward runs, once per layer.
* ``split_layer_graph``: ``(x_r, x_g, *externals) -> y`` — the same function with the residual
  path's direct reads of ``x`` fed by ``x_r`` and everything else (the block) by ``x_g``. At
  ``x_r = x_g = x`` it equals the layer; ``∂y/∂x_g`` is the block Jacobian ``J`` and ``∂y/∂x_r`` the
  residual Jacobian ``K``. Taking J's VJP this way never forms ``vjp(f) − K·w`` (no cancellation).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .._torch_compat import FakeTensorMode, outside_dynamo_tracing
from ..compile import views_as_reshapes
from ..detect.model import Layer
from ..detect.ops import is_random

_aten = torch.ops.aten


def random_nodes(layer: Layer) -> list[fx.Node]:
    """The layer's random ops, in execution order: their draws are recorded by the forward."""
    return [n for n in layer.nodes if is_random(n)]


def draw_value(node: fx.Node, value: object) -> object:
    """The draw of random op ``node`` given its output ``value`` (an fx Node or a fake tensor):
    a dropout's mask (output 1); for the other random ops, the output itself."""
    if node.target is not _aten.native_dropout.default:
        return value
    return value.graph.call_function(operator.getitem, (value, 1)) if isinstance(value, fx.Node) else value[1]


def _replay_dropout(x: torch.Tensor, mask: torch.Tensor, p: float, train: object = True):
    # exactly what native_dropout computes, with the forward's mask
    return _aten.mul(_aten.mul(x, mask), 1.0 / (1.0 - p)) if p < 1 else _aten.mul(x, 0.0), mask


def _layer_norm_stats(x, normalized_shape, eps):
    # native_layer_norm's mean and rstd are not differentiable outputs in autograd, but J flows
    # through them (they are block values): recompute them with differentiable ops.
    dims = list(range(-len(normalized_shape), 0))
    mean = _aten.mean.dim(x, dims, True)
    var = _aten.var.correction(x, dims, correction=0, keepdim=True)
    return mean, _aten.rsqrt(_aten.add(var, eps))


def _layer_norm_with_stats(x, mean, rstd, weight=None, bias=None):
    # native_layer_norm's normalized output with given statistics, shaped like its (out, mean, rstd)
    out = _aten.mul(_aten.sub(x, mean), rstd)
    if weight is not None:
        out = _aten.mul(out, weight)
    if bias is not None:
        out = _aten.add(out, bias)
    return out, mean, rstd


def _math_attention(q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    # The fused CPU attention kernel has no vmap batching rule (vmap would loop over layers); the
    # math kernel decomposes into batched matmuls. Only output 0 is read (checked by the caller).
    # The fused kernel takes fewer key/value heads than query heads (grouped-query attention, as
    # SDPA's enable_gqa hands it over); the math kernel must be told.
    return _aten._scaled_dot_product_attention_math(
        q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=k.shape[-3] != q.shape[-3]
    )


def _swap_fused_attention(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.target is _aten._scaled_dot_product_flash_attention_for_cpu.default and all(
            user.target is operator.getitem and user.args[1] == 0 for user in node.users
        ):
            node.target = _math_attention


def _mixed_precision_norm_output(node: fx.Node) -> bool:
    """The normalized output of a layer norm whose input and weight dtypes differ."""
    if node.target is not operator.getitem or node.args[1] != 0:
        return False
    norm = node.args[0]
    if not isinstance(norm, fx.Node) or norm.target is not _aten.native_layer_norm.default:
        return False
    value, weight = norm.args[0].meta.get("val"), norm.args[2]
    weight_value = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    return isinstance(value, torch.Tensor) and isinstance(weight_value, torch.Tensor) and value.dtype != weight_value.dtype


def _copy_nodes(graph: fx.Graph, nodes, env: dict[fx.Node, fx.Node]) -> None:
    for node in nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])


def layer_graph(layer: Layer) -> fx.GraphModule:
    """``(x, *externals) -> y``, or ``-> (y, *side_outputs, *draws)`` when the layer has either.

    ``draws`` are what the random ops drew (a dropout's mask), for ``split_layer_graph`` to replay.

    >>> gm = layer_graph(chain.layers[0]); gm(h0, *externals)   # doctest: +SKIP
    """
    graph = fx.Graph()
    env = {layer.x: graph.placeholder("x")}
    env.update({e: graph.placeholder(f"side_{i}") for i, e in enumerate(layer.externals)})
    _copy_nodes(graph, layer.nodes, env)
    draws = [draw_value(n, env[n]) for n in random_nodes(layer)]
    extra = [env[n] for n in layer.side_outputs] + draws
    graph.output((env[layer.y], *extra) if extra else env[layer.y])
    return fx.GraphModule(torch.nn.Module(), graph, class_name="HbpLayer")


def differentiable_side_outputs(layer: Layer, layer_fn: fx.GraphModule) -> tuple[bool, ...]:
    """Per side output of the layer: can autograd carry a gradient back through it?

    Asked of autograd itself, on fake tensors with every floating input requiring grad: a returned
    key/value cache can, a BatchNorm's updated running statistics cannot. (The captured graph's
    metadata cannot tell: its values were traced without the parameters requiring grad.)
    """
    if not layer.side_outputs:
        return ()
    mode = FakeTensorMode()

    def fake(value: object, grad: bool) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        with mode:
            t = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return t.requires_grad_(grad and t.is_floating_point())

    def ask(externals_grad: bool) -> tuple:
        inputs = [fake(layer.x.meta.get("val"), True)] + [fake(e.meta.get("val"), externals_grad)
                                                           for e in layer.externals]
        with mode, torch.enable_grad(), outside_dynamo_tracing():
            return layer_fn(*inputs)

    try:
        out = ask(externals_grad=True)
    except RuntimeError:
        # an external that may not require grad (a float attention mask: the fused CPU attention
        # refuses it); a side output that depends on the layer's input is differentiable all the same
        out = ask(externals_grad=False)
    return tuple(bool(getattr(v, "requires_grad", False)) for v in out[1: 1 + len(layer.side_outputs)])


_SLICE_DIM_ARG = {_aten.slice.Tensor: 1, _aten.slice_scatter.default: 2}  # where each one's dim argument is


def _clamp_slice_ends(graph: fx.Graph) -> None:
    """``x[..., 2:]`` is traced as ``slice(x, dim, 2, 2**63 - 1)``; under vmap torch 2.13 overflows on
    that end ("IntArrayRef contains an int that cannot be represented as a SymInt", Funnel's pooling).
    The dim's static size is the same slice."""
    for node in graph.nodes:
        dim_at = _SLICE_DIM_ARG.get(node.target)
        if dim_at is None:
            continue
        args = list(node.args)
        source = args[0].meta.get("val") if isinstance(args[0], fx.Node) else None
        if len(args) <= dim_at + 2 or not isinstance(source, torch.Tensor):
            continue
        dim, end = args[dim_at], args[dim_at + 2]
        if isinstance(dim, int) and isinstance(end, int) and end > source.shape[dim]:
            args[dim_at + 2] = int(source.shape[dim])
            node.args = tuple(args)


def split_layer_graph(layer: Layer) -> fx.GraphModule:
    """``(x_r, x_g, *externals, *draws) -> y`` (or ``(y, *side_outputs)``): the block sees ``x_g``, the
    residual path's direct reads see ``x_r``, and random ops return the forward's ``draws``."""
    graph = fx.Graph()
    x_r, x_g = graph.placeholder("x_r"), graph.placeholder("x_g")
    sides = {e: graph.placeholder(f"side_{i}") for i, e in enumerate(layer.externals)}
    draws = {n: graph.placeholder(f"draw_{i}") for i, n in enumerate(random_nodes(layer))}
    block_env = {layer.x: x_g, **sides}
    for node in layer.nodes:
        if node not in draws:
            block_env[node] = graph.node_copy(node, lambda n: block_env[n])
            if _mixed_precision_norm_output(node):
                # vmap's layer-norm rule promotes bf16 input with fp32 weights to fp32; the model's
                # kernel returns the input's dtype (autocast on CPU): keep it
                block_env[node] = graph.call_function(
                    _aten._to_copy.default, (block_env[node],), {"dtype": node.meta["val"].dtype})
        elif node.target is _aten.native_dropout.default:
            args = fx.node.map_arg(node.args, lambda n: block_env[n])
            block_env[node] = graph.call_function(_replay_dropout, (args[0], draws[node], *args[1:]))
        else:
            block_env[node] = draws[node]
    # Re-run only the residual path; its reads of block values come from the x_g pass above. A layer
    # norm on the path keeps the block's statistics: only its elementwise part sees x_r.
    residual_env = {**block_env, layer.x: x_r}
    for node in layer.residual:
        if node.target is _aten.native_layer_norm.default:
            args = fx.node.map_arg(node.args, lambda n: residual_env[n])
            block_input, normalized_shape, eps = block_env[node.args[0]], node.args[1], node.args[4]
            stats = graph.call_function(_layer_norm_stats, (block_input, normalized_shape, eps))
            mean, rstd = (graph.call_function(operator.getitem, (stats, i)) for i in (0, 1))
            residual_env[node] = graph.call_function(_layer_norm_with_stats, (args[0], mean, rstd, *args[2:4]))
        else:
            residual_env[node] = graph.node_copy(node, lambda n: residual_env[n])
    side = [block_env[n] for n in layer.side_outputs]
    graph.output((residual_env[layer.y], *side) if side else residual_env[layer.y])
    graph.eliminate_dead_code()
    _swap_fused_attention(graph)
    _clamp_slice_ends(graph)
    # Under vmap the batch dim can leave a tensor that `view` cannot reinterpret (a transposed
    # layout); `reshape` gives the same values and copies only when it must. Backward-only graph.
    return views_as_reshapes(fx.GraphModule(torch.nn.Module(), graph, class_name="HbpSplitLayer"))
