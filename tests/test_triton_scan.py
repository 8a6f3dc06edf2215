"""The CUDA scan kernel (``engine/triton_scan.py``), checked without a GPU in Triton's interpreter
(``TRITON_INTERPRET=1``, which runs the kernel's arithmetic on the CPU with numpy): against the
Python loop ``w_i = c_i + v_i + k_i w_{i+1}`` for every K it takes, and inside the engine (chains,
pipelined chunks, recurrences) against autograd and the sequential Theorem-2 reference. On a GPU
the same kernel is compiled; tests/test_devices.py runs the engine on it.

The interpreter must be chosen before Triton is first imported (Triton's own helpers, ``tl.sum``'s
among them, are decorated then), so these tests run in a process of their own:
``test_the_kernel_in_triton_s_interpreter`` starts it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hbp_compile import hbp_compile

from .models import make, mlp_stack
from .recurrent_models import RecurrentLoss
from .reference import autograd_grads, highway_reference_grads, max_relative_error
from .test_chunk import _relu_stack, _two_stages_tapped, record_pipelined_runs

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_or_skip(interpreter: bool = True):
    triton = pytest.importorskip("triton")
    if interpreter and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 9):
        pytest.skip("Triton's interpreter before 3.9 fails on numpy 2's scalars")


@pytest.mark.skipif(INTERPRETING, reason="this is the process it starts")
def test_the_kernel_in_triton_s_interpreter():
    _triton_or_skip()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # one process: the suite's `-n auto` would start two more workers to share a handful of tests
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", __file__],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    # every interpreter test ran: the only skips are this test and the ahead-of-time compiles
    assert " passed" in run.stdout and "interpreter's own process" not in run.stdout, run.stdout[-2000:]
    assert "Triton's interpreter before" not in run.stdout, run.stdout[-2000:]


@pytest.mark.skipif(INTERPRETING, reason="compiles, not interprets")
@pytest.mark.parametrize("arch", [80, 90])  # A100; H100 and H200
def test_the_kernel_compiles_for_nvidia_gpus_without_one(arch):
    """Triton compiles ahead of time to a GPU's machine code with the ptxas it ships, no GPU needed:
    every K mode, both dtypes' accumulators, with and without v and a given last row."""
    _triton_or_skip(interpreter=False)
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hbp_compile.engine import _triton_scan_kernel

    variants = [("fp64", tl.float64, 2, "fp64", True, True), ("fp32", tl.float32, 3, "u8", True, False),
                ("bf16", tl.float32, 1, "bf16", False, True), ("fp32", tl.float32, 0, "fp32", False, False)]
    for dtype, acc, mode, k_dtype, has_v, given_last in variants:
        signature = {"out": f"*{dtype}", "c": f"*{dtype}", "v": f"*{dtype}", "k": f"*{k_dtype}", "rows": "i32",
                     "cols": "i32", "v_rows": "i32", "k_rows": "i32", **dict.fromkeys(
                         ["MODE", "HAS_V", "GIVEN_LAST", "ACC", "BLOCK_N", "BLOCK_F"], "constexpr")}
        constants = {"MODE": mode, "HAS_V": has_v, "GIVEN_LAST": given_last, "ACC": acc, "BLOCK_N": 32, "BLOCK_F": 32}
        try:
            compiled = triton.compile(ASTSource(_triton_scan_kernel.reverse_scan_kernel, signature, constants),
                                      target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False})
        except RuntimeError as err:
            if "ptxas" in str(err).lower() and "not found" in str(err).lower():
                pytest.skip(f"this Triton has no ptxas: {err}")
            raise
        assert "reverse_scan_kernel" in compiled.asm["ptx"]


@pytest.fixture
def interpreted(monkeypatch):
    """Triton's interpreter for the scans, the C kernel off: CPU tensors take the CUDA path.
    Yields the shapes the kernel scanned."""
    if not INTERPRETING:
        pytest.skip("runs in the interpreter's own process (test_the_kernel_in_triton_s_interpreter)")
    _triton_or_skip()
    from hbp_compile.engine import native_scan, scans, triton_scan

    monkeypatch.setattr(native_scan, "available", lambda t: False)
    monkeypatch.setattr(scans, "_broken_kernels", set())
    calls = []
    original = triton_scan.reverse_scan_into
    monkeypatch.setattr(triton_scan, "reverse_scan_into", lambda *a, **kw: calls.append(a[1].shape) or original(*a, **kw))
    yield calls


def _loop(c, v, k, given_last, out):
    w, cv = out.clone(), c.clone()
    if v is not None:
        cv[: v.shape[0]] += v
    if not given_last:
        w[-1] = cv[-1]
    for i in range(c.shape[0] - 2, -1, -1):
        factor = 1.0 if k is None else k if not isinstance(k, torch.Tensor) else k[i].to(c.dtype)
        w[i] = cv[i] + factor * w[i + 1]
    return w


def _check(c, v, k, given_last, tol):
    from hbp_compile.engine import triton_scan

    out = torch.randn_like(c)
    want = _loop(c, v, k, given_last, out)
    triton_scan.reverse_scan_into(out, c, v, k, given_last)
    assert max_relative_error({"w": out}, {"w": want}) < tol


def _k(kind, n, shape, g, dtype):
    return {"identity": None, "scalar": 0.7, "diagonal": torch.rand(n - 1, *shape, generator=g, dtype=dtype),
            "mask": torch.rand(n - 1, *shape, generator=g) > 0.5}[kind]


@pytest.mark.parametrize("kind", ["identity", "scalar", "diagonal", "mask"])
@pytest.mark.parametrize("n", [2, 70])  # one tile; several tiles and a part of one
def test_kernel_matches_the_loop(interpreted, kind, n):
    g = torch.Generator().manual_seed(n)
    c, k = torch.randn(n, 5, generator=g, dtype=torch.float64), _k(kind, n, (5,), g, torch.float64)
    for v in [None, torch.randn(n // 2 + 1, 5, generator=g, dtype=torch.float64)]:  # v may have fewer rows
        for given_last in [False, True]:
            _check(c, v, k, given_last, 1e-12)


def test_kernel_in_float32_over_several_bands_of_columns_and_in_place(interpreted):
    from hbp_compile.engine import triton_scan

    g = torch.Generator().manual_seed(0)
    c, k = torch.randn(33, 40, 2, generator=g), _k("diagonal", 33, (40, 2), g, torch.float32)
    _check(c, torch.randn(33, 40, 2, generator=g), k, False, 1e-5)
    in_place = c.clone()  # scan_rows scans a buffer into itself
    triton_scan.reverse_scan_into(in_place, in_place, None, k)
    assert max_relative_error({"w": in_place}, {"w": _loop(c, None, k, False, c)}) < 1e-5


def test_a_float64_scalar_k_is_not_rounded_to_float32(interpreted):
    """Triton passes a float argument as float32; the kernel reads K = 1 - γ from a float64 tensor."""
    from hbp_compile.engine import triton_scan

    c = torch.ones(40, 1, dtype=torch.float64)
    out = torch.empty_like(c)
    triton_scan.reverse_scan_into(out, c, None, 0.8)
    assert max_relative_error({"w": out}, {"w": _loop(c, None, 0.8, False, c)}) < 1e-14


@pytest.mark.parametrize("k", [2, 100])
@pytest.mark.parametrize("build,chunk", [(lambda: mlp_stack(6, taps=True), None), (lambda: _relu_stack(6), 2),
                                         (_two_stages_tapped, 2)], ids=["identity-K-taps", "relu-mask-pipelined",
                                                                        "two-runs-pipelined"])
def test_chains_on_the_kernel(interpreted, monkeypatch, build, chunk, k):
    pipelined = record_pipelined_runs(monkeypatch)  # stacked states: pipelined rows are views
    model = make(build())
    x = torch.randn(2, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k, 0.2) if k < 100 else autograd_grads(model, x)[1]
    model.zero_grad()
    hbp_compile(model, k=k, gamma=0.2 if k < 100 else 0.0, chunk=chunk, backend="eager")(x).backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-9
    assert interpreted  # the kernel scanned
    assert bool(pipelined) == (chunk is not None)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_recurrences_on_the_kernel(interpreted, kind):
    torch.manual_seed(0)
    model = RecurrentLoss(kind, 3, 5, 2).double()
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    for k in (2, 7):
        want = highway_reference_grads(model, x, k) if k < 7 else autograd_grads(model, x)[1]
        model.zero_grad(set_to_none=True)
        hbp_compile(model, k=k, backend="eager")(x).backward()
        assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-8
    assert interpreted


def test_a_kernel_that_does_not_build_is_reported_and_torch_ops_scan(interpreted, monkeypatch):
    from hbp_compile.engine import triton_scan

    def broken(*args, **kwargs):
        raise RuntimeError("no PTX for this GPU")

    monkeypatch.setattr(triton_scan, "_launch", broken)
    model = make(mlp_stack(4))
    x = torch.randn(2, 3, dtype=torch.float64)
    compiled = hbp_compile(model, k=100, backend="eager")
    with pytest.warns(RuntimeWarning, match="Triton scan kernel failed.*torch ops"):
        model.zero_grad()
        compiled(x).backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, autograd_grads(model, x)[1]) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        model.zero_grad()
        compiled(x).backward()
