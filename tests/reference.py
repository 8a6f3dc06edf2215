"""A slow, layer-by-layer Highway-BP written straight from Theorem 2 (HIGHWAY_BP.md §3).

It shares no code with the engine: it reads the blocks' explicit ``block``/``residual`` split and
computes every VJP with plain autograd, one layer at a time:

    w_L^k = a_L,   w_i^{k+1} = a_i + w_{i+1}^k J'_{i+1} + w_{i+1}^{k+1} K'_{i+1}
    K' = (1-γ) K,  J' = J + γ K                      (γ-split)
    ∂L/∂θ_i = w_i^k ∂f_i/∂θ_i,                       ∂L/∂h_0 = w_0^k
"""
from __future__ import annotations

import torch


def _detached(z):
    return tuple(t.detach() for t in z) if isinstance(z, tuple) else z.detach()


def _vjp_through_block(layer, x, w):
    x = x.detach().requires_grad_()
    y = layer.residual(x.detach(), layer.block(x))
    (g,) = torch.autograd.grad(y, x, w)
    return g


def _vjp_through_residual(layer, x, w):
    z = _detached(layer.block(x.detach()))
    x = x.detach().requires_grad_()
    y = layer.residual(x, z)
    if not y.requires_grad:  # K = 0: a layer without a residual path
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(y, x, w)
    return g


def highway_reference_grads(model, x, k: int, gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """Parameter gradients of ``model(x)`` (a ``tests.models.Stack``) under Highway-BP with ``k``."""
    for p in model.parameters():
        p.grad = None
    h0 = model.prologue(x)
    states = [h0.detach()]
    for layer in model.layers:
        states.append(layer(states[-1]).detach())
    leaves = [s.clone().requires_grad_() for s in states]
    loss = model.epilogue(leaves)
    loss.backward()
    n = len(model.layers)
    a = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]

    def j(i, w):  # w J'_i  (layer i maps states[i-1] to states[i])
        layer = model.layers[i - 1]
        out = _vjp_through_block(layer, states[i - 1], w)
        return out + gamma * _vjp_through_residual(layer, states[i - 1], w) if gamma else out

    def kk(i, w):  # w K'_i
        return (1 - gamma) * _vjp_through_residual(model.layers[i - 1], states[i - 1], w)

    w = [None] * (n + 1)
    w[n] = a[n]
    for i in range(n - 1, -1, -1):
        w[i] = a[i] + kk(i + 1, w[i + 1])
    for _ in range(k):
        new = [None] * (n + 1)
        new[n] = a[n]
        for i in range(n - 1, -1, -1):
            new[i] = a[i] + j(i + 1, w[i + 1]) + kk(i + 1, new[i + 1])
        w = new
    for i, layer in enumerate(model.layers, start=1):
        layer(states[i - 1]).backward(w[i])
    if h0.requires_grad:  # a zero start state (an RNN's) carries no gradient
        h0.backward(w[0])
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def autograd_grads(model, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    out = model(x)
    out.backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Largest per-parameter ‖got − want‖ / ‖want‖. A parameter whose true gradient is zero (a bias
    right before a training-mode BatchNorm) is measured against 1e-3 × the largest gradient norm
    instead, since both sides are then rounding noise."""
    assert got.keys() == want.keys()
    floor = 1e-3 * max(w.norm().item() for w in want.values())
    return max(((got[n] - want[n]).norm() / max(want[n].norm().item(), floor, 1e-30)).item() for n in want)
