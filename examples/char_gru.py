"""A character-level GRU language model on Python's own standard-library sources (no download),
trained with backprop and with Highway-BP over the time steps at k = 0, 1, 3.

Run: python examples/char_gru.py [--steps 300] [--length 128] [--hidden 128] [--backend inductor|eager]
Prints a table (held-out loss, step time vs backprop) and saves char_gru.png.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from char_lm import CharCorpus, compare_training, report
from hbp_compile import hbp_compile


class CharGRU(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 64)
        self.gru = nn.GRU(64, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids):
        return self.head(self.gru(self.embed(ids))[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 3])
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--plot", default="char_gru.png")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = CharCorpus()
    variants = {"backprop": None}
    variants.update({f"HBP k={k}": (lambda m, k=k: hbp_compile(m, k=k, backend=args.backend)) for k in args.ks})
    results = compare_training(lambda: CharGRU(corpus.vocab_size, args.hidden), variants, corpus, steps=args.steps,
                               batch=args.batch, length=args.length, lr=3e-3, eval_every=25, device=device)
    report(results, f"char GRU (hidden {args.hidden}), T={args.length}, B={args.batch}, {args.steps} steps, "
                    f"{corpus.vocab_size} chars, device={device}", args.plot)


if __name__ == "__main__":
    main()
