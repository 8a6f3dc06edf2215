"""The Hugging Face Trainer, unchanged, training a GPT-2 (small random config, no download) with
Highway-BP on Python's standard-library sources as characters; then save_model and from_pretrained.

Run: python examples/hf_trainer.py [--steps 40] [--k 3] [--gamma 0.2] [--out hf_trainer_out]
Prints the training loss, the layers Highway-BP rewrote, and checks that the saved model reloads
with the trained weights.
"""
from __future__ import annotations

import argparse

import torch
import transformers

from char_lm import CharCorpus
from hbp_compile import hbp_compile


class CharWindows(torch.utils.data.Dataset):
    """Fixed windows of the corpus as ``{"input_ids", "labels"}`` (GPT-2 shifts the labels itself)."""

    def __init__(self, corpus: CharCorpus, length: int, count: int):
        g = torch.Generator().manual_seed(0)
        self.windows, _ = corpus.batch("train", count, length, g)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--gamma", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--out", default="hf_trainer_out")
    args = parser.parse_args()
    torch.manual_seed(0)
    corpus = CharCorpus(max_chars=100_000)
    config = transformers.GPT2Config(vocab_size=corpus.vocab_size, n_positions=args.length, n_embd=64,
                                     n_layer=args.layers, n_head=4, use_cache=False)
    model = transformers.GPT2LMHeadModel(config)
    compiled = hbp_compile(model, k=args.k, gamma=args.gamma, backend=args.backend)
    training = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=max(1, args.steps // 4), save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = transformers.Trainer(model=compiled, args=training,
                                   train_dataset=CharWindows(corpus, args.length, 8 * args.steps))
    result = trainer.train()
    print(f"training loss {result.training_loss:.3f}; Highway-BP rewrote {compiled.hbp_report.num_layers} "
          f"residual layers (k={args.k}, gamma={args.gamma})")
    trainer.save_model(f"{args.out}/model")  # save_pretrained on the GPT-2 itself: tied weights handled
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(f"{args.out}/model")
    same = all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), reloaded.state_dict().values()))
    print(f"saved to {args.out}/model; reloaded weights equal the trained ones: {same}")


if __name__ == "__main__":
    main()
