"""Unmodified library models: torch's own pre-LN TransformerEncoder."""
import pytest
import torch

from hbp_compile import explain, hbp_compile

from .reference import max_relative_error


def encoder(depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
    return torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False).double()


def test_pre_ln_transformer_encoder_two_layers_per_block():
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    report = explain(encoder(3), x)
    assert report.num_layers == 6
    paths = [layer.module_path for layer in report.chains[0].layers]
    assert paths == ["layers.0", "layers.0", "layers.1", "layers.1", "layers.2", "layers.2"]


@pytest.mark.parametrize("k", [0, 6])
def test_pre_ln_transformer_encoder_gradients(k):
    model = encoder(3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    want_out = model(x).pow(2).mean()
    want_out.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = hbp_compile(model, k=k, backend="eager")(x).pow(2).mean()
    assert torch.equal(out, want_out)
    out.backward()
    err = max_relative_error({n: p.grad for n, p in model.named_parameters()}, want)
    assert err < 1e-8 if k >= 6 else err > 1e-6
