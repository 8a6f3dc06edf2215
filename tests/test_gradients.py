"""Gradient parity in float64: exact at k >= L against autograd, and equal at small k to the
sequential Theorem-2 reference in ``reference.py``."""
from __future__ import annotations

import pytest
import torch

from hbp_compile import hbp_compile

from .models import (
    Gated,
    PostLN,
    PreLNMLP,
    ReLUResidual,
    Stack,
    make,
    mlp_stack,
    transformer_stack,
    two_stage_stack,
)
from .reference import autograd_grads, highway_reference_grads, max_relative_error

TOL = 1e-8


def hbp_grads(model, x, k, gamma=0.0, backend="eager", recompute=True):
    compiled = hbp_compile(model, k=k, gamma=gamma, backend=backend, recompute=recompute)
    for p in model.parameters():
        p.grad = None
    out = compiled(x)
    out.backward()
    return compiled, out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


MODELS = {
    "mlp-L2-d4": (lambda: mlp_stack(2, d=4, hidden=8), (3, 3)),
    "mlp-L5-d8": (lambda: mlp_stack(5, d=8, hidden=16), (4, 3)),
    "mlp-L8-d16-relu": (lambda: mlp_stack(8, d=16, hidden=8, act=torch.relu), (2, 5, 3)),
    "transformer-L6": (lambda: transformer_stack(6, d=8, hidden=16), (2, 5, 3)),
    "mlp-taps-L4": (lambda: mlp_stack(4, d=6, hidden=12, taps=True), (3, 3)),
    "shared-weights-L4": (lambda: Stack([PreLNMLP(5, 7)] * 4, 3, 5, 2), (3, 3)),
    "post-ln-L4": (lambda: Stack([PostLN(6) for _ in range(4)], 3, 6, 2), (4, 3)),
    "two-stages-K0-L7": (two_stage_stack, (4, 3)),
}


@pytest.fixture(params=sorted(MODELS), name="case")
def _case(request):
    factory, shape = MODELS[request.param]
    model = make(factory())
    torch.manual_seed(1)
    return model, torch.randn(*shape, dtype=torch.float64)


def test_exact_at_k_at_least_depth(case):
    model, x = case
    want_out, want = autograd_grads(model, x)
    depth = len(model.layers)
    for k in (depth, depth + 3):
        compiled, out, got = hbp_grads(model, x, k)
        assert torch.equal(out, want_out), "forward must be bit-identical to the original model"
        assert compiled.hbp_report.num_layers == depth
        assert max_relative_error(got, want) < TOL


@pytest.mark.parametrize("k", [0, 1, 3])
def test_small_k_matches_theorem2_reference(case, k):
    model, x = case
    want = highway_reference_grads(model, x, k)
    _, _, got = hbp_grads(model, x, k)
    assert max_relative_error(got, want) < TOL
    if k < len(model.layers) - 1:
        _, exact = autograd_grads(model, x)
        assert max_relative_error(got, exact) > 1e-6, "a truncated estimate should differ from backprop"


def test_keeping_intermediates_gives_the_same_gradients(case):
    """recompute=False: the backward vmaps aot_autograd's backward graph over the values the forward
    kept, instead of recomputing them; exact at k >= L, the reference's estimate at small k."""
    model, x = case
    depth = len(model.layers)
    _, exact = autograd_grads(model, x)
    _, _, got = hbp_grads(model, x, depth, recompute=False)
    assert max_relative_error(got, exact) < TOL
    _, _, got = hbp_grads(model, x, 1, gamma=0.3, recompute=False)
    assert max_relative_error(got, highway_reference_grads(model, x, 1, gamma=0.3)) < TOL


@pytest.mark.parametrize("gamma", [0.2, 1.0])
@pytest.mark.parametrize("k", [0, 2])
def test_gamma_split_matches_reference(gamma, k):
    model = make(transformer_stack(4))
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k, gamma=gamma)
    _, _, got = hbp_grads(model, x, k, gamma=gamma)
    assert max_relative_error(got, want) < TOL


@pytest.mark.parametrize("block", [ReLUResidual, Gated, PostLN], ids=["relu", "gated", "post-ln"])
@pytest.mark.parametrize("gamma", [0.8, 1.0])
def test_gamma_split_on_diagonal_kinds(block, gamma):
    """γ-split for every kind: K' = (1-γ)K in the scan, γK added to the block's VJP; γ = 1 is
    fixed-point iteration (the reference then uses the full layer Jacobian per iteration)."""
    model = make(Stack([block(6) for _ in range(4)], 3, 6, 2))
    x = torch.randn(4, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, 1, gamma=gamma)
    _, _, got = hbp_grads(model, x, 1, gamma=gamma)
    assert max_relative_error(got, want) < TOL


@pytest.mark.parametrize("block", [ReLUResidual, Gated], ids=["relu-diag", "gated-diag"])
@pytest.mark.parametrize("k", [0, 2, 5])
def test_diagonal_residuals(block, k):
    model = make(Stack([block(6) for _ in range(5)], 3, 6, 2))
    x = torch.randn(4, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k) if k < 5 else autograd_grads(model, x)[1]
    _, _, got = hbp_grads(model, x, k)
    assert max_relative_error(got, want) < TOL


def test_default_backend_same_gradients_as_eager():
    model = make(mlp_stack(4))
    x = torch.randn(3, 3, dtype=torch.float64)
    _, _, eager = hbp_grads(model, x, 1, backend="eager")
    _, _, default = hbp_grads(model, x, 1, backend="inductor")
    assert max_relative_error(default, eager) < TOL


def test_input_gradient_flows_through_chain():
    model = make(mlp_stack(3))
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    model(x).backward()
    want = x.grad.clone()
    x.grad = None
    hbp_compile(model, k=3, backend="eager")(x).backward()
    assert torch.allclose(x.grad, want, rtol=TOL, atol=0)
