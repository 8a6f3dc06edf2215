"""The models the benchmark suite and the fidelity study measure: each a factory for the model, a
fixed batch, and the loss. Sizes are chosen to run on a 2-core CPU in minutes; ``scale`` grows them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple]
    loss: Callable[[nn.Module, tuple], torch.Tensor]
    gamma: float = 0.0  # the γ-split HBP uses on it (transformers need γ > 0 in the paper)
    note: str = ""


class PreLNBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


class PreLNStack(nn.Module):
    def __init__(self, depth: int, d: int):
        super().__init__()
        self.blocks = nn.Sequential(*[PreLNBlock(d) for _ in range(depth)])
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(x))


class ReLUBlock(nn.Module):
    """The original ResNet's basic block: relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self, depth: int, c: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[ReLUBlock(c) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class RecurrentLM(nn.Module):
    def __init__(self, cell: str, d: int):
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](d, d, batch_first=True)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class CellLoopLM(nn.Module):
    """``RecurrentLM`` written as a Python loop over ``nn.GRUCell``: the sequential backprop the
    paper's Table 6 measures, one small kernel sequence per step (``nn.GRU``'s is one fused call)."""

    def __init__(self, d: int):
        super().__init__()
        self.cell, self.head = nn.GRUCell(d, d), nn.Linear(d, 10)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        states = []
        for x_t in x.unbind(1):
            h = self.cell(x_t, h)
            states.append(h)
        return self.head(torch.stack(states, 1))


def _classification(shape: tuple[int, ...], classes: int = 10):
    def batch(gen: torch.Generator):
        return torch.randn(*shape, generator=gen), torch.randint(0, classes, shape[:1], generator=gen)

    return batch


def _ce(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def _sequence(batch: int, steps: int, d: int):
    def make(gen: torch.Generator):
        return torch.randn(batch, steps, d, generator=gen), torch.randint(0, 10, (batch, steps), generator=gen)

    return make


def _sequence_ce(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]).flatten(0, 1), batch[1].flatten())


def _gpt2(layers: int, d: int, heads: int, vocab: int, positions: int):
    import transformers

    config = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=positions,
                                     bos_token_id=0, eos_token_id=0, use_cache=False,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def _tokens(batch: int, steps: int, vocab: int):
    def make(gen: torch.Generator):
        return (torch.randint(0, vocab, (batch, steps), generator=gen),)

    return make


def _lm(model: nn.Module, batch: tuple) -> torch.Tensor:
    ids = batch[0]
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def workloads(scale: int = 1) -> list[Workload]:
    """The suite's models; ``scale=1`` is sized for a 2-core CPU."""
    return [
        Workload("pre-LN MLP L=64 d=32 B=8 (overhead-bound)", lambda: PreLNStack(64, 32),
                 _classification((8, 32)), _ce),
        Workload(f"pre-LN MLP L=16 d=512 B={32 * scale} (compute-bound)", lambda: PreLNStack(16, 512),
                 _classification((32 * scale, 512)), _ce),
        Workload(f"ReLU ResNet 8 blocks c=32 16x16 B={16 * scale}", lambda: ResNet(8, 32),
                 _classification((16 * scale, 3, 16, 16)), _ce),
        Workload("GPT-2 small shape (12 layers, d=768, 12 heads; vocab 512) T=64 B=2",
                 lambda: _gpt2(12, 768, 12, 512, 64), _tokens(2, 64, 512), _lm, gamma=0.2,
                 note="GPT-2 small's layer shapes; the vocabulary is cut to 512 so the LM head does not dominate"),
        Workload("GRU d=64 T=256 B=32", lambda: RecurrentLM("gru", 64), _sequence(32, 256, 64), _sequence_ce),
        Workload("LSTM d=64 T=256 B=32", lambda: RecurrentLM("lstm", 64), _sequence(32, 256, 64), _sequence_ce),
    ]
