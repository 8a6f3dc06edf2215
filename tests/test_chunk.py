"""``chunk``: the backward's batched VJPs over a few layers at a time (lower peak memory) give the
gradients of the unchunked backward: exact at k ≥ L, and the same Theorem-2 estimate at small k."""
from __future__ import annotations

import pytest
import torch

from hbp_compile import hbp_compile

from .models import PreLNMLP, ReLUResidual, Stack, make, mlp_stack, transformer_stack, two_stage_stack
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


@pytest.mark.parametrize("k,chunk,per_call", [(2, None, 3), (100, None, 3), (100, 2, 2)])
def test_weight_gradients_restacked_per_chunk_are_exact(monkeypatch, k, chunk, per_call):
    """A stack whose saved values are mostly its stacked weights: the weight-gradient call frees
    them and restacks each chunk of layers from the parameters; the gradients do not change."""
    from hbp_compile.engine import saved

    restacked = []
    monkeypatch.setattr(saved, "RESTACK_MIN_BYTES", 0)  # this test's weights are small
    original = saved.SavedGroup._restacking_chunk
    monkeypatch.setattr(saved.SavedGroup, "_restacking_chunk",
                        lambda self: restacked.append(original(self)) or restacked[-1])
    torch.manual_seed(0)
    model = make(Stack([PreLNMLP(16, 32) for _ in range(12)], 3, 16, 2))  # 12 layers, batch 2
    x = torch.randn(2, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k) if k < 12 else autograd_grads(model, x)[1]
    assert max_relative_error(_grads(model, x, k=k, chunk=chunk), want) < 1e-9
    assert restacked and restacked[-1] == per_call  # 12 layers: a quarter, or the chunk option


class _ConvBlock(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


@pytest.mark.parametrize("k", [1, 100])
def test_convolution_blocks_are_chunked_automatically_and_stay_exact(monkeypatch, k):
    """chunk=None: convolution blocks take as many layers per call as keep the call's states within
    the budget (here lowered so that a small model is chunked); the gradients are the unchunked ones."""
    from hbp_compile.engine import program

    monkeypatch.setattr(program, "AUTO_CHUNK_STATE_BYTES", 2 * 4 * 6 * 6 * 8 * 2)  # two layers' states
    chosen = []
    original = program.automatic_chunk
    monkeypatch.setattr(program, "automatic_chunk", lambda *a: chosen.append(original(*a)) or chosen[-1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_ConvBlock(4) for _ in range(6)]).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)

    def grads(**options):
        model.zero_grad()
        hbp_compile(model, k=k, backend="eager", **options)(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    want = grads(chunk=6)  # one call: every layer of the group
    assert max_relative_error(grads(), want) < 1e-12
    assert chosen[-1] == 2


def _relu_stack(depth: int) -> Stack:
    return Stack([ReLUResidual(6) for _ in range(depth)], 3, 6, 2)


def _two_stages_tapped() -> Stack:
    stack = two_stage_stack()
    stack.epilogue = lambda states: stack.head(states[-1]).pow(2).mean() + states[2].pow(2).mean()
    return stack


def record_pipelined_runs(monkeypatch) -> list[int]:
    """Keep every run's states in one stack (as large states are, so the VJPs read views of it) and
    record the runs the pipelined iterations scan (engine/pipelined.py)."""
    from hbp_compile.engine import highway, layout

    monkeypatch.setattr(layout, "STACK_STATE_MIN_BYTES", 0)
    calls: list[int] = []
    original = highway.pipelined_step
    monkeypatch.setattr(highway, "pipelined_step", lambda *a: calls.append(a[0]) or original(*a))
    return calls


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("build,chunk", [
    (lambda: mlp_stack(7), 3),                 # one group fills one run; chunks of 3, 3, 1
    (lambda: mlp_stack(7, taps=True), 2),      # the outside's cotangent on every state
    (lambda: _relu_stack(6), 4),               # K a 0/1 mask
    (_two_stages_tapped, 2),                   # two runs: the projection's VJP lands in run 0's top row
])
@pytest.mark.parametrize("k,gamma", [(1, 0.0), (2, 0.3), (100, 0.0)])
def test_pipelined_iterations_give_the_whole_run_estimate(monkeypatch, build, chunk, recompute, k, gamma):
    """When one chunked group fills a run, each iteration scans the run chunk by chunk as its VJPs come
    (engine/pipelined.py): the same Theorem-2 estimate at small k, autograd's gradients at k >= L.
    The states are kept in one stack (as large states are), so the VJPs read views of it."""
    calls = record_pipelined_runs(monkeypatch)
    model = make(build())
    x = torch.randn(2, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, k, gamma) if k < 100 else autograd_grads(model, x)[1]
    got = _grads(model, x, k=k, gamma=gamma, chunk=chunk, recompute=recompute)
    assert max_relative_error(got, want) < 1e-9
    assert calls  # the pipelined path ran


@pytest.mark.parametrize("build", [lambda: _relu_stack(6), _two_stages_tapped])
def test_pipelined_iterations_without_the_c_scan(monkeypatch, build):
    """The torch-ops scans (CUDA, other dtypes, no C compiler): rows scanned in place, a bool K."""
    from hbp_compile.engine import native_scan

    monkeypatch.setattr(native_scan, "available", lambda t: False)
    model = make(build())
    x = torch.randn(2, 3, dtype=torch.float64)
    assert max_relative_error(_grads(model, x, k=2, chunk=2), highway_reference_grads(model, x, 2)) < 1e-9
    assert max_relative_error(_grads(model, x, k=100, chunk=2), autograd_grads(model, x)[1]) < 1e-9
    assert max_relative_error(_grads(model, x, k=2), highway_reference_grads(model, x, 2)) < 1e-9
