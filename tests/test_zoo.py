"""The zoo (tests/zoo.py): models written by others, each exact at k ≥ L or refused with its reason.

Every entry trains one float64 step: the forward must equal the model's bit for bit, the pass must
find the layer count the table expects, the gradients must equal autograd's (1e-8), and any
hbp_compile warning must be the one the table names. ``python -m tests.zoo`` prints the table.
"""
from __future__ import annotations

import re

import pytest

from . import zoo

pytest.importorskip("transformers")


@pytest.mark.parametrize("entry", zoo.ZOO, ids=[e.name for e in zoo.ZOO])
def test_zoo_model_is_exact_or_refused_with_its_reason(entry):
    result = zoo.run(entry)
    assert result.forward_equal
    assert result.error is not None and result.error < 1e-8, result.error
    assert result.layers == entry.expected_found, (result.layers, result.warnings)
    fallbacks = [w for w in result.warnings if "trains with exact backprop" in w]
    if entry.warning:
        assert any(re.search(entry.warning, w) for w in fallbacks), result.warnings
    else:
        # graphs beside the model's chain with nothing to rewrite (a speech model's feature
        # extractor) still warn today (issue 18); nothing else may
        assert all("no residual chain found" in w for w in fallbacks), result.warnings


def test_the_zoo_is_large_enough():
    hugging_face = [e for e in zoo.ZOO if not e.name.startswith("nn.")]
    assert len(hugging_face) >= 40
