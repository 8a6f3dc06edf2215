"""``torch._higher_order_ops.scan`` over a gated cell: one carry, the steps as a chain (float64)."""
from __future__ import annotations

import pytest
import torch
from torch._higher_order_ops import scan

from hbp_compile import hbp_compile

from .reference import highway_reference_grads, max_relative_error

TOL = 1e-8


class _Step:
    def __init__(self, owner, x_t):
        self.owner, self.x_t = owner, x_t

    def block(self, h):
        z = torch.sigmoid(self.owner.U(self.x_t))
        return z, (1 - z) * torch.tanh(self.owner.W(h))

    def residual(self, h, z):
        gate, update = z
        return gate * h + update

    def __call__(self, h):
        return self.residual(h, self.block(h))


class ScanModel(torch.nn.Module):
    """``h_t = z_t ⊙ h + (1 − z_t) ⊙ tanh(W h)``, ``z_t = σ(U x_t)``; the loss reads every step's output."""

    def __init__(self, outputs: str):
        super().__init__()
        self.W, self.U = torch.nn.Linear(4, 4), torch.nn.Linear(3, 4)
        self.h0 = torch.nn.Parameter(0.5 * torch.randn(2, 4))
        self.outputs = outputs  # "carry": y_t is a copy of the state; "sin": y_t = sin(h_t)

    def _combine(self, h, x_t):
        step = _Step(self, x_t)
        new = step(h)
        if self.outputs == "gate":  # a block intermediate leaves the step: a side output
            return new, step.block(h)[1] * 2.0
        return new, (new.clone() if self.outputs == "carry" else new.sin())

    def forward(self, x):
        last, ys = scan(self._combine, self.h0, x)
        return ys.pow(2).sum() + last.sum()

    # --- the reference's view -----------------------------------------------------------------
    def prologue(self, x):
        self.layers = [_Step(self, x_t) for x_t in x]
        return self.h0 * 1.0

    def epilogue(self, states):
        ys = torch.stack([s.clone() if self.outputs == "carry" else s.sin() for s in states[1:]])
        return ys.pow(2).sum() + states[-1].sum()


@pytest.mark.parametrize("outputs", ["carry", "sin"])
@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_scan_matches_reference_and_is_exact_at_k_ge_T(outputs, k):
    torch.manual_seed(0)
    model = ScanModel(outputs).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k)
    model.zero_grad()
    want_out = model(x).detach()
    if k >= 6:
        model.zero_grad()
        model(x).backward()
        assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < TOL
    model.zero_grad()
    compiled = hbp_compile(model, k=k, backend="eager")
    out = compiled(x)
    assert torch.equal(out, want_out)
    out.backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < TOL
    record = compiled.hbp_report.records[0]
    assert compiled.hbp_report.num_layers == 6
    assert "torch scan" in str(compiled.hbp_report) and "K = z0" in str(compiled.hbp_report)
    assert not any(n.target is torch.ops.higher_order.scan for n in record.rewritten.graph.nodes)


def test_scan_output_reading_the_block_is_a_side_output_and_exact_at_k_ge_T():
    torch.manual_seed(0)
    model = ScanModel("gate").double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    model(x).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = hbp_compile(model, k=5, backend="eager")
    compiled(x).backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < TOL
    assert compiled.hbp_report.num_layers == 5


class TwoCarries(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.W = torch.nn.Linear(4, 4)

    def forward(self, x):
        def combine(carry, x_t):
            a, b = carry
            new_a = a + torch.tanh(self.W(b)) * x_t
            return (new_a, b * 0.5 + new_a), new_a.clone()

        zeros = torch.zeros(2, 4, dtype=x.dtype)
        _, ys = scan(combine, (zeros, zeros), x)
        return ys.pow(2).sum()


def test_scan_with_two_carries_trains_exactly_and_says_why():
    torch.manual_seed(0)
    model = TwoCarries().double()
    x = torch.randn(4, 2, 4, dtype=torch.float64)
    model(x).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = hbp_compile(model, k=1, backend="eager")
    with pytest.warns(UserWarning, match="only scans with one carry"):
        compiled(x).backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-12
