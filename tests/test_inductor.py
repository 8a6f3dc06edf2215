"""The Inductor path computes what the eager rewrite computes (float32, 1e-4 relative), through both
entry points: ``hbp_compile(model, k)`` (Inductor is the default) and
``torch.compile(model, backend="hbp", options=...)``. Models are small: Inductor compiles on a
2-core CPU take seconds per graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hbp_compile import hbp_compile

from .models import Gated, Stack, make, mlp_stack, transformer_stack, two_stage_stack
from .test_real_models import small_resnet
from .test_scan_hop import ScanModel

REL = 1e-4


def _gru_model() -> nn.Module:
    class GRULoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(3, 6, num_layers=2, batch_first=True)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            return self.head(self.gru(x)[0]).pow(2).mean()

    torch.manual_seed(0)
    return GRULoss()


def _encoder_with_dropout() -> nn.Module:
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, x):
            return self.encoder(x).pow(2).mean()

    torch.manual_seed(0)
    return Encoder()


class SquaredMean(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).pow(2).mean()


# name: (model factory, input shape, k, gamma[, recompute])
CASES = {
    "pre-LN MLP with taps": (lambda: make(mlp_stack(4, d=8, hidden=16, taps=True)).float(), (4, 3), 2, 0.0),
    "attention + MLP, kept intermediates": (lambda: make(transformer_stack(4, d=8)).float(), (2, 5, 3), 1, 0.3, False),
    "attention + MLP, γ-split": (lambda: make(transformer_stack(4, d=8)).float(), (2, 5, 3), 1, 0.3),
    "two stages, K = 0 between": (lambda: make(two_stage_stack()).float(), (4, 3), 2, 0.0),
    "gated, diagonal K": (lambda: make(Stack([Gated(6) for _ in range(4)], 3, 6, 2)).float(), (4, 3), 1, 0.0),
    "nn.GRU, 2 layers": (_gru_model, (2, 7, 3), 2, 0.0),
    "scan HOP": (lambda: ScanModel("sin"), (6, 2, 3), 2, 0.0),
    "TransformerEncoder, dropout": (_encoder_with_dropout, (2, 5, 8), 1, 0.0),
    "ResNet, BatchNorm, downsampling": (lambda: SquaredMean(small_resnet().float()), (4, 3, 8, 8), 2, 0.0),
    # the partitioner's lazily compiled graph modules used to make dynamo refuse the saving forward
    "ResNet, kept intermediates": (lambda: SquaredMean(small_resnet().float()), (4, 3, 8, 8), 2, 0.0, False),
}


def _grads(compiled: nn.Module, model: nn.Module, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, dict]:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the same dropout masks for every entry point
    loss = compiled(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().clamp_min(1e-6)
        assert ((got[name] - want[name]).abs().max() / scale).item() < REL, name


@pytest.mark.parametrize("entry", ["hbp_compile", "torch.compile"])
@pytest.mark.parametrize("case", list(CASES))
def test_inductor_matches_eager_rewrite(case, entry):
    """One entry point per test (the two compile the same graphs): the suite runs them side by side."""
    factory, shape, k, gamma, *rest = CASES[case]
    recompute = rest[0] if rest else True
    model = factory()
    torch.manual_seed(2)
    x = torch.randn(*shape)
    eager = hbp_compile(model, k=k, gamma=gamma, backend="eager", recompute=recompute)
    loss_eager, want = _grads(eager, model, x)
    assert eager.hbp_report.num_layers >= 2

    if entry == "hbp_compile":
        inductor = hbp_compile(model, k=k, gamma=gamma, recompute=recompute)
        loss, got = _grads(inductor, model, x)
        assert inductor.hbp_report.num_layers == eager.hbp_report.num_layers
        torch.testing.assert_close(loss, loss_eager, rtol=REL, atol=1e-6)
        _assert_close(got, want)
    else:
        via_torch_compile = torch.compile(model, backend="hbp", options={"k": k, "gamma": gamma, "recompute": recompute})
        with torch._dynamo.config.patch(allow_rnn=True):  # else dynamo keeps nn.GRU out of the graph
            _, got = _grads(via_torch_compile, model, x)
        _assert_close(got, want)


def test_inductor_compiles_each_group_once_whatever_the_depth():
    """The chain's forward calls one compiled layer function per group: 8 layers of one group make
    the same number of compiled graphs as 2."""
    from torch._dynamo.utils import counters

    unique = {}
    for depth in (2, 8):
        torch._dynamo.reset()
        counters.clear()
        model = make(mlp_stack(depth, d=8, hidden=16)).float()
        hbp_compile(model, k=1)(torch.randn(4, 3)).backward()
        unique[depth] = counters["stats"]["unique_graphs"]
    assert unique[2] == unique[8]


def test_a_second_compile_of_the_same_layers_comes_from_inductor_s_cache():
    """The engine's kernels go through Inductor's FX graph cache (they used to bypass it, "No shape
    env"): a fresh model with the same layers, compiled again, generates no code, and neither would
    a second process. The cached artifact is specialized like the first: same gradients."""
    from torch._dynamo.utils import counters

    grads = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        model = make(mlp_stack(3, d=8, hidden=16)).float()
        hbp_compile(model, k=1)(torch.randn(4, 3, generator=torch.Generator().manual_seed(0))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert not counters["inductor"]["fxgraph_cache_bypass"]
    assert counters["inductor"]["fxgraph_cache_hit"] >= 3 and not counters["inductor"]["fxgraph_cache_miss"]
    _assert_close(grads[1], grads[0])


def test_engine_kernels_compile_directly_with_the_former_path_s_values(monkeypatch):
    """Every kernel of a chain's step takes the direct compile (one fake-tensor trace, then
    Inductor's ``compile_fx_inner``, no aot_autograd) and computes what the former path
    (``torch._inductor.compile``) computes; a function with a non-tensor argument, which the direct
    path declines, still compiles, through the former path."""
    from hbp_compile import _torch_compat
    from hbp_compile.compile import GraphKernel

    direct = _torch_compat.inductor_compile_function
    taken, captured = [], []
    original = GraphKernel._compile

    def record(kernel, args):
        captured.append((kernel.fn, tuple(a.clone() for a in args)))
        return original(kernel, args)

    monkeypatch.setattr(_torch_compat, "inductor_compile_function",
                        lambda *a, **k: taken.append(direct(*a, **k)) or taken[-1])
    monkeypatch.setattr(GraphKernel, "_compile", record)
    model = make(mlp_stack(3, d=8, hidden=16)).float()
    hbp_compile(model, k=1)(torch.randn(4, 3, generator=torch.Generator().manual_seed(0))).backward()
    assert len(taken) == len(captured) >= 4 and all(t is not None for t in taken)

    monkeypatch.setattr(GraphKernel, "_compile", original)

    def compiled_through(path, fn, args):
        monkeypatch.setattr(_torch_compat, "inductor_compile_function", path)
        return GraphKernel(fn, "inductor")(*args)

    former = lambda *a, **k: None  # noqa: E731 - the direct path declines every graph
    for fn, args in captured:
        torch.testing.assert_close(compiled_through(former, fn, args), compiled_through(direct, fn, args),
                                   rtol=0, atol=0)

    monkeypatch.setattr(_torch_compat, "inductor_compile_function", direct)
    assert direct(lambda x, n: x * n, (torch.ones(2), 3), {}) is None
    torch.testing.assert_close(GraphKernel(lambda x, n: x * n, "inductor")(torch.ones(2), 3), torch.full((2,), 3.0))
