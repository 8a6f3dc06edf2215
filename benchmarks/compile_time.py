"""First-call (compile) time of ``hbp_compile`` with Inductor vs depth, measured in one run.

Run: python -m benchmarks.compile_time [--depths 4 48] [--width 32] [--batch 8] [--write]
Each configuration runs in a fresh subprocess with an empty Inductor cache, so no depth profits from
another's compiled kernels. Prints the first training step's time (capture, rewrite, Inductor code
generation of the forward and backward) per depth and the ratio to the shallowest, for
``hbp_compile(k=3)`` and for ``torch.compile`` backprop; then the same first step in a second fresh
process that finds the first one's Inductor cache (what a user's second run of a script pays).
``--write`` puts the table into docs/compile.md (between the ``compile-time`` markers), headed by the
command that wrote it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .suite import device_name, write_section

_ONE_RUN = r"""
import json, sys, time, torch
sys.path.insert(0, {bench_dir!r})
from deep_stack import Stack
from hbp_compile import hbp_compile
torch.manual_seed(0)
model = Stack({depth}, {width})
x = torch.randn({batch}, {width})
compiled = hbp_compile(model, k=3) if {method!r} == "hbp" else torch.compile(model)
start = time.perf_counter()
compiled(x).backward()
first = time.perf_counter() - start
start = time.perf_counter()
compiled(x).backward()
print(json.dumps({{"first": first, "second": time.perf_counter() - start}}))
"""


def first_call(method: str, depth: int, width: int, batch: int) -> dict:
    """The first (and second) step in a fresh process with an empty Inductor cache; ``warm``: the
    first step of a second fresh process that finds that cache."""
    code = _ONE_RUN.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), depth=depth, width=width,
                           batch=batch, method=method)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        runs = [json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                          text=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    return {**runs[0], "warm": runs[1]["first"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_time", description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 48])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["hbp", "torch.compile"])
    parser.add_argument("--write", action="store_true", help="write the table into docs/compile.md")
    args = parser.parse_args(argv)
    lines = [f"Written by `python -m benchmarks.compile_time {' '.join(sys.argv[1:] if argv is None else argv)}` on "
             f"{device_name('cpu')}, torch {torch.__version__}: a pre-LN residual MLP, d={args.width}, "
             f"B={args.batch}; each configuration in a fresh process with an empty Inductor cache, then in a second "
             "fresh process that finds the first one's cache.", "",
             "| method | depth | first step (s) | / shallowest | second step (s) | first step, cache warm (s) |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for method in args.methods:
        base = None
        for depth in args.depths:
            r = first_call(method, depth, args.width, args.batch)
            base = base or r["first"]
            lines.append(f"| {method} | {depth} | {r['first']:.2f} | {r['first'] / base:.2f} | {r['second']:.4f} "
                         f"| {r['warm']:.2f} |")
            print(lines[-1], flush=True)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "compile.md", "\n".join(lines), "compile-time")


if __name__ == "__main__":
    main()
