"""The accumulation along the residual path: ``w_i = c_i + w_{i+1} K_{i+1}``, ``w_L = c_L``.

With ``K = I`` this is a reversed cumulative sum. With a scalar or diagonal ``K`` it is the linear
recurrence that Hillis–Steele scans in ⌈log2(L+1)⌉ steps of O(L) work with the associative operator
``(u, P) ∘ (u', P') = (u + u'·P, P'·P)`` (HIGHWAY_BP.md §4).
"""
from __future__ import annotations

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
    # Forward-time view: t = L - i; y_t = b_t + a_t · y_{t-1} with a_t = k_{L-t}, a_0 unused.
    a = torch.cat([torch.zeros_like(k[:1]), k.flip(0)], dim=0)
    return linear_scan(c.flip(0), a).flip(0)
