"""Text that ships with Python: the sources of a few standard-library modules, as one character corpus.

Used by the character-level examples (char_gru.py, gpt2_tiny.py); nothing is downloaded. Also the
training loop they share: same initialisation, same batches, held-out loss curves, step times.
"""
from __future__ import annotations

import inspect
import json
import textwrap
import argparse
import collections
import difflib

import torch

MODULES = (textwrap, argparse, collections, difflib, json.decoder, inspect)


class CharCorpus:
    """The modules' sources as character ids, split 90/10 into train and held-out text.

    >>> corpus = CharCorpus(max_chars=10_000)
    >>> x, y = corpus.batch("train", 4, 16, torch.Generator().manual_seed(0))
    >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
    (torch.Size([4, 16]), True)
    """

    def __init__(self, max_chars: int = 400_000):
        text = "\n".join(inspect.getsource(m) for m in MODULES)[:max_chars]
        self.chars = sorted(set(text))
        index = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([index[c] for c in text])
        cut = int(0.9 * len(ids))
        self.splits = {"train": ids[:cut], "held-out": ids[cut:]}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch: int, length: int, generator: torch.Generator):
        """``batch`` random windows of ``length`` characters and the same windows shifted by one."""
        ids = self.splits[split]
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=generator)
        x = torch.stack([ids[s: s + length] for s in starts])
        y = torch.stack([ids[s + 1: s + length + 1] for s in starts])
        return x, y


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    logits = getattr(logits, "logits", logits)  # transformers' output objects
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def compare_training(make_model, variants: dict, corpus: CharCorpus, *, steps: int, batch: int, length: int,
                     lr: float, eval_every: int, seed: int = 0, device: str = "cpu") -> dict:
    """Train a copy of ``make_model()`` per variant (``name -> wrap(model)``, ``None`` for backprop) from
    the same initialisation on the same batches. Returns per variant: held-out loss curve, first-step
    time, median step time."""
    import copy
    import time

    torch.manual_seed(seed)
    init = make_model().to(device)
    results = {}
    for name, wrap in variants.items():
        model = copy.deepcopy(init)
        step_model = model if wrap is None else wrap(model)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        gen, eval_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
        held_out = [corpus.batch("held-out", batch, length, eval_gen) for _ in range(4)]
        curve, times = [], []
        for step in range(1, steps + 1):
            x, y = (t.to(device) for t in corpus.batch("train", batch, length, gen))
            start = time.perf_counter()
            loss = lm_loss(step_model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    value = sum(lm_loss(model, hx.to(device), hy.to(device)).item() for hx, hy in held_out) / 4
                curve.append((step, value))
        steady = sorted(times[1:])[len(times[1:]) // 2]
        results[name] = (curve, times[0], steady)
        print(f"{name:>22}: held-out loss {curve[-1][1]:.3f}  step {steady * 1e3:.1f} ms", flush=True)
    return results


def report(results: dict, title: str, plot_path: str) -> None:
    """The summary table (Markdown) and the held-out loss curves as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results[next(iter(results))]
    print(f"\n{title}")
    print("| method | held-out loss | vs backprop | first step (s) | step (ms) | step / backprop |")
    print("|---|---|---|---|---|---|")
    for name, (curve, first, steady) in results.items():
        print(f"| {name} | {curve[-1][1]:.3f} | {curve[-1][1] - base[0][-1][1]:+.3f} | {first:.2f} | "
              f"{steady * 1e3:.1f} | {steady / base[2]:.2f} |")
    plt.figure(figsize=(6, 4))
    for name, (curve, _, _) in results.items():
        plt.plot(*zip(*curve), label=name)
    plt.xlabel("step")
    plt.ylabel("held-out loss (nats/char)")
    plt.title(title, fontsize=9)
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(plot_path, dpi=120)
    print(f"plot: {plot_path}")
