"""The speed issue's workloads, HBP and eager backprop interleaved in one process.

Run: python -m benchmarks.speed [--repeats 15] [--k 3] [--only gru256 gru1024 cell256 stack64 stack64-autocast]
                                [--compile] [--write]

Each training step (forward, loss, backward) is timed with the methods alternating, in an order
shuffled every round (``rounds.py``), so that machine noise hits all of them alike; the table gives the median over ``--repeats`` rounds, min–max beside
it, and the ratio HBP step / eager backprop step. First calls (capture + compile) are timed apart.
``--write`` puts the tables into docs/benchmarks.md between the ``speed`` markers.
"""
from __future__ import annotations

import argparse
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hbp_compile import hbp_compile

from .rounds import interleaved_rounds
from .workloads import PreLNStack


class GRUNet(nn.Module):
    """Linear -> nn.GRU -> Linear head reading every state (the issue's recurrence workload)."""

    def __init__(self, din: int = 16, d: int = 64):
        super().__init__()
        self.inp, self.rnn, self.head = nn.Linear(din, d), nn.GRU(d, d), nn.Linear(d, din)

    def forward(self, x):
        return self.head(self.rnn(self.inp(x))[0])


class GRUCellNet(nn.Module):
    """The same net as a Python loop over nn.GRUCell."""

    def __init__(self, din: int = 16, d: int = 64):
        super().__init__()
        self.inp, self.cell, self.head = nn.Linear(din, d), nn.GRUCell(d, d), nn.Linear(d, din)

    def forward(self, x):
        u = self.inp(x)
        h = u.new_zeros(u.shape[1], self.cell.hidden_size)
        outs = []
        for u_t in u:
            h = self.cell(u_t, h)
            outs.append(h)
        return self.head(torch.stack(outs))


def _seq(T: int, B: int = 32, din: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(T, B, din, generator=g), torch.randn(T, B, din, generator=g)


WORKLOADS: dict[str, tuple[str, Callable[[], nn.Module], Callable[[], tuple]]] = {
    "gru256": ("Linear→nn.GRU→head, T=256 (d=64, B=32)", GRUNet, lambda: _seq(256)),
    "gru1024": ("Linear→nn.GRU→head, T=1024 (d=64, B=32)", GRUNet, lambda: _seq(1024)),
    "cell256": ("loop over nn.GRUCell, T=256 (d=64, B=32)", GRUCellNet, lambda: _seq(256)),
    "stack64": ("pre-LN MLP L=64 (d=32, B=8)", lambda: PreLNStack(64, 32),
                lambda: (torch.randn(8, 32, generator=torch.Generator().manual_seed(0)),
                         torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1)))),
    # the default path's mixed precision: a float32 model under bfloat16 autocast (issue 28)
    "stack64-autocast": ("pre-LN MLP L=64 (d=32, B=8), float32 under bfloat16 autocast",
                         lambda: PreLNStack(64, 32),
                         lambda: (torch.randn(8, 32, generator=torch.Generator().manual_seed(0)),
                                  torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1)))),
}


def _loss(name: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), target) if name.startswith("stack64") else F.mse_loss(out, target)


def measure(name: str, ks: list[int], repeats: int, with_compile: bool) -> list[str]:
    title, make, batch = WORKLOADS[name]
    torch.manual_seed(0)
    model = make()
    x, target = batch()
    methods: dict[str, nn.Module] = {"eager backprop": model}
    if with_compile:
        methods["torch.compile backprop"] = torch.compile(model)
    for k in ks:
        methods[f"HBP k={k}"] = hbp_compile(model, k=k)

    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name.endswith("-autocast"))

    def step(m: nn.Module) -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        with amp:
            loss = _loss(name, m(x), target)
        loss.backward()
        return time.perf_counter() - start

    first = {label: step(m) for label, m in methods.items()}
    for m in methods.values():
        step(m)
    times: dict[str, list[float]] = {label: [] for label in methods}
    interleaved_rounds({label: (lambda lb=label, m=m: times[lb].append(step(m))) for label, m in methods.items()},
                       repeats)
    base = statistics.median(times["eager backprop"])
    lines = [f"### {title}", "", "| method | step (ms) | min–max (ms) | / eager backprop | paired ratio | first call (s) |",
             "|---|---|---|---|---|---|"]
    for label, ts in times.items():
        med = statistics.median(ts)
        # each round's step over the same round's backprop step: slow drifts of the machine cancel
        paired = statistics.median(t / b for t, b in zip(ts, times["eager backprop"]))
        lines.append(f"| {label} | {med * 1e3:.2f} | {min(ts) * 1e3:.2f}–{max(ts) * 1e3:.2f} | {med / base:.2f}× | "
                     f"{paired:.2f}× | {first[label]:.1f} |")
    print("\n".join(lines), flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--k", type=int, nargs="+", default=[3])
    parser.add_argument("--only", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--compile", action="store_true", help="add a torch.compile backprop row")
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    command = "python -m benchmarks.speed " + " ".join(
        [f"--repeats {args.repeats}", *(["--compile"] if args.compile else []), "--write"])
    lines = [f"Written by `{command}` on {platform.machine()} CPU ({torch.get_num_threads()} threads), "
             f"torch {torch.__version__}, float32; methods interleaved in one process, median of "
             f"{args.repeats} steps; the machine's noise shows in min–max.", ""]
    for name in args.only:
        lines += measure(name, args.k, args.repeats, args.compile)
    if args.write:
        page = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        text = page.read_text()
        block = "<!-- speed:begin -->\n" + "\n".join(lines) + "<!-- speed:end -->"
        if "<!-- speed:begin -->" in text:
            text = re.sub(r"<!-- speed:begin -->.*<!-- speed:end -->", lambda _: block, text, flags=re.S)
        else:
            text = text.replace("<!-- suite:begin -->", "## The speed issue's workloads\n\n" + block +
                                "\n\n## The suite\n\n<!-- suite:begin -->", 1)
        page.write_text(text)


if __name__ == "__main__":
    main()
