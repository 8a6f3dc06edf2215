"""The ``HighwayChain`` autograd.Function: sequential forward, Highway-BP backward (DESIGN.md §5).

Backward, for a chain ``h_0 -> ... -> h_L`` with cotangents ``a_i`` on the states the outside reads:

1. ``w^0 = scan(a)`` along the residual Jacobians ``K`` (HIGHWAY_BP.md §3);
2. per group, one vmapped forward of the split layer over the group's stacked states and weights
   (built once), whose graph is reused by every VJP below;
3. ``min(k, L)`` iterations of: ``v_i = w_{i+1} J_{i+1}`` for all layers at once (one batched VJP per
   group), then ``w = scan(a + v)``;
4. one more batched VJP per group with ``w`` for the weights and side inputs; ``∂L/∂h_0 = w_0``.

After ``L`` iterations ``w`` is the exact gradient, so ``k >= L`` costs ``L`` iterations, not ``k``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.fx as fx
from torch.autograd.function import once_differentiable

from ..compile import GraphKernel, compile_function, without_inductor_conv_bug
from ..detect.model import Chain, ResidualKind
from .layer_graphs import differentiable_side_outputs, layer_graph, random_nodes, split_layer_graph
from .iterate import IterationUsage, run_iterations
from .layout import Plan, StateRuns, gather, scatter_add_
from .saved import SavedGroup, SavedLayer, partition_split_layer
from .scans import ResidualScan


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
    _partitions: dict = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def casts_dtypes(self) -> bool:
        """Does the block change dtypes (autocast)? aot_autograd's joint trace of such a split layer
        dropped the cast back in the backward (torch 2.13: a bfloat16 cotangent reached a float32
        layer norm's backward), so these groups take their VJPs through autograd instead."""
        return any(n.op == "call_function" and n.target is torch.ops.aten._to_copy.default
                   for n in self.split_fn.graph.nodes)

    @property
    def keeps_intermediates(self) -> bool:
        return not self.recompute and self.num_draws == 0 and not self.casts_dtypes

    def partition(self, x: torch.Tensor, externals: Sequence[torch.Tensor],
                  need: Sequence[bool] | None = None) -> SavedLayer:
        """The split layer ``(x_r, x_g, *externals, *draws)`` partitioned by aot_autograd (traced on one
        layer's values), per pattern of which inputs need a gradient (by default: which externals
        require grad)."""
        need = tuple(need) if need is not None else (True, True, *(e.requires_grad for e in externals))
        if need not in self._partitions:
            self._partitions[need] = partition_split_layer(self._for_backend(self.split_fn), [x, x, *externals], need,
                                                           self.side_differentiable, self.backend)
        return self._partitions[need]

    def in_dims(self) -> tuple[int | None, ...]:
        """vmap's in_dims for ``(x_r, x_g, *externals, *draws)``: stacked inputs 0, broadcast None."""
        dims: list[int | None] = [None] * (len(self.stacked) + len(self.broadcast))
        for p, _ in self.stacked:
            dims[p] = 0
        return (0, 0, *dims, *[0] * self.num_draws)

    @cached_property
    def run_layer(self) -> Callable[..., object]:
        """The layer function the forward calls once per layer of the group."""
        return GraphKernel(self._for_backend(self.layer_fn), self.backend)

    def _for_backend(self, gm: fx.GraphModule) -> fx.GraphModule:
        return gm if self.backend == "eager" else without_inductor_conv_bug(gm)

    def batched_split(self, split_fn: fx.GraphModule | None = None) -> Callable[..., object]:
        """``(xs_r, xs_g, *externals, *draws) -> ys``: the split layer vmapped over the group's layers."""
        return torch.func.vmap(split_fn or self.split_fn, in_dims=self.in_dims())

    @cached_property
    def run_batched(self) -> Callable[..., object]:
        """``batched_split`` compiled: its aot_autograd backward graph is the group's batched VJP."""
        return compile_function(self.batched_split(self._for_backend(self.split_fn)), self.backend,
                                "hbp_batched_split")

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

    @property
    def identity_residual(self) -> bool:
        return all(g.kind is ResidualKind.IDENTITY for g in self.groups)

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


def build_program(chain: Chain, side_nodes: Sequence[fx.Node], *, k: int, gamma: float,
                  backend: str = "eager", recompute: bool = True, tol: float = 0.0) -> ChainProgram:
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


class _BatchedGroup:
    """One group's vmapped split-layer forward, recorded once and reused by every VJP of a backward.

    Compiled, the forward runs twice: once with only the states requiring grad, for the k+1 block
    VJPs (a compiled backward computes the gradient of every input that requires one, so weights
    there would cost a weight gradient per iteration), and once with the weights, for their gradient.
    Eager autograd computes only what is asked for, so one forward serves both. The states-only
    forward runs on first use: at k = 0 on identity residuals nothing needs it, and it is skipped.
    """

    def __init__(self, prog: GroupProgram, states: Sequence[torch.Tensor], sides: Sequence[torch.Tensor],
                 sides_need_grad: Sequence[bool], draws: Sequence[Sequence[torch.Tensor]], *,
                 compiled: bool = True):
        self.prog = prog
        self.forward = prog.run_batched if compiled else prog.batched_split()
        self.separate_weights = compiled and prog.backend != "eager"
        # Compiled, no two inputs may share storage: aot_autograd treats aliased inputs that require
        # grad through a synthetic base, which gave wrong weight gradients (a 1x1 conv's weight
        # read through two views). Eager autograd needs no copies.
        fresh = (lambda t: t.detach().clone()) if self.separate_weights else (lambda t: t.detach())
        xs = torch.stack([states[p] for p in prog.layers])
        self.x_r = fresh(xs).requires_grad_(prog.kind not in (ResidualKind.IDENTITY, ResidualKind.ZERO))
        self.x_g = xs.detach().requires_grad_()
        n_ext = len(prog.stacked) + len(prog.broadcast)
        args: list[torch.Tensor | None] = [None] * n_ext
        self.grad_leaves: list[tuple[torch.Tensor, int | tuple[int, ...]]] = []
        for p, idx in prog.stacked:
            need = any(sides_need_grad[i] for i in idx)
            args[p] = torch.stack([sides[i].detach() for i in idx]).requires_grad_(need)
            if need:
                self.grad_leaves.append((args[p], idx))
        for p, i in prog.broadcast:
            args[p] = fresh(sides[i]).requires_grad_(sides_need_grad[i])
            if sides_need_grad[i]:
                self.grad_leaves.append((args[p], i))
        self.args = args
        self.replay = [torch.stack([draws[p][j] for p in prog.layers]) for j in range(prog.num_draws)]
        self._states_graph: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None
        self.side_pairs: list[tuple[int, torch.Tensor]] = []  # (side output, its cotangent)

    def _states_forward(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if self._states_graph is None:
            frozen = [a.detach() for a in self.args] if self.separate_weights else self.args
            self._states_graph = self._split(self.forward(self.x_r, self.x_g, *frozen, *self.replay))
        return self._states_graph

    @property
    def y(self) -> torch.Tensor:
        """The stacked layer outputs of the states-only forward (run on first use)."""
        return self._states_forward()[0]

    @property
    def side(self) -> tuple[torch.Tensor, ...]:
        return self._states_forward()[1]

    @property
    def like(self) -> torch.Tensor:
        """A stacked state: shape, dtype and device of the group's cotangents."""
        return self.x_g

    def _split(self, out: object) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        return (out[0], tuple(out[1:])) if self.prog.side_differentiable else (out, ())  # type: ignore[index]

    def side_output_cotangents(self, grads: Sequence[torch.Tensor | None], offsets: Sequence[int]) -> torch.Tensor | None:
        """Take the cotangents of the group's side outputs; return their gradient on the input states.

        A side output read by the loss (a returned KV cache) adds ``c · ∂s_p/∂h_p`` to the cotangent
        of its layer's input state, like a tap, and ``c · ∂s_p/∂θ_p`` to the weight gradients.
        """
        for j, differentiable in enumerate(self.prog.side_differentiable):
            given = [(i, grads[offsets[p] + j]) for i, p in enumerate(self.prog.layers)]
            if not differentiable or all(g is None for _, g in given):
                continue
            cot = torch.zeros_like(self.side[j])
            for i, g in given:
                if g is not None:
                    cot[i] = g
            self.side_pairs.append((j, cot))
        if not self.side_pairs:
            return None
        (dx,) = torch.autograd.grad([self.side[j] for j, _ in self.side_pairs], self.x_g,
                                    [c for _, c in self.side_pairs], retain_graph=True, allow_unused=True)
        return dx

    def residual_jacobian(self) -> torch.Tensor:
        """Diagonal of K for every layer of the group (r is elementwise in x, so a VJP with ones)."""
        if self.prog.kind is ResidualKind.IDENTITY:
            return torch.ones_like(self.like)
        if self.prog.kind is ResidualKind.ZERO:
            return torch.zeros_like(self.like)
        (k,) = torch.autograd.grad(self.y, self.x_r, torch.ones_like(self.y), retain_graph=True)
        return k

    def block_vjp(self, cotangent: torch.Tensor) -> torch.Tensor:
        (v,) = torch.autograd.grad(self.y, self.x_g, cotangent, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.x_g) if v is None else v

    def release_iteration_graph(self) -> None:
        """Compiled, drop the states-only forward once the iterations are done: its saved activations
        are freed before the weight forward saves its own, so the two never add up in the peak."""
        if self.separate_weights:
            self._states_graph = None

    def side_grads(self, cotangent: torch.Tensor) -> list[tuple[torch.Tensor, int | tuple[int, ...]]]:
        if not self.grad_leaves:
            return []
        if self.separate_weights:
            y, side = self._split(self.forward(self.x_r.detach(), self.x_g.detach(), *self.args, *self.replay))
        else:
            y, side = self._states_forward()
        outputs = [y] + [side[j] for j, _ in self.side_pairs]
        cotangents = [cotangent] + [c for _, c in self.side_pairs]
        grads = torch.autograd.grad(outputs, [leaf for leaf, _ in self.grad_leaves], cotangents, allow_unused=True)
        return [(g, where) for g, (_, where) in zip(grads, self.grad_leaves) if g is not None]


def dry_run_backward(program: ChainProgram, states: Sequence[torch.Tensor], sides: Sequence[torch.Tensor],
                     sides_need_grad: Sequence[bool], draws: Sequence[Sequence[torch.Tensor]]) -> None:
    """Build every group's batched graph and take one VJP of each kind (for fake tensors at compile time)."""
    with torch.enable_grad():
        for prog in program.groups:
            b = _BatchedGroup(prog, states, sides, sides_need_grad, draws, compiled=False)
            b.residual_jacobian()
            b.block_vjp(torch.ones_like(b.y))
            b.side_grads(torch.ones_like(b.y))


class HighwayChain(torch.autograd.Function):
    """``(h_0, *sides) -> (h_L, *taps)`` with the Highway-BP backward of the module docstring."""

    @staticmethod
    def forward(ctx, program: ChainProgram, h0: torch.Tensor, *sides: torch.Tensor):  # type: ignore[override]
        states = [h0]
        draws: list[torch.Tensor] = []  # what each layer's random ops drew, in layer order
        side_outputs: list[torch.Tensor] = []
        frozen: list[torch.Tensor] = []
        kept: list[tuple[torch.Tensor, ...]] = []  # per layer of a group that keeps its intermediates
        partitions: dict[int, SavedLayer] = {}
        for group, side_idx in zip(program.layer_group, program.layer_sides):
            prog = program.groups[group]
            externals = [sides[i] for i in side_idx]
            if prog.keeps_intermediates:
                with torch.enable_grad():  # requires_grad of the externals decides what is saved
                    part = partitions[group] = prog.partition(states[-1], externals)
                out = part.run_forward()(states[-1], states[-1], *externals)
                kept.append(tuple(out[part.num_outputs:]))
                out = out[0] if part.num_outputs == 1 else tuple(out[: part.num_outputs])
            else:
                out = prog.run_layer(states[-1], *externals)
            y, side, drawn = prog.unpack(out)
            states.append(y)
            draws.extend(drawn)
            side_outputs.extend(side)
            frozen.extend(v for v, d in zip(side, prog.side_differentiable) if not d)
        ctx.program = program
        ctx.num_sides = len(sides)
        ctx.num_draws = len(draws)
        ctx.kept_counts = [len(values) for values in kept]
        ctx.partitions = partitions
        ctx.save_for_backward(*states, *sides, *draws, *(v for values in kept for v in values))
        ctx.mark_non_differentiable(*frozen)
        return (states[-1], *(states[t] for t in program.taps), *side_outputs)

    @staticmethod
    @once_differentiable  # a second derivative of the estimate would be silently wrong: refuse it
    def backward(ctx, grad_out: torch.Tensor | None, *grad_rest: torch.Tensor | None):  # type: ignore[override]
        program: ChainProgram = ctx.program
        saved = ctx.saved_tensors
        n = program.num_layers
        states, sides = saved[: n + 1], saved[n + 1: n + 1 + ctx.num_sides]
        first_kept = n + 1 + ctx.num_sides + ctx.num_draws
        draws = program.split_draws(saved[n + 1 + ctx.num_sides: first_kept])
        kept = _split_counts(saved[first_kept:], ctx.kept_counts)
        sides_need_grad = ctx.needs_input_grad[2:]
        runs = program.state_runs
        a = runs.zeros(states)
        for state, g in [(n, grad_out), *zip(program.taps, grad_rest)]:
            if g is not None:
                r, offset = runs.locate(state)
                a[r][offset] += g
        grad_side_outputs = grad_rest[len(program.taps):]
        with torch.enable_grad():
            batched = [_group_backward(program, gi, states, sides, sides_need_grad, draws, kept, ctx.partitions)
                       for gi in range(len(program.groups))]
            offsets = program.side_offsets()
            for b in batched:
                dx = b.side_output_cotangents(grad_side_outputs, offsets)
                if dx is not None:
                    scatter_add_(a, b.prog.inputs, dx)
            w = _highway_iterations(program, batched, a)
            for b in batched:
                b.release_iteration_graph()
            grads: list[torch.Tensor | None] = [None] * len(sides)
            for b in batched:
                for g, where in b.side_grads(gather(w, b.prog.outputs)):
                    if isinstance(where, tuple):
                        # one copy into the parameters' own layout for the whole stack: AccumulateGrad
                        # then takes each layer's slice as it is instead of cloning it
                        g = _like_sources(g, [sides[i] for i in where])
                    for i, gi in (zip(where, g.unbind(0)) if isinstance(where, tuple) else [(where, g)]):
                        grads[i] = gi if grads[i] is None else grads[i] + gi
        return (None, w[0][0] if ctx.needs_input_grad[1] else None, *grads)


def _like_sources(g: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """``g`` (stacked per-layer gradients) laid out so that each slice has its source's strides."""
    first = sources[0]
    if first.is_contiguous() and not g.is_contiguous():
        return g.contiguous()
    return g


def _split_counts(flat: Sequence[torch.Tensor], counts: Sequence[int]) -> list[tuple[torch.Tensor, ...]]:
    out, start = [], 0
    for count in counts:
        out.append(tuple(flat[start: start + count]))
        start += count
    return out


def _group_backward(program: ChainProgram, group: int, states: Sequence[torch.Tensor],
                    sides: Sequence[torch.Tensor], sides_need_grad: Sequence[bool],
                    draws: Sequence[Sequence[torch.Tensor]], kept: Sequence[tuple[torch.Tensor, ...]],
                    partitions: dict[int, SavedLayer]) -> SavedGroup | _BatchedGroup:
    """The group's batched backward: aot_autograd's backward graph of the split layer, vmapped over the
    layers, fed the values its forward saves, kept by the chain's forward (``recompute=False``) or
    recomputed here by one batched run of the partitioned forward. Every VJP is then a direct call of
    the compiled backward graph: no autograd engine, no second forward for the weights."""
    prog = program.groups[group]
    first = prog.layers[0]
    like = states[first].new_empty((len(prog.layers), *states[first].shape))
    if group in partitions:
        # kept values are listed per layer of the groups that keep them, in layer order
        keeping = [p for p, g in enumerate(program.layer_group) if program.groups[g].keeps_intermediates]
        per_layer = [kept[keeping.index(p)] for p in prog.layers]
        values = [torch.stack([v.detach() for v in column]) for column in zip(*per_layer)]
        return SavedGroup(prog, partitions[group], values, sides_need_grad, like)
    if prog.casts_dtypes:
        return _BatchedGroup(prog, states, sides, sides_need_grad, draws)
    xs = torch.stack([states[p].detach() for p in prog.layers])
    n_ext = len(prog.stacked) + len(prog.broadcast)
    args: list[torch.Tensor | None] = [None] * n_ext
    example: list[torch.Tensor | None] = [None] * n_ext
    need: list[bool] = [False] * n_ext
    for p, idx in prog.stacked:
        args[p] = torch.stack([sides[i].detach() for i in idx])
        example[p], need[p] = sides[idx[0]], any(sides_need_grad[i] for i in idx)
    for p, i in prog.broadcast:
        args[p] = example[p] = sides[i].detach()
        need[p] = sides_need_grad[i]
    replay = [torch.stack([draws[p][j] for p in prog.layers]) for j in range(prog.num_draws)]
    part = prog.partition(states[first], [*example, *(draws[first][j] for j in range(prog.num_draws))],
                          need=(True, True, *need, *[False] * prog.num_draws))
    out = part.batched_forward(prog.in_dims())(xs, xs, *args, *replay)
    return SavedGroup(prog, part, out[part.num_outputs:], sides_need_grad, like)


def _run_scans(program: ChainProgram, batched: Sequence[_BatchedGroup]) -> list[ResidualScan]:
    """One scan per run of states, built once per backward: K = I (a cumulative sum) where every layer
    of the run has an identity residual, else the diagonal K of each layer at its input state's offset."""
    runs, gamma = program.state_runs.runs, program.gamma
    k_diag: dict[int, torch.Tensor] = {}
    for b in batched:
        if b.prog.kind in (ResidualKind.IDENTITY, ResidualKind.ZERO):
            continue  # a ZERO layer ends its run: nothing of it enters a scan
        k, start = b.residual_jacobian().detach(), 0
        for r, offsets in b.prog.inputs:
            first, last = runs[r]
            if r not in k_diag:  # identity layers of a mixed run keep K = 1
                k_diag[r] = k.new_ones((last - first, *k.shape[1:]))
            k_diag[r][list(offsets)] = k[start: start + len(offsets)]
            start += len(offsets)
    return [
        ResidualScan((1.0 - gamma) * k_diag[r] if r in k_diag else None if gamma == 0 else 1.0 - gamma,
                     last - first + 1)
        for r, (first, last) in enumerate(runs)
    ]


def _highway_iterations(program: ChainProgram, batched: Sequence[_BatchedGroup], a: list) -> list:
    """``w^k`` for every state, one stacked tensor per run (HIGHWAY_BP.md §3-4)."""
    gamma = program.gamma
    scans = _run_scans(program, batched)
    residual_k = {id(b): b.residual_jacobian().detach() for b in batched} if gamma else {}
    a = [ar.contiguous() for ar in a]
    v = [torch.empty_like(ar) for ar in a]
    # iterate j+1 is written while iterate j is read: two buffers per run, taken in turns
    buffers = [[torch.empty_like(ar), torch.empty_like(ar)] for ar in a]

    def step(w: list) -> list:
        for vr in v:
            vr.zero_()
        for b in batched:
            cot = gather(w, b.prog.outputs)
            vb = b.block_vjp(cot)
            if gamma and b.prog.kind is not ResidualKind.ZERO:
                # γ-split: the γ·K part of the residual moves into the block (HIGHWAY_BP.md §1).
                vb = vb + gamma * residual_k[id(b)] * cot
            scatter_add_(v, b.prog.inputs, vb)
        return [scan(ar, vr, out=pair[0] if pair[0] is not wr else pair[1])
                for scan, ar, vr, wr, pair in zip(scans, a, v, w, buffers)]

    w, used = run_iterations([scan(ar) for scan, ar in zip(scans, a)], step,
                             max_iterations=min(program.k, program.num_layers), tol=program.tol)
    program.usage.record(used)
    return w


class ChainModule(torch.nn.Module):
    """The call site the rewrite puts in the aten graph: ``(h_0, *sides) -> (h_L, *taps)``."""

    def __init__(self, program: ChainProgram):
        super().__init__()
        self.program = program
        for i, g in enumerate(program.groups):
            self.add_module(f"group{i}_layer", g.layer_fn)
            self.add_module(f"group{i}_split", g.split_fn)

    @torch.compiler.disable  # a graph break: Inductor compiles the code around the chain, not through it
    def forward(self, h0: torch.Tensor, *sides: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return HighwayChain.apply(self.program, h0, *sides)

    def extra_repr(self) -> str:
        p = self.program
        k = f"auto (tol={p.tol}, at most {p.k})" if p.tol else p.k
        return f"layers={p.num_layers}, groups={len(p.groups)}, taps={list(p.taps)}, k={k}, gamma={p.gamma}"
