"""From residual segments to validated ``Chain`` records (DESIGN.md §4).

Segments are linked when one ends where the next starts. The longest runs are claimed first, and a
run is cut before any layer that would make the rewrite unsafe: a side input computed from the chain
itself, a state of another shape or dtype, a random or mutating op inside the block. Every cut is
recorded as a note, so a report can say why a chain is shorter than the model.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch.fx as fx

from .kinds import classify_residual
from .model import Chain, Group, Layer
from ..graph_utils import descendants, module_path
from .ops import (describe_ops, describe_value, is_light, is_mutating, is_random, is_replayable_random, is_sink,
                  tensor_meta)
from .pairs import packed_segments
from .segments import Segment, find_residual_segments, interval

log = logging.getLogger("hbp_compile.detect")


@dataclass(frozen=True)
class Detection:
    """What detection found in one graph: the chains, and notes on every candidate it cut or refused."""

    chains: tuple[Chain, ...]
    notes: tuple[str, ...]
    num_segments: int


def _absorb_input_prep(seg: Segment) -> Segment:
    """Pull light pure ops on graph inputs that only this layer reads (``t(W)``) into the segment.

    The layer's externals are then the parameters themselves, so their gradients come back in the
    parameters' own layout, and the prep op is batched with the layer instead of run per layer.
    """
    inside = set(seg.nodes)
    prep: list[fx.Node] = []
    for node in seg.nodes:
        for arg in node.all_input_nodes:
            if (
                arg not in inside
                and arg is not seg.x
                and arg.op == "call_function"
                and is_light(arg)
                and not is_random(arg)
                and not is_mutating(arg)
                and all(a.op in ("placeholder", "get_attr") for a in arg.all_input_nodes)
                and all(u in inside for u in arg.users)
                and _whole(arg)
            ):
                inside.add(arg)
                prep.append(arg)
    if not prep:
        return seg
    return Segment(x=seg.x, y=seg.y, nodes=tuple(prep) + seg.nodes, residual=seg.residual)


def _whole(prep: fx.Node) -> bool:
    """Does ``prep`` keep all of its input (``t(W)``) rather than pick a part (``x[t]``)? A part is
    an external: the time steps of a hand-written RNN then share one group, ``x[t]`` stacked."""
    out = tensor_meta(prep)
    ins = [tensor_meta(a) for a in prep.all_input_nodes]
    return out is not None and all(i is not None and i.numel() == out.numel() for i in ins)


def _externals(seg: Segment) -> tuple[fx.Node, ...]:
    inside = set(seg.nodes)
    found: dict[fx.Node, None] = {}
    for node in seg.nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg is not seg.x:
                found.setdefault(arg, None)
    return tuple(found)


def _side_outputs(seg: Segment) -> tuple[fx.Node, ...]:
    inside = set(seg.nodes)
    return tuple(n for n in seg.nodes if n is not seg.y and any(u not in inside for u in n.users))


def _signature(seg: Segment, externals: tuple[fx.Node, ...]) -> str:
    """Structural hash: op targets, argument structure, shapes and dtypes; not the node identities."""
    local = {n: f"%{i}" for i, n in enumerate(seg.nodes)}
    local[seg.x] = "x"
    local.update({e: f"${i}" for i, e in enumerate(externals)})
    parts = [f"x:{describe_value(seg.x)}"] + [f"${i}:{describe_value(e)}" for i, e in enumerate(externals)]
    parts += describe_ops(seg.nodes, local.__getitem__)
    parts.append(f"side outputs: {[local[n] for n in _side_outputs(seg)]}")
    return "\n".join(parts)


def _common_module_path(nodes: Iterable[fx.Node]) -> str:
    paths = [p.split(".") for p in (module_path(n) for n in nodes) if p]
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        i = 0
        while i < min(len(common), len(p)) and common[i] == p[i]:
            i += 1
        common = common[:i]
    return ".".join(common)


def _why_unsafe(seg: Segment, produced_by_chain: set[fx.Node]) -> str | None:
    # A residual segment keeps its state's shape and dtype by construction (the residual path does).
    for node in seg.nodes:
        if is_random(node) and not is_replayable_random(node):
            return f"random op {node.format_node()} inside the block cannot be replayed"
        if is_mutating(node):
            return f"mutating op {node.format_node()} inside the block"
    for ext in _externals(seg):
        if ext in produced_by_chain:
            return f"side input {ext.name} of {seg.y.name} is computed from the chain's own states"
    return None


def _runs(segments: dict[fx.Node, Segment], notes: list[str]) -> list[list[Segment]]:
    """Claim the longest runs of linked segments first; cut a run where a layer is unsafe."""
    length: dict[fx.Node, int] = {}

    def run_length(x: fx.Node) -> int:
        path = []
        while x in segments and x not in length:
            path.append(x)
            x = segments[x].y
            if len(path) > len(segments):  # a cycle cannot happen in a DAG; stay safe anyway
                break
        tail = length.get(x, 0)
        for start in reversed(path):
            tail += 1
            length[start] = tail
        return length.get(path[0], tail) if path else tail

    # Longest runs first; on a tie the later start, whose first layer is the smallest (GPT-2's chain
    # starts after the embedding dropout, not before it).
    if not segments:
        return []
    position = {node: i for i, node in enumerate(next(iter(segments)).graph.nodes)}
    starts = sorted(segments, key=lambda x: (-run_length(x), -position[x]))
    claimed: set[fx.Node] = set()
    runs = []
    for start in starts:
        if start in claimed or segments[start].y in claimed:
            continue
        run: list[Segment] = []
        produced = descendants(start)
        x = start
        while x in segments:
            seg = segments[x]
            if claimed.intersection(seg.nodes):
                break
            why = _why_unsafe(seg, produced)
            if why is not None:
                notes.append(f"layer {seg.x.name} -> {seg.y.name} not rewritten: {why}")
                break
            run.append(seg)
            x = seg.y
        if run:
            claimed.update(n for seg in run for n in seg.nodes)
            claimed.add(start)
            runs.append(run)
    return runs


def _transition(before: list[Segment], after: list[Segment], order: dict[fx.Node, int],
                claimed: set[fx.Node]) -> Segment | None:
    """A layer with no residual path (K = 0) joining two runs: the closed piece of graph from the
    last state of ``before`` to the first state of ``after`` (a strided convolution with a projection
    shortcut between ResNet stages)."""
    x, y = before[-1].y, after[0].x
    if order[y] <= order[x]:
        return None
    nodes = interval(x, y, order)
    if not any(arg is x for n in nodes for arg in n.all_input_nodes) or claimed.intersection(nodes - {y}):
        return None
    if any(u not in nodes for u in x.users):
        return None
    if any(u not in nodes and not is_sink(u) for n in nodes if n is not y for u in n.users):
        return None
    seg = Segment(x=x, y=y, nodes=tuple(sorted(nodes, key=order.__getitem__)), residual=())
    return seg if _why_unsafe(seg, descendants(before[0].x) - set(seg.nodes)) is None else None


def _link_runs(runs: list[list[Segment]], graph: fx.Graph) -> list[list[Segment]]:
    """Join runs that follow each other through a closed non-residual layer into one chain."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    runs = sorted(runs, key=lambda run: order[run[0].x])
    claimed = {n for run in runs for seg in run for n in seg.nodes}
    linked = [runs[0]] if runs else []
    for run in runs[1:]:
        bridge = _transition(linked[-1], run, order, claimed)
        if bridge is None:
            linked.append(run)
        else:
            linked[-1] = linked[-1] + [bridge] + run
    return linked


def _build_chain(run: list[Segment]) -> Chain:
    layers: list[Layer] = []
    group_of: dict[str, int] = {}
    for i, seg in enumerate(run, start=1):
        seg = _absorb_input_prep(seg)
        externals = _externals(seg)
        signature = _signature(seg, externals)
        group = group_of.setdefault(signature, len(group_of))
        kind, formula = classify_residual(seg.x, seg.residual)
        layers.append(
            Layer(
                index=i,
                x=seg.x,
                y=seg.y,
                nodes=seg.nodes,
                residual=seg.residual,
                externals=externals,
                side_outputs=_side_outputs(seg),
                kind=kind,
                formula=formula,
                group=group,
                # the block's heavy ops and the residual path: mask plumbing that a parent module
                # put inside the layer does not drag the path up to the parent
                module_path=_common_module_path([n for n in seg.nodes if not is_light(n)] + list(seg.residual)),
                signature=signature,
            )
        )
    groups = []
    for g in range(len(group_of)):
        members = tuple(i for i, layer in enumerate(layers) if layer.group == g)
        first = layers[members[0]]
        stacked, broadcast = [], []
        for p in range(len(first.externals)):
            # A one-layer group stacks everything (size 1): "shared" needs two layers, and a value a
            # layer updates in place (BatchNorm's running stats) must be batched under vmap.
            same = len(members) > 1 and all(layers[m].externals[p] is first.externals[p] for m in members)
            (broadcast if same else stacked).append(p)
        groups.append(Group(g, members, tuple(stacked), tuple(broadcast), first.kind))
    taps = tuple(
        i
        for i in range(1, len(layers))
        if any(u not in set(layers[i].nodes) for u in layers[i - 1].y.users)
    )
    return Chain(layers=tuple(layers), groups=tuple(groups), taps=taps)


def find_residual_chains(graph: fx.Graph, *, min_layers: int = 2) -> Detection:
    """Find the chains of residual layers in an aten graph. Pure analysis: the graph is not changed.

    Example::

        >>> det = find_residual_chains(aten_gm.graph)         # doctest: +SKIP
        >>> [c.num_layers for c in det.chains], det.notes     # doctest: +SKIP
        ([4], ())
    """
    segments = find_residual_segments(graph)
    segments.update(packed_segments(graph))
    notes: list[str] = []
    chains = []
    for run in _link_runs(_runs(segments, notes), graph):
        if len(run) < min_layers:
            notes.append(
                f"run {run[0].x.name} -> {run[-1].y.name} has {len(run)} layer(s), fewer than "
                f"min_layers={min_layers}"
            )
            continue
        chains.append(_build_chain(run))
    if not segments:
        notes.append("no residual segment (x reaching h through pointwise ops and a block) found")
    for chain in chains:
        log.info("chain of %d layers in %d group(s) from %s", chain.num_layers, len(chain.groups), chain.h0.name)
    return Detection(chains=tuple(chains), notes=tuple(notes), num_segments=len(segments))
