"""Never silently wrong: every feature of the training code is honoured exactly or refused loudly.

Each test is one way a user's code used to get a wrong gradient, or plain backprop with no word:
a custom autograd.Function or a tensor hook inside the model, create_graph, more input shapes than
dynamo's recompile limit, ``torch.compiler.disable``, a backward that fails only when run, a stage
of the pass that raises, residual ops with keyword arguments, merged input ops.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import hbp_compile.backend as backend_module
import hbp_compile as hbp
from hbp_compile import Fallback, hbp_compile
from hbp_compile.backend import HbpError
from hbp_compile.capture import merge_repeated_input_ops
from hbp_compile.detect import ResidualKind, classify_residual

from .models import make, mlp_stack
from .reference import max_relative_error


def x_for(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, dtype=torch.float64)


class RoundSTE(torch.autograd.Function):
    """Straight-through rounding: the forward rounds, the backward passes the gradient through."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, g):
        return g


class Block(nn.Module):
    def __init__(self, d: int = 6, ste: bool = False):
        super().__init__()
        self.ln, self.fc1, self.fc2, self.ste = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d), ste

    def forward(self, x):
        y = self.fc1(self.ln(x))
        return x + self.fc2(torch.tanh(RoundSTE.apply(y) if self.ste else y))


class Net(nn.Module):
    def __init__(self, ste: bool = False, hook_after: int | None = None, depth: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(Block(ste=ste) for _ in range(depth))
        self.hook_after = hook_after

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == self.hook_after and x.requires_grad:
                x.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        return x.pow(2).sum()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _backprop(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(x).backward()
    grads = _grads(model)
    model.zero_grad()
    return grads


@pytest.mark.parametrize("feature, where, model", [
    ("torch.autograd.Function", "in `layers.0`", lambda: Net(ste=True)),
    ("tensor hook", "at the model's top level", lambda: Net(hook_after=1)),
])
def test_features_the_backward_would_drop_are_refused_loudly(feature, where, model):
    torch.manual_seed(0)
    net = model().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    want = _backprop(net, x)
    compiled = hbp_compile(net, k=8, backend="eager", strict=False)
    with pytest.warns(UserWarning, match=f"hbp_compile: graph 0 trains with exact backprop.*{feature}.* {where}"):
        compiled(x).backward()
    assert compiled.hbp_report.num_layers == 0
    assert compiled.hbp_report.fallbacks[0].fallback is Fallback.UNSUPPORTED
    assert max_relative_error(_grads(net), want) < 1e-12  # exact backprop, custom backward and hook included

    strict = hbp_compile(net, k=8, backend="eager", strict=True)
    with pytest.raises(Exception, match=f"strict mode.*|{feature}"):
        strict(x)


@pytest.mark.parametrize("how", ["autograd.grad", "backward"])
def test_create_graph_is_refused_by_name(how):
    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=1, backend="eager")
    loss = compiled(x_for())
    with pytest.raises(RuntimeError, match="hbp_compile: double backward .create_graph=True. through a Highway-BP chain"):
        if how == "backward":
            loss.backward(create_graph=True)
        else:
            torch.autograd.grad(loss, model.layers[0].fc1.weight, create_graph=True)


def test_past_the_recompile_limit_the_model_warns_and_stays_exact():
    """With ``dynamic=False`` every batch shape is traced again; past dynamo's limit the original
    model runs. (The default, automatic dynamic shapes, never gets there: test_dynamic_shapes.py.)"""
    model = make(mlp_stack(3, d=4, hidden=8))
    compiled = hbp_compile(model, k=3, backend="eager", dynamic=False)
    limit = torch._dynamo.config.recompile_limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in range(1, limit + 3):
            x = x_for(batch)
            want = _backprop(model, x)
            compiled(x).backward()
            assert max_relative_error(_grads(model), want) < 1e-8
            model.zero_grad()
    messages = [str(w.message) for w in caught if "hbp_compile" in str(w.message)]
    assert len(messages) == 1 and "recompile_limit" in messages[0], messages
    assert compiled.uncaptured_calls == 2
    assert len(compiled.hbp_backend.records) == limit


def test_a_forward_dynamo_never_captures_is_said():
    class Disabled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net()

        @torch.compiler.disable
        def forward(self, x):
            return self.net(x)

    compiled = hbp_compile(Disabled().double(), k=3, backend="eager")
    with pytest.warns(UserWarning, match="without torch.compile capturing any graph.*torch.compiler.disable"):
        compiled(torch.randn(2, 6, dtype=torch.float64)).backward()
    compiled(torch.randn(2, 6, dtype=torch.float64)).backward()  # counted, not warned again
    assert compiled.uncaptured_calls == 2


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("broken", ["side_grads", "block_vjp"])
def test_a_backward_that_fails_fails_at_compile_time(monkeypatch, recompute, broken):
    """The compile-time training step runs the real backward (weight VJPs included): a failure there
    is a fallback with its reason before the first step, not an error in the middle of training."""
    from hbp_compile.engine.saved import SavedGroup

    def fail(*args, **kwargs):
        raise NotImplementedError("no batching rule for this op")

    monkeypatch.setattr(SavedGroup, broken, fail)
    model = make(mlp_stack(3, d=4, hidden=8))
    x = x_for()
    want = _backprop(model, x)
    compiled = hbp_compile(model, k=3, backend="eager", recompute=recompute, strict=False)
    with pytest.warns(UserWarning, match="failed its compile-time training step.*no batching rule"):
        out = compiled(x)
    out.backward()
    assert compiled.hbp_report.fallbacks[0].fallback is Fallback.DRY_RUN_FAILED
    assert max_relative_error(_grads(model), want) < 1e-12


@pytest.mark.parametrize("stage, fallback", [
    ("swap_recurrences", Fallback.RECURRENCE_FAILED),
    ("to_aten_graph", Fallback.CAPTURE_FAILED),
    ("find_residual_chains", Fallback.DETECTION_FAILED),
    ("rewrite_chains", Fallback.REWRITE_FAILED),
    ("compile_rewritten", Fallback.COMPILE_FAILED),
])
def test_every_stage_fails_the_same_way(monkeypatch, stage, fallback):
    """A bug in any stage is one fallback with the stage's reason, or an HbpError under strict."""
    def bug(*args, **kwargs):
        raise ValueError("a bug in the pass")

    monkeypatch.setattr(backend_module, stage, bug)
    model = nn.Sequential(nn.GRU(3, 4), ) if stage == "swap_recurrences" else make(mlp_stack(3, d=4, hidden=8))
    x = torch.randn(5, 2, 3, dtype=torch.float64) if stage == "swap_recurrences" else x_for()
    model = model.double()
    compiled = hbp_compile(model, k=1, backend="eager", strict=False)
    with pytest.warns(UserWarning, match=f"{fallback.value}.*ValueError: a bug in the pass"):
        compiled(x)
    assert compiled.hbp_report.fallbacks[0].fallback is fallback
    strict = hbp_compile(model, k=1, backend="eager", strict=True)
    with pytest.raises(Exception, match="strict mode") as raised:
        strict(x)
    assert isinstance(raised.value, HbpError) or "HbpError" in str(raised.value)


def test_strict_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("HBP_STRICT", "1")
    assert hbp_compile(nn.Linear(2, 2)).hbp_options.strict
    monkeypatch.setenv("HBP_STRICT", "0")
    assert not hbp_compile(nn.Linear(2, 2)).hbp_options.strict
    assert hbp_compile(nn.Linear(2, 2), strict=True).hbp_options.strict


def _residual_graph(target, args, kwargs):
    graph = fx.Graph()
    x, z = graph.placeholder("x"), graph.placeholder("z")
    r = graph.call_function(target, (x, *args), kwargs)
    y = graph.call_function(torch.ops.aten.add.Tensor, (r, z))
    return x, [r, y]


@pytest.mark.parametrize("target, args, kwargs, kind", [
    (torch.ops.aten.div.Tensor_mode, (2.0,), {"rounding_mode": "floor"}, ResidualKind.DIAGONAL),
    (torch.ops.aten.div.Tensor, (2.0,), {}, ResidualKind.SCALAR),
    (torch.ops.aten.clone.default, (), {"memory_format": torch.contiguous_format}, ResidualKind.IDENTITY),
    (torch.ops.aten.add.Tensor, (1.0,), {"alpha": 2}, ResidualKind.IDENTITY),
])
def test_residual_kinds_read_the_overload_and_its_arguments(target, args, kwargs, kind):
    x, residual = _residual_graph(target, args, kwargs)
    assert classify_residual(x, residual)[0] is kind


def test_only_input_ops_with_inputs_are_merged():
    def f(w):
        return torch.zeros(3) + w.t().sum(), torch.zeros(3), w.t() * 2

    gm = torch.fx.experimental.proxy_tensor.make_fx(f)(torch.randn(2, 3))
    zeros = [n for n in gm.graph.nodes if n.target is torch.ops.aten.zeros.default]
    transposes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.t.default]
    assert len(zeros) == 2 and len(transposes) == 2
    assert merge_repeated_input_ops(gm.graph) == 1  # the two t(w), never the two zeros()
    gm.recompile()
    a, b, _ = gm(torch.randn(2, 3))
    assert a.data_ptr() != b.data_ptr()


class SDPABlock(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.ln, self.qkv, self.out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in self.qkv(self.ln(x)).chunk(3, -1))
        return x + self.out(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("recompute", [True, False])
def test_the_forward_is_bit_identical_where_the_docs_say_so(recompute):
    """limitations.md: bit-identical with backend="eager" and recompute=True; with recompute=False,
    blocks with SDPA run attention in its math form and differ by rounding only."""
    torch.manual_seed(0)
    model = nn.Sequential(*[SDPABlock() for _ in range(3)])
    x = torch.randn(2, 5, 8)
    compiled = hbp_compile(model, k=1, backend="eager", recompute=recompute)
    got, want = compiled(x), model(x)
    assert compiled.hbp_report.num_layers == 3
    if recompute:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class TwoBranches(nn.Module):
    """Two chains that no layer links: ``a`` over x and ``b`` over y."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*[Block() for _ in range(3)])
        self.b = nn.Sequential(*[Block() for _ in range(3)])

    def forward(self, x, y):
        return self.a(x).pow(2).sum() + self.b(y).pow(2).sum()


def test_a_failing_chain_falls_back_alone_and_explain_agrees(monkeypatch):
    import hbp_compile.rewrite as rewrite_module

    real_build = rewrite_module.build_program

    def build_failing_for_b(chain, *args, **kwargs):
        if chain.layers[0].module_path.startswith("b."):
            raise NotImplementedError("no batching rule for this op")
        return real_build(chain, *args, **kwargs)

    monkeypatch.setattr(rewrite_module, "build_program", build_failing_for_b)
    torch.manual_seed(0)
    model = TwoBranches().double()
    x, y = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    want = _backprop_args(model, x, y)
    compiled = hbp_compile(model, k=8, backend="eager", strict=False)
    with pytest.warns(UserWarning, match="the chain of 3 layers from `b.0` trains with exact backprop: the rewrite "
                                         "failed .NotImplementedError: no batching rule.*other chains keep Highway-BP"):
        compiled(x, y).backward()
    report = compiled.hbp_report
    assert report.num_layers == 3 and report.chains[0].layers[0].module_path.startswith("a.")
    assert max_relative_error(_grads(model), want) < 1e-8
    assert str(hbp.explain(compiled, x, y)) == str(report)
    with pytest.raises(Exception, match="strict mode"):
        hbp_compile(model, k=8, backend="eager", strict=True)(x, y)


def _backprop_args(model: nn.Module, *args: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(*args).backward()
    grads = _grads(model)
    model.zero_grad()
    return grads
