"""The default path (issue 28): what a user runs first — Inductor, float32 or bfloat16 autocast, the
Hugging Face configs' own defaults (``use_cache=True``), padding masks, grouped-query attention,
``labels=``. Each family trains one step through ``hbp_compile(model, k=10_000)`` with no option
set but ``k``: no exception, no fallback, the layers the eager zoo finds, and the gradient of
autograd in the same precision (``zoo.ZooResult.passes``: float32 within 1e-4 of float64 autograd, or
3 × float32 autograd's own error where that is larger; autocast cosine ≥ 0.99).

``python -m tests.zoo --backend inductor --dtype autocast`` prints the whole zoo this way.
"""
from __future__ import annotations

import pytest

from . import zoo

pytest.importorskip("transformers")

# decoders (GPT-2 as its config comes, Llama with GQA and a left-padded mask, Gemma-2, GPT-Neo),
# encoders (BERT with a padding mask, ModernBERT), encoder-decoder (T5: its encoder and decoder stacks), state space
# (Mamba) and the recurrent family (nn.GRU, swapped for a Highway-BP recurrence)
FAMILIES = ("gpt2", "llama, GQA, left padding", "gemma2", "gpt_neo", "bert, padding mask", "modernbert",
            "t5", "mamba", "nn.GRU")
CASES = [(name, dtype) for dtype in ("float32", "autocast") for name in FAMILIES]


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_family_trains_exactly_on_the_default_path(name, dtype):
    entry = next(e for e in zoo.ZOO if e.name == name)
    result = zoo.run(entry, backend="inductor", dtype=dtype)
    assert not result.warnings, result.warnings
    assert result.layers == entry.expected_found
    assert result.forward_equal
    assert result.passes(entry), (result.error, result.backprop_error)


def test_the_math_attention_replacement_takes_grouped_query_heads():
    """SDPA hands grouped-query attention to the fused CPU kernel as fewer key/value heads; the
    math kernel that replaces it for vmap must be told (enable_gqa), batched or not."""
    import torch

    from hbp_compile.engine.layer_graphs import _math_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, heads, 8, 4, generator=g) for heads in (4, 2, 2))
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q[0], k[0], v[0], 0.0, True)[0]
    torch.testing.assert_close(_math_attention(q[0], k[0], v[0], 0.0, True)[0], want)
    batched = torch.func.vmap(lambda q, k, v: _math_attention(q, k, v, 0.0, True)[0])(q, k, v)
    torch.testing.assert_close(batched[0], want)


def test_no_user_backward_compiles_anything_under_autocast(monkeypatch):
    """Everything the chain's backward runs is compiled by the compile-time training step, inside the
    first call's forward: the user's own backward, and every later step, compile nothing (a compile
    nested in a backward is what raised "Metric(s) {'is_forward'} have already been set")."""
    import torch

    from hbp_compile import hbp_compile
    from hbp_compile.compile import GraphKernel

    from .models import make, mlp_stack
    from .reference import max_relative_error

    compiles = []
    original = GraphKernel._compile
    monkeypatch.setattr(GraphKernel, "_compile", lambda self, args: compiles.append(1) or original(self, args))
    model = make(mlp_stack(3, d=8, hidden=16)).float()
    compiled = hbp_compile(model, k=3)
    for step in range(2):
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(step))
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = model(x)
        want.float().backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(x)
        assert compiles if step == 0 else not compiles  # the first forward compiled every kernel
        compiles.clear()
        out.float().backward()
        assert not compiles, "a kernel was compiled inside the user's backward"
        assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want_grads) < 2e-2
