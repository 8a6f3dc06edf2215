"""The recurrent cells of ``nn.RNN``/``nn.GRU``/``nn.LSTM`` as split steps over all time steps at once.

A step maps the state ``x`` of shape ``(m, B, H)`` (``m = 2`` for LSTM's ``(c, h)``, else 1) to the next
one. ``split_step(x_r, x_g, gi, w_hh, b_hh)`` takes the states of *every* step stacked in front,
``(T, m, B, H)``, and the input projections ``gi = x_t W_ih^T + b_ih`` of every step, ``(T, B, G·H)``:
time is folded into the batch, so one call is the batched block of HIGHWAY_BP.md §3. The residual
path reads ``x_r`` and the block ``x_g``; the split step also returns the diagonal of
``K = ∂y/∂x_r``, which for these cells is known in closed form (DESIGN.md §8):

=========  ===================================  ==========================
cell       residual ``r(x, z)``                  ``K``
=========  ===================================  ==========================
RNN        ``z``                                 0
GRU        ``z_gate ⊙ h + (1 − z_gate) ⊙ n``     ``diag(z_gate)``
LSTM       ``[f ⊙ c + i ⊙ g, o ⊙ tanh(c')]``     ``diag(f)`` on c, 0 on h
=========  ===================================  ==========================

The formulas and gate orders are PyTorch's own (``torch.nn.GRU`` docs).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def _hidden_projection(h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    out = torch.matmul(h, w_hh.t())
    return out if b_hh is None else out + b_hh


def _rnn_step(activation: Callable[[Tensor], Tensor]):
    def split_step(x_r: Tensor, x_g: Tensor, gi: Tensor, w_hh: Tensor, b_hh: Tensor | None):
        y = activation(gi + _hidden_projection(x_g[:, 0], w_hh, b_hh))
        return y.unsqueeze(1), torch.zeros_like(x_r)

    return split_step


def _gru_split_step(x_r: Tensor, x_g: Tensor, gi: Tensor, w_hh: Tensor, b_hh: Tensor | None):
    gh = _hidden_projection(x_g[:, 0], w_hh, b_hh)
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    y = (1 - update) * new + update * x_r[:, 0]
    return y.unsqueeze(1), update.detach().unsqueeze(1)


def _lstm_split_step(x_r: Tensor, x_g: Tensor, gi: Tensor, w_hh: Tensor, b_hh: Tensor | None):
    gates = gi + _hidden_projection(x_g[:, 1], w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_residual = f * x_r[:, 0] + i * g
    h = o * torch.tanh(f * x_g[:, 0] + i * g)  # the block's own c': h carries no residual path
    k = torch.stack([f.detach(), torch.zeros_like(f)], 1)
    return torch.stack([c_residual, h], 1), k


@dataclass(frozen=True)
class Cell:
    """One recurrent cell: its state size ``m`` and gate count, and its split step."""

    mode: str
    num_states: int
    num_gates: int
    split_step: Callable[..., tuple[Tensor, Tensor]]


CELLS: dict[str, Cell] = {
    "rnn_tanh": Cell("rnn_tanh", 1, 1, _rnn_step(torch.tanh)),
    "rnn_relu": Cell("rnn_relu", 1, 1, _rnn_step(torch.relu)),
    "gru": Cell("gru", 1, 3, _gru_split_step),
    "lstm": Cell("lstm", 2, 4, _lstm_split_step),
}
