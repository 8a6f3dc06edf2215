"""The zoo (tests/zoo.py): models written by others, each exact at k ≥ L or refused with its reason.

Every entry trains one float64 step: the forward must equal the model's bit for bit, the pass must
find the layer count the table expects, the gradients must equal autograd's (1e-8 unless the entry says why not), and any
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
    assert result.passes(entry), result.error
    assert result.layers == entry.expected_found, (result.layers, result.warnings)
    fallbacks = [w for w in result.warnings if "trains with exact backprop" in w]
    if entry.warning:
        assert any(re.search(entry.warning, w) for w in fallbacks), result.warnings
    else:
        # a graph with nothing to rewrite beside a rewritten one (a speech model's feature
        # extractor) is in the report, not a warning
        assert not result.warnings, result.warnings


def test_the_zoo_is_large_enough():
    hugging_face = [e for e in zoo.ZOO if not e.name.startswith("nn.")]
    assert len(hugging_face) >= 40
