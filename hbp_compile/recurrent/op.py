"""``hbp::recurrence``: one layer (one direction) of an RNN/GRU/LSTM with a Highway-BP backward.

A ``torch.library`` custom op, so that tracing (make_fx, dynamo, Inductor) keeps it as one opaque
node instead of unrolling ``T`` time steps: compile time does not grow with the sequence length.

* Forward: PyTorch's own fused kernel for one layer (``torch.gru`` ...) under no autograd, returning
  every state ``(T+1, m, B, H)``; LSTM's cell states, which the kernel does not return, come from
  one batched gate computation and a log-depth scan of ``c_t = f_t c_{t-1} + i_t g_t``.
* Backward (HIGHWAY_BP.md §3): one batched split step over all ``T`` steps (time folded into the
  batch), ``w^0 = scan(a)``, ``min(k, T)`` iterations of one VJP plus a scan, then one VJP for the
  weights, the inputs and ``h_0``. The cotangents ``a`` of every state (the output sequence reads all
  of them) enter every iteration, as taps do.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import weakref
from collections.abc import Callable
from typing import Generic, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.iterate import IterationUsage, refuse_double_backward, run_iterations
from ..engine.scans import ResidualScan, linear_scan
from ..compile import GraphKernel, without_autocast
from .cells import CELLS, Coefficients

_KERNELS = {"rnn_tanh": torch.rnn_tanh, "rnn_relu": torch.rnn_relu, "gru": torch.gru}
STEP_KERNELS = {"rnn_tanh": torch.rnn_tanh_cell, "rnn_relu": torch.rnn_relu_cell, "gru": torch.gru_cell,
                "lstm": torch.lstm_cell}


V = TypeVar("V")


class PerInput(NamedTuple, Generic[V]):
    """One value per differentiable input of the op, by name: what needs a gradient, the gradients."""

    input: V
    state0: V
    w_ih: V
    w_hh: V
    b_ih: V
    b_hh: V


# Where a recurrence's backward records its iterations (``hbp_iterations``, ``k="auto"``): the op's
# arguments can only be tensors and scalars, so its ``usage`` argument names an IterationUsage here,
# kept alive by the ``Recurrence`` record of the graph that holds the op.
_USAGES: weakref.WeakValueDictionary[str, IterationUsage] = weakref.WeakValueDictionary()
_usage_ids = itertools.count()


def register_usage(usage: IterationUsage) -> str:
    """The key under which the backward of an ``hbp::recurrence`` call records into ``usage``.

    >>> usage = IterationUsage()
    >>> register_usage(usage).startswith("recurrence")
    True
    """
    key = f"recurrence{next(_usage_ids)}"
    _USAGES[key] = usage
    return key


def _params(w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None) -> list[Tensor]:
    return [w_ih, w_hh] if b_ih is None else [w_ih, w_hh, b_ih, b_hh]


def _all_states(mode: str, input: Tensor, state0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
               b_hh: Tensor | None, k: int, gamma: float, step_kernel: bool = False, tol: float = 0.0,
               backend: str = "eager", usage: str = "") -> tuple[Tensor, Tensor]:
    """All states ``(T+1, m, B, H)`` of one recurrent layer over a time-major ``input`` ``(T, B, D)``,
    and what the backward reads of the forward beside them: for the fused LSTM the pre-activation
    gates of every step ``(T, B, 4H)``, computed anyway for the cell states (the backward would
    compute them a third time), else an empty tensor. Only the states carry a gradient.

    ``state0`` is ``(m, B, H)``: ``[h]``, or ``[c, h]`` for LSTM. With ``step_kernel`` the forward is a
    loop of the one-step kernels (``torch.gru_cell`` ...), bit-identical to a user's loop over
    ``nn.GRUCell``; else the fused sequence kernel of ``nn.GRU``, bit-identical to the module.
    ``tol > 0``: the backward runs at most ``k`` iterations and stops once converged (``k="auto"``).
    ``backend="inductor"``: the backward's once-per-backward coefficients are an Inductor kernel.
    ``usage``: a ``register_usage`` key; each backward records the iterations it ran there.

    >>> T, B, D, H = 5, 2, 3, 4
    >>> gru = torch.nn.GRU(D, H)
    >>> x, h0 = torch.randn(T, B, D), torch.zeros(1, B, H)
    >>> states, _ = torch.ops.hbp.recurrence("gru", x, h0, *gru.parameters(), 3, 0.0)
    >>> torch.allclose(states[1:, 0], gru(x, h0)[0])
    True
    """
    if step_kernel:
        return _step_loop(mode, input, state0, w_ih, w_hh, b_ih, b_hh), input.new_empty(0)
    params = _params(w_ih, w_hh, b_ih, b_hh)
    if mode != "lstm":
        out, _ = _KERNELS[mode](input, state0, params, b_ih is not None, 1, 0.0, False, False, False)
        return torch.cat([state0, out]).unsqueeze(1), input.new_empty(0)
    c0, h0 = state0[0], state0[1]
    out, _, _ = torch.lstm(input, (h0[None], c0[None]), params, b_ih is not None, 1, 0.0, False, False, False)
    hs = torch.cat([h0[None], out])
    gates = F.linear(input, w_ih, b_ih) + F.linear(hs[:-1], w_hh, b_hh)
    i, f, g, _ = gates.chunk(4, -1)
    cs = linear_scan(torch.cat([c0[None], torch.sigmoid(i) * torch.tanh(g)]),
                     torch.cat([torch.zeros_like(c0[None]), torch.sigmoid(f)]))
    return torch.stack([cs, hs], 1), gates


recurrence = torch.library.custom_op("hbp::recurrence", mutates_args=())(_all_states)
# the op's arguments by name (the autograd context is handed them as one positional tuple)
_SIGNATURE = inspect.signature(_all_states)


def _step_loop(mode: str, input: Tensor, state0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
               b_hh: Tensor | None) -> Tensor:
    step = STEP_KERNELS[mode]
    states = [state0]
    for x_t in input:
        if mode == "lstm":
            h, c = step(x_t, (states[-1][1], states[-1][0]), w_ih, w_hh, b_ih, b_hh)
            states.append(torch.stack([c, h]))
        else:
            states.append(step(x_t, states[-1][0], w_ih, w_hh, b_ih, b_hh).unsqueeze(0))
    return torch.stack(states)


@recurrence.register_fake
def _(mode, input, state0, w_ih, w_hh, b_ih, b_hh, k, gamma, step_kernel=False, tol=0.0, backend="eager", usage=""):
    gates = (input.shape[0], input.shape[1], w_ih.shape[0]) if mode == "lstm" and not step_kernel else (0,)
    return input.new_empty((input.shape[0] + 1, *state0.shape)), input.new_empty(gates)


def _setup_context(ctx, inputs, output):
    args = _SIGNATURE.bind(*inputs)
    args.apply_defaults()
    a = args.arguments
    ctx.mode, ctx.k, ctx.gamma, ctx.tol, ctx.backend = a["mode"], a["k"], a["gamma"], a["tol"], a["backend"]
    ctx.usage = a["usage"]
    ctx.num_inputs = len(inputs)
    states, gates = output
    ctx.mark_non_differentiable(gates)
    ctx.save_for_backward(a["input"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], states, gates)


def _coefficient_kernel(compute: Callable[..., Coefficients], backend: str) -> Callable[..., Coefficients]:
    """``compute`` as one compiled kernel (a ``GraphKernel``, which returns tensors only): the fields the
    cell leaves ``None`` are dropped from its outputs and put back around them.

    A ``GraphKernel``, not a ``torch.compile``d function: one function serves every model and every
    shape, and dynamo would count each shape against its recompile limit, which the compile-time
    training step of a model's fifth batch shape then hit (the model fell back to exact backprop)."""
    present: list[bool] = []  # which Coefficients fields the cell fills (set while the kernel traces)

    def fields(*args: Tensor) -> tuple[Tensor, ...]:
        found = compute(*args).fields()
        present[:] = [f is not None for f in found]
        return tuple(f for f in found if f is not None)

    kernel = GraphKernel(fields, backend)

    def run(*args: Tensor) -> Coefficients:
        found = iter(kernel(*args))
        return Coefficients(*(next(found) if p else None for p in present))

    return run


@functools.cache
def _coefficients(mode: str, backend: str, biased: bool) -> Callable[..., Coefficients]:
    """``(states, input, w_ih, w_hh, b_ih, b_hh) -> Coefficients``: the input projection and the cell's
    VJP coefficients of all steps; under Inductor one fused kernel around two matmuls."""
    cell = CELLS[mode]

    def coefficients(states: Tensor, input: Tensor, w_ih: Tensor, w_hh: Tensor, *biases: Tensor) -> Coefficients:
        b_ih, b_hh = biases if biased else (None, None)
        return cell.coefficients(states, F.linear(input, w_ih, b_ih), w_hh, b_hh)

    kernel = _coefficient_kernel(coefficients, backend)

    def run(states: Tensor, input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
            b_hh: Tensor | None) -> Coefficients:
        return kernel(states, input, w_ih, w_hh, *((b_ih, b_hh) if biased else ()))

    return run


@functools.cache
def _coefficients_from_gates(mode: str, backend: str) -> Callable[[Tensor, Tensor], Coefficients]:
    """``(states, pre-activation gates) -> Coefficients``: the cell's VJP coefficients of all steps from
    the gates the forward computed (one fused pointwise kernel under Inductor)."""
    return _coefficient_kernel(CELLS[mode].coefficients_from_gates, backend)


def highway_backward(mode: str, k: int, gamma: float, grad_states: Tensor, states: Tensor, input: Tensor,
                     weights: tuple[Tensor, Tensor, Tensor | None, Tensor | None], needs_grad: PerInput[bool],
                     tol: float = 0.0, backend: str = "eager", gates: Tensor | None = None,
                     usage: IterationUsage | None = None) -> PerInput[Tensor | None]:
    """Gradients of ``(input, state0, w_ih, w_hh, b_ih, b_hh)`` given the cotangents of all states.

    The cell's VJP coefficients are computed once (``cells.py``); an iteration is then one multiply,
    one matmul with ``W_hh`` and one O(T) scan that adds the cotangents ``a`` on the way, writing into
    one of two buffers that the iterations take turns on.
    """
    cell = CELLS[mode]
    w_ih, w_hh, b_ih, b_hh = weights
    steps, hidden = states.shape[0] - 1, cell.num_states - 1
    x = states[:-1]
    if gates is not None:  # the forward's pre-activations (fused LSTM): no projection to redo
        coef = _coefficients_from_gates(mode, backend)(x, gates.to(states.dtype))
    else:
        coef = _coefficients(mode, backend, b_ih is not None)(x, input, w_ih, w_hh, b_ih, b_hh)
    # K = 0 (plain RNN): nothing travels along the residual path, and the scan only adds a and v
    scan = ResidualScan(0.0 if mode.startswith("rnn") else coef.k_diag if not gamma else (1.0 - gamma) * coef.k_diag,
                        steps + 1)
    a = grad_states.contiguous()
    v = torch.zeros_like(x)
    buffers = [torch.empty_like(a), torch.empty_like(a)]
    d_gh = torch.empty_like(coef.hidden)  # reused by every iteration: no fresh pages per iteration

    def step(w: list[Tensor]) -> list[Tensor]:
        cell.hidden_cotangent(coef, w[0][1:], out=d_gh)
        if coef.direct is None:
            torch.matmul(d_gh.flatten(2), w_hh, out=v[:, 0])
        else:
            v[:, hidden] = d_gh.flatten(2) @ w_hh
            v[:, 0] = cell.direct_cotangent(coef, w[0][1:])
        if gamma:
            v.addcmul_(coef.k_diag, w[0][1:], value=gamma)  # γ-split: γ·K moves into the block (HIGHWAY_BP.md §1)
        out = buffers[0] if buffers[0] is not w[0] else buffers[1]
        return [scan(a, v, out=out)]

    (w,), used = run_iterations([scan(a)], step, max_iterations=min(k, steps), tol=tol, what=f"recurrence {mode}")
    if usage is not None:
        usage.record(used)
    cell.hidden_cotangent(coef, w[1:], out=d_gh)
    flat = d_gh.flatten(0, 1).flatten(1)
    grad_w_hh = flat.t() @ x[:, hidden].flatten(0, -2) if needs_grad.w_hh else None
    grad_b_hh = flat.sum(0) if b_hh is not None and needs_grad.b_hh else None
    cell.input_cotangent_(coef, w[1:], d_gh)  # d_gh becomes d_gi
    return PerInput(
        input=d_gh.flatten(2) @ w_ih if needs_grad.input else None,
        state0=w[0] if needs_grad.state0 else None,
        w_ih=flat.t() @ input.flatten(0, -2) if needs_grad.w_ih else None,
        w_hh=grad_w_hh,
        b_ih=flat.sum(0) if b_ih is not None and needs_grad.b_ih else None,
        b_hh=grad_b_hh,
    )


def _backward(ctx, grad_states, _grad_gates):
    refuse_double_backward("recurrence")
    input, w_ih, w_hh, b_ih, b_hh, states, gates = ctx.saved_tensors
    with without_autocast():  # as the chains' backward: the op's dtypes are the forward's
        grads = highway_backward(ctx.mode, ctx.k, ctx.gamma, grad_states, states, input,
                                 (w_ih, w_hh, b_ih, b_hh), PerInput(*ctx.needs_input_grad[1:7]), ctx.tol,
                                 backend=ctx.backend, gates=gates if gates.numel() else None,
                                 usage=_USAGES.get(ctx.usage))
    return (None, *grads, *[None] * (ctx.num_inputs - 1 - len(grads)))


recurrence.register_autograd(_backward, setup_context=_setup_context)
