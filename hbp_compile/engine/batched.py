"""The batched split layer under autograd: ``vmap(split)`` and ``torch.autograd.grad``.

The engine's own backward calls aot_autograd's partitioned graphs directly (``engine/saved.py``);
this path serves what those cannot: blocks that cast dtypes (their joint trace lost a cast).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..detect.model import ResidualKind
from .layout import StateStacks
from .program import GroupProgram


class BatchedGroup:
    """One group's vmapped split-layer forward, recorded once and reused by every VJP of a backward.

    Compiled, the forward runs twice: once with only the states requiring grad, for the k+1 block
    VJPs (a compiled backward computes the gradient of every input that requires one, so weights
    there would cost a weight gradient per iteration), and once with the weights, for their gradient.
    Eager autograd computes only what is asked for, so one forward serves both. The states-only
    forward runs on first use: at k = 0 on identity residuals nothing needs it, and it is skipped.
    """

    def __init__(self, prog: GroupProgram, stacks: StateStacks, sides: Sequence[torch.Tensor],
                 sides_need_grad: Sequence[bool], draws: Sequence[Sequence[torch.Tensor]], *,
                 compiled: bool = True):
        self.prog = prog
        self.forward = prog.run_batched if compiled else prog.batched_split()
        self.separate_weights = compiled and prog.backend != "eager"
        # Compiled, no two inputs may share storage: aot_autograd treats aliased inputs that require
        # grad through a synthetic base, which gave wrong weight gradients (a 1x1 conv's weight
        # read through two views). Eager autograd needs no copies.
        fresh = (lambda t: t.detach().clone()) if self.separate_weights else (lambda t: t.detach())
        xs, args, need, self.replay = prog.stack_inputs(stacks, sides, sides_need_grad, draws)
        self.x_r = fresh(xs).requires_grad_(prog.kind not in (ResidualKind.IDENTITY, ResidualKind.ZERO))
        self.x_g = xs.detach().requires_grad_()
        self.grad_leaves: list[tuple[torch.Tensor, int | tuple[int, ...]]] = []
        for p, idx in prog.stacked:
            args[p].requires_grad_(need[p])  # a stack of its own: no copy needed
            if need[p]:
                self.grad_leaves.append((args[p], idx))
        for p, i in prog.broadcast:
            args[p] = fresh(args[p]).requires_grad_(need[p])
            if need[p]:
                self.grad_leaves.append((args[p], i))
        self.args = args
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

    def held_bytes(self, sides) -> tuple[int, int]:
        """Unknown here: the values live in an autograd graph (counted as neither)."""
        return 0, 0

    def release_iteration_graph(self) -> None:
        """Compiled, drop the states-only forward once the iterations are done: its saved activations
        are freed before the weight forward saves its own, so the two never add up in the peak."""
        if self.separate_weights:
            self._states_graph = None

    def side_grads(self, cotangent: torch.Tensor, sides: Sequence[torch.Tensor] = ()
                   ) -> list[tuple[torch.Tensor, int | tuple[int, ...]]]:
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
