"""Random ops inside blocks: the forward draws in the original order, the backward replays those draws."""
import pytest
import torch
import torch.nn.functional as F

from hbp_compile import explain, hbp_compile

from .models import PreLNMLP, Stack, make
from .reference import max_relative_error


def manual_dropout(x, p, training):
    if not training:
        return x
    return x * (torch.rand_like(x) > p) / (1 - p)


class RandLikeMLP(PreLNMLP):
    def block(self, x):
        return manual_dropout(self.fc2(manual_dropout(self.act(self.fc1(self.ln(x))), 0.3, self.training)),
                              0.1, self.training)


class DropoutMLP(PreLNMLP):
    def block(self, x):
        return F.dropout(self.fc2(F.dropout(self.act(self.fc1(self.ln(x))), 0.3, self.training)), 0.1,
                         self.training)


def assert_draws_replayed(model, x) -> None:
    """The compiled model draws the masks the model draws (same seed, same output), its backward
    replays them (exact at k >= L), and the random stream is left where the model leaves it."""
    torch.manual_seed(123)
    want_out = model(x)
    want_out.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = hbp_compile(model, k=len(model.layers), backend="eager")
    torch.manual_seed(123)
    out = compiled(x)
    assert torch.equal(out, want_out), "same seed must give the same dropout masks and output"
    out.backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-8
    torch.manual_seed(123)
    model(x)
    after_original = torch.rand(3, device=x.device)
    torch.manual_seed(123)
    compiled(x)
    assert torch.equal(torch.rand(3, device=x.device), after_original)


@pytest.mark.parametrize("block", [DropoutMLP, RandLikeMLP], ids=["F.dropout", "rand_like"])
def test_dropout_forward_identical_and_exact_at_k_ge_depth(block):
    model = make(Stack([block(6, 12) for _ in range(4)], 3, 6, 2)).train()
    x = torch.randn(5, 3, dtype=torch.float64)
    assert explain(model, x).num_layers == 4
    assert_draws_replayed(model, x)


def test_eval_mode_has_no_draws():
    model = make(Stack([DropoutMLP(6, 12) for _ in range(3)], 3, 6, 2)).eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    compiled = hbp_compile(model, k=3, backend="eager")
    out = compiled(x)
    assert torch.equal(out, model(x))
    assert compiled.hbp_report.num_layers == 3


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder_with_all_dropouts_is_rewritten(norm_first):
    """Attention, residual and feed-forward dropout (the encoder's defaults): forward identical to the
    model's under the same seed, two layers per encoder layer, gradients exact at k >= L."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.2, batch_first=True, norm_first=norm_first)
    model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.manual_seed(1)
    want_out = model(x).pow(2).mean()
    want_out.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled = hbp_compile(model, k=4, backend="eager")
    torch.manual_seed(1)
    out = compiled(x).pow(2).mean()
    assert compiled.hbp_report.num_layers == 4
    assert torch.equal(out, want_out)
    out.backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-8
