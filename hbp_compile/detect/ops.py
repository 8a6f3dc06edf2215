"""How the detector sees one FX node: pointwise, reduction, view, or heavy.

Classification goes through ``torch.Tag`` and ``OpOverload.is_view`` rather than op spellings, so that
an op renamed by a torch upgrade is still classified (STYLE.md, "traps").
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx


def _overload(node: fx.Node) -> torch._ops.OpOverload | None:
    target = node.target
    return target if isinstance(target, torch._ops.OpOverload) else None


def is_pointwise(node: fx.Node) -> bool:
    """True for an aten op tagged ``torch.Tag.pointwise`` (elementwise in every tensor input)."""
    op = _overload(node)
    return node.op == "call_function" and op is not None and torch.Tag.pointwise in op.tags


def _argument(node: fx.Node, op: torch._ops.OpOverload, name: str) -> object:
    for i, arg in enumerate(op._schema.arguments):
        if arg.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if i < len(node.args):
                return node.args[i]
            return arg.default_value
    return None


def is_random(node: fx.Node) -> bool:
    """True for ops that draw random numbers (dropout, bernoulli, rand...).

    Ops tagged ``nondeterministic_seeded`` only because they *can* drop out (scaled-dot-product
    attention with ``dropout_p=0``, ``native_dropout`` with ``train=False``) draw nothing and are not
    random here.
    """
    op = _overload(node)
    if op is None or torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    if _argument(node, op, "dropout_p") == 0.0:
        return False
    if op.overloadpacket is torch.ops.aten.native_dropout and (
        _argument(node, op, "train") is False or _argument(node, op, "p") == 0.0
    ):
        return False
    return True


# Random ops the engine can replay: the forward records what they drew, the backward reuses it.
# native_dropout records its mask; the others' outputs do not depend differentiably on any input.
REPLAYABLE_RANDOM = {
    torch.ops.aten.native_dropout,
    torch.ops.aten.rand_like,
    torch.ops.aten.randn_like,
    torch.ops.aten.rand,
    torch.ops.aten.randn,
    torch.ops.aten.bernoulli,
}


def is_replayable_random(node: fx.Node) -> bool:
    op = _overload(node)
    return is_random(node) and op is not None and op.overloadpacket in REPLAYABLE_RANDOM


def is_mutating(node: fx.Node) -> bool:
    """True for ops that write into one of their inputs (``add_``, ``copy_``...)."""
    op = _overload(node)
    return op is not None and op._schema.is_mutable


def is_sink(node: fx.Node) -> bool:
    """A reader that feeds nothing else: the graph output, or a ``copy_`` into a graph input (a
    functionalized buffer update such as BatchNorm's running statistics)."""
    if node.op == "output":
        return True
    return node.target is torch.ops.aten.copy_.default and node.args[0].op == "placeholder"


# Ops that read only their input's shape: with the random ops, they make masks, not blocks.
_FACTORIES = {
    torch.ops.aten.empty_like, torch.ops.aten.zeros_like, torch.ops.aten.ones_like, torch.ops.aten.full_like,
    torch.ops.aten.empty, torch.ops.aten.zeros, torch.ops.aten.ones, torch.ops.aten.full,
}


def is_layer_norm(node: fx.Node) -> bool:
    return node.target is torch.ops.aten.native_layer_norm.default


def layer_norm_outputs(node: fx.Node) -> list[fx.Node]:
    """The normalized outputs (``getitem(ln, 0)``) of the layer norms that normalize ``node``.

    On a residual path a layer norm is elementwise in its input once its mean and rstd are held
    fixed: ``LN(s) = (s - mean)·rstd·w + b``. Its statistics belong to the block (they come through
    reductions), so ``LN(x + B(x))`` is one layer with ``K = diag(rstd·w)`` (DESIGN.md §4).
    """
    return [
        out
        for ln in node.users
        if is_layer_norm(ln) and ln.args[0] is node
        for out in ln.users
        if out.target is operator.getitem and out.args[1] == 0
    ]


_aten = torch.ops.aten
# Ops that move or cast a tensor's elements without computing: on a residual path they are part of K
# (OPT's MLP reshapes the stream (B, T, D) -> (B·T, D) and back; Mamba casts it to float32).
LAYOUT_OPS = {
    _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.transpose.int,
    _aten.permute.default, _aten.t.default, _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.dims,
    _aten.squeeze.default, _aten.alias.default, _aten.flatten.using_ints, _aten.unflatten.int,
    _aten.view_copy.default, _aten.transpose_copy.int, _aten.permute_copy.default, _aten.t_copy.default,
    _aten.unsqueeze_copy.default, _aten.squeeze_copy.dim, _aten.alias_copy.default,
}
# copies that may cast, with the keyword arguments that keep them pure copies
CASTS = {_aten._to_copy.default: {"dtype", "memory_format"}, _aten.clone.default: {"memory_format"}}


def is_layout(node: fx.Node) -> bool:
    """A view, reshape, transpose or floating-point cast: moves or casts elements, computes nothing.
    (``view.dtype`` reinterprets bits and is not one.)"""
    if node.op != "call_function":
        return False
    if node.target in LAYOUT_OPS:
        return True
    allowed = CASTS.get(node.target)
    if allowed is None or not set(node.kwargs) <= allowed:
        return False
    out = tensor_meta(node)
    return out is not None and out.is_floating_point()


def residual_successors(node: fx.Node, like: fx.Node) -> list[fx.Node]:
    """Next values along a residual path from ``node``: pointwise readers, layout ops (views,
    reshapes, casts) and layer-norm outputs, as many floating elements as ``like`` has. Only those of
    ``like``'s shape and dtype can end a layer; the others are steps through another layout."""
    found = [u for u in node.users if is_pointwise(u) or is_layout(u)] + layer_norm_outputs(node)
    target = tensor_meta(like)
    return [u for u in found if (t := tensor_meta(u)) is not None and t.is_floating_point()
            and target is not None and t.numel() == target.numel()]


def is_light(node: fx.Node) -> bool:
    """Pointwise, reduction, view, tuple access, normalization, factory or random ops: the ops that
    alone do not make a block worth a layer (``x * bernoulli(empty_like(x))`` is a dropout, not a
    layer; ``LN(s)`` is a normalization)."""
    if node.target is operator.getitem:
        return True
    op = _overload(node)
    if op is None:
        return False
    if op.overloadpacket in _FACTORIES or torch.Tag.nondeterministic_seeded in op.tags or is_layer_norm(node):
        return True
    return torch.Tag.pointwise in op.tags or torch.Tag.reduction in op.tags or op.is_view or is_layout(node)


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    """The fake tensor recorded by tracing under ``meta['val']``, if the node produced one tensor."""
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def describe_value(node: fx.Node) -> str:
    """``(shape):dtype`` of the node's tensor, or the type of its value: the part of a node a
    structural signature compares (layers, steps of a recurrence)."""
    val = tensor_meta(node)
    return f"{tuple(val.shape)}:{val.dtype}" if val is not None else type(node.meta.get("val")).__name__


def describe_ops(nodes: Iterable[fx.Node], name: Callable[[fx.Node], str]) -> list[str]:
    """One line per node: its op, its arguments with each node read spelled by ``name``, its value's
    type. The lines of a structural signature (a layer's, a recurrence step's): equal lines mean the
    same computation on the same shapes, whatever the node identities."""
    return [f"{node.target}{fx.node.map_arg((node.args, node.kwargs), name)}->{describe_value(node)}" for node in nodes]


def same_tensor_type(a: fx.Node, b: fx.Node) -> bool:
    """Same shape and dtype: the states of one run of a chain must agree on both."""
    ta, tb = tensor_meta(a), tensor_meta(b)
    return ta is not None and tb is not None and ta.shape == tb.shape and ta.dtype == tb.dtype
