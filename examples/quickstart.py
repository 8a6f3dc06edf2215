"""Quickstart: train a small pre-LN residual MLP with Highway-BP (k=3) and compare with backprop.

Run: python examples/quickstart.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from hbp_compile import explain, hbp_compile


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class ResidualMLP(nn.Module):
    def __init__(self, d_in: int = 16, d: int = 32, depth: int = 12, classes: int = 4):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, classes))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0).long()) % 4  # a learnable synthetic labelling
    model = ResidualMLP()
    print(explain(model, x[:8], k=3))

    fast = hbp_compile(model, k=3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    print(f"\n{'step':>4}  {'loss':>8}  {'cos(HBP grad, backprop grad)':>28}")
    for step in range(8):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # exact backprop, for comparison only
        exact = flat_grad(model)
        opt.zero_grad()
        loss = F.cross_entropy(fast(x), y)
        loss.backward()  # Highway-BP, k=3
        cos = F.cosine_similarity(flat_grad(model), exact, dim=0).item()
        print(f"{step:>4}  {loss.item():>8.4f}  {cos:>28.4f}")
        opt.step()


if __name__ == "__main__":
    main()
