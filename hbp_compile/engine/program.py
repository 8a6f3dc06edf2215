"""What the engine runs for one chain: per-group graphs and where their inputs come from.

``build_program`` turns a detected ``Chain`` into a ``ChainProgram``: per group a ``GroupProgram``
with its layer graph (the forward calls it once per layer), its split-layer graph (the backward
partitions and vmaps it) and the indices of its external inputs among the chain's side inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.fx as fx

from ..compile import GraphKernel, without_inductor_conv_bug
from ..detect.model import Chain, Layer, ResidualKind
from .iterate import IterationUsage
from .memory import BackwardMemory
from .layer_graphs import differentiable_side_outputs, layer_graph, random_nodes, split_layer_graph
from .layout import Plan, StateRuns, StateStacks, row_index
from .saved import SavedLayer, partition_split_layer


@dataclass(frozen=True)
class GroupProgram:
    """What the engine needs of one group: its two graphs and where its inputs come from."""

    layers: tuple[int, ...]  # 0-based layer positions; layer p maps state p to state p+1
    layer_fn: fx.GraphModule
    split_fn: fx.GraphModule
    kind: ResidualKind
    # For each external position: indices into the chain's flat side-input list, one per layer of
    # the group (stacked) or a single one (broadcast).
    stacked: tuple[tuple[int, tuple[int, ...]], ...]
    broadcast: tuple[tuple[int, int], ...]
    num_draws: int  # random ops per layer whose draws the forward records for the backward
    # per side output of a layer (a value leaving the block to a sink): can it carry a gradient?
    side_differentiable: tuple[bool, ...]
    inputs: Plan  # where the group's input states (p) live among the per-run cotangents
    outputs: Plan  # where its output states (p + 1) live
    backend: str = "eager"  # "inductor": the two functions below are compiled, once per group
    recompute: bool = True  # False: the forward keeps the block intermediates (engine/saved.py)
    chunk: int | None = None  # layers per batched VJP call (None: the whole group at once)
    _partitions: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def keeps_intermediates(self) -> bool:
        return not self.recompute and self.num_draws == 0

    def partition(self, x: torch.Tensor, externals: Sequence[torch.Tensor],
                  need: Sequence[bool] | None = None) -> SavedLayer:
        """The split layer ``(x_r, x_g, *externals, *draws)`` partitioned by aot_autograd (traced on one
        layer's values), per pattern of which inputs need a gradient (by default: which externals
        require grad)."""
        need = tuple(need) if need is not None else (True, True, *(e.requires_grad for e in externals))
        if need not in self._partitions:
            self._partitions[need] = partition_split_layer(self._for_backend(self.split_fn), [x, x, *externals], need,
                                                           self.side_differentiable, self.backend, self.chunk)
        return self._partitions[need]

    def partitions(self) -> tuple[SavedLayer, ...]:
        """The split layer's partitions built so far (one per pattern of inputs needing a gradient)."""
        return tuple(self._partitions.values())

    def in_dims(self) -> tuple[int | None, ...]:
        """vmap's in_dims for ``(x_r, x_g, *externals, *draws)``: stacked inputs 0, broadcast None."""
        dims: list[int | None] = [None] * (len(self.stacked) + len(self.broadcast))
        for p, _ in self.stacked:
            dims[p] = 0
        return (0, 0, *dims, *[0] * self.num_draws)

    def stack_inputs(self, stacks: StateStacks, sides: Sequence[torch.Tensor],
                     sides_need_grad: Sequence[bool], draws: Sequence[Sequence[torch.Tensor]]
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[bool], list[torch.Tensor]]:
        """The group's batched inputs, detached: its input states stacked (a view of the forward's
        stack where the layers are consecutive), each external (stacked over the layers, or the one
        broadcast tensor) with whether it needs a gradient, and the draws."""
        xs = stacks.rows(self.inputs).detach()
        n_ext = len(self.stacked) + len(self.broadcast)
        args: list[torch.Tensor] = [None] * n_ext  # type: ignore[list-item]
        need = [False] * n_ext
        for p, idx in self.stacked:
            args[p], need[p] = torch.stack([sides[i].detach() for i in idx]), any(sides_need_grad[i] for i in idx)
        for p, i in self.broadcast:
            args[p], need[p] = sides[i].detach(), sides_need_grad[i]
        replay = [torch.stack([draws[p][j] for p in self.layers]) for j in range(self.num_draws)]
        return xs, args, need, replay

    @cached_property
    def run_layer(self) -> Callable[..., object]:
        """The layer function the forward calls once per layer of the group."""
        return GraphKernel(self._for_backend(self.layer_fn), self.backend)

    def _for_backend(self, gm: fx.GraphModule) -> fx.GraphModule:
        return gm if self.backend == "eager" else without_inductor_conv_bug(gm)

    def unpack(self, out: object) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """A layer graph's result as (y, side outputs, draws)."""
        if not self.side_differentiable and not self.num_draws:
            return out, (), ()  # type: ignore[return-value]
        n_side = len(self.side_differentiable)
        return out[0], tuple(out[1: 1 + n_side]), tuple(out[1 + n_side:])  # type: ignore[index]


@dataclass(frozen=True)
class ChainProgram:
    """A chain compiled for execution: per-layer side inputs, per-group graphs, taps, k and gamma."""

    num_layers: int
    layer_group: tuple[int, ...]
    layer_sides: tuple[tuple[int, ...], ...]
    groups: tuple[GroupProgram, ...]
    taps: tuple[int, ...]
    k: int  # iterations, or at most this many when tol > 0
    gamma: float
    state_runs: StateRuns
    backend: str = "eager"
    tol: float = 0.0  # > 0: k="auto", stop when the relative change of w falls to tol (engine/iterate.py)
    usage: IterationUsage = field(default_factory=IterationUsage, compare=False, repr=False)
    memory: BackwardMemory = field(default_factory=BackwardMemory, compare=False, repr=False)  # the last backward's

    @cached_property
    def consecutive_runs(self) -> frozenset[int]:
        """Runs of states that some group reads two or more consecutive rows of: the forward keeps
        their states in one stack, so that those rows are a view (``StateStacks``)."""
        return frozenset(r for g in self.groups for r, offsets in g.inputs
                         if len(offsets) > 1 and isinstance(row_index(offsets), slice))

    def side_offsets(self) -> list[int]:
        """Index of each layer's first side output among the chain's flat side outputs."""
        offsets, start = [], 0
        for group in self.layer_group:
            offsets.append(start)
            start += len(self.groups[group].side_differentiable)
        return offsets

    def split_draws(self, flat: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
        """Per layer, the draws its random ops made (``flat`` is in layer order)."""
        out, start = [], 0
        for group in self.layer_group:
            count = self.groups[group].num_draws
            out.append(tuple(flat[start: start + count]))
            start += count
        return out


AUTO_CHUNK_STATE_BYTES = 2 ** 20


def automatic_chunk(layer: Layer, layers: int) -> int | None:
    """Layers per batched VJP call when the user chose none, for convolution blocks: as many as keep
    the call's input states within ``AUTO_CHUNK_STATE_BYTES`` (1 MiB). vmap folds the layers of a
    batched convolution into its batch, which gains nothing once one layer's batch keeps the kernel
    busy, while the call's temporaries grow with every layer (a ResNet's 0.5 MiB feature maps: 2 per
    call, at the same step time and 0.6 × the peak). Matmul blocks stay in one call: a transformer's
    batched matmuls lost 17 % of the step when chunked this way (GPT-2 small shape, 2 layers per call).

    >>> from hbp_compile.detect.model import Layer          # doctest: +SKIP
    >>> automatic_chunk(resnet_block, 8)                     # doctest: +SKIP
    2
    """
    value = layer.x.meta.get("val")
    if not isinstance(value, torch.Tensor) or not any(
            n.target is torch.ops.aten.convolution.default for n in layer.nodes):
        return None
    per_layer = value.numel() * value.element_size()
    chunk = max(1, AUTO_CHUNK_STATE_BYTES // max(per_layer, 1))
    return chunk if chunk < layers else None


def build_program(chain: Chain, side_nodes: Sequence[fx.Node], *, k: int, gamma: float,
                  backend: str = "eager", recompute: bool = True, tol: float = 0.0,
                  chunk: int | None = None) -> ChainProgram:
    """Index every layer's externals into ``side_nodes`` (the chain's flat side-input list)."""
    where = {node: i for i, node in enumerate(side_nodes)}
    state_runs = StateRuns.from_kinds(chain.kinds)
    groups = []
    for group in chain.groups:
        template = chain.layers[group.layers[0]]
        stacked = tuple(
            (p, tuple(where[chain.layers[m].externals[p]] for m in group.layers)) for p in group.stacked
        )
        broadcast = tuple((p, where[template.externals[p]]) for p in group.broadcast)
        layer_fn = layer_graph(template)
        groups.append(
            GroupProgram(
                layers=group.layers,
                layer_fn=layer_fn,
                split_fn=split_layer_graph(template),
                kind=group.kind,
                stacked=stacked,
                broadcast=broadcast,
                num_draws=len(random_nodes(template)),
                side_differentiable=differentiable_side_outputs(template, layer_fn),
                inputs=state_runs.plan(group.layers),
                outputs=state_runs.plan([p + 1 for p in group.layers]),
                backend=backend,
                recompute=recompute,
                chunk=chunk if chunk is not None else automatic_chunk(template, len(group.layers)),
            )
        )
    return ChainProgram(
        num_layers=chain.num_layers,
        layer_group=tuple(layer.group for layer in chain.layers),
        layer_sides=tuple(tuple(where[e] for e in layer.externals) for layer in chain.layers),
        groups=tuple(groups),
        taps=chain.taps,
        k=k,
        gamma=gamma,
        state_runs=state_runs,
        backend=backend,
        tol=tol,
    )
