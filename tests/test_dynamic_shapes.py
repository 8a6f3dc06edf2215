"""Inputs whose shapes change between calls (issue 33): torch.compile's automatic dynamic shapes.

The first call specializes; a shape that changes makes dynamo trace once more with symbolic sizes,
and that graph serves every later shape (no recompile limit to reach). The pass rewrites the graph
at each concrete shape it meets (``hbp_compile/shapes.py``). Each test checks Highway-BP at every
shape: exact at k ≥ L against autograd, and at small k equal to the Theorem-2 reference (so the
call did run Highway-BP, not backprop). float64, eager backend, except the Inductor check.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hbp_compile import hbp_compile

from .models import make, mlp_stack, transformer_stack
from .reference import autograd_grads, highway_reference_grads, max_relative_error

TOL = 1e-9
# batch and sequence sizes change; more distinct shapes than the recompile limit we set below
SHAPES = [(3, 5), (5, 5), (7, 6), (2, 9), (5, 5), (4, 3)]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("entry", ["hbp_compile", "torch.compile"])
def test_a_chain_runs_highway_bp_at_every_shape(entry):
    """More distinct shapes than dynamo's recompile limit (3 here: a static graph, then B, then B and
    T symbolic): every call is Highway-BP, equal to the Theorem-2 reference at k=1 (and not to
    backprop). ``torch.compile(backend="hbp")`` once returned the first shape's rewrite for dynamo's
    symbolic graph: the third shape raised."""
    model = make(transformer_stack(4)).double()
    compiled = (hbp_compile(model, k=1, backend="eager") if entry == "hbp_compile" else
                torch.compile(model, backend="hbp", options={"k": 1, "backend": "eager"}))
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        for i, (batch, steps) in enumerate(SHAPES):
            x = torch.randn(batch, steps, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            want = highway_reference_grads(model, x, 1)
            _, exact = autograd_grads(model, x)
            model.zero_grad()
            compiled(x).backward()
            assert max_relative_error(_grads(model), want) < TOL, (batch, steps)
            assert max_relative_error(_grads(model), exact) > 1e-6, "k=1 must differ from backprop"
    if entry == "hbp_compile":
        assert compiled.uncaptured_calls == 0
        records = compiled.hbp_backend.records
        # the first shape static, then one rewrite per new shape of the symbolic graphs
        assert [r.input_shapes for r in records][0] == "" and all(r.input_shapes for r in records[1:])
        assert all(r.num_layers == 4 for r in records)
        assert "rewritten for inputs of shapes (5, 5, 3)" in str(compiled.hbp_report)


def test_exact_at_k_at_least_depth_at_every_shape():
    model = make(mlp_stack(3)).double()
    compiled = hbp_compile(model, k=3, backend="eager")
    for i, (batch, steps) in enumerate(SHAPES):
        x = torch.randn(batch, steps, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        _, exact = autograd_grads(model, x)
        model.zero_grad()
        out = compiled(x)
        assert torch.equal(out, model(x))
        out.backward()
        assert max_relative_error(_grads(model), exact) < TOL


class _GRULanguageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.rnn = nn.GRU(4, 5, batch_first=True)
        self.head = nn.Linear(5, 11)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0]).pow(2).mean()


def test_a_recurrence_runs_highway_bp_at_every_batch_and_length():
    torch.manual_seed(0)
    model = _GRULanguageModel().double()
    exact_model = hbp_compile(model, k=100, backend="eager")
    truncated = hbp_compile(model, k=1, backend="eager")
    for i, (batch, steps) in enumerate(SHAPES):
        ids = torch.randint(0, 11, (batch, steps), generator=torch.Generator().manual_seed(i))
        model.zero_grad()
        model(ids).backward()
        want = _grads(model)
        for compiled, exact in ((exact_model, True), (truncated, False)):
            model.zero_grad()
            compiled(ids).backward()
            error = max_relative_error(_grads(model), want)
            assert error < TOL if exact else error > 1e-6, (batch, steps, exact, error)
    assert exact_model.uncaptured_calls == truncated.uncaptured_calls == 0
    assert all(r.recurrences and r.recurrences[0].swapped for r in truncated.hbp_backend.records)


def test_a_model_with_a_padding_mask_is_exact_at_every_shape():
    """Hugging Face GPT-2 (as its config comes, ``use_cache=True``) with right padding masks whose
    batch and length change."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=32,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).double().train()
    compiled = hbp_compile(model, k=100, backend="eager")
    for i, (batch, steps) in enumerate(SHAPES[:4]):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(1, 32, (batch, steps), generator=g)
        mask = torch.ones(batch, steps, dtype=torch.long)
        mask[0, steps - 2:] = 0
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).sum().backward()
        want = _grads(model)
        model.zero_grad()
        compiled(input_ids=ids, attention_mask=mask).last_hidden_state.pow(2).sum().backward()
        assert max_relative_error(_grads(model), want) < 1e-8, (batch, steps)
    assert compiled.uncaptured_calls == 0 and all(r.num_layers == 4 for r in compiled.hbp_backend.records)


def test_mark_dynamic_and_dynamic_true_trace_with_symbolic_sizes_from_the_first_call():
    model = make(mlp_stack(3)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for how in ("mark_dynamic", "dynamic=True"):
        compiled = hbp_compile(model, k=3, backend="eager", dynamic=True if how == "dynamic=True" else None)
        first = x.clone()
        if how == "mark_dynamic":
            torch._dynamo.mark_dynamic(first, 0)
        _, exact = autograd_grads(model, first)
        model.zero_grad()
        compiled(first).backward()
        assert max_relative_error(_grads(model), exact) < TOL
        assert compiled.hbp_backend.records[0].input_shapes == "(4, 3)", how
    with pytest.raises(TypeError, match="dynamic must be None, True or False"):
        hbp_compile(model, dynamic="auto")


def test_inductor_float32_is_exact_at_a_new_shape():
    """The default path: Inductor, float32, a batch that changes; k ≥ L equals autograd at each shape."""
    model = make(mlp_stack(3)).float()
    compiled = hbp_compile(model, k=3)
    for i, batch in enumerate((4, 6, 5)):
        x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(i))
        _, exact = autograd_grads(model, x)
        model.zero_grad()
        compiled(x).backward()
        assert max_relative_error(_grads(model), exact) < 1e-4
    assert [bool(r.input_shapes) for r in compiled.hbp_backend.records] == [False, True, True]
