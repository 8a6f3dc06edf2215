"""Find residual segments in an aten graph: the candidate layers of a chain.

A segment starts at a value ``x`` and ends at ``y`` when

* ``x`` reaches ``y`` along a path of pointwise ops of ``x``'s shape and dtype (the residual path R),
* the segment ``desc(x) ∩ anc(y)`` is closed: nothing inside it except ``y`` is read from outside,
  except by sinks (the graph output, a buffer update): those values are the layer's *side outputs*
  (GPT-2's KV cache, BatchNorm's running statistics), and
* the segment contains a heavy op (matmul, convolution...) off R: the block ``g``, and
* no other read of ``x`` outside the segment flows back into the residual path right after ``y``
  (that read belongs to the same layer, e.g. the ``tanh(B x)`` branch of ``sigmoid(A x)⊙x + tanh(B x)``;
  a read that never rejoins, like a loss reading ``x``, is a tap).

We take, for every ``x``, the first such ``y`` in topological order, then extend it through unary
pointwise ops that are its only reader (``relu(x + B(x))`` ends after the ``relu``). This one rule covers ``x + B(x)``,
``relu(x + B(x))`` and gated updates ``a⊙x + b`` (DESIGN.md §4).
"""
from __future__ import annotations

import heapq
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..graph_utils import closure, inputs, module_path, users
from ..marks import REQUIRES_GRAD_META_KEY
from .ops import (
    LAYOUT_OPS,
    is_layer_norm,
    is_layout,
    is_light,
    is_pointwise,
    is_random,
    is_sink,
    layer_norm_outputs,
    residual_successors,
    same_tensor_type,
    tensor_meta,
)

log = logging.getLogger("hbp_compile.detect")

# A candidate y further than this many pointwise hops from x is not tried: keeps detection linear.
# Steps through another layout of the state (a reshape) count against the second, larger budget.
MAX_CANDIDATES_PER_START = 16
MAX_STEPS_PER_START = 256


@dataclass(frozen=True)
class Segment:
    """A closed piece of graph from ``x`` to ``y`` with a pointwise residual path and a heavy block."""

    x: fx.Node
    y: fx.Node
    nodes: tuple[fx.Node, ...]  # topological order, y last, x excluded
    residual: tuple[fx.Node, ...]  # pointwise path x -> y, y last




def interval(x: fx.Node, y: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """``desc(x) ∩ anc(y)`` plus ``y``, without ``x``."""
    lo, hi = order[x], order[y]
    forward = closure([x], users, lambda user: order.get(user, hi + 1) <= hi)
    backward = closure([y], inputs, lambda arg: order[arg] > lo)
    return (forward & backward) | {y}


def residual_path(x: fx.Node, nodes: set[fx.Node], y: fx.Node) -> set[fx.Node]:
    """Nodes of the segment on a residual path from x to y: pointwise ops, and layer norms (the
    ``native_layer_norm`` node with its normalized output)."""
    def step(node: fx.Node) -> list[fx.Node]:
        steps = [u for u in node.users if is_pointwise(u) or is_layout(u)]
        for out in layer_norm_outputs(node):
            steps += [out.args[0], out]
        return steps

    reach = closure([x], step, lambda user: user in nodes)
    coreach = {y} | closure([y], inputs, lambda arg: arg in reach)
    return reach & coreach


def keeps_element_positions(x: fx.Node, residual: Sequence[fx.Node]) -> bool:
    """Does every element of ``x`` come out of the residual path (views, reshapes and casts
    included) at its own position in ``y``? Then ``K`` is diagonal in the state's coordinates, the
    layout ops are part of it, and the engine's scans hold. Checked by pushing element indices
    through the path's layout ops (pointwise ops keep positions: all their path inputs must agree)."""
    if not any(is_layout(n) for n in residual):
        return True
    meta = tensor_meta(x)
    env: dict[fx.Node, torch.Tensor] = {x: torch.arange(meta.numel(), dtype=torch.float64).reshape(meta.shape)}
    for node in residual:
        sources = [env[a] for a in node.all_input_nodes if a in env]
        if not sources or any(s.shape != sources[0].shape or not torch.equal(s, sources[0]) for s in sources):
            return False
        if node.target in LAYOUT_OPS:  # moves elements (casts and copies keep them in place)
            args = node.args[1:]
            if any(isinstance(a, fx.Node) for a in pytree.tree_leaves(args)):
                return False  # a shape computed at run time: cannot tell
            # on index tensors a view is a reshape (the values, not the strides, are the question)
            op = _RESHAPES.get(node.target, node.target)
            env[node] = op(sources[0], *args)
        else:  # pointwise, a cast, a layer norm (elementwise once its statistics are fixed), getitem
            out = tensor_meta(node)
            if out is not None and tuple(out.shape) != tuple(sources[0].shape):
                return False  # broadcasting onto more elements
            env[node] = sources[0]
    end = residual[-1]
    return end in env and torch.equal(env[end], env[x].reshape(env[end].shape)) and \
        tuple(env[end].shape) == tuple(meta.shape)


_RESHAPES = {op: torch.ops.aten.reshape.default for op in (
    torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.view_copy.default)}


def feeds_only_sinks(node: fx.Node, depth: int = 8) -> bool:
    """A sink, or light ops (a slice, a view) whose every reader feeds only sinks: a KV cache that
    the model slices before returning it (Mistral's sliding window) is still a side output."""
    if is_sink(node):
        return True
    if depth == 0 or not node.users or not is_light(node) or is_random(node):
        return False
    return all(feeds_only_sinks(u, depth - 1) for u in node.users)


def _why_not_segment(x: fx.Node, y: fx.Node, nodes: set[fx.Node]) -> str | None:
    if any(u not in nodes and not feeds_only_sinks(u) for n in nodes if n is not y for u in n.users):
        return "an intermediate value is read outside the segment"
    if all(is_pointwise(n) or is_layout(n) for n in nodes):
        return "no block: the path is pointwise only"
    if all(is_light(n) for n in nodes):
        return "block has only pointwise/reduction/view ops (too light to be a layer)"
    return None


def _rejoins_after(x: fx.Node, y: fx.Node, nodes: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Does a read of ``x`` outside the segment reach the residual path just after ``y``?"""
    outside = [u for u in x.users if u not in nodes]
    targets = set(residual_successors(y, x))
    if not outside or not targets:
        return False
    limit = max(order[t] for t in targets)
    seen = set(outside)
    stack = list(outside)
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        for user in node.users:
            if user not in seen and order.get(user, limit + 1) <= limit:
                seen.add(user)
                stack.append(user)
    return False


def _inside_module(node: fx.Node, owner: fx.Node) -> bool:
    """Was ``node`` made by ``owner``'s module or one of its children (true when unknown)?"""
    inner, outer = module_path(node), module_path(owner)
    return not inner or not outer or inner == outer or inner.startswith(outer + ".")


def _extend_through_unary(x: fx.Node, y: fx.Node, nodes: set[fx.Node]) -> fx.Node:
    """Move ``y`` past pointwise ops and layer norms that are its only reader and read nothing else
    from the layer (``relu(x + B(x))`` and post-LN ``LN(x + B(x))`` end after the relu / the norm)."""
    while len(y.users) == 1:
        (user,) = y.users
        if is_layer_norm(user) and user.args[0] is y:
            outs = [u for u in user.users if u.target is operator.getitem]
            normalized = layer_norm_outputs(y)
            if len(normalized) != 1 or any(u.args[1] != 0 and u.users for u in outs):
                break  # the statistics are read elsewhere: not a plain post-LN
            if not _inside_module(user, y):
                break  # a final norm after the chain (GPT-2's ln_f), not the layer's own post-LN
            step, added = normalized[0], [user, *outs]
        elif is_pointwise(user) and same_tensor_type(user, x):
            step, added = user, [user]
        else:
            break
        if any(arg is not y and (arg in nodes or arg is x) for arg in user.all_input_nodes):
            break
        nodes.update(added)
        y = step
    return y


def segment_from(x: fx.Node, order: dict[fx.Node, int]) -> Segment | None:
    """The first residual segment starting at ``x``, or None. Only floating tensors are states:
    integer and bool values (position ids, masks) carry no gradient."""
    meta = tensor_meta(x)
    if meta is None or not meta.is_floating_point():
        return None
    heap = [(order[u], u) for u in residual_successors(x, x)]
    heapq.heapify(heap)
    seen: set[fx.Node] = set()
    tried = 0
    while heap and tried < MAX_CANDIDATES_PER_START and len(seen) < MAX_STEPS_PER_START:
        _, y = heapq.heappop(heap)
        if y in seen:
            continue
        seen.add(y)
        if same_tensor_type(y, x):  # else a step through another layout (a reshape) of the state
            tried += 1
            nodes = interval(x, y, order)
            why = _why_not_segment(x, y, nodes)
            if why is None and _rejoins_after(x, y, nodes, order):
                why = "another read of x rejoins the residual path after this point"
            if why is None:
                end = _extend_through_unary(x, y, nodes)
                residual = tuple(sorted(residual_path(x, nodes, end), key=order.__getitem__))
                if keeps_element_positions(x, residual):
                    log.debug("segment %s -> %s: %d nodes", x.name, end.name, len(nodes))
                    return Segment(x=x, y=end, nodes=tuple(sorted(nodes, key=order.__getitem__)), residual=residual)
                why = "the residual path moves elements (a transpose or reshape it does not undo)"
            log.debug("no segment %s -> %s: %s", x.name, y.name, why)
        for user in residual_successors(y, x):
            heapq.heappush(heap, (order[user], user))
    return None


def differentiable_values(graph: fx.Graph) -> set[fx.Node]:
    """Values a gradient can reach: computed from an input that requires grad (the backend records
    which under ``meta["hbp_requires_grad"]``; unknown counts as yes). A position-id computation
    from an attention mask is not, and never ends a layer."""
    found: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.meta.get(REQUIRES_GRAD_META_KEY, True):
                found.add(node)
        elif node.op == "get_attr" or any(arg in found for arg in node.all_input_nodes):
            found.add(node)
    return found


def find_residual_segments(graph: fx.Graph) -> dict[fx.Node, Segment]:
    """Map each start value ``x`` to its residual segment (see module docstring)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    differentiable = differentiable_values(graph)
    segments = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "call_function"):
            seg = segment_from(node, order)
            # a layer whose output no gradient reaches (position ids from a mask) is no layer; its
            # input may be one (the model's input, h_0)
            if seg is not None and seg.y in differentiable:
                segments[node] = seg
    return segments
