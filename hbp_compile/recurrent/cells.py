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

**Cotangent-linear VJPs.** The block's VJP is linear in the cotangent ``w``: every activation
derivative and gate it multiplies ``w`` by depends on the forward only. ``coefficients`` computes
those once per backward, as per-gate tensors ``(T, B, G, H)``; a Highway-BP iteration then costs one
multiply (``hidden_cotangent``) and one matmul with ``W_hh`` instead of re-deriving ~20 pointwise
ops (DESIGN.md §5). ``tests/test_recurrent.py`` checks the result against autograd and against a
sequential reference written from the module equations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def _hidden_projection(h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    out = torch.matmul(h, w_hh.t())
    return out if b_hh is None else out + b_hh


@dataclass
class Coefficients:
    """What one batched recompute of the steps keeps for every VJP of a backward.

    ``hidden[t, :, g]`` multiplies gate g's signal into the cotangent of ``gh = h W_hh^T + b_hh``;
    the cotangent of ``gi`` is the same but for GRU's candidate gate, whose coefficient on ``gi`` is
    ``new_gate`` (``hidden`` has it times the reset gate); ``direct`` (LSTM) multiplies the cotangent
    of ``h'`` into that of the input cell state ``c`` through the block.
    """

    k_diag: Tensor  # (T, m, B, H): the diagonal of K per step
    hidden: Tensor  # (T, B, G, H)
    new_gate: Tensor | None = None  # GRU: (T, B, H)
    direct: Tensor | None = None

    def fields(self) -> tuple[Tensor | None, ...]:
        return self.k_diag, self.hidden, self.new_gate, self.direct


class Cell:
    """A recurrent cell: its ``coefficients`` once per backward, then VJPs that are linear maps."""

    mode: str
    num_states: int
    num_gates: int

    def coefficients(self, states: Tensor, gi: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Coefficients:
        raise NotImplementedError

    def hidden_cotangent(self, coef: Coefficients, w: Tensor, out: Tensor | None = None) -> Tensor:
        """``∂/∂gh`` of cotangent ``w`` ``(T, m, B, H)`` on the steps' outputs, ``(T, B, G, H)``, into
        ``out`` when given. Its product with ``W_hh`` is ``w·J`` on the hidden state."""
        return torch.mul(w[:, -1].unsqueeze(2), coef.hidden, out=out) if out is not None else \
            w[:, -1].unsqueeze(2) * coef.hidden

    def input_cotangent_(self, coef: Coefficients, w: Tensor, d_gh: Tensor) -> Tensor:
        """``∂/∂gi`` of cotangent ``w``, written over ``d_gh = hidden_cotangent(coef, w)``."""
        if coef.new_gate is not None:
            torch.mul(w[:, -1], coef.new_gate, out=d_gh[:, :, 2])
        return d_gh


class RNNCell(Cell):
    num_states, num_gates = 1, 1

    def __init__(self, mode: str):
        self.mode = mode

    def coefficients(self, states, gi, w_hh, b_hh):
        y = gi + _hidden_projection(states[:, 0], w_hh, b_hh)
        slope = 1 - torch.tanh(y).square() if self.mode == "rnn_tanh" else (y > 0).to(y.dtype)
        return Coefficients(torch.zeros_like(states), slope.unsqueeze(2))


class GRUCell(Cell):
    mode, num_states, num_gates = "gru", 1, 3

    def coefficients(self, states, gi, w_hh, b_hh):
        gh = _hidden_projection(states[:, 0], w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        reset = torch.sigmoid(i_r + h_r)
        update = torch.sigmoid(i_z + h_z)
        new = torch.tanh(torch.addcmul(i_n, reset, h_n))
        # n = tanh(i_n + r ⊙ h_n), h' = u ⊙ h + (1 − u) ⊙ n: the chain rule through each gate
        d_n = (1 - update) * (1 - new * new)
        d_z = (states[:, 0] - new) * update * (1 - update)
        d_r = d_n * h_n * reset * (1 - reset)
        return Coefficients(update.unsqueeze(1), torch.stack([d_r, d_z, d_n * reset], 2), new_gate=d_n)


class LSTMCell(Cell):
    mode, num_states, num_gates = "lstm", 2, 4

    def coefficients(self, states, gi, w_hh, b_hh):
        return self.coefficients_from_gates(states, gi + _hidden_projection(states[:, 1], w_hh, b_hh))

    def coefficients_from_gates(self, states: Tensor, pre: Tensor) -> Coefficients:
        """``coefficients`` from the pre-activation gates ``gi + gh`` of every step ``(T, B, 4H)``."""
        i, f, g, o = pre.chunk(4, -1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        tanh_c = torch.tanh(torch.addcmul(i * g, f, states[:, 0]))
        through_h = o * (1 - tanh_c * tanh_c)  # ∂h'/∂c' for h' = o·tanh(c')
        hidden = torch.stack([g * i * (1 - i), states[:, 0] * f * (1 - f), i * (1 - g * g),
                              tanh_c * o * (1 - o)], 2)
        k_diag = torch.stack([f, torch.zeros_like(f)], 1)
        # the block carries w_h into the input c through c' = f·c + ... and h' (c itself is on R)
        return Coefficients(k_diag, hidden, direct=torch.stack([through_h, through_h * f], 1))

    def hidden_cotangent(self, coef, w, out=None):
        w_c, w_h = w[:, 0], w[:, 1]
        d_c_new = torch.addcmul(w_c, w_h, coef.direct[:, 0])  # c' feeds the output c and, in the block, h
        out = torch.empty_like(coef.hidden) if out is None else out
        torch.mul(d_c_new.unsqueeze(2), coef.hidden[:, :, :3], out=out[:, :, :3])
        torch.mul(w_h, coef.hidden[:, :, 3], out=out[:, :, 3])
        return out

    def direct_cotangent(self, coef: Coefficients, w: Tensor) -> Tensor:
        """The block's part of ``w·J`` on the input cell state: ``w_h ⊙ o(1 − tanh²c') ⊙ f``."""
        return w[:, 1] * coef.direct[:, 1]


CELLS: dict[str, Cell] = {
    "rnn_tanh": RNNCell("rnn_tanh"),
    "rnn_relu": RNNCell("rnn_relu"),
    "gru": GRUCell(),
    "lstm": LSTMCell(),
}
