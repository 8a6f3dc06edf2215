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
# encoders (BERT with a padding mask, ModernBERT), encoder-decoder and encoder (T5), state space
# (Mamba) and the recurrent family (nn.GRU, swapped for a Highway-BP recurrence)
FAMILIES = ("gpt2", "llama, GQA, left padding", "gemma2", "gpt_neo", "bert, padding mask", "modernbert",
            "t5 encoder", "mamba", "nn.GRU")
CASES = [(name, dtype) for dtype in ("float32", "autocast") for name in FAMILIES]


@pytest.mark.parametrize("name, dtype", CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_family_trains_exactly_on_the_default_path(name, dtype):
    entry = next(e for e in zoo.ZOO if e.name == name)
    result = zoo.run(entry, backend="inductor", dtype=dtype)
    assert not result.warnings, result.warnings
    assert result.layers == entry.expected_found
    assert result.forward_equal
    assert result.passes(entry), (result.error, result.backprop_error)
