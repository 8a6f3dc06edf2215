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
from dataclasses import dataclass

import torch.fx as fx

from .ops import (
    is_layer_norm,
    is_light,
    is_pointwise,
    is_sink,
    layer_norm_outputs,
    module_path,
    residual_successors,
    same_tensor_type,
    tensor_meta,
)

log = logging.getLogger("hbp_compile.detect")

# A candidate y further than this many pointwise hops from x is not tried: keeps detection linear.
MAX_CANDIDATES_PER_START = 16


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
    forward: set[fx.Node] = set()
    stack = [x]
    while stack:
        for user in stack.pop().users:
            if user not in forward and order.get(user, hi + 1) <= hi:
                forward.add(user)
                stack.append(user)
    backward: set[fx.Node] = set()
    stack = [y]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg not in backward and order[arg] > lo:
                backward.add(arg)
                stack.append(arg)
    return (forward & backward) | {y}


def residual_path(x: fx.Node, nodes: set[fx.Node], y: fx.Node) -> set[fx.Node]:
    """Nodes of the segment on a residual path from x to y: pointwise ops, and layer norms (the
    ``native_layer_norm`` node with its normalized output)."""
    reach: set[fx.Node] = set()
    stack = [x]
    while stack:
        node = stack.pop()
        steps = [u for u in node.users if is_pointwise(u)]
        for out in layer_norm_outputs(node):
            steps += [out.args[0], out]
        for user in steps:
            if user in nodes and user not in reach:
                reach.add(user)
                stack.append(user)
    coreach: set[fx.Node] = {y}
    stack = [y]
    while stack:
        for arg in stack.pop().all_input_nodes:
            if arg in reach and arg not in coreach:
                coreach.add(arg)
                stack.append(arg)
    return reach & coreach


def _why_not_segment(x: fx.Node, y: fx.Node, nodes: set[fx.Node]) -> str | None:
    if any(u not in nodes and not is_sink(u) for n in nodes if n is not y for u in n.users):
        return "an intermediate value is read outside the segment"
    if all(is_pointwise(n) for n in nodes):
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
    while heap and len(seen) < MAX_CANDIDATES_PER_START:
        _, y = heapq.heappop(heap)
        if y in seen:
            continue
        seen.add(y)
        nodes = interval(x, y, order)
        why = _why_not_segment(x, y, nodes)
        if why is None and _rejoins_after(x, y, nodes, order):
            why = "another read of x rejoins the residual path after this point"
        if why is None:
            y = _extend_through_unary(x, y, nodes)
            residual = residual_path(x, nodes, y)
            log.debug("segment %s -> %s: %d nodes", x.name, y.name, len(nodes))
            return Segment(
                x=x,
                y=y,
                nodes=tuple(sorted(nodes, key=order.__getitem__)),
                residual=tuple(sorted(residual, key=order.__getitem__)),
            )
        log.debug("no segment %s -> %s: %s", x.name, y.name, why)
        for user in residual_successors(y, x):
            heapq.heappush(heap, (order[user], user))
    return None


def find_residual_segments(graph: fx.Graph) -> dict[fx.Node, Segment]:
    """Map each start value ``x`` to its residual segment (see module docstring)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    segments = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "call_function"):
            seg = segment_from(node, order)
            if seg is not None:
                segments[node] = seg
    return segments
