"""Gradient fidelity study: cosine similarity of the Highway-BP gradient to the exact one, against k
and over training, for four model kinds on data that ships with packages.

Run: python -m benchmarks.fidelity [--steps 400] [--no-write]

Each model trains with exact backprop (AdamW); at a few points of training the HBP gradient at
k in KS (``backend="eager"``, same parameters, a fixed probe batch) is compared with the exact
gradient of the same batch. Writes docs/fidelity.md (between the ``fidelity`` markers) and
docs/img/fidelity.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hbp_compile import hbp_compile

from .suite import write_section
from .workloads import PreLNStack, RecurrentLM, ResNet, _gpt2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))  # the character corpus of the examples (stdlib sources)
from char_lm import CharCorpus  # noqa: E402

KS = (0, 1, 2, 3, 4, 6, 8, 12)


def digits(device: str):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x.to(device), torch.tensor(d.target).to(device)


class DigitsMLP(nn.Module):
    """A 12-block pre-LN residual MLP on the 64 pixels."""

    def __init__(self):
        super().__init__()
        self.embed, self.body = nn.Linear(64, 64), PreLNStack(12, 64)

    def forward(self, x):
        return self.body(self.embed(x))


class DigitsResNet(nn.Module):
    """The benchmark's ReLU ResNet (8 basic blocks with BatchNorm) on the 8x8 images, 3 channels."""

    def __init__(self):
        super().__init__()
        self.net = ResNet(8, 16)

    def forward(self, x):
        return self.net(x.view(-1, 1, 8, 8).expand(-1, 3, -1, -1))


class CharGRU(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab, 64), RecurrentLM("gru", 64)
        self.rnn.head = nn.Linear(64, vocab)

    def forward(self, ids):
        return self.rnn(self.embed(ids))


def studies(device: str):
    """(name, model, gamma, sample(generator) -> batch, loss(model, batch))."""
    x, y = digits(device)
    corpus = CharCorpus(max_chars=200_000)

    def digit_batch(gen):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        return x[idx], y[idx]

    def char_batch(gen):
        return tuple(t.to(device) for t in corpus.batch("train", 16, 64, gen))

    def ce(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    def lm(model, batch):
        out = model(batch[0])
        out = getattr(out, "logits", out)
        return F.cross_entropy(out.flatten(0, 1), batch[1].flatten())

    return [
        ("pre-LN residual MLP, 12 blocks (digits)", DigitsMLP(), 0.0, digit_batch, ce),
        ("ReLU ResNet, 8 blocks + BatchNorm (digits)", DigitsResNet(), 0.0, digit_batch, ce),
        ("GRU language model, T=64 (stdlib text)", CharGRU(corpus.vocab_size), 0.0, char_batch, lm),
        ("GPT-2, 4 layers d=64, γ=0.2 (stdlib text)", _gpt2(4, 64, 4, corpus.vocab_size, 64), 0.2, char_batch, lm),
    ]


def cosines(model, gamma, batch, loss) -> dict[int, float]:
    def grads(fn):
        model.zero_grad(set_to_none=True)
        loss(fn, batch).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()

    # BatchNorm statistics and dropout must not move between the compared gradients
    state = {k: v.clone() for k, v in model.state_dict().items()}
    exact = grads(model)
    out = {}
    for k in KS:
        model.load_state_dict(state)
        out[k] = F.cosine_similarity(grads(hbp_compile(model, k=k, gamma=gamma, backend="eager")), exact, dim=0).item()
    model.load_state_dict(state)
    return out


def run(steps: int, checkpoints: int, device: str) -> dict:
    results = {}
    for name, model, gamma, sample, loss in tqdm(studies(device), desc="fidelity", unit="model"):
        torch.manual_seed(0)
        model = model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        gen = torch.Generator().manual_seed(0)
        probe = sample(torch.Generator().manual_seed(123))
        marks = sorted({round(steps * i / (checkpoints - 1)) for i in range(checkpoints)})
        curve = {}
        for step in range(steps + 1):
            if step in marks:
                curve[step] = cosines(model, gamma, probe, loss)
                torch._dynamo.reset()
            if step == steps:
                break
            value = loss(model, sample(gen))
            opt.zero_grad()
            value.backward()
            opt.step()
        curve["final loss"] = value.item()
        results[name] = curve
    return results


def markdown(results: dict, steps: int) -> str:
    lines = [f"Produced by `python -m benchmarks.fidelity` (torch {torch.__version__}, float32, {steps} "
             "training steps with exact backprop; HBP gradients on a fixed probe batch).", ""]
    for name, curve in results.items():
        marks = [m for m in curve if m != "final loss"]
        lines += [f"### {name}", "", "| k | " + " | ".join(f"step {m}" for m in marks) + " |",
                  "|---|" + "---|" * len(marks)]
        for k in KS:
            lines.append(f"| {k} | " + " | ".join(f"{curve[m][k]:.4f}" for m in marks) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.6), sharey=True)
    for ax, (name, curve) in zip(axes, results.items()):
        for mark in [m for m in curve if m != "final loss"]:
            ax.plot(KS, [curve[mark][k] for k in KS], marker="o", ms=3, label=f"step {mark}")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cosine to exact gradient")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    results = run(args.steps, args.checkpoints, args.device)
    text = markdown(results, args.steps)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "fidelity.md", text, "fidelity")
        plot(results, ROOT / "docs" / "img" / "fidelity.png")


if __name__ == "__main__":
    main()
