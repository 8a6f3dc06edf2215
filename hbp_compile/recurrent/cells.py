"""The recurrent cells of ``nn.RNN``/``nn.GRU``/``nn.LSTM``, batched over all time steps at once.

A step maps the state ``x`` of shape ``(m, B, H)`` (``m = 2`` for LSTM's ``(c, h)``, else 1) to the next
one. Here the states of *every* step come stacked in front, ``(T, m, B, H)``, with the input
projections ``gi = x_t W_ih^T + b_ih`` of every step, ``(T, B, G·H)``: time is folded into the batch,
so one call is the batched block of HIGHWAY_BP.md §3. Each cell splits its update into the residual
path and the block (DESIGN.md §8):

=========  ===================================  ==========================
cell       residual ``r(x, z)``                  ``K = ∂r/∂x``
=========  ===================================  ==========================
RNN        ``z``                                 0
GRU        ``u ⊙ h + (1 − u) ⊙ n``               ``diag(u)`` (update gate)
LSTM       ``[f ⊙ c + i ⊙ g, o ⊙ tanh(c')]``     ``diag(f)`` on c, 0 on h
=========  ===================================  ==========================

The block's VJP is written out by hand (the chain rule through the gates, PyTorch's own gate
equations and orders) instead of taken with autograd: the backward re-runs it ``k + 1`` times, and
on a CPU its cost is memory traffic, which fewer temporaries cut. ``tests/test_recurrent.py`` checks
it against autograd and against a sequential reference written from the module equations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _hidden_projection(h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    out = torch.matmul(h, w_hh.t())
    return out if b_hh is None else out + b_hh


@dataclass
class Gates:
    """What one batched recompute of the steps keeps for the VJPs of a backward."""

    states: Tensor  # (T, m, B, H): the input state of every step
    k_diag: Tensor  # (T, m, B, H): the diagonal of K per step
    saved: tuple[Tensor, ...]


class Cell:
    """A recurrent cell: ``recompute`` the gates of all steps once, then ``vjp`` as often as needed."""

    mode: str
    num_states: int
    num_gates: int

    def recompute(self, states: Tensor, gi: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Gates:
        raise NotImplementedError

    def vjp(self, gates: Gates, w: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """The block VJP of cotangent ``w`` on the steps' outputs, as ``(d_c, d_gh, d_gi)``: the part
        reaching LSTM's input cell state directly (else None), and the cotangents of the hidden and
        input projections ``gh = h W_hh^T + b_hh`` and ``gi``. ``w·J`` on the hidden state is
        ``d_gh @ W_hh``."""
        raise NotImplementedError


class RNNCell(Cell):
    num_states, num_gates = 1, 1

    def __init__(self, mode: str):
        self.mode = mode

    def recompute(self, states, gi, w_hh, b_hh):
        y = gi + _hidden_projection(states[:, 0], w_hh, b_hh)
        y = torch.tanh(y) if self.mode == "rnn_tanh" else torch.relu(y)
        return Gates(states, torch.zeros_like(states), (y,))

    def vjp(self, gates, w):
        (y,) = gates.saved
        d_pre = w[:, 0] * (1 - y * y) if self.mode == "rnn_tanh" else w[:, 0] * (y > 0)
        return None, d_pre, d_pre


class GRUCell(Cell):
    mode, num_states, num_gates = "gru", 1, 3

    def recompute(self, states, gi, w_hh, b_hh):
        gh = _hidden_projection(states[:, 0], w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        reset = torch.sigmoid(i_r + h_r)
        update = torch.sigmoid(i_z + h_z)
        new = torch.tanh(torch.addcmul(i_n, reset, h_n))
        return Gates(states, update.unsqueeze(1), (reset, update, new, h_n))

    def vjp(self, gates, w):
        reset, update, new, h_n = gates.saved
        w = w[:, 0]
        d_pre_n = w * (1 - update) * (1 - new * new)
        d_pre_z = w * (gates.states[:, 0] - new) * update * (1 - update)
        d_pre_r = d_pre_n * h_n * reset * (1 - reset)
        return None, torch.cat([d_pre_r, d_pre_z, d_pre_n * reset], -1), torch.cat([d_pre_r, d_pre_z, d_pre_n], -1)


class LSTMCell(Cell):
    mode, num_states, num_gates = "lstm", 2, 4

    def recompute(self, states, gi, w_hh, b_hh):
        pre = gi + _hidden_projection(states[:, 1], w_hh, b_hh)
        i, f, g, o = pre.chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        tanh_c = torch.tanh(torch.addcmul(i * g, f, states[:, 0]))
        k_diag = torch.stack([f, torch.zeros_like(f)], 1)
        return Gates(states, k_diag, (i, f, g, o, tanh_c))

    def vjp(self, gates, w):
        i, f, g, o, tanh_c = gates.saved
        w_c, w_h = w[:, 0], w[:, 1]
        d_c_block = w_h * o * (1 - tanh_c * tanh_c)  # through h = o·tanh(c'), c' the block's own
        d_c_new = w_c + d_c_block  # c' enters the residual output c and, in the block, h
        d_pre = torch.cat([
            d_c_new * g * i * (1 - i),
            d_c_new * gates.states[:, 0] * f * (1 - f),
            d_c_new * i * (1 - g * g),
            w_h * tanh_c * o * (1 - o),
        ], -1)
        return d_c_block * f, d_pre, d_pre


CELLS: dict[str, Cell] = {
    "rnn_tanh": RNNCell("rnn_tanh"),
    "rnn_relu": RNNCell("rnn_relu"),
    "gru": GRUCell(),
    "lstm": LSTMCell(),
}
