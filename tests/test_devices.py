"""The exactness core on every accelerator present (CUDA), skipped where there is none.

k ≥ L against autograd (1e-8 in float64, 1e-4 in float32), small k against the sequential
Theorem-2 reference, for chains (eager and Inductor) and for swapped recurrences; then the paths
the CPU takes otherwise on a GPU: the torch-ops scans (the C scan is CPU-only), pipelined chunks
with stacked states and a 0/1 K, dropout's draws replayed, ``k="auto"``, autocast. Every tensor the
pass creates must live on the model's device: a CPU tensor reaching a CUDA op raises here.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from hbp_compile import hbp_compile

from .models import Gated, Stack, make, mlp_stack, transformer_stack
from .recurrent_models import RecurrentLoss
from .reference import autograd_grads, highway_reference_grads, max_relative_error
from .test_chunk import _relu_stack, _two_stages_tapped, record_pipelined_runs

# HBP_TEST_DEVICES=cpu runs this file on the CPU as well (with the C scan switched off, the scans
# CUDA takes): a check of the tests themselves, and of a torch other than the pinned one, without a GPU
DEVICES = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
           *[d for d in os.environ.get("HBP_TEST_DEVICES", "").split(",") if d and d != "cuda"]]
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}


@pytest.fixture(autouse=True)
def _scans_as_on_cuda(monkeypatch, request):
    """The C scan is CPU-only: a CPU run of this file takes CUDA's torch-ops scans instead."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cpu":
        from hbp_compile.engine import native_scan

        monkeypatch.setattr(native_scan, "available", lambda t: False)


CHAINS = {
    "mlp-L6": (lambda: mlp_stack(6, d=8, hidden=16), (4, 3)),
    "transformer-L4": (lambda: transformer_stack(4, d=8, hidden=16), (2, 5, 3)),
    "gated-L5": (lambda: Stack([Gated(6) for _ in range(5)], 3, 6, 2), (4, 3)),
}


def _grads(compiled, model, x):
    model.zero_grad(set_to_none=True)
    compiled(x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_exact_at_k_ge_depth(device, backend, dtype, name):
    factory, shape = CHAINS[name]
    model = make(factory()).to(device=device, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype, device=device)
    _, want = autograd_grads(model, x)
    got = _grads(hbp_compile(model, k=len(model.layers), backend=backend), model, x)
    assert all(g.device.type == device for g in got.values())
    assert max_relative_error(got, want) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_small_k_matches_reference(device, k, name):
    factory, shape = CHAINS[name]
    model = make(factory()).to(device)
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    want = highway_reference_grads(model, x, k, gamma=0.2)
    got = _grads(hbp_compile(model, k=k, gamma=0.2, backend="eager"), model, x)
    assert max_relative_error(got, want) < 1e-8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("k", [0, 2, 7])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_recurrence_matches_reference(device, kind, k, backend):
    torch.manual_seed(0)
    model = RecurrentLoss(kind, 3, 5, 2).double().to(device)
    x = torch.randn(7, 2, 3, dtype=torch.float64, device=device)
    want = highway_reference_grads(model, x, k) if k < 7 else autograd_grads(model, x)[1]
    got = _grads(hbp_compile(model, k=k, backend=backend), model, x)
    assert max_relative_error(got, want) < 1e-8


@pytest.mark.parametrize("device", DEVICES)
def test_hugging_face_gpt2_exact_at_k_ge_depth(device):
    """SDPA attention: its CUDA backward lays gradients out otherwise than the CPU's."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(device)
    ids = torch.randint(0, 64, (2, 16), device=device)

    def loss(m):
        return m(ids).logits.float().pow(2).mean()

    model.zero_grad(set_to_none=True)
    loss(model).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    compiled = hbp_compile(model, k=4, gamma=0.2)
    model.zero_grad(set_to_none=True)
    loss(compiled).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert compiled.hbp_report.num_layers == 4
    assert max_relative_error(got, want) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("build", [lambda: _relu_stack(6), _two_stages_tapped],
                         ids=["relu-mask", "two-runs-tapped"])
def test_pipelined_chunks_on_stacked_states(monkeypatch, device, build, recompute):
    """One chunked group filling a run is scanned chunk by chunk (engine/pipelined.py), on states
    kept in one stack, with a ReLU's K kept as a bool mask: the CUDA scans take rows in place."""
    calls = record_pipelined_runs(monkeypatch)
    model = make(build()).to(device)
    x = torch.randn(2, 3, dtype=torch.float64, device=device)
    for k in (2, 100):
        want = highway_reference_grads(model, x, k) if k < 100 else autograd_grads(model, x)[1]
        got = _grads(hbp_compile(model, k=k, chunk=2, recompute=recompute, backend="eager"), model, x)
        assert max_relative_error(got, want) < 1e-8
    assert calls


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_draws_replayed_on_device(device):
    """The backward replays the forward's draws from the device's generator."""
    from .test_dropout import DropoutMLP, assert_draws_replayed

    model = make(Stack([DropoutMLP(6, 12) for _ in range(4)], 3, 6, 2)).train().to(device)
    assert_draws_replayed(model, torch.randn(5, 3, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_auto_k_on_device(device):
    model = make(mlp_stack(8)).to(device)
    x = torch.randn(4, 3, dtype=torch.float64, device=device)
    compiled = hbp_compile(model, k="auto", tol=1e-3, backend="eager")
    got = _grads(compiled, model, x)
    (usage,) = compiled.hbp_iterations.values()
    assert max_relative_error(got, highway_reference_grads(model, x, usage.last)) < 1e-8


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_bfloat16_matches_autocast_backprop(device):
    from .test_robustness import assert_autocast_bfloat16_matches_backprop

    assert_autocast_bfloat16_matches_backprop(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["identity", "scalar", "diagonal", "mask"])
def test_residual_scan_matches_the_loop(device, dtype, tol, kind):
    """The scan the engine runs on this device (on CUDA: the Triton kernel, engine/triton_scan.py),
    whole and a few rows at a time, against the Python loop; several tiles of rows, several bands
    of columns."""
    from hbp_compile.engine.scans import ResidualScan, _kernel_for

    from .test_triton_scan import _loop

    n, shape = 70, (40, 9)
    g = torch.Generator(device=device).manual_seed(0)
    c = torch.randn(n, *shape, dtype=dtype, device=device, generator=g)
    v = torch.randn(n - 5, *shape, dtype=dtype, device=device, generator=g)
    k = {"identity": None, "scalar": 0.8, "diagonal": torch.rand(n - 1, *shape, dtype=dtype, device=device, generator=g),
         "mask": torch.rand(n - 1, *shape, device=device, generator=g) > 0.5}[kind]
    if device == "cuda" and importlib.util.find_spec("triton"):
        assert _kernel_for(c).__name__.endswith("triton_scan")
    scan = ResidualScan(k, n)
    want = _loop(c, v, k, False, c)
    assert max_relative_error({"w": scan(c, v)}, {"w": want}) < tol
    rows = c.clone()
    rows[: v.shape[0]] += v
    for lo, hi in [(40, 70), (3, 40), (0, 3)]:  # top down, each part given the row above it
        scan.scan_rows(rows, lo, hi)
    assert max_relative_error({"w": rows}, {"w": want}) < tol
