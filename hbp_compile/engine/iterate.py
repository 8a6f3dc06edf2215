"""The Highway-BP iteration loop, shared by the chain engine and the recurrence op.

``w^{j+1} = step(w^j)`` for at most ``max_iterations`` iterations. ``tol > 0`` (``k="auto"``) stops
as soon as the relative change ``‖w^{j+1} − w^j‖ / ‖w^j‖`` falls to ``tol`` or below; ``tol = 0`` runs
exactly ``max_iterations`` (a fixed ``k``). The callers cap ``max_iterations`` at the depth L: after L
iterations ``w`` is exact and further ones change nothing.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

log = logging.getLogger("hbp_compile")


def relative_change(new: Sequence[torch.Tensor], old: Sequence[torch.Tensor]) -> float:
    """``‖new − old‖ / ‖old‖`` over all tensors together (Frobenius norms; 0/0 counts as converged).

    >>> relative_change([torch.tensor([1., 1.])], [torch.tensor([1., 0.])])
    1.0
    """
    diff = torch.sqrt(sum((n - o).double().pow(2).sum() for n, o in zip(new, old)))
    base = torch.sqrt(sum(o.double().pow(2).sum() for o in old))
    diff, base = float(diff), float(base)
    return 0.0 if diff == 0 else diff / base if base > 0 else float("inf")


def refuse_double_backward(where: str) -> None:
    """Raise when a Highway-BP backward runs under ``create_graph=True`` (grad mode on in backward):
    the estimate's derivative is not a second derivative of the model, so it must never be returned."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"hbp_compile: double backward (create_graph=True) through a Highway-BP {where} is not "
            "supported: its backward is an estimate, and its derivative is not a second derivative of "
            "the model. Use the original model (e.g. model._orig_mod) for higher-order gradients.")


@dataclass
class IterationUsage:
    """How many iterations the backward passes of one chain or recurrence ran: ``last`` and a
    histogram (``counts[k]`` backward passes ran k iterations)."""

    last: int | None = None
    counts: collections.Counter = field(default_factory=collections.Counter)

    def reset(self) -> None:
        self.last = None
        self.counts.clear()

    def record(self, used: int) -> None:
        self.last = used
        self.counts[used] += 1


def run_iterations(w: list[torch.Tensor], step: Callable[[list[torch.Tensor]], list[torch.Tensor]], *,
                   max_iterations: int, tol: float, what: str = "chain") -> tuple[list[torch.Tensor], int]:
    """``(w^j, j)``: the iterate where the loop stopped and how many iterations it ran.

    >>> towards_one = lambda w: [(w[0] + 1) / 2]     # 0, .5, .75, .875, .9375: changes inf, .5, .17, .07
    >>> run_iterations([torch.tensor([0.])], towards_one, max_iterations=3, tol=0.0)[1]
    3
    >>> run_iterations([torch.tensor([0.])], towards_one, max_iterations=50, tol=0.1)[1]
    4
    """
    used = 0
    for used in range(1, max_iterations + 1):
        new = step(w)
        converged = tol > 0 and relative_change(new, w) <= tol
        w = new
        if converged:
            break
    if tol > 0:
        log.debug("%s: %d Highway-BP iteration(s) (auto, tol=%g, at most %d)", what, used, tol, max_iterations)
    return w, used
