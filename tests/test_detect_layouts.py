"""Views, reshapes, transposes and casts on the residual path are part of K, not layers of their own;
values no gradient reaches are never states; a path that moves elements is not a residual path."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hbp_compile import ResidualKind, explain, hbp_compile

from .reference import max_relative_error


class LayoutBlock(nn.Module):
    def __init__(self, mode: str, d: int = 6):
        super().__init__()
        self.ln, self.fc, self.mode = nn.LayerNorm(d), nn.Linear(d, d), mode

    def forward(self, x):
        if self.mode == "no-op view":
            x = x.view(x.shape)
        elif self.mode == "flattened (OPT's MLP)":
            b, t, d = x.shape
            flat = x.reshape(b * t, d)
            return (flat + self.fc(self.ln(flat))).view(b, t, d)
        elif self.mode == "cast to float32 and back":
            return (x.float() + self.fc(self.ln(x)).float()).to(x.dtype)
        elif self.mode == "transposed and back":
            return (x.transpose(1, 2) + self.fc(self.ln(x)).transpose(1, 2)).transpose(1, 2)
        elif self.mode == "transposed (moves elements)":
            return x.transpose(1, 2) + self.fc(self.ln(x)).transpose(1, 2)
        return x + self.fc(self.ln(x))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode, layers, tolerance", [
    ("no-op view", 4, 1e-10),
    ("flattened (OPT's MLP)", 4, 1e-10),
    ("transposed and back", 4, 1e-10),
    # autograd rounds the cotangent to float32 at the cast; Highway-BP's K = 1 does not
    ("cast to float32 and back", 4, 1e-6),
])
def test_layout_ops_on_the_residual_path_are_part_of_k(mode, layers, tolerance):
    torch.manual_seed(0)
    model = nn.Sequential(*[LayoutBlock(mode) for _ in range(4)]).double()
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    report = explain(model, x)
    (chain,) = report.chains
    assert chain.num_layers == layers
    assert chain.kinds == (ResidualKind.IDENTITY,) * layers
    model(x).pow(2).sum().backward()
    want = _grads(model)
    model.zero_grad()
    hbp_compile(model, k=100, backend="eager")(x).pow(2).sum().backward()
    assert max_relative_error(_grads(model), want) < tolerance


def test_a_residual_path_that_moves_elements_is_not_taken_for_k():
    """x -> xᵀ + B(x)ᵀ: K is a permutation, not diagonal. Two such blocks undo it (one layer of two
    blocks); a single one never ends a layer, and the gradient stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(*[LayoutBlock("transposed (moves elements)") for _ in range(4)]).double()
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    report = explain(model, x)
    assert report.num_layers == 2 and all("K = 1" in layer.formula for c in report.chains for layer in c.layers)
    model(x).pow(2).sum().backward()
    want = _grads(model)
    model.zero_grad()
    hbp_compile(model, k=100, backend="eager")(x).pow(2).sum().backward()
    assert max_relative_error(_grads(model), want) < 1e-10


class PositionIds(nn.Module):
    """Position ids from a float mask (OPT): ``cumsum(mask) * mask - 1`` looks like a residual layer
    but no gradient reaches it."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.pos = nn.Embedding(16, d)
        self.blocks = nn.Sequential(*[LayoutBlock("plain", d) for _ in range(3)])

    def forward(self, h, mask):
        positions = (torch.cumsum(mask, dim=1) * mask - 1).long().clamp(min=0)
        return self.blocks(h + self.pos(positions))


def test_values_no_gradient_reaches_are_never_states():
    model = PositionIds().double()
    h, mask = torch.randn(2, 5, 6, dtype=torch.float64), torch.ones(2, 5, dtype=torch.float64)
    report = explain(model, h, mask)
    (chain,) = report.chains
    assert chain.num_layers == 3
    assert [layer.module_path for layer in chain.layers] == [f"blocks.{i}" for i in range(3)]


class MaskFromStateMetadata(nn.Module):
    """A constant mask built from h_0's dtype and shape (``h.new_ones``, as Funnel builds its
    ``cls_mask``) and read by every layer: a side input, not a value of the first layer."""

    def __init__(self, depth: int = 4, d: int = 6):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.blocks = nn.ModuleList(LayoutBlock("plain", d) for _ in range(depth))

    def forward(self, x):
        h = self.inp(x)
        mask = torch.nn.functional.pad(h.new_ones(h.shape[0], h.shape[1] - 1), (1, 0))
        for block in self.blocks:
            h = h + block.fc(block.ln(h)) * mask
        return h.pow(2).mean()


def test_a_mask_built_from_a_states_metadata_does_not_cut_the_chain():
    torch.manual_seed(0)
    model = MaskFromStateMetadata().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    model(x).backward()
    want = _grads(model)
    model.zero_grad()
    compiled = hbp_compile(model, k=4, backend="eager")
    compiled(x).backward()
    assert compiled.hbp_report.num_layers == 4
    assert max_relative_error(_grads(model), want) < 1e-10
