"""Public API contract: options, explain() text, fallbacks, and the original model left alone."""
import copy
import warnings

import pytest
import torch

import hbp_compile as hbp
from hbp_compile import HbpOptions, explain, hbp_compile

from .models import make, mlp_stack


@pytest.mark.parametrize("k", [-1, 1.5, "3", None, True])
def test_bad_k_is_rejected_with_the_value(k):
    with pytest.raises((TypeError, ValueError), match="k must be a non-negative int"):
        hbp_compile(torch.nn.Linear(2, 2), k=k)


@pytest.mark.parametrize("gamma", [-0.1, 1.5, "a"])
def test_bad_gamma_is_rejected(gamma):
    with pytest.raises((TypeError, ValueError), match="gamma"):
        hbp_compile(torch.nn.Linear(2, 2), k=1, gamma=gamma)


def test_unknown_backend_and_option():
    with pytest.raises(ValueError, match=r"backend must be one of \('inductor', 'eager'\)"):
        hbp_compile(torch.nn.Linear(2, 2), backend="tvm")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kk'\]"):
        HbpOptions.from_mapping({"kk": 1})


def test_backend_default_reads_hbp_backend(monkeypatch):
    monkeypatch.delenv("HBP_BACKEND", raising=False)
    assert HbpOptions().backend == "inductor"
    monkeypatch.setenv("HBP_BACKEND", "eager")
    assert HbpOptions().backend == "eager" and HbpOptions.from_mapping({"k": 2}).backend == "eager"
    assert hbp_compile(torch.nn.Linear(2, 2)).hbp_options.backend == "eager"
    assert HbpOptions(backend="inductor").backend == "inductor"  # an explicit choice wins
    monkeypatch.setenv("HBP_BACKEND", "tvm")
    with pytest.raises(ValueError, match=r"\$HBP_BACKEND"):
        HbpOptions()


def test_explain_report_text():
    report = explain(make(mlp_stack(3)), torch.randn(2, 3, dtype=torch.float64), k=1)
    assert report.num_layers == 3
    assert str(report) == "\n".join([
        "hbp_compile: 1 captured region(s), 3 residual layer(s), k=1, gamma=0.0",
        "region 0 chain 0: 3 layers, 1 group(s), taps: none",
        "  layer  module    group  kind      residual",
        "      1  layers.0      0  identity  r = x + z0; K = 1",
        "      2  layers.1      0  identity  r = x + z0; K = 1",
        "      3  layers.2      0  identity  r = x + z0; K = 1",
        "  backward depth (longest path) in block VJPs: backprop 3, highway 2 (+ 4 scan steps)",
    ])
    assert hbp_compile.explain is explain


def test_explain_does_not_touch_the_model_or_rng():
    model = make(mlp_stack(3))
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    explain(model, torch.randn(2, 3, dtype=torch.float64))
    after_rng = torch.rand(1)
    torch.manual_seed(7)
    torch.randn(2, 3, dtype=torch.float64)
    assert torch.equal(after_rng, torch.rand(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_without_chain_trains_exactly_and_warns():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    model(x).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = hbp_compile(model, k=0, backend="eager")
    with pytest.warns(UserWarning, match="trains with exact backprop: no residual chain found"):
        compiled(x).sum().backward()
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    assert compiled.hbp_report.fallbacks[0].fallback is hbp.Fallback.NO_CHAIN
    assert "exact backprop: no residual chain found" in str(compiled.hbp_report)


def test_compiled_module_shares_parameters_and_state_dict_keys():
    model = make(mlp_stack(2))
    compiled = hbp_compile(model, k=1)
    assert compiled.state_dict().keys() == model.state_dict().keys()
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in model.parameters()}
    assert compiled.layers is model.layers  # attribute access falls through to the model


def test_many_compiled_models_of_one_class_are_all_rewritten():
    """Dynamo's per-code cache would silently fall back to eager after 8 backends on one class."""
    x = torch.randn(2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(10):
            compiled = hbp_compile(make(mlp_stack(2), seed=seed), k=0, backend="eager")
            compiled(x).backward()
            assert compiled.hbp_report.num_layers == 2


def test_no_grad_inference_matches_original():
    model = make(mlp_stack(3))
    x = torch.randn(2, 3, dtype=torch.float64)
    compiled = hbp_compile(model, k=1, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))


def test_torch_compile_backend_hbp_with_options():
    """The `torch_dynamo_backends` entry point makes backend="hbp" available; options arrive as a dict."""
    from .reference import highway_reference_grads, max_relative_error

    model = make(mlp_stack(4))
    x = torch.randn(3, 3, dtype=torch.float64)
    want = highway_reference_grads(model, x, 1)
    model.zero_grad()
    torch.compile(model, backend="hbp", options={"k": 1, "backend": "eager"})(x).backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-8
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(make(mlp_stack(2)), backend="hbp", options={"kay": 1})(x)


@pytest.mark.parametrize("layers,k", [(1, 0), (3, 1), (8, 3), (31, 10), (64, 2)])
def test_backward_depth_longest_path(layers, k):
    """The DAG's longest path: backprop L VJPs; Highway-BP min(k, L) + 1 VJPs and one log-depth scan
    per pass (the closed form the report uses for recurrences)."""
    from hbp_compile.inspect.depth import backward_depths

    passes = min(k, layers) + 1
    assert backward_depths(layers, k) == (layers, passes, passes * layers.bit_length())


class _FeaturesThenStack(torch.nn.Module):
    """A plain feature extractor (no chain), a graph break, then a residual stack."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
        self.stack = make(mlp_stack(3))

    def forward(self, x):
        h = self.features(x)
        torch._dynamo.graph_break()
        return self.stack(h)


def test_a_graph_without_chain_beside_a_rewritten_one_does_not_warn():
    model = _FeaturesThenStack().double()
    compiled = hbp_compile(model, k=1, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled(torch.randn(2, 3, dtype=torch.float64)).sum().backward()
    assert not [w for w in caught if "hbp_compile" in str(w.message)]
    report = compiled.hbp_report
    assert report.num_layers == 3 and report.fallbacks[0].fallback is hbp.Fallback.NO_CHAIN
    assert "exact backprop: no residual chain found" in str(report)
