"""The cost model (issue 31): where a Highway-BP step's time goes, against backprop's, per workload.

Run: python -m benchmarks.cost_model [--only NAME-REGEX] [--repeats 9] [--ks 0 1 3 10] [--write]

For each workload of the suite (``workloads.py``), in one process, every method stepping once per
round in a shuffled order (``rounds.py``; the medians of ``--repeats`` rounds):

* eager backprop's forward (the loss) and backward, timed apart;
* ``hbp_compile(k)`` (Inductor, the workload's γ) at each k, and the least-squares line through
  those step times: the **base** (its value at k = 0) and the **slope** (the cost of one iteration);
* the FLOPs of one step (``torch.utils.flop_counter``), backprop's and Highway-BP's at k = 0 and the
  FLOPs each iteration adds, counted on the same rewrite uncompiled (``backend="eager"``: Inductor's
  fused kernels are invisible to the counter; the matmuls and convolutions are the same);
* each step's time against its **FLOP-bound time**, FLOPs divided by the rate this machine reaches on
  one large matmul: how far the step is from what its arithmetic costs.

The bound the issue sets (two matmuls a block): k = 0 ≈ 1.17× backprop's step with ``recompute=True``
and each iteration ≈ one block-input VJP, i.e. about 1/3 of backprop's step. Anything above is
overhead. ``--write`` puts the table into docs/benchmarks.md between the ``cost-model`` markers.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from hbp_compile import hbp_compile

from .rounds import interleaved_rounds
from .suite import device_name, write_section
from .workloads import Workload, workloads

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


@dataclass
class Costs:
    workload: str
    forward_ms: float
    backward_ms: float
    hbp_ms: dict[int, float]  # k -> median step
    base_ms: float
    slope_ms: float
    flops_backprop: float
    flops_hbp: dict[int, float]  # k -> FLOPs of one step (0 where the counter cannot see the work)
    rate: float  # FLOP/s of one large matmul on this machine
    note: str = ""

    @property
    def backprop_ms(self) -> float:
        return self.forward_ms + self.backward_ms

    def row(self, ks: list[int]) -> str:
        bp = self.backprop_ms
        steps = " | ".join(f"{self.hbp_ms[k] / bp:.2f}×" for k in ks)
        k0, k_top = ks[0], ks[-1]
        if self.flops_hbp.get(k0):
            per_iter = (self.flops_hbp[k_top] - self.flops_hbp[k0]) / max(k_top - k0, 1)
            flops = (f"{self.flops_backprop / 1e6:.0f} | {self.flops_hbp[k0] / self.flops_backprop:.2f}× | "
                     f"{per_iter / self.flops_backprop:.2f}×")
            hbp_bound = f"{self.hbp_ms[k0] / (1e3 * self.flops_hbp[k0] / self.rate):.1f}×"
        else:
            flops, hbp_bound = "— | — | —", "—"
        bp_bound = f"{bp / (1e3 * self.flops_backprop / self.rate):.1f}×" if self.flops_backprop else "—"
        return (f"| {self.workload} | {self.forward_ms:.2f} / {self.backward_ms:.2f} | {steps} | "
                f"{self.base_ms / bp:.2f}× | {self.slope_ms / bp:.2f}× | {flops} | {bp_bound} | {hbp_bound} | "
                f"{self.note} |")


def matmul_rate(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an n×n float32 matmul on this machine (the best of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fit_line(ks: list[int], times: list[float]) -> tuple[float, float]:
    """Least-squares ``time = base + slope * k``.

    >>> fit_line([0, 1, 3], [1.0, 2.0, 4.0])
    (1.0, 1.0)
    """
    mean_k, mean_t = statistics.fmean(ks), statistics.fmean(times)
    slope = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, times)) / sum((k - mean_k) ** 2 for k in ks)
    return round(mean_t - slope * mean_k, 12), round(slope, 12)


class _FlopCount(TorchDispatchMode):
    """``torch.utils.flop_counter``'s formulas, in a dispatch mode dynamo looks through
    (``ignore_compile_internals``): under ``FlopCounterMode`` dynamo skips compiled frames and runs
    the original model, so Highway-BP's rewrite would never be counted."""

    def __init__(self):
        super().__init__()
        self.total = 0

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.convolution_backward.default:
            self.total += _convolution_backward_flops(*args)
            return out
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def _convolution_backward_flops(grad_out, x, weight, bias_sizes, stride, padding, dilation, transposed,
                                output_padding, groups, output_mask) -> int:
    """Each gradient a convolution's backward computes (``output_mask``) costs the convolution's own
    FLOPs. flop_counter's formula counts a grouped convolution's weight gradient ``groups`` times
    over, and the engine's batched VJPs are grouped convolutions (vmap folds the layers into groups)."""
    spatial = (x if transposed else grad_out).shape[2:]
    forward = 2 * x.shape[0] * weight.numel() * spatial.numel()
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def step_flops(model: torch.nn.Module, workload: Workload, batch: tuple) -> float:
    """FLOPs of one training step (matmuls, convolutions, attention, and their backwards). A compiled
    model steps once first, outside the count, so that the counted step runs what it compiled."""
    workload.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)
    with _FlopCount() as counter:
        workload.loss(model, batch).backward()
    return float(counter.total)


def measure(workload: Workload, ks: list[int], repeats: int, rate: float) -> Costs:
    torch.manual_seed(0)
    model = workload.make_model()
    batch = workload.make_batch(torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"forward": [], "backward": [], **{f"k={k}": [] for k in ks}}

    def backprop() -> None:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = workload.loss(model, batch)
        middle = time.perf_counter()
        loss.backward()
        times["forward"].append(middle - start)
        times["backward"].append(time.perf_counter() - middle)

    def hbp_step(compiled: torch.nn.Module, k: int) -> None:
        model.zero_grad(set_to_none=True)
        times[f"k={k}"].append(_timed(lambda: workload.loss(compiled, batch).backward()))

    steps = {"backprop": backprop}
    notes = []
    for k in ks:
        compiled = hbp_compile(model, k=k, gamma=workload.gamma)
        workload.loss(compiled, batch).backward()  # the first call compiles
        if not compiled.hbp_report.num_layers:
            notes.append(f"k={k} fell back to backprop")
        steps[f"k={k}"] = lambda c=compiled, k=k: hbp_step(c, k)
    for step in steps.values():  # warm-up round
        step()
    for series in times.values():
        series.clear()
    interleaved_rounds(steps, repeats)
    median = {name: statistics.median(series) * 1e3 for name, series in times.items()}
    base, slope = fit_line(ks, [median[f"k={k}"] for k in ks])

    if any(isinstance(m, torch.nn.RNNBase) for m in model.modules()):
        # nn.GRU/nn.LSTM are fused ops without a FLOP formula, and the recurrence op hides part of
        # its work in a custom op: the counts would compare different things
        flops_backprop, flops_hbp = 0.0, {}
        notes.append("FLOPs not counted: nn.GRU/nn.LSTM and the recurrence op are opaque to the counter")
    else:
        flops_backprop = step_flops(model, workload, batch)
        flops_hbp = {k: step_flops(hbp_compile(model, k=k, gamma=workload.gamma, backend="eager"), workload, batch)
                     for k in ks}
    return Costs(workload.name, median["forward"], median["backward"], {k: median[f"k={k}"] for k in ks},
                 base, slope, flops_backprop, flops_hbp, rate, "; ".join(notes))


def table(results: list[Costs], ks: list[int], repeats: int, command: str) -> str:
    steps = " | ".join(f"HBP k={k} step" for k in ks)
    lines = [
        f"Written by `{command}` on {device_name('cpu')}, torch {torch.__version__}; medians of {repeats} "
        f"interleaved rounds. Times are ratios to eager backprop's step (its forward / backward in ms); base "
        f"and slope: the least-squares line through the HBP steps at k = {', '.join(map(str, ks))}. FLOPs "
        f"(torch.utils.flop_counter's formulas, a convolution backward's counted per gradient computed; the "
        f"rewrite counted uncompiled): backprop's step in MFLOP, HBP's at "
        f"k = {ks[0]} and per iteration as multiples of it. Against the FLOP bound: the step's time over "
        f"its FLOPs at {results[0].rate / 1e9:.0f} GFLOP/s (one 1024² matmul on this machine).",
        "",
        f"| workload | backprop fwd / bwd ms | {steps} | base | slope / iteration | backprop MFLOP | "
        f"HBP k={ks[0]} FLOPs | FLOPs / iteration | backprop / FLOP bound | HBP k={ks[0]} / FLOP bound | note |",
        "|---|---|" + "---|" * len(ks) + "---|---|---|---|---|---|---|---|",
    ]
    lines += [r.row(ks) for r in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="regex of workload names")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 3, 10])
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rate = matmul_rate()
    selected = [w for w in workloads() if not args.only or re.search(args.only, w.name)]
    command = "python -m benchmarks.cost_model " + " ".join(sys.argv[1:] if argv is None else argv)
    results = []
    for workload in selected:
        results.append(measure(workload, args.ks, args.repeats, rate))
        print(results[-1].row(args.ks), flush=True)
    text = table(results, args.ks, args.repeats, command.strip())
    print(text)
    if args.write:
        write_section(DOC, text, "cost-model")


if __name__ == "__main__":
    main()
