"""The ``HighwayChain`` autograd.Function: sequential forward, Highway-BP backward (DESIGN.md §5).

Backward, for a chain ``h_0 -> ... -> h_L`` with cotangents ``a_i`` on the states the outside reads:

1. per group, the values every VJP of the backward reads (activations, statistics, gates: the
   cotangent-independent part), from one batched run of aot_autograd's partitioned saving forward
   (``recompute=True``) or kept by the forward (``recompute=False``) — ``engine/saved.py``;
2. ``w^0 = scan(a)`` along the residual Jacobians ``K`` (HIGHWAY_BP.md §3, ``engine/scans.py``);
3. ``min(k, L)`` iterations of: ``v_i = w_{i+1} J_{i+1}`` for all layers at once (one call of each
   group's vmapped backward graph, linear in ``w``), then ``w = scan(a, v)``;
4. one more call per group for the weights and side inputs; ``∂L/∂h_0 = w_0``.

After ``L`` iterations ``w`` is exact, so ``k >= L`` costs ``L`` iterations, not ``k``. The programs
it runs are built in ``engine/program.py``; blocks that cast dtypes (autocast, bfloat16 weights with
float32 norms) take the same path, their casts explicit in the partitioned graphs.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from ..compile import without_autocast
from ..detect.model import ResidualKind
from .iterate import refuse_double_backward, run_iterations
from .layout import CotangentRows, StateStacks, gather, row_index
from .pipelined import pipelined_runs, pipelined_step
from .memory import nbytes
from .program import ChainProgram
from .saved import SavedGroup, SavedLayer
from .scans import ResidualScan, mask_if_binary


@dataclass(frozen=True)
class SavedTensors:
    """What the chain's forward saves for its backward, packed into ``ctx.save_for_backward``'s flat
    list and unpacked by name: the state stacks' tensors, the side inputs, the random draws, and the
    intermediates of each layer whose group keeps them (``recompute=False``)."""

    held: Sequence[torch.Tensor]
    sides: Sequence[torch.Tensor]
    draws: Sequence[torch.Tensor]
    kept: dict[int, tuple[torch.Tensor, ...]]  # layer index -> its saved intermediates

    def flat(self) -> tuple[list[torch.Tensor], tuple]:
        """The tensors to save, and the counts ``unflatten`` needs to find them again: of the held
        tensors, the sides and the draws, then (layer, how many) of each layer's kept values."""
        counts = (len(self.held), len(self.sides), len(self.draws), tuple((p, len(v)) for p, v in self.kept.items()))
        return [*self.held, *self.sides, *self.draws, *(v for values in self.kept.values() for v in values)], counts

    @staticmethod
    def unflatten(saved: Sequence[torch.Tensor], counts: tuple) -> SavedTensors:
        *sizes, kept_sizes = counts
        parts, start = [], 0
        for size in (*sizes, *(n for _, n in kept_sizes)):
            parts.append(tuple(saved[start: start + size]))
            start += size
        held, sides, draws, *kept = parts
        return SavedTensors(held, sides, draws, {p: values for (p, _), values in zip(kept_sizes, kept)})


class HighwayChain(torch.autograd.Function):
    """``(h_0, *sides) -> (h_L, *taps)`` with the Highway-BP backward of the module docstring."""

    @staticmethod
    def forward(ctx, program: ChainProgram, h0: torch.Tensor, *sides: torch.Tensor):  # type: ignore[override]
        stacks = StateStacks(program.state_runs, program.num_layers, program.consecutive_runs)
        x = stacks.append(0, h0)
        draws: list[torch.Tensor] = []  # what each layer's random ops drew, in layer order
        side_outputs: list[torch.Tensor] = []
        frozen: list[torch.Tensor] = []
        kept: dict[int, tuple[torch.Tensor, ...]] = {}  # per layer of a group that keeps its intermediates
        partitions: dict[int, SavedLayer] = {}
        for p, (group, side_idx) in enumerate(zip(program.layer_group, program.layer_sides)):
            prog = program.groups[group]
            externals = [sides[i] for i in side_idx]
            if prog.keeps_intermediates:
                with torch.enable_grad():  # requires_grad of the externals decides what is saved
                    part = partitions[group] = prog.partition(x, externals)
                out = part.run_forward()(x, x, *externals)
                values = out[part.num_outputs:]
                out = out[0] if part.num_outputs == 1 else tuple(out[: part.num_outputs])
            else:
                out = prog.run_layer(x, *externals)
            y, side, drawn = prog.unpack(out)
            x = stacks.append(p + 1, y)
            if prog.keeps_intermediates:  # a saved output (a ReLU's) is read from the stack: no second copy
                kept[p] = tuple(x if v is y else v for v in values)
            draws.extend(drawn)
            side_outputs.extend(side)
            frozen.extend(v for v, d in zip(side, prog.side_differentiable) if not d)
        ctx.program = program
        ctx.partitions = partitions
        held, ctx.state_layout = stacks.saved()
        tensors, ctx.saved_counts = SavedTensors(held, sides, draws, kept).flat()
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(*frozen)
        # taps may be rows of a saved stack: returned detached, they are not views to autograd (a view
        # output could not be modified in place), while an in-place change still bumps the stack's
        # version and is reported by the backward, as for any saved output
        return (stacks.last, *(stacks.state(t).detach() if t < program.num_layers else stacks.last
                               for t in program.taps), *side_outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        refuse_double_backward("chain")  # before once_differentiable, which would hide create_graph
        with without_autocast():  # a backward taken under autocast: the graphs carry their own casts
            return HighwayChain._backward(ctx, *grads)

    @staticmethod
    @once_differentiable
    def _backward(ctx, grad_out: torch.Tensor | None, *grad_rest: torch.Tensor | None):
        program: ChainProgram = ctx.program
        saved = SavedTensors.unflatten(ctx.saved_tensors, ctx.saved_counts)
        n = program.num_layers
        stacks = StateStacks.restore(program.state_runs, n, saved.held, ctx.state_layout)
        states, sides, kept = stacks.states(), saved.sides, saved.kept
        draws = program.split_draws(saved.draws)
        sides_need_grad = ctx.needs_input_grad[2:]
        runs = program.state_runs
        a = CotangentRows(runs)
        for state, g in [(n, grad_out), *zip(program.taps, grad_rest)]:
            if g is not None:
                a.add(state, g)
        grad_side_outputs = grad_rest[len(program.taps):]
        with torch.enable_grad():
            batched = [_group_backward(program, gi, stacks, sides, sides_need_grad, draws, kept, ctx.partitions)
                       for gi in range(len(program.groups))]
            offsets = program.side_offsets()
            for b in batched:
                dx = b.side_output_cotangents(grad_side_outputs, offsets)
                if dx is not None:
                    a.scatter_add(b.prog.inputs, dx)
            memory = program.memory  # the program is frozen; its ledger is refilled by each backward
            memory.clear()
            memory.states = nbytes(states)
            for b in batched:
                activations, weights = b.held_bytes(sides)
                memory.activations += activations
                memory.weights += weights
            w = _highway_iterations(program, batched, a, states)
            grads: list[torch.Tensor | None] = [None] * len(sides)
            for b in batched:
                for g, where in b.side_grads(gather(w, b.prog.outputs), sides):
                    memory.gradients += nbytes([g])
                    if isinstance(where, tuple):
                        # one copy into the parameters' own layout for the whole stack: AccumulateGrad
                        # then takes each layer's slice as it is instead of cloning it
                        g = _like_source(g, sides[where[0]])
                    for i, gi in (zip(where, g.unbind(0)) if isinstance(where, tuple) else [(where, g)]):
                        grads[i] = gi if grads[i] is None else grads[i] + gi
        return (None, w[0][0] if ctx.needs_input_grad[1] else None, *grads)


def _like_source(g: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``g`` (stacked per-layer gradients) laid out so that each slice is contiguous where the
    parameters (``source``, one of them) are."""
    return g.contiguous() if source.is_contiguous() else g


def _group_backward(program: ChainProgram, group: int, stacks: StateStacks,
                    sides: Sequence[torch.Tensor], sides_need_grad: Sequence[bool],
                    draws: Sequence[Sequence[torch.Tensor]], kept: dict[int, tuple[torch.Tensor, ...]],
                    partitions: dict[int, SavedLayer]) -> SavedGroup:
    """The group's batched backward: aot_autograd's backward graph of the split layer, vmapped over the
    layers, fed the values its forward saves, kept by the chain's forward (``recompute=False``) or
    recomputed here by one batched run of the partitioned forward. Every VJP is then a direct call of
    the compiled backward graph: no autograd engine, no second forward for the weights."""
    prog = program.groups[group]
    first = stacks.state(prog.layers[0])
    like = first.new_empty((len(prog.layers), *first.shape))
    if group in partitions:
        per_layer = [kept[p] for p in prog.layers]
        values = [torch.stack([v.detach() for v in column]) for column in zip(*per_layer)]
        return SavedGroup(prog, partitions[group], values, sides_need_grad, like)
    xs, args, need, replay = prog.stack_inputs(stacks, sides, sides_need_grad, draws)
    example = list(args)  # one layer's values: the partition is traced on them
    for p, idx in prog.stacked:
        example[p] = sides[idx[0]]
    part = prog.partition(first, [*example, *(draws[prog.layers[0]][j] for j in range(prog.num_draws))],
                          need=(True, True, *need, *[False] * prog.num_draws))
    out = part.batched_forward(prog.in_dims())(xs, xs, *args, *replay)
    values = out[part.num_outputs:]
    # saved values that are the stacked copy of per-layer parameters: the weight gradients' call can
    # restack them a chunk at a time from the parameters instead (SavedGroup.side_grads)
    restackable = {j: idx for p, idx in prog.stacked for j, v in enumerate(values) if v is args[p]}
    return SavedGroup(prog, part, values, sides_need_grad, like, restackable)


def _run_scans(program: ChainProgram, batched: Sequence[SavedGroup]) -> list[ResidualScan]:
    """One scan per run of states, built once per backward: K = I (a cumulative sum) where every layer
    of the run has an identity residual, else the diagonal K of each layer at its input state's offset.

    K is the size of a state stack, so it is built with no copy to spare: a group whose layers fill
    a run gives its K rows as they are, γ scales them in place, and a K of zeros and ones (a ReLU
    residual) is kept as a bool mask (``mask_if_binary``)."""
    runs, gamma = program.state_runs.runs, program.gamma
    k_diag: dict[int, torch.Tensor] = {}
    for b in batched:
        if b.prog.kind in (ResidualKind.IDENTITY, ResidualKind.ZERO):
            continue  # a ZERO layer ends its run: nothing of it enters a scan
        k, start = b.residual_jacobian().detach(), 0
        for r, offsets in b.prog.inputs:
            first, last = runs[r]
            rows = k[start: start + len(offsets)]
            start += len(offsets)
            if r not in k_diag and offsets == tuple(range(last - first)):
                k_diag[r] = rows  # the whole run: residual_jacobian's own tensor, no copy
                continue
            if r not in k_diag:  # identity layers of a mixed run keep K = 1
                k_diag[r] = k.new_ones((last - first, *k.shape[1:]))
            k_diag[r][row_index(offsets)] = rows
        del k
    for r in k_diag:
        k_diag[r] = k_diag[r].mul_(1.0 - gamma) if gamma else mask_if_binary(k_diag[r])
    return [
        ResidualScan(k_diag[r] if r in k_diag else None if gamma == 0 else 1.0 - gamma, last - first + 1)
        for r, (first, last) in enumerate(runs)
    ]


def _highway_iterations(program: ChainProgram, batched: Sequence[SavedGroup], a: CotangentRows,
                        states: Sequence[torch.Tensor]) -> list:
    """``w^k`` for every state, one stacked tensor per run (HIGHWAY_BP.md §3-4). ``a`` is added into
    each iteration's buffer before its scan (the scan's ``c``)."""
    gamma = program.gamma
    scans = _run_scans(program, batched)
    residual_k = {id(b): b.residual_jacobian().detach() for b in batched} if gamma else {}
    # A fixed k needs one buffer per run: every group's block VJPs v are taken from w^j first, then
    # gathered into w^j's own buffer and scanned there in place into w^{j+1} (the scan reads each row
    # of v before it writes it). k="auto" compares w^{j+1} with w^j, so it keeps two buffers, taken in
    # turns. No separate v, and w^0 starts in a buffer.
    in_place = program.tol == 0
    buffers = [[states[first].new_empty((last - first + 1, *states[first].shape)) for _ in range(1 if in_place else 2)]
               for first, last in program.state_runs.runs]

    def group_vjp(b, cot: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        # a chunk of layers only in pipelined runs
        vb = b.block_vjp(cot, layers)
        if gamma and b.prog.kind is not ResidualKind.ZERO:
            # γ-split: the γ·K part of the residual moves into the block (HIGHWAY_BP.md §1).
            vb = vb + gamma * residual_k[id(b)][layers] * cot
        return vb

    def block_vjp(b, w: list) -> torch.Tensor:
        return group_vjp(b, gather(w, b.prog.outputs))

    # runs one chunked group fills: scanned chunk by chunk as its VJPs come (engine/pipelined.py)
    pipelined = pipelined_runs(program.state_runs.runs, batched) if in_place else {}
    fills = {id(b) for b in pipelined.values()}
    others = [b for b in batched if id(b) not in fills]
    whole = [r for r in range(len(buffers)) if r not in pipelined]

    def step(w: list) -> list:
        # in place: every VJP before w^j's buffer is overwritten; with two buffers one group's at a time
        pending = [block_vjp(b, w) for b in others] if in_place else None
        v = w if in_place else [pair[0] if pair[0] is not wr else pair[1] for wr, pair in zip(w, buffers)]
        for r in whole:
            v[r].zero_()
            a.add_rows(v[r], r, 0, v[r].shape[0])
        into_pipelined: list = []  # pieces of other groups' VJPs that land in pipelined runs
        for i, b in enumerate(others):
            vb = pending[i] if pending is not None else block_vjp(b, w)
            start = 0
            for r, offsets in b.prog.inputs:
                rows = vb[start: start + len(offsets)]
                start += len(offsets)
                if r in pipelined:
                    into_pipelined.append((r, (b, offsets, rows)))
                else:
                    v[r][row_index(offsets)] += rows
        for r, fill in pipelined.items():
            pipelined_step(r, v[r], fill, batched, scans[r], a, [c for q, c in into_pipelined if q == r], group_vjp)
        for r in whole:
            v[r] = scans[r](v[r], out=v[r])
        return v

    first = [pair[-1].zero_() for pair in buffers]
    a.add_into(first)
    w, used = run_iterations([scan(vr, out=vr) for scan, vr in zip(scans, first)], step,
                             max_iterations=min(program.k, program.num_layers), tol=program.tol)
    program.usage.record(used)
    program.memory.iteration = nbytes([*a.held(), *(t for pair in buffers for t in pair), *residual_k.values(),
                                       *(t for scan in scans for t in scan.held())])
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
