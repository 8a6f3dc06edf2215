"""A GRU written by hand in its original formulation (Cho et al. 2014: the reset gate applied to h
before the matmul) is one chain over its time steps, one group, K = diag(z) — the paper's layers —
and equals a sequential Theorem-2 reference at small k."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hbp_compile import explain, hbp_compile

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


class _LSTMStep:
    """One time step on the packed state ``s = [c, h]``: the block gives the forget gate, the input
    term and the new h; the residual path is ``c' = f⊙c + i⊙g`` (K = diag(f) on c, 0 on h)."""

    def __init__(self, owner: "HandLSTM", x_t: torch.Tensor):
        self.owner, self.x_t = owner, x_t

    def block(self, s):
        c, h = s.unbind(0)
        i, f, g, o = self.owner.gates(self.x_t, h)
        c_new = f * c + i * g
        return f, i * g, o * torch.tanh(c_new)

    def residual(self, s, z):
        f, ig, h_new = z
        return torch.stack([f * s[0] + ig, h_new])

    def __call__(self, s):
        return self.residual(s, self.block(s))


class HandLSTM(nn.Module):
    """LSTM equations written out in a loop over time, as people write them: (c, h) is the state."""

    def __init__(self, d_in: int = 3, hidden: int = 5, batch: int = 2, *, layout: str = "ih+hh", taps: bool = True,
                 zero_start: bool = False):
        super().__init__()
        self.layout, self.taps, self.zero_start = layout, taps, zero_start
        if layout == "ih+hh":  # nn.LSTM's: the input and the hidden projection of all four gates, chunked
            self.ih = nn.Linear(d_in, 4 * hidden)
            self.hh = nn.Linear(hidden, 4 * hidden, bias=False)
        elif layout == "per gate":  # one Linear per gate on cat([x, h])
            self.gate = nn.ModuleDict({name: nn.Linear(d_in + hidden, hidden) for name in "ifgo"})
        else:  # "cat([h, x]) chunked": one Linear over cat([h, x]), chunked into the four gates
            self.hx = nn.Linear(hidden + d_in, 4 * hidden)
        self.head = nn.Linear(hidden, 1)
        self.shape = (batch, hidden)
        if not zero_start:
            self.h0 = nn.Parameter(0.5 * torch.randn(batch, hidden))
            self.c0 = nn.Parameter(0.5 * torch.randn(batch, hidden))

    def gates(self, x_t, h):
        if self.layout == "ih+hh":
            i, f, g, o = (self.ih(x_t) + self.hh(h)).chunk(4, -1)
        elif self.layout == "per gate":
            u = torch.cat([x_t, h], -1)
            i, f, g, o = (self.gate[name](u) for name in "ifgo")
        else:
            i, f, g, o = self.hx(torch.cat([h, x_t], -1)).chunk(4, -1)
        return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)

    def start(self, x):
        if self.zero_start:  # one value starts both components
            h = c = x.new_zeros(self.shape)
            return c, h
        return self.c0, self.h0

    def forward(self, x):
        (c, h), outputs = self.start(x), []
        for x_t in x:
            i, f, g, o = self.gates(x_t, h)
            c = f * c + i * g
            h = o * torch.tanh(c)
            outputs.append(h)
        if self.taps:
            return torch.tanh(self.head(torch.stack(outputs))).pow(2).sum()
        return torch.tanh(self.head(h)).pow(2).sum() + c.square().sum()

    # the reference's view: a stack of time steps on s = [c, h]
    def prologue(self, x):
        self.layers = [_LSTMStep(self, x_t) for x_t in x]
        return torch.stack(self.start(x))

    def epilogue(self, states):
        if self.taps:
            return torch.tanh(self.head(torch.stack([s[1] for s in states[1:]]))).pow(2).sum()
        return torch.tanh(self.head(states[-1][1])).pow(2).sum() + states[-1][0].square().sum()


@pytest.mark.parametrize("k,layout,taps,zero_start", [
    *((k, "ih+hh", True, False) for k in (0, 1, 3, 100)),  # nn.LSTM's layout, every step's h read
    # a Linear per gate on cat([x, h]); one Linear over cat([h, x]) chunked; the last (h, c) read
    *((k, layout, False, False) for layout in ("per gate", "cat([h, x]) chunked") for k in (0, 1, 3, 100)),
    (100, "ih+hh", True, True),  # h = c = zeros(...): one value starts both components
])
def test_hand_written_lstm_is_one_chain_over_time_and_matches_theorem_2(k, layout, taps, zero_start):
    torch.manual_seed(0)
    steps = 10
    model = HandLSTM(layout=layout, taps=taps, zero_start=zero_start).double()
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k) if k < steps else autograd_grads(model, x)[1]
    model.zero_grad()
    compiled = hbp_compile(model, k=k, backend="eager")
    loss = compiled(x)
    assert torch.equal(loss.detach(), model(x).detach())  # the packing changes no forward value
    loss.backward()
    (chain,) = compiled.hbp_report.chains
    assert chain.num_layers == steps and len(chain.groups) == 1
    assert chain.layers[0].kind.value == "diagonal"
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert max_relative_error(got, want) < 1e-9
    if k == 100:  # explain() runs the same pipeline and reports what the compiled model rewrote
        assert str(explain(compiled, x)) == str(compiled.hbp_report)
