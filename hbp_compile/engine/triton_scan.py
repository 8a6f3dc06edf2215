"""The residual-path scan on CUDA as one Triton kernel: ``w_t = c_t + v_t + K_t · w_{t+1}``.

The torch-ops scan that CUDA used before (``engine/scans.py``: ``cumsum``, or Hillis–Steele) does
O(n log n) work in 2·log₂ n launches per iteration and keeps a product of K per level (ten copies
of K at n = 1024). This kernel is one launch per scan and keeps nothing: each program takes a band
of columns and goes down the rows a tile at a time, scanning each tile in parallel
(``tl.associative_scan``) and carrying one row between tiles (``_triton_scan_kernel.py``). It takes
the same operands as the CPU's C kernel (``native_scan.reverse_scan_into``).

Triton is imported on first use, where a CUDA tensor asks for it. ``TRITON_INTERPRET=1`` (Triton's
interpreter, which runs the kernel on the CPU with numpy) lets CPU tensors through, so the tests
check the kernel's arithmetic without a GPU. If the kernel cannot be built, ``engine/scans.py``
says so in a warning and scans with torch ops.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from .native_scan import scan_operands

BLOCK_N = 32  # rows per tile: the rows a program scans in parallel
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    try:
        from . import _triton_scan_kernel
    except ImportError:
        return None
    return _triton_scan_kernel


def available(t: torch.Tensor) -> bool:
    """Can the Triton kernel scan tensors like ``t``? (CUDA, or the interpreter; a float dtype;
    Triton installed.)"""
    return ((t.device.type == "cuda" or (_interpreting() and t.device.type == "cpu"))
            and t.dtype in _DTYPES and _kernels() is not None)


def _block_f(cols: int) -> int:
    # Enough programs to fill a GPU's ~130 multiprocessors twice over when the rows are narrow
    # (a GRU's batch × hidden is a few thousand), wider bands when there are many columns.
    return 32 if cols <= 32 * 512 else 128


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or launched here (``engine/scans.py`` then scans with torch ops)."""


@functools.lru_cache(maxsize=16)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # a scalar K read from a tensor of c's dtype (Triton passes float arguments as float32), made once
    # per value rather than once per scan
    return torch.full((1,), value, dtype=dtype, device=device)


def reverse_scan_into(out: torch.Tensor, c: torch.Tensor, v: torch.Tensor | None, k: torch.Tensor | float | None,
                      given_last: bool = False) -> None:
    """``out_t = c_t + v_t + K_t · out_{t+1}`` along dim 0, written into ``out`` (which may be ``c``).

    The contract of ``native_scan.reverse_scan_into``: ``k`` None (K = I), a float, or a contiguous
    tensor of ``n - 1`` rows shaped as ``c``'s, of ``c``'s dtype or bool; ``v`` at most ``n`` rows;
    ``given_last``: ``out``'s last row is final already and only read. Half types are added in float32.
    Raises ``KernelUnavailable`` when Triton cannot build or launch the kernel here.
    """
    n, cols, mode = scan_operands(out, c, v, k)
    if n == 0 or cols == 0:
        return
    if mode == 1:
        k = _scalar(float(k), c.dtype, c.device)
    elif mode == 3:
        k = k.view(torch.uint8)
    try:
        _launch(out, c, v, k, n, cols, mode, given_last)
    except Exception as err:  # noqa: BLE001 - Triton's compiler and launcher raise many kinds
        raise KernelUnavailable(f"{type(err).__name__}: {err}") from err


def _launch(out: torch.Tensor, c: torch.Tensor, v: torch.Tensor | None, k: torch.Tensor | None, n: int, cols: int,
            mode: int, given_last: bool) -> None:
    kernels = _kernels()
    tl = kernels.tl
    acc = tl.float64 if c.dtype == torch.float64 else tl.float32
    block_f = _block_f(cols)
    kernels.reverse_scan_kernel[(-(-cols // block_f),)](
        out, c, v if v is not None else c, k if k is not None else c,
        n - 1 if given_last else n, cols, v.shape[0] if v is not None else 0, n - 1,
        MODE=mode, HAS_V=v is not None, GIVEN_LAST=given_last, ACC=acc, BLOCK_N=BLOCK_N, BLOCK_F=block_f,
        enable_fp_fusion=False)  # each operation rounded as torch rounds it, as the C kernel does
