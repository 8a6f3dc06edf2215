"""The benchmark suite: every workload of ``workloads.py`` under every method, in one run.

Run: python -m benchmarks [--quick] [--only NAME...] [--repeats 9] [--no-write] [--replot]

Methods: eager backprop, torch.compile backprop, fixed-point iteration (γ = 1, k = 3), HBP at k in
(0, 1, 3, 10) (Inductor; the workload's γ) and HBP k=3 with ``recompute=False``. Per method: median
step time / eager backprop's (measured in this run), first-call time (compilation included), peak
memory of a training step / eager backprop's (CUDA ``max_memory_allocated``, or torch.profiler's CPU
memory timeline), and the cosine similarity of the parameter gradient to the exact one on the same batch.
An HBP method whose model was not rewritten (no layer, or a graph that failed) is a row that says
"fell back to exact backprop" with the reasons, never a number read as Highway-BP's.

Writes the tables into docs/benchmarks.md (between the ``suite`` markers) and the plots
docs/img/bench_time_vs_k.png and docs/img/bench_cosine_vs_k.png.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hbp_compile import hbp_compile

from .workloads import Workload, workloads

ROOT = Path(__file__).resolve().parents[1]
HBP_KS = (0, 1, 3, 10)


@dataclass
class Row:
    workload: str
    method: str
    k: int | None
    step_s: float
    first_s: float
    peak_bytes: float
    cosine: float
    error: str = ""


def methods(workload: Workload, ks=HBP_KS) -> list[tuple[str, int | None, object]]:
    """(name, k, wrap) triples; ``wrap(model)`` returns what a training step calls."""
    out = [("eager backprop", None, lambda m: m), ("torch.compile backprop", None, torch.compile)]
    out.append(("fixed point (γ=1, k=3)", 3, lambda m: hbp_compile(m, k=3, gamma=1.0)))
    gamma = f", γ={workload.gamma}" if workload.gamma else ""
    for k in ks:
        out.append((f"HBP k={k}{gamma}", k, lambda m, k=k: hbp_compile(m, k=k, gamma=workload.gamma)))
    out.append((f"HBP k=3{gamma}, recompute=False", 3,
                lambda m: hbp_compile(m, k=3, gamma=workload.gamma, recompute=False)))
    return out


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _step(fn, model, workload: Workload, batch: tuple, device: str) -> None:
    model.zero_grad(set_to_none=True)
    workload.loss(fn, batch).backward()
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory(fn, model, workload: Workload, batch: tuple, device: str) -> float:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(fn, model, workload, batch, device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        _step(fn, model, workload, batch, device)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        _, sizes = json.loads(Path(path).read_text())
    return float(max(sum(s) for s in sizes))


def measure(workload: Workload, name: str, k: int | None, wrap, repeats: int, device: str,
            exact: torch.Tensor, init: torch.nn.Module, batch: tuple) -> Row:
    model = copy.deepcopy(init)
    fn = wrap(model)
    start = time.perf_counter()
    _step(fn, model, workload, batch, device)
    first = time.perf_counter() - start
    _step(fn, model, workload, batch, device)  # warm: a second call may still specialise
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(fn, model, workload, batch, device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    cosine = torch.nn.functional.cosine_similarity(_grads(model).double(), exact.double(), dim=0).item()
    peak = _peak_memory(fn, model, workload, batch, device)
    return Row(workload.name, name, k, step_s, first, peak, cosine, error=fell_back(fn))


def fell_back(fn: object) -> str:
    """For an hbp-compiled model: why the row is not a Highway-BP number ('' when it is). A model
    with no rewritten layer, or with a graph that failed to be rewritten, trained (partly) with
    exact backprop, and its timings must not be read as Highway-BP's."""
    report = getattr(fn, "hbp_report", None)
    if report is None:
        return ""
    failed = [f"graph {r.index}: {r.fallback.name}" for r in report.fallbacks if r.fallback.is_failure]
    if report.num_layers == 0 or failed:
        reasons = "; ".join(failed) or "no layer rewritten"
        return f"fell back to exact backprop ({reasons})"
    return ""


def run(selected: list[Workload], repeats: int, device: str, ks=HBP_KS) -> list[Row]:
    """Every (workload, method) pair, each in a process of its own.

    One process per pair keeps what a method leaves behind (dynamo and Inductor state, the
    allocator's, threads) out of the next one's timings, and gives every first call a fresh process.
    The processes share the run's Inductor cache directory, so a method compiling graphs that another
    already compiled reuses them, as a user changing k would.
    """
    rows = []
    jobs = [(w, name, k) for w in selected for name, k, _ in methods(w, ks)]
    progress = tqdm(jobs, desc="benchmarks", unit="run")
    for workload, name, k in progress:
        progress.set_postfix_str(f"{workload.name[:28]} | {name}")
        command = [sys.executable, "-m", "benchmarks.suite", "--one", workload.name, name,
                   "--repeats", str(repeats), "--device", device, "--ks", *map(str, ks)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode == 0:
            rows.append(Row(**json.loads(done.stdout.strip().splitlines()[-1])))
        else:  # one failing method must not lose the whole run
            nan = float("nan")
            error = "failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            rows.append(Row(workload.name, name, k, nan, nan, nan, nan, error))
            tqdm.write(f"{workload.name} | {name}: {error}")
    return rows


def run_one(workload_name: str, method_name: str, repeats: int, device: str, ks=HBP_KS) -> Row:
    """One method on one workload, in this process (the child of ``run``)."""
    workload = next(w for w in workloads() if w.name == workload_name)
    _, k, wrap = next(m for m in methods(workload, ks) if m[0] == method_name)
    torch.manual_seed(0)
    init = workload.make_model().to(device).train()
    batch = tuple(t.to(device) for t in workload.make_batch(torch.Generator().manual_seed(0)))
    reference = copy.deepcopy(init)
    _step(reference, reference, workload, batch, device)
    return measure(workload, method_name, k, wrap, repeats, device, _grads(reference), init, batch)


def markdown(rows: list[Row], selected: list[Workload], device: str, repeats: int) -> str:
    cache = "a warm" if "hbp_bench_inductor_" not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "") else "an empty"
    lines = [f"Measured by `python -m benchmarks` on {device_name(device)}, torch {torch.__version__}, "
             f"float32, median of {repeats} steps. Ratios are to eager backprop in the same run. The run started "
             f"with {cache} Inductor cache. Each method runs in a process of its own; the processes share the "
             "run's Inductor cache, so methods that compile the same graphs (HBP at another k) reuse its "
             "entries, as a user changing k would.", ""]
    for workload in selected:
        mine = [r for r in rows if r.workload == workload.name]
        if not mine:
            continue
        base = next(r for r in mine if r.method == "eager backprop")
        lines += [f"### {workload.name}", ""]
        if workload.note:
            lines += [workload.note + ".", ""]
        lines += ["| method | step (ms) | step / backprop | first call (s) | peak memory / backprop | grad cosine |",
                  "|---|---|---|---|---|---|"]
        for r in mine:
            if r.error:  # a failure, or an HBP method that fell back: no number to read as Highway-BP's
                lines.append(f"| {r.method} | {r.error} | | | | |")
                continue
            lines.append(f"| {r.method} | {r.step_s * 1e3:.1f} | {r.step_s / base.step_s:.2f} | {r.first_s:.1f} | "
                         f"{r.peak_bytes / base.peak_bytes:.2f} | {r.cosine:.4f} |")
        lines.append("")
    return "\n".join(lines)


def rows_from_markdown(text: str) -> list[Row]:
    """The rows of tables that ``markdown`` wrote, back from the page (``--replot`` redraws the plots
    from the numbers the page holds). Memory comes back as the ratio to eager backprop.

    >>> w = workloads()[0]
    >>> rows = [Row(w.name, "eager backprop", None, 0.01, 0.1, 10.0, 1.0), Row(w.name, "HBP k=3", 3, 0.02, 2.0, 15.0, 0.99)]
    >>> [(r.method, r.k, round(r.step_s, 4), r.peak_bytes) for r in rows_from_markdown(markdown(rows, [w], "cpu", 5))]
    [('eager backprop', None, 0.01, 1.0), ('HBP k=3', 3, 0.02, 1.5)]
    """
    rows, workload = [], ""
    for line in text.splitlines():
        if line.startswith("### "):
            workload = line[4:].strip()
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 6 or cells[0] == "method" or \
                cells[1].startswith(("failed", "fell back")):
            continue
        method, step_ms, _, first, peak, cosine = cells
        k = re.search(r"\bk=(\d+)", method)
        rows.append(Row(workload, method, int(k.group(1)) if k else None, float(step_ms) / 1e3, float(first),
                        float(peak), float(cosine)))
    return rows


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def plots(rows: list[Row], selected: list[Workload], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, label, fname in [("time", "step time / eager backprop", "bench_time_vs_k.png"),
                                 ("cosine", "gradient cosine to exact", "bench_cosine_vs_k.png")]:
        fig, ax = plt.subplots(figsize=(7, 5.2))
        ks: set[int] = set()
        for workload in selected:
            mine = [r for r in rows if r.workload == workload.name]
            if not mine:
                continue
            base = next(r for r in mine if r.method == "eager backprop")
            hbp = sorted((r for r in mine if r.method.startswith("HBP") and "recompute" not in r.method), key=lambda r: r.k)
            ys = [r.step_s / base.step_s if metric == "time" else r.cosine for r in hbp]
            ax.plot([r.k for r in hbp], ys, marker="o", label=workload.name)
            ks.update(r.k for r in hbp)
        if metric == "time":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="eager backprop")
        ax.set_xlabel("k (Highway-BP iterations)")
        ax.set_ylabel(label)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(out_dir / fname)
    return paths


def write_section(doc: Path, text: str, marker: str = "suite") -> None:
    """Replace the text between the ``<!-- marker:begin -->``/``end`` comments of ``doc``."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    content = doc.read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", content))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="workloads whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--ks", type=int, nargs="+", default=list(HBP_KS))
    parser.add_argument("--quick", action="store_true", help="the first workload only, 2 repeats, no docs written")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave docs/ as it is")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use Inductor's usual on-disk cache (default: a fresh one, so first calls compile)")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--replot", action="store_true",
                        help="redraw the plots from the tables in docs/benchmarks.md, measure nothing")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(dataclasses.asdict(run_one(*args.one, args.repeats, args.device, tuple(args.ks)))))
        return
    if args.replot:
        rows = rows_from_markdown((ROOT / "docs" / "benchmarks.md").read_text())
        named = {r.workload for r in rows}
        for path in plots(rows, [w for w in workloads() if w.name in named], ROOT / "docs" / "img"):
            print(f"plot: {path.relative_to(ROOT)}")
        return
    if not args.warm_cache:
        # Inductor reads the variable when it first needs its cache: no compilation has happened yet
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hbp_bench_inductor_")
    selected = workloads()
    if args.only:
        selected = [w for w in selected if any(s.lower() in w.name.lower() for s in args.only)]
    if args.quick:
        selected, args.repeats, args.no_write = selected[:1], 2, True
    rows = run(selected, args.repeats, args.device, tuple(args.ks))
    text = markdown(rows, selected, args.device, args.repeats)
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "benchmarks.md", text)
        for path in plots(rows, selected, ROOT / "docs" / "img"):
            print(f"plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
