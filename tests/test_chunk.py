"""``chunk``: the backward's batched VJPs over a few layers at a time (lower peak memory) give the
gradients of the unchunked backward: exact at k ≥ L, and the same Theorem-2 estimate at small k."""
from __future__ import annotations

import pytest
import torch

from hbp_compile import hbp_compile

from .models import PreLNMLP, Stack, make, mlp_stack, transformer_stack
from .reference import autograd_grads, highway_reference_grads, max_relative_error


def _grads(model, x, **options):
    model.zero_grad()
    hbp_compile(model, backend="eager", **options)(x).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("chunk", [1, 3])
def test_chunked_backward_is_the_same_estimate(chunk, recompute):
    model = make(transformer_stack(7))
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, 2)
    got = _grads(model, x, k=2, chunk=chunk, recompute=recompute)
    assert max_relative_error(got, want) < 1e-9
    _, exact = autograd_grads(model, x)
    assert max_relative_error(_grads(model, x, k=100, chunk=chunk, recompute=recompute), exact) < 1e-9


def test_chunks_of_shared_weights_add_up():
    block = PreLNMLP(4, 8)
    model = make(Stack([block] * 5, 3, 4, 2))  # one weight for every layer: its gradient is a sum
    x = torch.randn(2, 3, dtype=torch.float64)
    _, exact = autograd_grads(model, x)
    assert max_relative_error(_grads(model, x, k=100, chunk=2), exact) < 1e-9


def test_bad_chunk_is_rejected():
    with pytest.raises(ValueError, match="chunk must be an int >= 1"):
        hbp_compile(make(mlp_stack(2)), chunk=0)
