"""Recurrences however they are written: one chain over time, exact, compile time flat in T (issue 32).

Run: python -m benchmarks.formulations [--steps 32 128] [--width 16] [--batch 8] [--k 3] [--repeats 7]
                                       [--only REGEX] [--write]

Each formulation is a one-layer GRU or LSTM language-model step (the hidden state at every step feeds
the loss), written the way people write it: the ``nn.GRU``/``nn.LSTM`` module, a loop over the cell
module, or the cell's equations by hand in several layouts (gates from one Linear over ``cat([h, x])``
or ``cat([x, h])``, chunked; a Linear per gate; the input and hidden projections apart). Per row:

* the chains ``hbp_compile`` finds and their layers (one chain, a layer per time step, is the aim);
* the k = 0 gradient's relative error against the Theorem-2 reference of ``tests/reference.py``
  (float64, T = 8, each formulation's block/residual split written here from its equations);
* the training step at the largest T, k = ``--k``, float32, Inductor, over eager backprop's step
  (medians of ``--repeats`` interleaved rounds);
* the first call (capture + compile + the compile-time step) at each T, Inductor's on-disk caches
  off (each measured as in a fresh process).

``--write`` puts the table into docs/recurrence-study.md between the ``formulations`` markers.
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hbp_compile import hbp_compile

from .rounds import interleaved_rounds
from .suite import device_name, write_section


class Formulation(nn.Module):
    """A recurrence over a time-major ``x`` ``(T, B, D)``; the loss reads the hidden state of every step.

    ``step`` is what the forward runs per time step; ``block``/``residual`` split it for the
    Theorem-2 reference (the residual path carries the state, the block computes the gates)."""

    lstm = False

    def __init__(self, width: int, batch: int):
        super().__init__()
        self.width, self.batch = width, batch
        self.head = nn.Linear(width, 1)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """The initial state: ``h`` ``(B, H)``, or ``[c, h]`` stacked for an LSTM."""
        return x.new_zeros((2, self.batch, self.width) if self.lstm else (self.batch, self.width))

    def hidden(self, state: torch.Tensor) -> torch.Tensor:
        return state[1] if self.lstm else state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, outputs = self.start(x), []
        for x_t in x:
            state = self.step(state, x_t)
            outputs.append(self.hidden(state))
        return torch.tanh(self.head(torch.stack(outputs))).pow(2).sum()

    def step(self, state: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return self.residual(state, self.block(state, x_t))

    # the reference's view (tests/reference.py): a stack of time steps
    def prologue(self, x: torch.Tensor) -> torch.Tensor:
        self.layers = [_TimeStep(self, x_t) for x_t in x]
        return self.start(x)

    def epilogue(self, states: list[torch.Tensor]) -> torch.Tensor:
        return torch.tanh(self.head(torch.stack([self.hidden(s) for s in states[1:]]))).pow(2).sum()


@dataclass
class _TimeStep:
    owner: Formulation
    x_t: torch.Tensor

    def __call__(self, state):
        return self.owner.step(state, self.x_t)

    def block(self, state):
        return self.owner.block(state, self.x_t)

    def residual(self, state, z):
        return self.owner.residual(state, z)


class _GRU(Formulation):
    """``h' = z ⊙ h + (1 − z) ⊙ n``: K = diag(z)."""

    def residual(self, h, zn):
        z, n = zn
        return z * h + (1 - z) * n


class TextbookGRU(_GRU):
    """Cho et al.: a Linear per gate over ``cat([h, x])``, the reset gate applied to h before the matmul."""

    def __init__(self, width, batch):
        super().__init__(width, batch)
        self.update, self.reset, self.candidate = (nn.Linear(2 * width, width) for _ in range(3))

    def block(self, h, x_t):
        hx = torch.cat([h, x_t], -1)
        z, r = torch.sigmoid(self.update(hx)), torch.sigmoid(self.reset(hx))
        return z, torch.tanh(self.candidate(torch.cat([r * h, x_t], -1)))


class PyTorchEquationsGRU(_GRU):
    """nn.GRU's equations by hand: input and hidden projections apart, chunked into three gates."""

    def __init__(self, width, batch):
        super().__init__(width, batch)
        self.ih, self.hh = nn.Linear(width, 3 * width), nn.Linear(width, 3 * width)

    def block(self, h, x_t):
        i_r, i_z, i_n = self.ih(x_t).chunk(3, -1)
        h_r, h_z, h_n = self.hh(h).chunk(3, -1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        return z, torch.tanh(i_n + r * h_n)


class GRUModule(PyTorchEquationsGRU):
    """``nn.GRU`` itself (the reference reads its weights into the equations above)."""

    def __init__(self, width, batch):
        super().__init__(width, batch)
        self.rnn = nn.GRU(width, width)
        self.ih, self.hh = _Projection(self.rnn, "ih"), _Projection(self.rnn, "hh")

    def forward(self, x):
        return torch.tanh(self.head(self.rnn(x)[0])).pow(2).sum()


class GRUCellLoop(PyTorchEquationsGRU):
    """A Python loop over ``nn.GRUCell``."""

    def __init__(self, width, batch):
        super().__init__(width, batch)
        self.cell = nn.GRUCell(width, width)
        self.ih, self.hh = _Projection(self.cell, "ih"), _Projection(self.cell, "hh")

    def step(self, h, x_t):
        return self.cell(x_t, h)


class _Projection(nn.Module):
    """``x W^T + b`` with a recurrent module's ``weight_ih``/``weight_hh`` (nn.GRU's suffix ``_l0``)."""

    def __init__(self, module: nn.Module, which: str):
        super().__init__()
        self.module, self.which = [module], which  # a list: not a submodule, its parameters counted once

    def forward(self, x):
        m, suffix = self.module[0], "_l0" if isinstance(self.module[0], nn.RNNBase) else ""
        return F.linear(x, getattr(m, f"weight_{self.which}{suffix}"), getattr(m, f"bias_{self.which}{suffix}"))


class _LSTM(Formulation):
    """The state ``[c, h]``: ``c' = f ⊙ c + i ⊙ g`` on the residual path (K = diag(f) on c, 0 on h)."""

    lstm = True

    def gates(self, h, x_t):
        raise NotImplementedError

    def block(self, state, x_t):
        i, f, g, o = self.gates(state[1], x_t)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        return f, i * g, o * torch.tanh(f * state[0] + i * g)

    def residual(self, state, z):
        f, ig, h_new = z
        return torch.stack([f * state[0] + ig, h_new])

    def forward(self, x):  # as people write it: c and h two values, both started at zeros
        c = h = x.new_zeros(self.batch, self.width)
        outputs = []
        for x_t in x:
            i, f, g, o = self.gates(h, x_t)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.tanh(self.head(torch.stack(outputs))).pow(2).sum()


class ChunkedLSTM(_LSTM):
    """One Linear over ``cat([h, x])`` (or ``cat([x, h])``), chunked into the four gates."""

    def __init__(self, width, batch, h_first: bool = True):
        super().__init__(width, batch)
        self.h_first, self.gate = h_first, nn.Linear(2 * width, 4 * width)

    def gates(self, h, x_t):
        return self.gate(torch.cat([h, x_t] if self.h_first else [x_t, h], -1)).chunk(4, -1)


class PerGateLSTM(_LSTM):
    """A Linear per gate on x and one on h."""

    def __init__(self, width, batch):
        super().__init__(width, batch)
        self.x_gates = nn.ModuleList(nn.Linear(width, width) for _ in range(4))
        self.h_gates = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(4))

    def gates(self, h, x_t):
        return [wx(x_t) + wh(h) for wx, wh in zip(self.x_gates, self.h_gates)]


class LSTMModule(_LSTM):
    """``nn.LSTM`` itself (the reference reads its weights)."""

    def __init__(self, width, batch):
        super().__init__(width, batch)
        self.rnn = nn.LSTM(width, width)
        self.ih, self.hh = _Projection(self.rnn, "ih"), _Projection(self.rnn, "hh")

    def gates(self, h, x_t):
        return (self.ih(x_t) + self.hh(h)).chunk(4, -1)

    def forward(self, x):
        return torch.tanh(self.head(self.rnn(x)[0])).pow(2).sum()


FORMULATIONS: dict[str, Callable[[int, int], Formulation]] = {
    "nn.GRU": GRUModule,
    "nn.GRUCell loop": GRUCellLoop,
    "GRU by hand, textbook (cat([h, x]), reset before the matmul)": TextbookGRU,
    "GRU by hand, nn.GRU's equations": PyTorchEquationsGRU,
    "nn.LSTM": LSTMModule,
    "LSTM by hand, one Linear over cat([h, x]) chunked": ChunkedLSTM,
    "LSTM by hand, one Linear over cat([x, h]) chunked": lambda w, b: ChunkedLSTM(w, b, h_first=False),
    "LSTM by hand, a Linear per gate": PerGateLSTM,
}


@dataclass
class Row:
    name: str
    chains: int
    layers: int
    k0_error: float
    step_ratio: float
    first_call: dict[int, float]


def _k0_error(make: Callable[[int, int], Formulation], width: int, batch: int, steps: int = 8) -> tuple[int, int, float]:
    from tests.reference import highway_reference_grads, max_relative_error

    torch.manual_seed(0)
    model = make(width, batch).double()
    x = torch.randn(steps, batch, width, dtype=torch.float64)
    want = highway_reference_grads(model, x, 0)
    model.zero_grad()
    compiled = hbp_compile(model, k=0, backend="eager", strict=False)
    compiled(x).backward()
    report = compiled.hbp_report
    got = {n: p.grad.clone() for n, p in model.named_parameters() if n in want}
    chains = len(report.chains) + sum(r.num_chains for rec in report.records for r in rec.recurrences if r.swapped)
    return chains, report.num_layers, max_relative_error(got, want)


def measure(name: str, args) -> Row:
    make = FORMULATIONS[name]
    chains, layers, error = _k0_error(make, args.width, args.batch)
    first: dict[int, float] = {}
    for steps in args.steps:
        torch.manual_seed(0)
        model = make(args.width, args.batch)
        compiled = hbp_compile(model, k=args.k)
        x = torch.randn(steps, args.batch, args.width)
        # as in a fresh process: nothing from an earlier row or T in Inductor's caches
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            start = time.perf_counter()
            compiled(x).backward()
            first[steps] = time.perf_counter() - start
    times: dict[str, list[float]] = {"backprop": [], "hbp": []}

    def timed(label: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            start = time.perf_counter()
            fn(x).backward()
            times[label].append(time.perf_counter() - start)
        return run

    runs = {"backprop": timed("backprop", model), "hbp": timed("hbp", compiled)}
    interleaved_rounds(runs, 2)  # warm-up
    for values in times.values():
        values.clear()
    interleaved_rounds(runs, args.repeats)
    ratio = statistics.median(times["hbp"]) / statistics.median(times["backprop"])
    return Row(name, chains, layers, error, ratio, first)


def table(rows: list[Row], args) -> list[str]:
    small, large = args.steps[0], args.steps[-1]
    lines = [f"Written by `python -m benchmarks.formulations {' '.join(args.argv)}` on {device_name('cpu')}, "
             f"torch {torch.__version__}. Width {args.width}, batch {args.batch}. Chains and layers at T = 8 "
             "(float64, eager); the k = 0 error against the Theorem-2 reference there; the step at "
             f"T = {large}, k = {args.k}, float32, Inductor, over eager backprop's (medians of {args.repeats} "
             "interleaved rounds); first call = capture, compile and the compile-time training step.",
             "",
             f"| formulation | chains | layers (T = 8) | k = 0 error vs Theorem 2 | step / backprop (T = {large}) "
             f"| first call T = {small} | first call T = {large} | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.chains} | {r.layers} | {r.k0_error:.0e} | {r.step_ratio:.2f}× | "
                     f"{r.first_call[small]:.1f} s | {r.first_call[large]:.1f} s | "
                     f"{r.first_call[large] / r.first_call[small]:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(prog="python -m benchmarks.formulations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs=2, default=[32, 128])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", help="regex of formulation names")
    parser.add_argument("--write", action="store_true", help="write the table into docs/recurrence-study.md")
    args = parser.parse_args(argv)
    args.argv = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write"]
    rows = []
    for name in FORMULATIONS:
        if args.only and not re.search(args.only, name):
            continue
        rows.append(measure(name, args))
        print(table(rows, args)[-1], flush=True)
    lines = table(rows, args)
    print("\n".join(lines))
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "recurrence-study.md", "\n".join(lines),
                      "formulations")


if __name__ == "__main__":
    main()
