"""First-call (compile) time of ``hbp_compile`` with Inductor vs depth, measured in one run.

Run: python benchmarks/compile_time.py [--depths 4 48] [--width 32] [--batch 8]
Each configuration runs in a fresh subprocess with an empty Inductor cache, so no depth profits from
another's compiled kernels. Prints the first training step's time (capture, rewrite, Inductor code
generation of the forward and backward) per depth and the ratio to the shallowest, for
``hbp_compile(k=3)`` and for ``torch.compile`` backprop.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

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
    code = _ONE_RUN.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), depth=depth, width=width,
                           batch=batch, method=method)
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 48])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["hbp", "torch.compile"])
    args = parser.parse_args()
    print(f"pre-LN residual MLP, d={args.width}, B={args.batch}, torch {__import__('torch').__version__}")
    print(f"{'method':>14} {'depth':>6} {'first step s':>13} {'vs shallowest':>14} {'second step s':>14}")
    for method in args.methods:
        base = None
        for depth in args.depths:
            t0 = time.perf_counter()
            r = first_call(method, depth, args.width, args.batch)
            base = base or r["first"]
            print(f"{method:>14} {depth:>6} {r['first']:>13.2f} {r['first'] / base:>14.2f} {r['second']:>14.4f}"
                  f"   (process {time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
