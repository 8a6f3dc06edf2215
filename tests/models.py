"""Residual models the tests write themselves. Each block exposes its split explicitly:
``block(x)`` is g and ``residual(x, z)`` is r, with ``forward(x) = residual(x, block(x))``, so that the
reference in ``reference.py`` can apply Theorem 2 without any help from the engine."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualBlock(nn.Module):
    def block(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def residual(self, x: torch.Tensor, z) -> torch.Tensor:
        return x + z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.block(x))


class PreLNMLP(ResidualBlock):
    """x + fc2(act(fc1(LN(x))))."""

    def __init__(self, d: int, hidden: int, act=F.gelu):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.act = act

    def block(self, x):
        return self.fc2(self.act(self.fc1(self.ln(x))))


class PreLNAttention(ResidualBlock):
    """x + out(softmax(q kᵀ/√d + mask) v), single head, over dim 1 of [B, T, d]."""

    def __init__(self, d: int, causal: bool = True):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.causal = causal

    def block(self, x):
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if self.causal:
            t = x.shape[1]
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.out(scores.softmax(-1) @ v)


class ReLUResidual(ResidualBlock):
    """relu(x + fc(x)): the original ResNet's post-activation, K = diag(1[x+z>0])."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def block(self, x):
        return self.fc(x)

    def residual(self, x, z):
        return torch.relu(x + z)


class Gated(ResidualBlock):
    """sigmoid(A x)⊙x + tanh(B x): a highway/GRU-style update, K = diag(sigmoid(A x))."""

    def __init__(self, d: int):
        super().__init__()
        self.gate = nn.Linear(d, d)
        self.cand = nn.Linear(d, d)

    def block(self, x):
        return torch.sigmoid(self.gate(x)), torch.tanh(self.cand(x))

    def residual(self, x, z):
        return z[0] * x + z[1]


class PostLN(ResidualBlock):
    """LayerNorm(x + tanh(fc(x))), split as HIGHWAY_BP.md §1 says: the block also yields the norm's
    statistics, the residual is (x + z0 - mean)·rstd·w + b, so K = diag(rstd·w)."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)

    def block(self, x):
        z = torch.tanh(self.fc(x))
        s = x + z
        var = s.var(-1, unbiased=False, keepdim=True)
        return z, s.mean(-1, keepdim=True), (var + self.ln.eps).rsqrt()

    def residual(self, x, z):
        b, mean, rstd = z
        return (x + b - mean) * rstd * self.ln.weight + self.ln.bias

    def forward(self, x):
        return self.ln(x + torch.tanh(self.fc(x)))


class Projection(ResidualBlock):
    """tanh(fc(x)) from d_in to d_out: no residual path (K = 0), the state changes shape."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def block(self, x):
        return torch.tanh(self.fc(x))

    def residual(self, x, z):
        return z


class Stack(nn.Module):
    """prologue -> residual blocks -> epilogue. ``taps=True``: the output sums a head over every state."""

    def __init__(self, blocks, d_in: int, d: int, d_out: int, taps: bool = False):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.layers = nn.ModuleList(blocks)
        self.head = nn.Linear(d, d_out)
        self.taps = taps

    def prologue(self, x):
        return self.inp(x)

    def epilogue(self, states):
        if self.taps:
            return sum(self.head(h).pow(2).mean() for h in states[1:])
        return self.head(states[-1]).pow(2).mean()

    def forward(self, x):
        h = self.prologue(x)
        states = [h]
        for layer in self.layers:
            h = layer(h)
            states.append(h)
        return self.epilogue(states)


def mlp_stack(depth: int, d: int = 8, hidden: int = 16, taps: bool = False, act=F.gelu) -> Stack:
    return Stack([PreLNMLP(d, hidden, act) for _ in range(depth)], 3, d, 2, taps)


def transformer_stack(depth: int, d: int = 8, hidden: int = 16) -> Stack:
    """Attention and MLP blocks alternating: two groups."""
    blocks = [PreLNAttention(d) if i % 2 == 0 else PreLNMLP(d, hidden) for i in range(depth)]
    return Stack(blocks, 3, d, 2)


def make(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        with torch.no_grad():
            p.normal_(0.0, 0.4)
    return model.double()


def two_stage_stack(d1: int = 4, d2: int = 6) -> Stack:
    """Three pre-LN blocks of width d1, a projection to d2 (K = 0), three blocks of width d2."""
    blocks = [PreLNMLP(d1, 8) for _ in range(3)] + [Projection(d1, d2)] + [PreLNMLP(d2, 8) for _ in range(3)]
    stack = Stack(blocks, 3, d1, 2)
    stack.head = nn.Linear(d2, 2)
    return stack
