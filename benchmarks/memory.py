"""Peak memory and step time of ``chunk`` (layers per batched VJP call in the backward).

``python -m benchmarks.memory [--repeats 7] [--write]``: the memory issue's workloads (the suite's
64-layer pre-LN stack and 8-block ResNet) with eager backprop and Highway-BP k=3 (Inductor) at
several chunk sizes. Peak: the bytes a training step allocates beyond what was live before it
(torch.profiler's CPU memory timeline, as the suite measures it). Time: the methods interleaved in
one process, in a shuffled order every round, median of ``--repeats`` steps. ``--write`` puts the table into docs/benchmarks.md
between ``<!-- memory:begin -->`` and ``<!-- memory:end -->``.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

from hbp_compile import hbp_compile

from .rounds import interleaved_rounds
from .suite import _peak_memory, write_section
from .workloads import workloads

WORKLOADS = ("pre-LN MLP L=64", "ReLU ResNet")
CHUNKS = (None, 4, 2, 1)


def measure(workload, repeats: int) -> list[str]:
    torch.manual_seed(0)
    init = workload.make_model()
    batch = workload.make_batch(torch.Generator().manual_seed(0))
    methods = {"eager backprop": (lambda m: m)}
    for chunk in CHUNKS:
        methods[f"HBP k=3, chunk={chunk}"] = (lambda m, c=chunk: hbp_compile(m, k=3, chunk=c))
    models, fns = {}, {}
    for label, wrap in methods.items():
        models[label] = copy.deepcopy(init)
        fns[label] = wrap(models[label])

    def step(label: str) -> float:
        start = time.perf_counter()
        models[label].zero_grad(set_to_none=True)
        workload.loss(fns[label], batch).backward()
        return time.perf_counter() - start

    for label in methods:  # compile, then warm
        step(label)
        step(label)
    times: dict[str, list[float]] = {label: [] for label in methods}
    interleaved_rounds({label: (lambda lb=label: times[lb].append(step(lb))) for label in methods}, repeats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peaks = {label: _peak_memory(fns[label], models[label], workload, batch, "cpu") for label in methods}
    base_t, base_m = statistics.median(times["eager backprop"]), peaks["eager backprop"]
    lines = [f"### {workload.name}", "", "| method | peak (MiB) | peak / backprop | step (ms) | step / backprop |",
             "|---|---|---|---|---|"]
    for label in methods:
        med = statistics.median(times[label])
        lines.append(f"| {label} | {peaks[label] / 2**20:.1f} | {peaks[label] / base_m:.2f}× | {med * 1e3:.2f} | "
                     f"{med / base_t:.2f}× |")
    print("\n".join(lines), flush=True)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--write", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    lines = [f"Written by `python -m benchmarks.memory --repeats {args.repeats} --write` on {platform.machine()} "
             f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, float32, Inductor. "
             "`chunk=None` is the default (automatic: convolution blocks take as many layers per call as "
             "keep its input states within 1 MiB, 2 of the ResNet's; other blocks all of them).", ""]
    for workload in workloads():
        if workload.name.startswith(WORKLOADS):
            lines += measure(workload, args.repeats)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "\n".join(lines), "memory")

if __name__ == "__main__":
    main()
