"""Highway-BP on recurrences: GRU and LSTM training steps vs backprop, measured in one run.

Run: python -m benchmarks.rnn [--steps 256 1024] [--width 64] [--batch 32] [--repeats 5] [--device cpu|cuda]
                              [--sources module cell-loop scan] [--write SECTION]

``--write SECTION`` replaces the table between the ``<!-- SECTION:begin/end -->`` markers of
docs/recurrence-study.md with this run's, headed by the command that wrote it.

Sources: ``module`` is ``nn.GRU``/``nn.LSTM``; ``cell-loop`` a Python loop over ``nn.GRUCell``/
``nn.LSTMCell`` (dynamo unrolls it: capture time grows with T); ``scan`` the GRU cell inside
``torch._higher_order_ops.scan`` (GRU only: an LSTM carry is a pair); ``by-hand`` the cell's
equations written out in the loop (the general chain engine; the LSTM's (c, h) pair packed).

Per cell and sequence length T it prints the median training-step time (forward + backward) of
eager backprop, torch.compile backprop (T <= --compile-max-steps: Inductor unrolls the loop), the
no-grad forward (the lower limit of any method that runs the forward), and Highway-BP at each k,
each as a ratio to eager backprop; first-call times (capture + compile); and the cosine between
each method's parameter gradient and the exact one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from hbp_compile import hbp_compile

from .suite import device_name, write_section


class SequenceModel(nn.Module):
    """A one-layer GRU/LSTM whose output at every step feeds the loss, as a language model's does."""

    def __init__(self, cell: str, width: int):
        super().__init__()
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](width, width)
        self.head = nn.Linear(width, width)

    def forward(self, x):
        return self.head(self.rnn(x)[0]).pow(2).mean()


class CellLoopModel(nn.Module):
    """The same model written as a Python loop over the cell module."""

    def __init__(self, cell: str, width: int):
        super().__init__()
        self.cell = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell](width, width)
        self.head = nn.Linear(width, width)

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.cell.hidden_size)
        c, outputs = h, []
        for x_t in x:
            if isinstance(self.cell, nn.LSTMCell):
                h, c = self.cell(x_t, (h, c))
            else:
                h = self.cell(x_t, h)
            outputs.append(h)
        return self.head(torch.stack(outputs)).pow(2).mean()


class ScanModel(nn.Module):
    """The GRU cell inside ``torch._higher_order_ops.scan``."""

    def __init__(self, cell: str, width: int):
        super().__init__()
        self.cell = nn.GRUCell(width, width)
        self.head = nn.Linear(width, width)

    def forward(self, x):
        from torch._higher_order_ops import scan

        def combine(h, x_t):
            new = torch.gru_cell(x_t, h, self.cell.weight_ih, self.cell.weight_hh, self.cell.bias_ih,
                                 self.cell.bias_hh)
            return new, new.clone()

        _, outputs = scan(combine, x.new_zeros(x.shape[1], self.cell.hidden_size), x)
        return self.head(outputs).pow(2).mean()


class ByHandModel(nn.Module):
    """The cell's equations written out in a Python loop (PyTorch's gate layout, no cell module)."""

    def __init__(self, cell: str, width: int):
        super().__init__()
        self.lstm = cell == "lstm"
        gates = 4 if self.lstm else 3
        self.ih, self.hh = nn.Linear(width, gates * width), nn.Linear(width, gates * width)
        self.head = nn.Linear(width, width)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], self.hh.in_features)
        outputs = []
        for x_t in x:
            gi, gh = self.ih(x_t), self.hh(h)
            if self.lstm:
                i, f, g, o = (gi + gh).chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            else:
                (i_r, i_z, i_n), (h_r, h_z, h_n) = gi.chunk(3, -1), gh.chunk(3, -1)
                r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
                h = z * h + (1 - z) * torch.tanh(i_n + r * h_n)
            outputs.append(h)
        return self.head(torch.stack(outputs)).pow(2).mean()


MODELS = {"module": SequenceModel, "cell-loop": CellLoopModel, "scan": ScanModel, "by-hand": ByHandModel}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, x, repeats: int, device: str, *, grad: bool = True) -> tuple[float, float]:
    """(first call in s, median step in s)."""
    def step():
        if grad:
            fn(x).backward()
        else:
            with torch.no_grad():
                fn(x)
        _sync(device)

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def gradient(model: nn.Module, fn, x) -> torch.Tensor:
    model.zero_grad()
    fn(x).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def run(source: str, cell: str, steps: int, args) -> list[tuple[str, float, float, float]]:
    """Rows (method, first call s, step s, gradient cosine vs exact)."""
    torch.manual_seed(0)
    model = MODELS[source](cell, args.width).to(args.device)
    x = torch.randn(steps, args.batch, args.width, device=args.device)
    exact = gradient(model, model, x)
    methods: list[tuple[str, object, bool]] = [("eager backprop", model, True), ("no-grad forward", model, False)]
    if steps <= args.compile_max_steps:
        torch._dynamo.config.allow_rnn = True  # else dynamo leaves the RNN to eager mode
        methods.append(("torch.compile backprop", torch.compile(model), True))
    methods += [(f"HBP k={k}", hbp_compile(model, k=k), True) for k in args.k]
    rows = []
    for name, fn, grad in tqdm(methods, desc=f"{source} {cell} T={steps}", leave=False):
        first, step = measure(fn, x, args.repeats, args.device, grad=grad)
        cos = torch.nn.functional.cosine_similarity(gradient(model, fn, x), exact, dim=0).item() if grad else float("nan")
        rows.append((name, first, step, cos))
    torch._dynamo.config.allow_rnn = False
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=["gru", "lstm"])
    parser.add_argument("--sources", nargs="+", default=["module"], choices=sorted(MODELS))
    parser.add_argument("--steps", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", nargs="+", type=int, default=[0, 1, 3, 10])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-max-steps", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", metavar="SECTION", default=None,
                        help="write the table into docs/recurrence-study.md between this section's markers")
    args = parser.parse_args(argv)
    lines = [f"Written by `python -m benchmarks.rnn {' '.join(sys.argv[1:] if argv is None else argv)}` on "
             f"{device_name(args.device)}, torch {torch.__version__}: width {args.width}, batch {args.batch}, "
             f"float32, median of {args.repeats} steps after 2, one process.", "",
             "| source | cell | T | method | step (ms) | / eager backprop | first call (s) | grad cosine |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for source in args.sources:
        for cell in args.cells:
            if source == "scan" and cell != "gru":
                continue
            for steps in args.steps:
                rows = run(source, cell, steps, args)
                base = rows[0][2]
                for name, first, step, cos in rows:
                    cosine = "" if cos != cos else f"{cos:.4f}"
                    lines.append(f"| {source} | {cell} | {steps} | {name} | {1e3 * step:.1f} | {step / base:.2f} | "
                                 f"{first:.2f} | {cosine} |")
                    print(lines[-1], flush=True)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "recurrence-study.md", "\n".join(lines),
                      args.write)


if __name__ == "__main__":
    main()
