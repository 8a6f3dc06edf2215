"""The benchmark suite: every workload of ``workloads.py`` under every method, in one run.

Run: python -m benchmarks [--quick] [--only NAME...] [--repeats 9] [--interleaved] [--no-write] [--replot]

Methods: eager backprop, torch.compile backprop, fixed-point iteration (γ = 1, k = 3), HBP at k in
(0, 1, 3, 10) (Inductor; the workload's γ) and HBP k=3 with ``recompute=False``. Per method: median
step time / eager backprop's (measured in this run), first-call time (compilation included), peak
memory of a training step / eager backprop's (CUDA ``max_memory_allocated``, or torch.profiler's CPU
memory timeline), the cosine similarity of the parameter gradient to the exact one on the same batch,
kernels per training step (forward / backward, ``kernels.py``) and the backward's sequential depth
in block VJPs over the rewritten chains (from the compiled model's report; backprop's for the
backprop methods). Times move between runs; kernel counts and depths do not.

Two modes. By default each method runs in a process of its own. ``--interleaved`` runs a workload's
methods in one process and alternates them step by step, round after round, so that a slow spell of
the machine hits every method alike; the tables then show the median and the min–max of the
rounds, and the difference between the two modes is the noise a reader should allow for.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from hbp_compile import hbp_compile
from hbp_compile.verify import peak_bytes

from .kernels import count_step_kernels, enable_kernel_events
from .rounds import interleaved_rounds
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
    step_min_s: float = float("nan")
    step_max_s: float = float("nan")
    kernels_forward: int = 0
    kernels_backward: int = 0
    depth: int | None = None  # the backward's sequential depth in block VJPs over the rewritten chains
    depth_backprop: int | None = None  # the same chains' depth under backprop


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
    return float(peak_bytes(lambda: _step(fn, model, workload, batch, device), device) or float("nan"))


@dataclass
class Prepared:
    """A method's model, warmed up: its first call (compilation included) and a second are done."""

    name: str
    k: int | None
    model: torch.nn.Module
    fn: object
    first_s: float
    times: list[float]


def prepare(workload: Workload, name: str, k: int | None, wrap, device: str, init: torch.nn.Module,
            batch: tuple) -> Prepared:
    model = copy.deepcopy(init)
    fn = wrap(model)
    start = time.perf_counter()
    _step(fn, model, workload, batch, device)
    first = time.perf_counter() - start
    _step(fn, model, workload, batch, device)  # warm: a second call may still specialise
    return Prepared(name, k, model, fn, first, [])


def time_step(method: Prepared, workload: Workload, batch: tuple, device: str) -> None:
    start = time.perf_counter()
    _step(method.fn, method.model, workload, batch, device)
    method.times.append(time.perf_counter() - start)


def finish(workload: Workload, method: Prepared, device: str, exact: torch.Tensor, batch: tuple) -> Row:
    """The row of a timed method: its gradient's cosine (last step), peak memory, kernels and depth."""
    cosine = torch.nn.functional.cosine_similarity(_grads(method.model).double(), exact.double(), dim=0).item()
    peak = _peak_memory(method.fn, method.model, workload, batch, device)
    method.model.zero_grad(set_to_none=True)
    forward, backward = count_step_kernels(lambda: workload.loss(method.fn, batch), device)
    report = getattr(method.fn, "hbp_report", None)
    depths = report.backward_depths() if report is not None else (None, None)
    return Row(workload.name, method.name, method.k, statistics.median(method.times), method.first_s, peak, cosine,
               error=fell_back(method.fn), step_min_s=min(method.times), step_max_s=max(method.times),
               kernels_forward=forward, kernels_backward=backward, depth=depths[1], depth_backprop=depths[0])


def measure(workload: Workload, name: str, k: int | None, wrap, repeats: int, device: str,
            exact: torch.Tensor, init: torch.nn.Module, batch: tuple) -> Row:
    method = prepare(workload, name, k, wrap, device, init, batch)
    for _ in range(repeats):
        time_step(method, workload, batch, device)
    return finish(workload, method, device, exact, batch)


def measure_interleaved(workload: Workload, repeats: int, device: str, ks=HBP_KS, chosen=None) -> list[Row]:
    """Every method of ``workload`` (or the ``chosen`` (name, k, wrap) triples) in this process,
    alternating: each round times each method once, in a shuffled order (``rounds.py``), so that no
    method always follows the same one."""
    init, batch, exact = _workload_inputs(workload, device)
    chosen = methods(workload, ks) if chosen is None else chosen
    prepared = [prepare(workload, name, k, wrap, device, init, batch) for name, k, wrap in chosen]
    interleaved_rounds({str(i): (lambda m=m: time_step(m, workload, batch, device)) for i, m in enumerate(prepared)},
                       repeats)
    return [finish(workload, method, device, exact, batch) for method in prepared]


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


def _workload_inputs(workload: Workload, device: str) -> tuple[torch.nn.Module, tuple, torch.Tensor]:
    """The initial model, the batch and backprop's exact gradient on it."""
    torch.manual_seed(0)
    init = workload.make_model().to(device).train()
    batch = tuple(t.to(device) for t in workload.make_batch(torch.Generator().manual_seed(0)))
    reference = copy.deepcopy(init)
    _step(reference, reference, workload, batch, device)
    return init, batch, _grads(reference)


def run_one(workload_name: str, method_name: str, repeats: int, device: str, ks=HBP_KS) -> Row:
    """One method on one workload, in this process (the child of ``run``)."""
    workload = next(w for w in workloads() if w.name == workload_name)
    _, k, wrap = next(m for m in methods(workload, ks) if m[0] == method_name)
    init, batch, exact = _workload_inputs(workload, device)
    return measure(workload, method_name, k, wrap, repeats, device, exact, init, batch)


def run_interleaved(selected: list[Workload], repeats: int, device: str, ks=HBP_KS) -> list[Row]:
    """Each workload's methods alternating in this process (``--interleaved``)."""
    rows = []
    for workload in tqdm(selected, desc="benchmarks (interleaved)", unit="workload"):
        rows += measure_interleaved(workload, repeats, device, ks)
    return rows


COLUMNS = ("method", "step (ms)", "min–max (ms)", "step / backprop", "first call (s)", "peak memory / backprop",
           "grad cosine", "kernels fwd / bwd", "backward depth")


def markdown(rows: list[Row], selected: list[Workload], device: str, repeats: int, interleaved: bool = False) -> str:
    cache = "a warm" if "hbp_bench_inductor_" not in os.environ.get("TORCHINDUCTOR_CACHE_DIR", "") else "an empty"
    if interleaved:
        mode = ("A workload's methods run in one process, alternating step by step, round after round "
                f"({repeats} rounds, in an order shuffled every round); min–max is over the rounds.")
    else:
        mode = ("Each method runs in a process of its own; the processes share the run's Inductor cache, so "
                "methods that compile the same graphs (HBP at another k) reuse its entries, as a user changing k "
                "would. min–max is over the timed steps.")
    lines = [f"Measured by `python -m benchmarks{' --interleaved' if interleaved else ''}` on {device_name(device)}, "
             f"torch {torch.__version__}, float32, median of {repeats} steps. Ratios are to eager backprop in the "
             f"same run. The run started with {cache} Inductor cache. {mode} Kernels: operator calls that compute "
             "(CPU) or device kernels (CUDA) per training step, forward / backward. Backward depth: block VJPs "
             "on the longest path of the rewritten chains' backward (backprop's for the backprop methods).", ""]
    for workload in selected:
        mine = [r for r in rows if r.workload == workload.name]
        if not mine:
            continue
        base = next(r for r in mine if r.method == "eager backprop")
        backprop_depth = next((r.depth_backprop for r in mine if r.depth_backprop), None)
        lines += [f"### {workload.name}", ""]
        if workload.note:
            lines += [workload.note + ".", ""]
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in mine:
            if r.error:  # a failure, or an HBP method that fell back: no number to read as Highway-BP's
                lines.append(f"| {r.method} | {r.error} |" + " |" * (len(COLUMNS) - 2))
                continue
            depth = r.depth if r.depth is not None else backprop_depth
            lines.append(f"| {r.method} | {r.step_s * 1e3:.1f} | {r.step_min_s * 1e3:.1f}–{r.step_max_s * 1e3:.1f} | "
                         f"{r.step_s / base.step_s:.2f} | {r.first_s:.1f} | {r.peak_bytes / base.peak_bytes:.2f} | "
                         f"{r.cosine:.4f} | {r.kernels_forward} / {r.kernels_backward} | "
                         f"{'' if depth is None else depth} |")
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
        if not line.startswith("| ") or len(cells) != len(COLUMNS) or cells[0] == "method" or \
                cells[1].startswith(("failed", "fell back")):
            continue
        named = dict(zip(COLUMNS, cells))
        k = re.search(r"\bk=(\d+)", named["method"])
        rows.append(Row(workload, named["method"], int(k.group(1)) if k else None, float(named["step (ms)"]) / 1e3,
                        float(named["first call (s)"]), float(named["peak memory / backprop"]),
                        float(named["grad cosine"])))
    return rows


def merge_tables(old: str, new: str, command: str) -> str:
    r"""``old``'s section with the workload tables of ``new`` put in place of (or after) the ones of
    the same name, and a line saying which tables ``command`` rewrote (``--only`` reruns).

    >>> old = "Measured by A.\n\n### w1\n\nt1\n\n### w2\n\nt2\n"
    >>> print(merge_tables(old, "Measured by B.\n\n### w2\n\nt2'\n", "python -m benchmarks --only w2"))
    Measured by A.
    <BLANKLINE>
    Rewritten since by `python -m benchmarks --only w2` (Measured by B): w2.
    <BLANKLINE>
    ### w1
    <BLANKLINE>
    t1
    <BLANKLINE>
    ### w2
    <BLANKLINE>
    t2'
    <BLANKLINE>
    """
    def split(text: str) -> tuple[str, dict[str, str]]:
        head, *blocks = re.split(r"^(?=### )", text, flags=re.M)
        return head.strip("\n"), {b.splitlines()[0][4:].strip(): b.strip("\n") for b in blocks}

    old_head, old_tables = split(old)
    new_head, new_tables = split(new)

    def superseded(paragraph: str) -> bool:  # an earlier rerun's line, all of whose tables are rewritten now
        return paragraph.startswith("Rewritten since by") and set(
            paragraph.rsplit("): ", 1)[-1].rstrip(".").split(", ")) <= set(new_tables)

    old_head = "\n\n".join(p for p in old_head.split("\n\n") if not superseded(p))
    tables = {**old_tables, **new_tables}
    note = f"Rewritten since by `{command}` ({new_head.split('. ')[0].rstrip('.')}): {', '.join(new_tables)}."
    return "\n\n".join([old_head, note, *tables.values()]) + "\n"


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
    parser.add_argument("--interleaved", action="store_true",
                        help="alternate a workload's methods in one process instead of a process per method")
    parser.add_argument("--one", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--replot", action="store_true",
                        help="redraw the plots from the tables in docs/benchmarks.md, measure nothing")
    args = parser.parse_args(argv)
    enable_kernel_events()
    if args.one:
        print(json.dumps(dataclasses.asdict(run_one(*args.one, args.repeats, args.device, tuple(args.ks)))))
        return
    if args.replot:
        page = (ROOT / "docs" / "benchmarks.md").read_text()  # the process-per-method tables only
        rows = rows_from_markdown(page[page.index("<!-- suite:begin -->"):page.index("<!-- suite:end -->")])
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
    if args.interleaved:
        rows = run_interleaved(selected, args.repeats, args.device, tuple(args.ks))
    else:
        rows = run(selected, args.repeats, args.device, tuple(args.ks))
    text = markdown(rows, selected, args.device, args.repeats, args.interleaved)
    print(text)
    if not args.no_write:
        marker = "suite-interleaved" if args.interleaved else "suite"
        if args.only:  # the other workloads keep the tables of the run that wrote them
            page = (ROOT / "docs" / "benchmarks.md").read_text()
            old = page[page.index(f"<!-- {marker}:begin -->") + len(f"<!-- {marker}:begin -->"):
                       page.index(f"<!-- {marker}:end -->")]
            text = merge_tables(old.strip("\n"), text, f"python -m benchmarks {' '.join(argv or sys.argv[1:])}")
        write_section(ROOT / "docs" / "benchmarks.md", text, marker)
        if not args.interleaved:  # the plots show the process-per-method run
            for path in plots(rows, selected, ROOT / "docs" / "img"):
                print(f"plot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
