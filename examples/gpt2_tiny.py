"""transformers' GPT-2 from a small random config (no download), trained as a character-level language
model on Python's standard-library sources with backprop and with Highway-BP using the γ-split
(the paper needs γ > 0 for transformers).

Run: python examples/gpt2_tiny.py [--steps 300] [--layers 6] [--gamma 0.2] [--backend inductor|eager]
Prints a table (held-out loss, step time vs backprop) and saves gpt2_tiny.png.
"""
from __future__ import annotations

import argparse

import torch
import transformers

from char_lm import CharCorpus, compare_training, report
from hbp_compile import hbp_compile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--gamma", type=float, default=0.2)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--plot", default="gpt2_tiny.png")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = CharCorpus()
    config = transformers.GPT2Config(vocab_size=corpus.vocab_size, n_positions=args.length, n_embd=args.width,
                                     n_layer=args.layers, n_head=4, bos_token_id=0, eos_token_id=0,
                                     use_cache=False)

    def make_model():
        return transformers.GPT2LMHeadModel(config)

    variants = {"backprop": None}
    for k in args.ks:
        variants[f"HBP k={k}, γ={args.gamma}"] = (
            lambda m, k=k: hbp_compile(m, k=k, gamma=args.gamma, backend=args.backend))
    results = compare_training(make_model, variants, corpus, steps=args.steps, batch=args.batch,
                               length=args.length, lr=1e-3, eval_every=25, device=device)
    report(results, f"GPT-2 ({args.layers} layers = {2 * args.layers} residual blocks, d={args.width}), "
                    f"T={args.length}, B={args.batch}, {args.steps} steps, device={device}", args.plot)


if __name__ == "__main__":
    main()
