"""A sequential reverse scan in C for the CPU: ``w_t = c_t + v_t + K_t · w_{t+1}`` in one O(n) pass.

Highway-BP scans the residual path once per iteration (HIGHWAY_BP.md §4). On a GPU a log-depth scan
pays; on a CPU the scan is memory-bound, and a sequential loop over the layer axis (vectorized over
the rest) reads each operand once and keeps nothing, where Hillis–Steele does O(n log n) work and
keeps a product per level, and aten's ``cumsum`` along a leading dim runs an order of magnitude
slower than the loop (measured in the speed issue). The kernel is 40 lines of C built once with the
C compiler that Inductor already requires, cached under ``HBP_CACHE_DIR`` (default
``~/.cache/hbp_compile``), and called through ``ctypes`` with the tensors' data pointers: no torch
headers, so it builds in about a second. Where no compiler works the caller falls back to torch ops
(see ``engine/scans.py``), and says so in the log.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("hbp_compile")

_SOURCE = r"""
/* w[t] = c[t] + v[t] (t < nv) + K[t] * w[t+1] for t = n-2 .. 0;  w[n-1] = c[n-1] + v[n-1] (if n-1 < nv).
   mode 0: K = 1;  mode 1: K = ks (a scalar);  mode 2: K = k[t] (rows of m elements);
   mode 3: K = mask[t] (rows of m bytes, each 0 or 1: a ReLU's K, an eighth of a double's bytes),
           converted and multiplied as a float K is (a branch per element would not vectorize).
   given_last: w[n-1] is already final (a scan of some rows of a longer one) and is only read.
   w may alias c or v: each row is read before it is written. */
#define DEFINE_SCAN(NAME, T)                                                                   \
void NAME(const T *c, const T *v, long nv, const T *k, const unsigned char *mask, double ks,  \
          int mode, int given_last, T *w, long n, long m)                                      \
{                                                                                              \
    const T s = (T)ks;                                                                         \
    for (long t = given_last ? n - 2 : n - 1; t >= 0; --t) {                                   \
        const T *ct = c + t * m;                                                               \
        const T *vt = (v && t < nv) ? v + t * m : 0;                                           \
        T *wt = w + t * m;                                                                     \
        const T *wn = wt + m;                                                                  \
        if (t == n - 1) {                                                                      \
            if (vt) for (long j = 0; j < m; ++j) wt[j] = ct[j] + vt[j];                        \
            else for (long j = 0; j < m; ++j) wt[j] = ct[j];                                   \
        } else if (mode == 0) {                                                                \
            if (vt) for (long j = 0; j < m; ++j) wt[j] = ct[j] + vt[j] + wn[j];                \
            else for (long j = 0; j < m; ++j) wt[j] = ct[j] + wn[j];                           \
        } else if (mode == 1) {                                                                \
            if (vt) for (long j = 0; j < m; ++j) wt[j] = ct[j] + vt[j] + s * wn[j];            \
            else for (long j = 0; j < m; ++j) wt[j] = ct[j] + s * wn[j];                       \
        } else if (mode == 3) {                                                                \
            const unsigned char *kt = mask + t * m;                                            \
            if (vt) for (long j = 0; j < m; ++j) wt[j] = ct[j] + vt[j] + (T)kt[j] * wn[j];    \
            else for (long j = 0; j < m; ++j) wt[j] = ct[j] + (T)kt[j] * wn[j];               \
        } else {                                                                               \
            const T *kt = k + t * m;                                                           \
            if (vt) for (long j = 0; j < m; ++j) wt[j] = ct[j] + vt[j] + kt[j] * wn[j];        \
            else for (long j = 0; j < m; ++j) wt[j] = ct[j] + kt[j] * wn[j];                   \
        }                                                                                      \
    }                                                                                          \
}
DEFINE_SCAN(hbp_reverse_scan_f32, float)
DEFINE_SCAN(hbp_reverse_scan_f64, double)
"""

_FUNCTIONS = {torch.float32: "hbp_reverse_scan_f32", torch.float64: "hbp_reverse_scan_f64"}


def _cache_dir() -> Path:
    return Path(os.environ.get("HBP_CACHE_DIR") or Path.home() / ".cache" / "hbp_compile")


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use; None when no C compiler works here."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        log.info("hbp_compile: no C compiler found; CPU scans use torch ops (slower)")
        return None
    digest = hashlib.sha256((_SOURCE + compiler).encode()).hexdigest()[:16]
    target = _cache_dir() / f"reverse_scan_{digest}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "scan.c", Path(tmp) / "scan.so"
                src.write_text(_SOURCE)
                # -O3 vectorizes the inner loops; -fno-math-errno/-ffp-contract=off keep each
                # operation rounded as torch rounds it (no fused multiply-adds), so results do not
                # depend on the CPU the kernel was built for.
                subprocess.run([compiler, "-O3", "-ffp-contract=off", "-shared", "-fPIC", str(src), "-o", str(out)],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, target)  # atomic: concurrent builders never load a partial file
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        log.info("hbp_compile: building the CPU scan kernel failed (%s); CPU scans use torch ops (slower)", err)
        return None
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    return lib


def available(t: torch.Tensor) -> bool:
    """Can the C kernel scan tensors like ``t``? (CPU, float32/float64, a compiler at hand.)"""
    return t.device.type == "cpu" and t.dtype in _FUNCTIONS and _library() is not None


def scan_operands(out: torch.Tensor, c: torch.Tensor, v: torch.Tensor | None,
                  k: torch.Tensor | float | None) -> tuple[int, int, int]:
    """Check a scan's operands (the contract of ``reverse_scan_into``, shared by the Triton kernel's)
    and return its rows, the elements per row and K's mode (0 identity, 1 scalar, 2 tensor, 3 mask)."""
    n = c.shape[0]
    m = c.numel() // n if n else 0
    mask = isinstance(k, torch.Tensor) and k.dtype == torch.bool
    for t in (out, c, v, k):
        if isinstance(t, torch.Tensor):
            assert t.is_contiguous() and (t.dtype == c.dtype or t is k and mask), \
                "reverse_scan_into: contiguous tensors of one dtype (K may be a bool mask)"
    if isinstance(k, torch.Tensor):
        assert k.numel() >= (n - 1) * m, "reverse_scan_into: k needs n - 1 rows shaped as c's"
    return n, m, 0 if k is None else 1 if not isinstance(k, torch.Tensor) else 3 if mask else 2


def reverse_scan_into(out: torch.Tensor, c: torch.Tensor, v: torch.Tensor | None, k: torch.Tensor | float | None,
                      given_last: bool = False) -> None:
    """``out_t = c_t + v_t + K_t · out_{t+1}`` along dim 0, written into ``out`` (which may be ``c``).

    ``k`` is None (K = I), a float (one scalar K), or a contiguous tensor of ``n - 1`` rows shaped as
    ``c``'s (``k[t]`` multiplies ``out[t+1]``), of ``c``'s dtype or bool (a 0/1 mask, multiplied as the
    float K it stands for). ``v`` has at most ``n`` rows (the missing last rows add
    0). All tensors contiguous, on the CPU, of one dtype but a mask (callers check ``available``).
    ``given_last``: ``out``'s last row is final already and only read (a scan of the rows below it).

    >>> c = torch.tensor([1., 1., 1.])
    >>> out = torch.empty(3)
    >>> reverse_scan_into(out, c, None, torch.tensor([2., 3.])); out
    tensor([9., 4., 1.])
    >>> reverse_scan_into(out, c, None, torch.tensor([True, False])); out
    tensor([2., 1., 1.])
    """
    n, m, mode = scan_operands(out, c, v, k)
    fn = getattr(_library(), _FUNCTIONS[c.dtype])
    fn(c.data_ptr(), v.data_ptr() if v is not None else None, v.shape[0] if v is not None else 0,
       k.data_ptr() if mode == 2 else None, k.data_ptr() if mode == 3 else None,
       float(k) if mode == 1 else 0.0, mode, int(given_last), out.data_ptr(), n, m)
