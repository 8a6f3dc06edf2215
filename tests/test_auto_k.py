"""``k="auto"``: iterate until the relative change of ``w`` is at most ``tol`` (or ``k_max``), and say
which k was used. The auto run must be exactly the fixed-k run at the k it reports (float64)."""
from __future__ import annotations

import logging

import pytest
import torch

from hbp_compile import hbp_compile

from .models import Gated, Stack, make, mlp_stack
from .reference import autograd_grads, highway_reference_grads, max_relative_error
from .test_recurrent import Head


def _run(model, x, **options):
    compiled = hbp_compile(model, backend="eager", **options)
    model.zero_grad(set_to_none=True)
    compiled(x).backward()
    return compiled, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make_model", [lambda: mlp_stack(8), lambda: Stack([Gated(6) for _ in range(6)], 3, 6, 2)],
                         ids=["pre-ln", "gated"])
@pytest.mark.parametrize("tol", [1e-1, 1e-2, 1e-3])
def test_auto_equals_fixed_k_at_the_k_it_used(make_model, tol):
    model = make(make_model())
    x = torch.randn(4, 3, dtype=torch.float64)
    compiled, got = _run(model, x, k="auto", tol=tol)
    (usage,) = compiled.hbp_iterations.values()
    assert usage.counts == {usage.last: 1}
    assert 1 <= usage.last <= len(model.layers)
    _, fixed = _run(model, x, k=usage.last)
    assert max_relative_error(got, fixed) < 1e-12
    assert max_relative_error(got, highway_reference_grads(model, x, usage.last)) < 1e-8


def test_auto_spends_more_iterations_for_a_tighter_tolerance_and_reaches_exact():
    model = make(mlp_stack(8))
    x = torch.randn(4, 3, dtype=torch.float64)
    used = []
    for tol in (1e-1, 1e-3, 1e-9):
        compiled, got = _run(model, x, k="auto", tol=tol)
        used.append(next(iter(compiled.hbp_iterations.values())).last)
    assert used == sorted(used) and used[0] < used[-1]
    assert used[-1] <= 8, "never more than the depth: L iterations are exact"
    assert max_relative_error(got, autograd_grads(model, x)[1]) < 1e-8


def test_k_max_caps_the_iterations():
    model = make(mlp_stack(8))
    x = torch.randn(4, 3, dtype=torch.float64)
    compiled, got = _run(model, x, k="auto", tol=1e-12, k_max=2)
    assert next(iter(compiled.hbp_iterations.values())).last == 2
    assert max_relative_error(got, _run(model, x, k=2)[1]) < 1e-12


def test_fixed_k_records_its_iterations_too():
    model = make(mlp_stack(4))
    compiled, _ = _run(model, torch.randn(4, 3, dtype=torch.float64), k=2)
    assert next(iter(compiled.hbp_iterations.values())).last == 2


def test_auto_on_a_recurrence_logs_the_k_and_equals_fixed_k(caplog):
    torch.manual_seed(0)
    model = Head(torch.nn.GRU(3, 5), 5).double()
    x = torch.randn(9, 2, 3, dtype=torch.float64)
    with caplog.at_level(logging.DEBUG, logger="hbp_compile"):
        _, got = _run(model, x, k="auto", tol=1e-2)
    (line,) = [r.getMessage() for r in caplog.records if "recurrence gru" in r.getMessage()]
    used = int(line.split(": ")[1].split()[0])
    assert 1 <= used <= 9
    compiled, _ = _run(model, x, k="auto", tol=1e-2)
    assert {name: u.last for name, u in compiled.hbp_iterations.items()} == {"graph 0 recurrence 0": used}
    compiled, fixed = _run(model, x, k=used)
    assert max_relative_error(got, fixed) < 1e-12
    assert compiled.hbp_iterations["graph 0 recurrence 0"].counts == {used: 1}


@pytest.mark.parametrize("bad", [{"k": "fast"}, {"k": "auto", "tol": 0.0}, {"k": "auto", "tol": 2.0},
                                 {"k": "auto", "k_max": -1}])
def test_bad_auto_options_name_the_value(bad):
    with pytest.raises(ValueError, match="hbp_compile"):
        hbp_compile(torch.nn.Linear(2, 2), **bad)
