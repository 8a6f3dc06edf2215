"""The engine's kernels compiled two ways: directly (one fake-tensor trace, then Inductor's
``compile_fx_inner``; what ``GraphKernel`` does) and through aot_autograd (``torch._inductor.compile``,
the former path). Compile time and run time, interleaved in one process.

Run: python -m benchmarks.kernel_compile [--model gpt2] [--dtype float32] [--rounds 4]
The kernels are those a zoo model (tests/zoo.py) compiles in one default-path training step. Compile
time is measured with the FX graph cache off and the C++ builds cached (the second round on builds
the same C++ code): what is left is the Python side, which is where the two paths differ. Run time
is the median of 15 shuffled rounds of 20 calls per kernel, and the outputs are compared bit for bit.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.utils._pytree as pytree

from hbp_compile import _torch_compat
from hbp_compile import compile as hbp_compile_stage


def _captured_kernels(model: str, dtype: str) -> list[tuple]:
    """(fn, args) of every kernel the zoo model's default-path step compiles."""
    from tests import zoo

    captured = []
    original = hbp_compile_stage.GraphKernel._compile

    def grab(kernel, args):
        captured.append((kernel.fn, tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)))
        return original(kernel, args)

    hbp_compile_stage.GraphKernel._compile = grab
    try:
        zoo.run(next(e for e in zoo.ZOO if e.name == model), backend="inductor", dtype=dtype)
    finally:
        hbp_compile_stage.GraphKernel._compile = original
    return captured


def _declined(*args, **kwargs) -> None:
    return None  # the direct path declines: GraphKernel takes the aot_autograd one


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_compile", description=__doc__)
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    captured = _captured_kernels(args.model, args.dtype)
    direct = _torch_compat.inductor_compile_function
    compile_s: dict[str, list[float]] = {"aot": [], "direct": []}
    kernels: dict[str, list] = {}
    try:
        with torch._inductor.config.patch(fx_graph_cache=False):
            for _ in range(args.rounds):
                for mode in random.sample(["aot", "direct"], 2):
                    _torch_compat.inductor_compile_function = direct if mode == "direct" else _declined
                    start = time.perf_counter()
                    kernels[mode] = [hbp_compile_stage.GraphKernel(fn, "inductor") for fn, _ in captured]
                    for kernel, (_, inputs) in zip(kernels[mode], captured):
                        kernel(*inputs)
                    compile_s[mode].append(time.perf_counter() - start)
    finally:
        _torch_compat.inductor_compile_function = direct
    aot_s, direct_s = statistics.median(compile_s["aot"]), statistics.median(compile_s["direct"])
    print(f"{args.model} {args.dtype}: {len(captured)} kernels; compile (Python side), median of {args.rounds}: "
          f"aot_autograd {aot_s:.2f} s, direct {direct_s:.2f} s")
    total = {"aot": 0.0, "direct": 0.0}
    for i, (_, inputs) in enumerate(captured):
        times: dict[str, list[float]] = {"aot": [], "direct": []}
        for _ in range(15):
            for mode in random.sample(["aot", "direct"], 2):
                start = time.perf_counter()
                for _ in range(20):
                    kernels[mode][i](*inputs)
                times[mode].append((time.perf_counter() - start) / 20)
        median = {m: statistics.median(t) * 1e6 for m, t in times.items()}
        for m in total:
            total[m] += median[m]
        same = all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(kernels["aot"][i](*inputs)),
                                                       pytree.tree_leaves(kernels["direct"][i](*inputs))))
        print(f"kernel {i}: aot_autograd {median['aot']:8.1f} µs, direct {median['direct']:8.1f} µs, "
              f"bit-equal: {same}")
    print(f"run time, sum of the kernels' medians: aot_autograd {total['aot']:.1f} µs, "
          f"direct {total['direct']:.1f} µs (direct / aot_autograd {total['direct'] / total['aot']:.2f}×)")


if __name__ == "__main__":
    main()
