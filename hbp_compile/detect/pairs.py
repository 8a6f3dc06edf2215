"""Recurrences whose state is a pair of tensors (an LSTM written by hand: ``(c, h)``), packed into one.

A chain carries one state tensor from layer to layer. In ``c' = f⊙c + i⊙g; h' = o⊙tanh(c')`` (gates
from ``h``) neither ``c`` nor ``h`` alone separates one step from the next; the pair does. This pass
finds runs of such pairs and packs each into one state ``s_t = stack([a_t, b_t])``, every later read
of ``a_t``/``b_t`` becoming a ``select`` of it, so that detection and the engine see one state per step:

* ``a`` is the highway component: ``a_t`` is reached from ``a_{t-1}`` along pointwise ops (``c``).
  That path is the residual path, ``K = diag(∂a_t/∂a_{t-1}, 0)``;
* ``b`` is computed from ``a_t`` along pointwise ops (``h = o⊙tanh(c)``); the block carries it.

A step ``P → P'`` is taken when the piece of graph strictly between the pairs is closed (its values
are read only inside it, or by sinks), holds a heavy op, reads nothing else the run computed, and
has the structure of its neighbours. The run's first pair (``(c_0, h_0)``, which no pointwise path
links) comes from matching the first step against the second node by node. The packing copies two
state-sized tensors per step in the forward and changes no value (the forward stays bit-identical).
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..graph_utils import closure, copy_source_meta, descendants, inputs, users
from ..marks import PACKED_STATE_META_KEY, UNPACK_META_KEY
from .ops import (describe_ops, describe_value, is_layout, is_light, residual_successors, same_tensor_type,
                  tensor_meta)
from .segments import (Segment, differentiable_values, feeds_only_sinks, interval, keeps_element_positions,
                       residual_path)

log = logging.getLogger("hbp_compile.detect")


_aten = torch.ops.aten
_MAX_SUCCESSORS = 6  # pointwise successors tried per component: detection stays linear
_MAX_STEP_CHECKS = 20_000  # per graph


@dataclass(frozen=True)
class StatePair:
    """One boundary of a pair recurrence: ``a`` the highway component, ``b`` the other."""

    a: fx.Node
    b: fx.Node
    # when one value starts both components (``h = c = zeros(...)``): its readers as a, and as b
    readers: tuple[frozenset[fx.Node], frozenset[fx.Node]] | None = None

    @property
    def nodes(self) -> tuple[fx.Node, fx.Node]:
        return self.a, self.b


class _Search:
    def __init__(self, graph: fx.Graph, claimed: set[fx.Node]):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.differentiable = differentiable_values(graph)
        self.claimed = claimed
        self.checks = 0

    def successors(self, a: fx.Node, after: int) -> list[fx.Node]:
        """``a``'s first same-type successors along pointwise paths, after position ``after``."""
        heap = [(self.order[u], u) for u in residual_successors(a, a)]
        heapq.heapify(heap)
        seen: set[fx.Node] = set()
        found: list[fx.Node] = []
        while heap and len(found) < _MAX_SUCCESSORS and len(seen) < 8 * _MAX_SUCCESSORS:
            _, node = heapq.heappop(heap)
            if node in seen:
                continue
            seen.add(node)
            if self.order[node] > after and same_tensor_type(node, a):
                found.append(node)
            for user in residual_successors(node, a):
                heapq.heappush(heap, (self.order[user], user))
        return found

    def step_nodes(self, p: StatePair, q: StatePair) -> set[fx.Node]:
        """The values strictly between the pairs: descendants of ``p`` that ``q`` depends on, less
        those that ``p`` itself is computed from (``tanh(c)`` between ``c`` and ``h = o⊙tanh(c)``)."""
        order = self.order
        lo, hi = min(order[n] for n in p.nodes), max(order[n] for n in q.nodes)
        forward = closure(p.nodes, users, lambda n: order.get(n, hi + 1) <= hi)
        backward = closure(q.nodes, inputs, lambda n: order[n] >= lo)
        before = closure(p.nodes, inputs, lambda n: order[n] >= lo)
        return ((forward & (backward | set(q.nodes))) - before) - set(p.nodes)

    def is_step(self, p: StatePair, q: StatePair, nodes: set[fx.Node], produced: _Produced) -> bool:
        self.checks += 1
        if q.a not in nodes or q.b not in nodes or self.claimed.intersection(nodes):
            return False
        if any(u not in nodes and not feeds_only_sinks(u) for n in nodes if n not in q.nodes for u in n.users):
            return False  # not closed
        if all(is_light(n) for n in nodes):
            return False  # no block
        path = residual_path(p.a, nodes, q.a)
        if q.a not in path or q.b in path or not keeps_element_positions(p.a, sorted(path, key=self.order.get)):
            return False
        if not any(p.b in n.all_input_nodes for n in nodes):
            return False  # b is not part of the state
        for node in nodes:
            for arg in node.all_input_nodes:
                if arg not in nodes and arg not in p.nodes and arg in produced():
                    return False  # reads a value of an earlier step: {a, b} does not cut
        return True

    def next_pair(self, p: StatePair, produced: _Produced, signature: str | None) -> tuple[StatePair, str] | None:
        after = max(self.order[n] for n in p.nodes)
        for a in self.successors(p.a, after):
            for b in filter(_feeds_a_block, self.successors(a, self.order[a])):
                if self.checks > _MAX_STEP_CHECKS:
                    return None
                q = StatePair(a, b)
                nodes = self.step_nodes(p, q)
                if not self.is_step(p, q, nodes, produced):
                    continue
                sig = _signature(p, q, nodes, self.order)
                if signature is None or sig == signature:
                    return q, sig
        return None

    def run_from(self, p: StatePair, min_steps: int) -> list[StatePair] | None:
        produced = _Produced(p)
        first = self.next_pair(p, produced, None)
        if first is None:
            return None
        q, signature = first
        run = [p, q]
        while (nxt := self.next_pair(run[-1], produced, signature)) is not None:
            run.append(nxt[0])
        previous = _previous_pair(run[0], run[1], self.step_nodes(run[0], run[1]), self.order)
        if previous is not None and same_tensor_type(previous.a, p.a) and same_tensor_type(previous.b, p.a):
            nodes = self.step_nodes(previous, run[0])
            if self.is_step(previous, run[0], nodes, _Produced(previous)):  # matched node by node
                run.insert(0, previous)
        return run if len(run) - 1 >= min_steps else None


def _feeds_a_block(b: fx.Node) -> bool:
    """Is ``b`` read by a heavy op (through views)? The other component of a state is the block's input
    (``h`` in ``gates = W h``): a pointwise value that feeds only pointwise ops is no state."""
    frontier = list(b.users)
    for _ in range(3):
        if any(not is_light(u) for u in frontier):
            return True
        frontier = [v for u in frontier if is_layout(u) or u.target is _aten.select.int for v in u.users]
    return False


class _Produced:
    """What a run starting at ``first`` computes (its descendants), found on the first question."""

    def __init__(self, first: StatePair):
        self.first, self.found = first, None

    def __call__(self) -> set[fx.Node]:
        if self.found is None:
            self.found = descendants(*self.first.nodes)
        return self.found


def _signature(p: StatePair, q: StatePair, nodes: set[fx.Node], order: dict[fx.Node, int]) -> str:
    """The step's structure: ops, argument structure, shapes; not node identities."""
    ordered = sorted(nodes, key=order.__getitem__)
    local = {n: f"%{i}" for i, n in enumerate(ordered)}
    local.update({p.a: "a", p.b: "b"})
    externals: dict[fx.Node, str] = {}

    def name(n: fx.Node) -> str:
        if n in local:
            return local[n]
        return externals.setdefault(n, f"${len(externals)}:{describe_value(n)}")

    parts = describe_ops(ordered, name)
    parts.append(f"out: {local[q.a]} {local[q.b]}")
    return "\n".join(parts)


def _previous_pair(p1: StatePair, p2: StatePair, nodes: set[fx.Node], order: dict[fx.Node, int]) -> StatePair | None:
    """The pair before ``p1``: match the step ``p1 → p2`` against the graph before ``p1``, node by node
    from the outputs back. Where the template reads ``p1.a`` (``p1.b``), the match reads ``a_0`` (``b_0``)."""
    mapping = {p2.a: p1.a, p2.b: p1.b}
    roles: dict[str, fx.Node] = {}
    readers: dict[str, set[fx.Node]] = {"a": set(), "b": set()}
    stack = [p2.a, p2.b]
    while stack:
        template = stack.pop()
        node = mapping[template]
        if node.op != template.op or node.target != template.target or len(node.args) != len(template.args) \
                or set(node.kwargs) != set(template.kwargs):
            return None
        pairs = zip(pytree.tree_leaves((template.args, template.kwargs)), pytree.tree_leaves((node.args, node.kwargs)))
        for want, got in pairs:
            if not isinstance(want, fx.Node):
                if isinstance(got, fx.Node) or want != got:
                    return None
                continue
            if not isinstance(got, fx.Node):
                return None
            role = "a" if want is p1.a else "b" if want is p1.b else None
            if role is not None:
                if roles.setdefault(role, got) is not got:
                    return None
                readers[role].add(node)
            elif want in nodes:
                if want in mapping:
                    if mapping[want] is not got:
                        return None
                else:
                    if got in mapping.values() or order[got] >= order[want]:
                        return None
                    mapping[want] = got
                    stack.append(want)
            elif want is not got and not same_tensor_type(want, got):
                return None  # externals: the same value (a weight) or one of the same type (x_t)
    if set(roles) != {"a", "b"}:
        return None
    if roles["a"] is not roles["b"]:
        return StatePair(roles["a"], roles["b"])
    # one value read as both components: each reader must read it in one role, and nothing else may
    if readers["a"] & readers["b"] or set(roles["a"].users) != readers["a"] | readers["b"]:
        return None
    return StatePair(roles["a"], roles["b"], (frozenset(readers["a"]), frozenset(readers["b"])))


def find_state_pairs(graph: fx.Graph, *, claimed: set[fx.Node], min_steps: int = 2) -> list[list[StatePair]]:
    """Runs of state pairs ``[P_0, ..., P_T]`` in ``graph`` outside the ``claimed`` nodes (the
    chains detection found already). Pure analysis.

    >>> runs = find_state_pairs(aten_gm.graph, claimed=set())   # doctest: +SKIP
    >>> [len(run) - 1 for run in runs]   # steps per run          # doctest: +SKIP
    [16]
    """
    search = _Search(graph, claimed)
    taken: set[fx.Node] = set(claimed)
    runs = []
    for a in graph.nodes:
        meta = tensor_meta(a)
        if a in taken or a not in search.differentiable or meta is None or not meta.is_floating_point():
            continue
        for b in filter(_feeds_a_block, search.successors(a, search.order[a])):
            if b in taken or search.checks > _MAX_STEP_CHECKS:
                continue
            run = search.run_from(StatePair(a, b), min_steps)
            if run is not None:
                runs.append(run)
                for p, q in zip(run, run[1:]):
                    taken.update(search.step_nodes(p, q))
                taken.update(n for p in run for n in p.nodes)
                break
    if search.checks > _MAX_STEP_CHECKS:
        log.info("state-pair search stopped after %d step checks", search.checks)
    return runs


def pack_state_pairs(gm: fx.GraphModule, runs: list[list[StatePair]]) -> None:
    """Pack each pair of each run into ``s_t = stack([a_t, b_t])``; reads of ``a_t``/``b_t`` after it
    read a ``select`` of ``s_t`` (one per component for the next step, one per other reader)."""
    graph = gm.graph
    for r, run in enumerate(runs):
        for t, pair in enumerate(run):
            order = {n: i for i, n in enumerate(graph.nodes)}
            last = max(pair.nodes, key=order.__getitem__)
            readers = {c: [u for u in n.users if order[u] > order[last]] for c, n in enumerate(pair.nodes)}
            if pair.readers is not None:
                readers = {c: [u for u in readers[c] if u in pair.readers[c]] for c in (0, 1)}
            with graph.inserting_after(last):
                packed = graph.call_function(_aten.stack.default, ([pair.a, pair.b],))
            copy_source_meta(packed, last)
            packed.meta["val"] = torch.stack([tensor_meta(pair.a), tensor_meta(pair.b)])
            packed.meta[PACKED_STATE_META_KEY] = (r, t)
            next_step = set() if t + 1 == len(run) else _step_consumers(run[t], run[t + 1])
            anchor = packed
            for component, later in readers.items():
                groups = [[u for u in later if u in next_step]] + [[u] for u in later if u not in next_step]
                for group in filter(None, groups):
                    with graph.inserting_after(anchor):
                        select = graph.call_function(_aten.select.int, (packed, 0, component))
                    select.meta.update(packed.meta)
                    select.meta.pop(PACKED_STATE_META_KEY)
                    select.meta["val"] = tensor_meta(pair.nodes[component])
                    select.meta[UNPACK_META_KEY] = component
                    anchor = select
                    for user in group:
                        user.replace_input_with(pair.nodes[component], select)
    graph.lint()
    gm.recompile()


def _step_consumers(p: StatePair, q: StatePair) -> set[fx.Node]:
    """Readers of ``p`` that ``q`` depends on (before packing)."""
    backward = closure(q.nodes, inputs) | set(q.nodes)
    return {u for n in p.nodes for u in n.users if u in backward}


def packed_segments(graph: fx.Graph) -> dict[fx.Node, Segment]:
    """The layers between consecutive packed states: ``s_{t-1} → s_t``, the residual path being
    ``select(s_{t-1}, 0, 0)``, the pointwise path to ``a_t``, and the ``stack``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    states = {n.meta[PACKED_STATE_META_KEY]: n for n in graph.nodes if PACKED_STATE_META_KEY in n.meta}
    segments = {}
    for (r, t), x in states.items():
        y = states.get((r, t + 1))
        if y is None:
            continue
        nodes = interval(x, y, order)
        firsts = [n for n in nodes if n.meta.get(UNPACK_META_KEY) == 0 and n.args[0] is x]
        a_next = y.args[0][0]
        if len(firsts) != 1:
            continue
        path = residual_path(firsts[0], nodes, a_next)
        residual = (firsts[0], *sorted(path, key=order.__getitem__), y)
        segments[x] = Segment(x=x, y=y, nodes=tuple(sorted(nodes, key=order.__getitem__)), residual=residual)
    return segments
