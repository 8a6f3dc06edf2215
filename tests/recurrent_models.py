"""Recurrent models for the tests, each with an explicit block/residual split per time step.

``forward`` is what ``hbp_compile`` sees: an unmodified ``nn.GRU``/``nn.LSTM`` whose output at every
step feeds the loss. ``prologue``/``layers``/``epilogue`` present the same computation to
``reference.highway_reference_grads`` as a stack of time steps, written here from PyTorch's documented
cell equations (no code shared with the engine). The LSTM state is the pair ``[c, h]`` stacked.
"""
from __future__ import annotations

import torch
from torch import nn


class _Step:
    def __init__(self, owner: "RecurrentLoss", x_t: torch.Tensor):
        self.owner, self.x_t = owner, x_t

    def __call__(self, s):
        return self.residual(s, self.block(s))

    def _gates(self, h):
        rnn = self.owner.rnn
        return (self.x_t @ rnn.weight_ih_l0.t() + rnn.bias_ih_l0, h @ rnn.weight_hh_l0.t() + rnn.bias_hh_l0)


class GRUStep(_Step):
    def block(self, s):
        gi, gh = self._gates(s[0])
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return z, torch.tanh(i_n + r * h_n)

    def residual(self, s, z):
        update, new = z
        return ((1 - update) * new + update * s[0]).unsqueeze(0)


class LSTMStep(_Step):
    def block(self, s):
        gi, gh = self._gates(s[1])
        i, f, g, o = (gi + gh).chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c_new = f * s[0] + i * g
        return f, i * g, o * torch.tanh(c_new)

    def residual(self, s, z):
        f, ig, h_new = z
        return torch.stack([f * s[0] + ig, h_new])


class RecurrentLoss(nn.Module):
    """``sum(tanh(head(rnn(x, state0)[0]))^2)`` with a learnable initial state."""

    def __init__(self, kind: str, d_in: int, hidden: int, batch: int):
        super().__init__()
        self.kind = kind
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](d_in, hidden)
        self.h0 = nn.Parameter(0.5 * torch.randn(1, batch, hidden))
        if kind == "lstm":
            self.c0 = nn.Parameter(0.5 * torch.randn(1, batch, hidden))
        self.head = nn.Linear(hidden, 1)

    def _loss(self, outputs):
        return torch.tanh(self.head(outputs)).pow(2).sum()

    def forward(self, x):
        state = (self.h0, self.c0) if self.kind == "lstm" else self.h0
        return self._loss(self.rnn(x, state)[0])

    # --- the reference's view: a stack of time steps --------------------------------------------
    def prologue(self, x):
        self.layers = [(LSTMStep if self.kind == "lstm" else GRUStep)(self, x_t) for x_t in x]
        return torch.cat([self.c0, self.h0]) if self.kind == "lstm" else self.h0

    def epilogue(self, states):
        return self._loss(torch.stack([s[-1] for s in states[1:]]))
