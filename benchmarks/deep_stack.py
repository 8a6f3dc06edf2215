"""HBP training-step time vs backprop on a deep pre-LN residual MLP, measured in one run.

Run: python benchmarks/deep_stack.py [--depth 64] [--width 32] [--batch 8] [--device cpu|cuda]
Prints, per configuration, the median step time (forward + backward) and the ratio HBP / backprop;
"kept" rows use recompute=False (block intermediates kept from the forward, no batched forward in
the backward). With --backend inductor, torch.compile backprop is measured too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from hbp_compile import hbp_compile
from workloads import PreLNBlock  # x + fc2(gelu(fc1(LN(x)))); this script's folder is on sys.path


class Stack(nn.Module):
    def __init__(self, depth: int, d: int):
        super().__init__()
        self.blocks = nn.ModuleList(PreLNBlock(d) for _ in range(depth))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.pow(2).mean()


def step_time(fn, x, repeats: int, device: str) -> float:
    def step():
        fn(x).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up, includes the first-call capture
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depth", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Stack(args.depth, args.width).to(args.device)
    x = torch.randn(args.batch, args.width, device=args.device)
    print(f"pre-LN MLP stack: L={args.depth} d={args.width} batch={args.batch} "
          f"device={args.device} threads={torch.get_num_threads()} hbp backend={args.backend}")
    base = step_time(model, x, args.repeats, args.device)
    print(f"{'method':<14}{'step ms':>10}{'/ backprop':>12}")
    print(f"{'backprop':<14}{base * 1e3:>10.2f}{1.0:>12.2f}")
    if args.backend == "inductor":
        t = step_time(torch.compile(model), x, args.repeats, args.device)
        print(f"{'torch.compile':<14}{t * 1e3:>10.2f}{t / base:>12.2f}")
    for k in (0, 1, 3):
        for recompute in (True, False):
            t = step_time(hbp_compile(model, k=k, backend=args.backend, recompute=recompute), x, args.repeats,
                          args.device)
            name = f"HBP k={k}" + ("" if recompute else " kept")
            print(f"{name:<14}{t * 1e3:>10.2f}{t / base:>12.2f}")


if __name__ == "__main__":
    main()
