"""The forward keeps a run's states in one stack (``engine/layout.py``, ``StateStacks``) when a group
reads them consecutively and they are large enough; the backward's batched inputs are then views
of it. Either way the forward and the gradients are the same."""
from __future__ import annotations

import pytest
import torch

from hbp_compile import hbp_compile
from hbp_compile.engine import layout

from .models import ReLUResidual, Stack, make, mlp_stack, two_stage_stack
from .reference import autograd_grads, highway_reference_grads, max_relative_error


def _run(model, x, min_bytes, **options):
    model.zero_grad()
    original = layout.STACK_STATE_MIN_BYTES
    layout.STACK_STATE_MIN_BYTES = min_bytes
    try:
        out = hbp_compile(model, backend="eager", **options)(x)
        out.backward()
    finally:
        layout.STACK_STATE_MIN_BYTES = original
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("build", [
    lambda: mlp_stack(5, taps=True),
    lambda: Stack([ReLUResidual(6) for _ in range(5)], 3, 6, 2),
    two_stage_stack,
])
@pytest.mark.parametrize("k", [2, 100])
def test_stacked_states_give_the_same_forward_and_gradients(build, k, recompute):
    model = make(build())
    x = torch.randn(2, 3, dtype=torch.float64)
    out_stacked, stacked = _run(model, x, 0, k=k, recompute=recompute)
    out_separate, separate = _run(model, x, 2 ** 40, k=k, recompute=recompute)
    assert torch.equal(out_stacked, out_separate)
    want = highway_reference_grads(model, x, k) if k < 100 else autograd_grads(model, x)[1]
    assert max_relative_error(stacked, want) < 1e-9
    assert max_relative_error(separate, want) < 1e-9


def test_the_batched_inputs_are_a_view_of_the_forward_stack(monkeypatch):
    from hbp_compile.engine import program

    seen = []
    original = program.GroupProgram.stack_inputs
    monkeypatch.setattr(program.GroupProgram, "stack_inputs",
                        lambda self, stacks, *a: seen.append(stacks) or original(self, stacks, *a))
    model = make(mlp_stack(4))
    x = torch.randn(2, 3, dtype=torch.float64)
    _run(model, x, 0, k=2)
    stacks = seen[-1]  # the compile-time training step ran one backward before
    assert isinstance(stacks.per_run[0], torch.Tensor)  # one stack for the run
    assert stacks.rows(((0, (0, 1, 2, 3)),))._base is stacks.per_run[0]
    _run(model, x, 2 ** 40, k=2)
    assert isinstance(seen[-1].per_run[0], list)  # small states: separate tensors


# (zoo entry, pipelined): convolution stages are one group per run; transformers alternate
# attention and MLP groups, whose states stay separate
ZOO_SAMPLE = [("convnext", True), ("resnet", True), ("gpt2", False), ("nn.TransformerEncoder (pre-LN)", False)]


@pytest.mark.parametrize("name,pipelined", ZOO_SAMPLE)
def test_models_written_by_others_stay_exact_with_stacked_states_and_pipelined_chunks(monkeypatch, name, pipelined):
    """Zoo models (tests/zoo.py) with the states of every run a group reads consecutively in a stack
    and one layer per VJP call, so that a group filling a run is pipelined: the forward
    bit-identical, exact at k >= L."""
    pytest.importorskip("transformers")
    from . import zoo
    from .test_chunk import record_pipelined_runs

    calls = record_pipelined_runs(monkeypatch)
    monkeypatch.setattr(zoo, "hbp_compile", lambda model, **options: hbp_compile(model, chunk=1, **options))
    (entry,) = [e for e in zoo.ZOO if e.name == name]
    result = zoo.run(entry)
    assert result.forward_equal
    assert result.error is not None and result.error < entry.tolerance, result.error
    assert result.layers == entry.expected_found
    assert bool(calls) == pipelined
