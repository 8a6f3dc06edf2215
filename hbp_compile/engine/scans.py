"""The accumulation along the residual path: ``w_i = c_i + v_i + K_{i+1} w_{i+1}``, ``w_L = c_L + v_L``.

With ``K = I`` this is a reversed cumulative sum; with a scalar or diagonal ``K`` a linear recurrence
(HIGHWAY_BP.md §4). ``ResidualScan`` is built once per backward with its ``K`` and applied once per
Highway-BP iteration:

* on the CPU (float32/float64), one sequential O(n) pass of a small C kernel
  (``engine/native_scan.py``): it reads each operand once, adds the iteration's block VJP ``v`` on
  the way, and keeps nothing between calls;
* on CUDA, one Triton kernel (``engine/triton_scan.py``) with the same operands: O(n) work in
  tiles scanned in parallel, nothing kept;
* elsewhere (other dtypes, no C compiler, no Triton, or ``HBP_SCAN=torch``), log-depth torch
  ops: ``cumsum`` for ``K = I``, and Hillis–Steele with ``K``'s running products computed once per
  backward for the others.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from . import native_scan, triton_scan

_broken_kernels: set[str] = set()  # kernels that failed to build here: warned once, not tried again


def _kernel_for(c: torch.Tensor) -> ModuleType | None:
    """The compiled scan for tensors like ``c``: the C kernel on the CPU, Triton on CUDA, else None."""
    if os.environ.get("HBP_SCAN") == "torch":
        return None
    if native_scan.available(c):
        return native_scan
    if "triton" not in _broken_kernels and triton_scan.available(c):
        return triton_scan
    return None


def _run_kernel(kernel: ModuleType, *args, **kwargs) -> bool:
    """Run ``kernel.reverse_scan_into``; a Triton kernel that cannot be built here is reported once
    and the scans go on in torch ops (False). Anything else it raises (a broken contract) propagates."""
    try:
        kernel.reverse_scan_into(*args, **kwargs)
    except triton_scan.KernelUnavailable as err:
        _broken_kernels.add("triton")
        warnings.warn(f"hbp_compile: the Triton scan kernel failed ({err}); the residual scans use torch ops "
                      f"from now on (same values, more launches and memory). Set HBP_SCAN=torch to skip the "
                      f"kernel.", RuntimeWarning, stacklevel=3)
        return False
    return True


def reverse_cumsum(c: torch.Tensor) -> torch.Tensor:
    """``w_i = Σ_{j ≥ i} c_j`` along dim 0.

    >>> reverse_cumsum(torch.tensor([1., 2., 3.]))
    tensor([6., 5., 3.])
    """
    return ResidualScan(None, c.shape[0])(c)


def linear_scan(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``y_0 = b_0`` and ``y_t = b_t + a_t · y_{t-1}`` along dim 0 (``a_0`` is unused).

    >>> linear_scan(torch.tensor([1., 1., 1.]), torch.tensor([0., 2., 3.]))
    tensor([ 1.,  3., 10.])
    """
    return ResidualScan(a[1:].flip(0), b.shape[0])(b.flip(0)).flip(0)


class ResidualScan:
    """``w_i = c_i + v_i + k_i · w_{i+1}`` (``w_{n-1} = c_{n-1} + v_{n-1}``) for many ``(c, v)``, one ``k``.

    ``k`` is None (K = I), a float (one scalar for every layer), or a tensor of ``n - 1`` rows that
    broadcasts against ``c[1:]`` (``k[i]`` multiplies ``w[i+1]``: layer ``i+1``'s residual Jacobian),
    possibly a bool mask (a ReLU's K, kept in a byte per entry: ``mask_if_binary``).
    ``v`` (the block VJPs of an iteration) may have fewer rows than ``c``; missing rows add nothing.

    >>> scan = ResidualScan(torch.tensor([2., 3.]), 3)
    >>> scan(torch.tensor([1., 1., 1.]))
    tensor([9., 4., 1.])
    >>> scan(torch.tensor([1., 1., 1.]), v=torch.tensor([0., 1.]))
    tensor([11.,  5.,  1.])
    """

    def __init__(self, k: torch.Tensor | float | None, n: int):
        self.n = n
        self.k = k
        self._products: list[torch.Tensor] | None = None  # Hillis–Steele levels, made on first use

    def __call__(self, c: torch.Tensor, v: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        kernel = self._kernel(c)
        if kernel is not None:
            c = c.contiguous()
            v = None if v is None else v.contiguous()
            target = torch.empty_like(c) if out is None or not out.is_contiguous() else out
            if _run_kernel(kernel, target, c, v, self._dense_k(c)):
                return target if out is None or target is out else out.copy_(target)
        if v is not None:
            c = c.clone()
            c[: v.shape[0]] += v
        if self.k is None:
            w = c.flip(0).cumsum(0).flip(0)
        else:
            w = c.clone()
            offset = 1
            for product in self._levels(c):
                w[:-offset] += product * w[offset:]
                offset *= 2
        return w if out is None else out.copy_(w)

    def scan_rows(self, w: torch.Tensor, lo: int, hi: int) -> None:
        """Rows ``hi - 1`` down to ``lo`` of ``w`` in place: ``w_i += k_i · w_{i+1}`` (``w`` holds ``c + v``
        there, and row ``hi`` is final already, or past the end). A scan taken a few rows at a time, top
        down, as the rows' block VJPs come (``engine/highway.py``'s pipelined iterations).

        >>> scan, w = ResidualScan(torch.tensor([2., 3.]), 3), torch.tensor([1., 1., 1.])
        >>> scan.scan_rows(w, 1, 3); scan.scan_rows(w, 0, 1); w
        tensor([9., 4., 1.])
        """
        given_last = hi < self.n
        rows = w[lo: hi + 1] if given_last else w[lo: hi]
        k = self.k
        kernel = self._kernel(w)
        if kernel is not None and rows.is_contiguous():
            dense = self._dense_k(w)
            if _run_kernel(kernel, rows, rows, None, dense[lo:] if isinstance(dense, torch.Tensor) else dense,
                           given_last):
                return
        for i in range(hi - 1, lo - 1, -1):
            if i + 1 >= self.n:
                continue  # the last row: no w above it
            if k is None:
                w[i] += w[i + 1]
            elif isinstance(k, torch.Tensor):
                w[i] += (k[i].to(w.dtype) if k.dtype == torch.bool else k[i]) * w[i + 1]
            else:
                w[i] += k * w[i + 1]

    def _kernel(self, c: torch.Tensor) -> ModuleType | None:
        """The compiled kernel that scans ``c`` with this K (``c``'s dtype, or a bool mask), if any."""
        if isinstance(self.k, torch.Tensor) and self.k.dtype not in (c.dtype, torch.bool):
            return None
        return _kernel_for(c)

    def held(self) -> list[torch.Tensor]:
        """The tensors the scan keeps between calls: its K and, off the native path, the products."""
        return [t for t in [self.k, *(self._products or [])] if isinstance(t, torch.Tensor)]

    def _dense_k(self, c: torch.Tensor) -> torch.Tensor | float | None:
        if isinstance(self.k, torch.Tensor) and (self.k.shape != c[1:].shape or not self.k.is_contiguous()):
            self.k = self.k.expand_as(c[1:]).contiguous()
        return self.k

    def _levels(self, c: torch.Tensor) -> list[torch.Tensor]:
        # products[level][i] = Π k over [i, i + 2^level) (zero past the end): what w[i + 2^level] is
        # multiplied by when it is added to w[i] at that level.
        if self._products is None:
            k = self.k.to(c.dtype) if isinstance(self.k, torch.Tensor) else torch.full(
                (self.n - 1,) + (1,) * (c.dim() - 1), float(self.k), dtype=c.dtype, device=c.device)
            step = torch.cat([k, torch.zeros_like(k[:1])], dim=0)
            self._products, offset = [], 1
            while offset < step.shape[0]:
                previous = step
                self._products.append(previous[: previous.shape[0] - offset])
                step = previous.clone()
                step[:-offset] *= previous[offset:]
                offset *= 2
        return self._products


def mask_if_binary(k: torch.Tensor) -> torch.Tensor:
    """``k`` as a bool mask when every entry is 0 or 1 (the residual Jacobian of ``relu(x + z)``),
    else ``k``: the scan then keeps a byte per entry instead of 4 or 8, multiplies it as the float it
    stands for, and gives the same values.

    >>> mask_if_binary(torch.tensor([0., 1., 1.]))
    tensor([False,  True,  True])
    >>> mask_if_binary(torch.tensor([0., .5]))
    tensor([0.0000, 0.5000])
    """
    if not k.is_floating_point():
        return k
    mask = k != 0
    return mask if bool(((k == 1) | ~mask).all()) else k


def reverse_linear_scan(c: torch.Tensor, k: torch.Tensor | float) -> torch.Tensor:
    """``w_i = c_i + w_{i+1} · k_i`` for ``i < L`` and ``w_L = c_L``.

    ``c`` has ``L+1`` entries along dim 0; ``k`` has ``L`` (``k[i]`` multiplies ``w_{i+1}``, i.e. it is
    layer ``i+1``'s residual Jacobian) or is one scalar shared by all layers.

    >>> reverse_linear_scan(torch.tensor([1., 1., 1.]), torch.tensor([2., 3.]))
    tensor([9., 4., 1.])
    """
    return ResidualScan(k if isinstance(k, torch.Tensor) else float(k), c.shape[0])(c)
