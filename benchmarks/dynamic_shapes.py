"""Training over batches whose shapes change (issue 33), as a fine-tuning run with dynamic padding.

Run: python -m benchmarks.dynamic_shapes [--models gpt2 gru] [--k 1] [--repeats 9] [--write]
Each model (a 3-block Hugging Face GPT-2 LM as its config comes, an embedding + nn.GRU + head LM)
trains over 10 distinct ``(B, T)`` with ``hbp_compile(model, k)``, in float32 with the default
backend (Inductor), once with the default ``dynamic=None`` and once with ``dynamic=False``, each in
a fresh process with an empty Inductor cache. Per call: its time (the compile included), whether it trained with Highway-BP (its gradient
differs from backprop's at k=1; a call past dynamo's recompile limit runs the original model).
Then, in this process, the step at the last shape, warm, interleaved (median of ``--repeats``, order shuffled):
``dynamic=None``'s model against one compiled for that shape alone (``dynamic=False``), and eager
backprop. ``--write`` puts the tables into docs/limitations.md (between the ``dynamic-shapes``
markers).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from hbp_compile import hbp_compile

from .suite import device_name, write_section

SHAPES = [(4, 24), (4, 17), (2, 31), (4, 9), (3, 24), (4, 12), (1, 28), (4, 20), (2, 14), (3, 7)]
VOCAB = 64


class GRULanguageModel(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.rnn = nn.GRU(d, d, batch_first=True)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids, labels):
        logits = self.head(self.rnn(self.embed(input_ids))[0])
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def _gpt2() -> nn.Module:
    import transformers

    config = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


MODELS = {"gpt2": ("HF GPT-2 LM, 3 blocks, d=64", _gpt2), "gru": ("nn.GRU LM, d=32", GRULanguageModel)}


def _batch(batch: int, steps: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids.clone()}


def _loss(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.loss


def _grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def calls(name: str, k: int, dynamic: bool | None) -> tuple[list[str], nn.Module, nn.Module]:
    """One training call per shape: (table rows, the model, the compiled model)."""
    torch.manual_seed(0)
    model = MODELS[name][1]().train()
    compiled = hbp_compile(model, k=k, dynamic=dynamic)
    rows = []
    print(f"calls of {name} dynamic={dynamic}", flush=True)
    for i, (batch, steps) in enumerate(SHAPES):
        inputs = _batch(batch, steps, i)
        model.zero_grad()
        _loss(model, inputs).backward()
        exact = _grad(model)
        model.zero_grad()
        start = time.perf_counter()
        _loss(compiled, inputs).backward()
        seconds = time.perf_counter() - start
        difference = ((_grad(model) - exact).norm() / exact.norm()).item()
        rows.append(f"| {batch}×{steps} | {seconds:.2f} | {'Highway-BP' if difference > 1e-5 else 'backprop'} |")
        print(f"{name} dynamic={dynamic} {batch}x{steps}: {seconds:.2f} s, relative difference to backprop "
              f"{difference:.1e}", flush=True)
    return rows, model, compiled


def calls_in_a_fresh_process(name: str, k: int, dynamic: bool | None) -> list[str]:
    """``calls`` in a new process with an empty Inductor cache: neither mode profits from the
    other's compiled kernels (each new shape is a cold compile, as in a user's first run)."""
    code = (f"from benchmarks.dynamic_shapes import calls; import json; "
            f"print('ROWS' + json.dumps(calls({name!r}, {k}, {dynamic})[0]))")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    out = [line for line in run.stdout.splitlines() if not line.startswith("ROWS")]
    print("\n".join(out), flush=True)
    if run.returncode:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith("ROWS"))[4:])


def step_times(model: nn.Module, methods: dict[str, nn.Module], inputs: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {m: [] for m in methods}
    for m in methods:  # warm
        _loss(methods[m], inputs).backward()
    for _ in range(repeats):
        for m in random.sample(list(methods), len(methods)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            _loss(methods[m], inputs).backward()
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) * 1e3 for m, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dynamic_shapes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    lines = [f"Written by `python -m benchmarks.dynamic_shapes --write` on {device_name('cpu')}, float32, "
             f"Inductor, k={args.k}; 10 batch shapes in this order, one training call each.", ""]
    for name in args.models:
        title = MODELS[name][0]
        dynamic_rows = calls_in_a_fresh_process(name, args.k, None)
        static_rows = calls_in_a_fresh_process(name, args.k, False)
        _, model, dynamic_model = calls(name, args.k, None)  # again, for the warm step times
        lines += [f"**{title}**", "", "| (B, T) | `dynamic=None` (default): s | trained with | "
                  "`dynamic=False`: s | trained with |", "|---|---|---|---|---|"]
        for a, b in zip(dynamic_rows, static_rows):
            lines.append(a + b.split("|", 2)[2])
        first = float(dynamic_rows[0].split("|")[2])
        rest = sum(float(r.split("|")[2]) for r in dynamic_rows[1:])
        lines += ["", f"`dynamic=None`: the 9 calls after the first took {rest:.1f} s together, "
                  f"{rest / first:.1f}× the first call ({first:.1f} s).", ""]
        inputs = _batch(*SHAPES[-1], 99)
        static_here = hbp_compile(model, k=args.k, dynamic=False)
        ms = step_times(model, {"eager backprop": model, "HBP, dynamic=None (its 10th shape)": dynamic_model,
                                "HBP, compiled for this shape alone": static_here}, inputs, args.repeats)
        base = ms["HBP, compiled for this shape alone"]
        lines += [f"Step at {SHAPES[-1][0]}×{SHAPES[-1][1]}, warm, median of {args.repeats} interleaved:", "",
                  "| method | step ms | / static HBP |", "|---|---|---|"]
        lines += [f"| {m} | {t:.2f} | {t / base:.2f}× |" for m, t in ms.items()]
        lines.append("")
        print("\n".join(lines[-8:]), flush=True)
    text = "\n".join(lines).rstrip()
    print(text)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "limitations.md", text, "dynamic-shapes")


if __name__ == "__main__":
    main()
