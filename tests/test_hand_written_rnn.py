"""A GRU written by hand in its original formulation (Cho et al. 2014: the reset gate applied to h
before the matmul) is one chain over its time steps, one group, K = diag(z) — the paper's layers —
and equals a sequential Theorem-2 reference at small k."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hbp_compile import hbp_compile

from .reference import autograd_grads, highway_reference_grads, max_relative_error


class _Step:
    def __init__(self, owner: "OriginalGRU", x_t: torch.Tensor):
        self.owner, self.x_t = owner, x_t

    def block(self, h):
        o = self.owner
        u = torch.cat([h, self.x_t], -1)
        z, r = torch.sigmoid(o.update(u)), torch.sigmoid(o.reset(u))
        return z, torch.tanh(o.candidate(torch.cat([r * h, self.x_t], -1)))

    def residual(self, h, zn):
        z, n = zn
        return z * h + (1 - z) * n

    def __call__(self, h):
        return self.residual(h, self.block(h))


class OriginalGRU(nn.Module):
    def __init__(self, d_in: int = 3, hidden: int = 5, batch: int = 2):
        super().__init__()
        self.update = nn.Linear(hidden + d_in, hidden)
        self.reset = nn.Linear(hidden + d_in, hidden)
        self.candidate = nn.Linear(hidden + d_in, hidden)
        self.head = nn.Linear(hidden, 1)
        self.h0 = nn.Parameter(0.5 * torch.randn(batch, hidden))

    def forward(self, x):
        h, outputs = self.h0, []
        for x_t in x:
            h = _Step(self, x_t)(h)
            outputs.append(h)
        return self.epilogue([None, *outputs])

    # the reference's view: a stack of time steps
    def prologue(self, x):
        self.layers = [_Step(self, x_t) for x_t in x]
        return self.h0

    def epilogue(self, states):
        return torch.tanh(self.head(torch.stack(states[1:]))).pow(2).sum()


@pytest.mark.parametrize("k", [0, 1, 3, 100])
def test_original_gru_is_one_chain_over_time_and_matches_theorem_2(k):
    torch.manual_seed(0)
    steps = 12
    model = OriginalGRU().double()
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k) if k < steps else autograd_grads(model, x)[1]
    model.zero_grad()
    compiled = hbp_compile(model, k=k, backend="eager")
    compiled(x).backward()
    (chain,) = compiled.hbp_report.chains
    assert chain.num_layers == steps and len(chain.groups) == 1
    assert chain.layers[0].kind.value == "diagonal"
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert max_relative_error(got, want) < 1e-9
