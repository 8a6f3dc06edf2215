"""The accumulation along the residual path: ``w_i = c_i + w_{i+1} K_{i+1}``, ``w_L = c_L``.

With ``K = I`` this is a reversed cumulative sum. With a scalar or diagonal ``K`` it is the linear
recurrence that Hillis–Steele scans in ⌈log2(L+1)⌉ steps of O(L) work with the associative operator
``(u, P) ∘ (u', P') = (u + u'·P, P'·P)`` (HIGHWAY_BP.md §4).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def reverse_cumsum(c: torch.Tensor) -> torch.Tensor:
    """``w_i = Σ_{j ≥ i} c_j`` along dim 0.

    >>> reverse_cumsum(torch.tensor([1., 2., 3.]))
    tensor([6., 5., 3.])
    """
    return c.flip(0).cumsum(0).flip(0)


def linear_scan(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``y_0 = b_0`` and ``y_t = b_t + a_t · y_{t-1}`` along dim 0, by Hillis–Steele (``a_0`` is unused).

    >>> linear_scan(torch.tensor([1., 1., 1.]), torch.tensor([0., 2., 3.]))
    tensor([ 1.,  3., 10.])
    """
    n = b.shape[0]
    offset = 1
    while offset < n:
        b = torch.cat([b[:offset], b[offset:] + a[offset:] * b[:-offset]], dim=0)
        a = torch.cat([a[:offset], a[offset:] * a[:-offset]], dim=0)
        offset *= 2
    return b


class ReverseLinearScan:
    """``w_i = c_i + w_{i+1} · k_i`` (``w_L = c_L``) for many ``c`` with the same ``k``, by Hillis–Steele.

    The running products of ``k`` at each of the ⌈log2(L+1)⌉ levels depend on ``k`` only, so they are
    computed once and reused by every scan of a backward (one per Highway-BP iteration). Each level
    is one fused multiply-add on the state tensor, done in place: no concatenations.

    >>> scan = ReverseLinearScan(torch.tensor([2., 3.]))
    >>> scan(torch.tensor([1., 1., 1.]))
    tensor([9., 4., 1.])
    """

    def __init__(self, k: torch.Tensor, kernel: Callable[..., torch.Tensor] | None = None):
        # products[level][i] = Π k over [i, i + 2^level) (zero past the end): what w[i + 2^level] is
        # multiplied by when it is added to w[i] at that level. Long products of gates in (0, 1)
        # underflow into subnormal numbers, which are slow on CPUs: see ``flush_denormals``.
        step = torch.cat([k, torch.zeros_like(k[:1])], dim=0)
        self.products = []
        offset = 1
        while offset < step.shape[0]:
            previous = step
            self.products.append(previous[: previous.shape[0] - offset])
            step = previous.clone()
            step[:-offset] *= previous[offset:]
            offset *= 2

        self.kernel = kernel or apply_reverse_products

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return self.kernel(c, *self.products)


def apply_reverse_products(c: torch.Tensor, *products: torch.Tensor) -> torch.Tensor:
    """The levels of a reverse Hillis–Steele scan, given its products (what Inductor compiles)."""
    w = c.clone()
    offset = 1
    for product in products:
        w[:-offset] += product * w[offset:]
        offset *= 2
    return w


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU for the duration (restoring the caller's mode).

    The scans multiply long runs of gate values in (0, 1); their products underflow into subnormal
    numbers, and arithmetic on those is one to two orders of magnitude slower on x86 CPUs. They are
    below every float's resolution relative to the values they scale, so flushing them to zero
    changes no result that matters (the float64 exactness tests run under it).
    """
    probe = torch.tensor(1e-39, dtype=torch.float32)  # subnormal in float32
    was_on = (probe * 1.0).item() == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def reverse_linear_scan(c: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """``w_i = c_i + w_{i+1} · k_i`` for ``i < L`` and ``w_L = c_L``, by Hillis–Steele.

    ``c`` has ``L+1`` entries along dim 0; ``k`` has ``L`` (``k[i]`` multiplies ``w_{i+1}``, i.e. it is
    layer ``i+1``'s residual Jacobian) or is one scalar shared by all layers.

    >>> reverse_linear_scan(torch.tensor([1., 1., 1.]), torch.tensor([2., 3.]))
    tensor([9., 4., 1.])
    """
    n = c.shape[0]
    if not isinstance(k, torch.Tensor):
        k = torch.full((n - 1,) + (1,) * (c.dim() - 1), float(k), dtype=c.dtype, device=c.device)
    return ReverseLinearScan(k)(c)
