"""The GPU check: the suite's headline workloads on one CUDA device, written to docs/benchmarks-gpu.md.

Run: python -m benchmarks.gpu [--smoke] [--budget-s 400] [--out docs/benchmarks-gpu.md]
(``benchmarks/device_check.sh`` runs the CUDA tests, then this.)

Per workload, in one process: eager backprop, torch.compile backprop and Highway-BP at k = 0, 1, 3.
Each method's training step (forward, loss, backward) is timed with the methods interleaved, in an
order shuffled every round (``rounds.py``), median of ``--repeats`` after warm-up, the device
synchronized around each step; beside it the peak memory the step allocated beyond what was live
before it (``torch.cuda.max_memory_allocated``), the cosine
between its parameter gradient and eager backprop's, and the first call (capture + compile).
``--smoke`` runs the same code on the CPU with tiny sizes (CI runs it). Methods left when
``--budget-s`` runs out are listed as not measured.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hbp_compile import hbp_compile

from .rounds import interleaved_rounds
from .workloads import CellLoopLM, PreLNStack, RecurrentLM, ResNet, _ce, _gpt2, _lm
from .workloads import _sequence_ce as _seq_ce

# The paper's Table 6 (one GPU, ms per training step; HIGHWAY_BP.md §5), as HBP k=3 / backprop.
# Its backprop is the sequential one (as the GRUCell loop's), not a fused cuDNN call.
PAPER_K3_RATIO = {"GRU T=256": 97 / 209, "GRU T=1024": 210 / 715,
                  "GRUCell loop T=256": 97 / 209, "GRUCell loop T=1024": 210 / 715}


# torch.compile unrolls a Python loop step by step into one graph: 215 s to compile 256 GRUCell
# steps on a 2-core CPU, more than 15 minutes for 1024 (measured 2026-11-26). hbp_compile finds the
# recurrence and captures one step (5.5 s and 11.5 s).
UNROLLED = {"torch.compile backprop": "not measured: torch.compile takes minutes on the unrolled loop"}


@dataclass
class Case:
    name: str
    make_model: Callable[[], torch.nn.Module]
    make_batch: Callable[[torch.device], tuple]
    loss: Callable[[torch.nn.Module, tuple], torch.Tensor]
    gamma: float = 0.0
    skip: dict[str, str] = field(default_factory=dict)  # method -> why it is not measured


@dataclass
class Row:
    method: str
    step_ms: float | None = None
    spread: tuple[float, float] | None = None
    peak_mib: float | None = None
    cosine: float | None = None
    first_s: float | None = None
    layers: int | None = None
    note: str = ""


@dataclass
class Result:
    case: str
    rows: list[Row] = field(default_factory=list)


def cases(smoke: bool) -> list[Case]:
    """The workloads, most wanted first (a run cut short by its budget keeps the first ones).
    ``smoke``: every one at a tiny size, so that the CPU run takes each code path the GPU run takes."""
    def classification(*shape):
        return lambda dev: (torch.randn(*shape, device=dev), torch.randint(0, 10, shape[:1], device=dev))

    def sequence(b, t, d):
        return lambda dev: (torch.randn(b, t, d, device=dev), torch.randint(0, 10, (b, t), device=dev))

    def tokens(b, t, vocab):
        return lambda dev: (torch.randint(0, vocab, (b, t), device=dev),)

    if smoke:
        return [
            Case("GRU T=16", lambda: RecurrentLM("gru", 8), sequence(2, 16, 8), _seq_ce),
            Case("GRUCell loop T=16", lambda: CellLoopLM(8), sequence(2, 16, 8), _seq_ce, skip=UNROLLED),
            Case("pre-LN MLP L=6", lambda: PreLNStack(6, 8), classification(4, 8), _ce),
            Case("ReLU ResNet 3 blocks c=4 8x8 B=2", lambda: ResNet(3, 4), classification(2, 3, 8, 8), _ce),
            Case("GPT-2 2 layers d=32 T=16 B=2 (vocab 64)", lambda: _gpt2(2, 32, 4, 64, 16), tokens(2, 16, 64),
                 _lm, gamma=0.2),
        ]
    gpt2 = Case("GPT-2 small shape T=64 B=2 (vocab 512)", lambda: _gpt2(12, 768, 12, 512, 64), tokens(2, 64, 512),
                _lm, gamma=0.2)
    return [
        Case("GRU T=256", lambda: RecurrentLM("gru", 64), sequence(32, 256, 64), _seq_ce),
        Case("GRUCell loop T=256", lambda: CellLoopLM(64), sequence(32, 256, 64), _seq_ce, skip=UNROLLED),
        gpt2,  # its Highway-BP rows failed on the first GPU run, before a fix: wanted early
        Case("GRU T=1024", lambda: RecurrentLM("gru", 64), sequence(32, 1024, 64), _seq_ce),
        Case("GRUCell loop T=1024", lambda: CellLoopLM(64), sequence(32, 1024, 64), _seq_ce, skip=UNROLLED),
        Case("pre-LN MLP L=64 d=32 B=8", lambda: PreLNStack(64, 32), classification(8, 32), _ce),
        Case("ReLU ResNet 8 blocks c=32 16x16 B=16", lambda: ResNet(8, 32), classification(16, 3, 16, 16), _ce),
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                      for p in model.parameters()])


def run_case(case: Case, device: torch.device, ks: list[int], repeats: int, deadline: float) -> Result:
    torch.manual_seed(0)
    model = case.make_model().to(device)
    batch = case.make_batch(device)
    methods: dict[str, Callable[[], torch.nn.Module]] = {
        "eager backprop": lambda: model,
        "torch.compile backprop": lambda: torch.compile(model),
        **{f"HBP k={k}": (lambda k=k: hbp_compile(model, k=k, gamma=case.gamma)) for k in ks},
    }
    result = Result(case.name)
    built: dict[str, torch.nn.Module] = {}
    rows: dict[str, Row] = {}

    def step(m: torch.nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        _sync(device)
        start = time.perf_counter()
        case.loss(m, batch).backward()
        _sync(device)
        return time.perf_counter() - start

    reference = None
    for label, make in methods.items():
        row = rows[label] = Row(label)
        result.rows.append(row)
        if label in case.skip:
            row.note = case.skip[label]
            continue
        if time.perf_counter() > deadline:
            row.note = "not measured (time budget)"
            continue
        try:
            m = make()
            row.first_s = step(m)
            if device.type == "cuda":
                model.zero_grad(set_to_none=True)  # last step's gradients are not this step's memory
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                step(m)
                row.peak_mib = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            else:
                step(m)
            grad = _flat_grad(model)
            reference = grad if reference is None else reference
            row.cosine = float(torch.nn.functional.cosine_similarity(grad, reference, dim=0))
            report = getattr(m, "hbp_report", None)
            row.layers = report.num_layers if report is not None else None
            if label.startswith("HBP") and not row.layers:
                row.note = "fell back to backprop"
            built[label] = m
        except Exception as exc:  # noqa: BLE001 - a failing method is a row that says why
            row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    times: dict[str, list[float]] = {label: [] for label in built}
    interleaved_rounds({label: (lambda lb=label, m=m: times[lb].append(step(m))) for label, m in built.items()},
                       repeats)
    for label, ts in times.items():
        rows[label].step_ms = statistics.median(ts) * 1e3
        rows[label].spread = (min(ts) * 1e3, max(ts) * 1e3)
    return result


# (name, rows n, row shape, K): the scans the workloads above run, once per Highway-BP iteration
SCAN_SHAPES = [
    ("GRU T=256 (d=64, B=32), diagonal K", 257, (32, 64), "diagonal"),
    ("GRU T=1024 (d=64, B=32), diagonal K", 1025, (32, 64), "diagonal"),
    ("64-layer stack (d=32, B=8), K = I", 65, (8, 32), "identity"),
    ("ResNet 8 blocks (c=32, 16x16, B=16), ReLU's 0/1 K", 9, (16, 32, 16, 16), "mask"),
]
SMOKE_SCAN_SHAPES = [("T=64, diagonal K", 65, (2, 8), "diagonal"), ("8 layers, 0/1 K", 9, (2, 4, 8, 8), "mask")]


def time_scans(device: torch.device, smoke: bool, repeats: int) -> list[str]:
    """One residual scan (with an iteration's block VJPs added on the way): the compiled kernel the
    engine picks here (Triton on CUDA, C on the CPU) against the torch-ops scan (``HBP_SCAN=torch``)."""
    from hbp_compile.engine.scans import ResidualScan, _kernel_for

    lines = ["## One residual scan: the compiled kernel against torch ops", "",
             "| scan | kernel | kernel ms | torch ops ms | torch ops / kernel | max abs difference |", "|---|---|---|---|---|---|"]
    previous = os.environ.get("HBP_SCAN")

    def run(which: str) -> None:
        os.environ["HBP_SCAN"] = which  # "torch": the torch-ops scan; anything else: the kernel
        _sync(device)
        start = time.perf_counter()
        outs[which] = scans[which](c, v)
        _sync(device)
        times[which].append(time.perf_counter() - start)

    try:
        for name, n, shape, kind in SMOKE_SCAN_SHAPES if smoke else SCAN_SHAPES:
            g = torch.Generator(device=device).manual_seed(0)
            c = torch.randn(n, *shape, device=device, generator=g)
            v = torch.randn(n - 1, *shape, device=device, generator=g)
            k = {"identity": None, "diagonal": torch.rand(n - 1, *shape, device=device, generator=g),
                 "mask": torch.rand(n - 1, *shape, device=device, generator=g) > 0.5}[kind]
            os.environ["HBP_SCAN"] = "kernel"
            kernel = _kernel_for(c)
            label = {None: "none: torch ops"}.get(kernel) or {"native_scan": "C", "triton_scan": "Triton"}.get(
                kernel.__name__.rsplit(".", 1)[-1], kernel.__name__)
            scans = {"kernel": ResidualScan(k, n), "torch": ResidualScan(k, n)}
            outs: dict[str, torch.Tensor] = {}
            times: dict[str, list[float]] = {"kernel": [], "torch": []}
            for which in times:  # warm-up: builds the kernel, the torch scan's products
                run(which)
                times[which].clear()
            interleaved_rounds({which: (lambda w=which: run(w)) for which in times}, repeats)
            ms = {which: statistics.median(ts) * 1e3 for which, ts in times.items()}
            diff = float((outs["kernel"] - outs["torch"]).abs().max())
            lines.append(f"| {name} | {label} | {ms['kernel']:.3f} | {ms['torch']:.3f} | "
                         f"{ms['torch'] / ms['kernel']:.2f}× | {diff:.1e} |")
    finally:
        os.environ.pop("HBP_SCAN", None)
        if previous is not None:
            os.environ["HBP_SCAN"] = previous
    return lines + [""]


@functools.lru_cache(maxsize=1)
def _commit() -> str:
    """The checkout's commit (and whether it has changes): what the numbers were measured on."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + (" with local changes" if dirty else "")) if head else "unknown"


def render(results: list[Result], device_name: str, smoke: bool, command: str, scans: list[str] = ()) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        "# Benchmarks on a GPU",
        "",
        f"Written by `{command}` on {today}, device: **{device_name}**" + (" (smoke run: tiny sizes)" if smoke else "") +
        f", torch {torch.__version__}, commit `{_commit()}`.",
        "",
        "Per workload, one process; methods interleaved in an order shuffled every round, median training step (forward + loss + backward) "
        "with min–max; peak = memory allocated during the step beyond what was live before it; cosine = "
        "gradient cosine to eager backprop; first call = capture + compile + first step. Rows marked "
        "'not measured' say why (the script's time budget, or a compile that takes minutes).",
        "",
    ]
    for res in results:
        base = next((r.step_ms for r in res.rows if r.method == "eager backprop" and r.step_ms), None)
        lines += [f"## {res.case}", "", "| method | step ms | min–max | / eager | peak MiB | cosine | layers | first call s | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res.rows:
            def fmt(v, f):
                return f.format(v) if v is not None else "—"
            ratio = f"{r.step_ms / base:.2f}×" if r.step_ms and base else "—"
            spread = f"{r.spread[0]:.2f}–{r.spread[1]:.2f}" if r.spread else "—"
            lines.append(f"| {r.method} | {fmt(r.step_ms, '{:.2f}')} | {spread} | {ratio} | {fmt(r.peak_mib, '{:.1f}')} | "
                         f"{fmt(r.cosine, '{:.4f}')} | {fmt(r.layers, '{}')} | {fmt(r.first_s, '{:.1f}')} | {r.note} |")
        if res.case in PAPER_K3_RATIO:
            lines.append(f"\nThe paper's Table 6 ratio HBP k=3 / backprop for this shape of workload: "
                         f"{PAPER_K3_RATIO[res.case]:.2f}× (its own model sizes and GPU).")
        lines.append("")
    return "\n".join([*lines, *scans])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code path, in seconds")
    parser.add_argument("--budget-s", type=float, default=400.0)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--k", type=int, nargs="+", default=None,
                        help="iterations to time (default 0 1 3; --smoke: 0 3, k = 1 takes k = 3's path)")
    parser.add_argument("--out", default="docs/benchmarks-gpu.md")
    parser.add_argument("--only", nargs="+", default=None, help="workloads whose name contains one of these")
    args = parser.parse_args()
    if args.smoke:
        device, name = torch.device("cpu"), "CPU"
    elif torch.cuda.is_available():
        device, name = torch.device("cuda"), torch.cuda.get_device_name()
    else:
        raise SystemExit("benchmarks.gpu: no CUDA device; run with --smoke for the CPU code path")
    deadline = time.perf_counter() + args.budget_s
    command = "python -m benchmarks.gpu" + (" --smoke" if args.smoke else "")
    scans = time_scans(device, args.smoke, max(args.repeats, 15))
    print("\n".join(scans), flush=True)
    results = []
    for case in cases(args.smoke):
        if args.only and not any(word in case.name for word in args.only):
            continue
        ks = args.k or ([0, 3] if args.smoke else [0, 1, 3])
        results.append(run_case(case, device, ks, args.repeats, deadline))
        text = render(results, name, args.smoke, command, scans)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)  # after every workload: a run cut short keeps what it measured
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], Path(args.out).name).write_text(text)
        print(render(results, name, args.smoke, command).split("\n## ")[-1], flush=True)


if __name__ == "__main__":
    main()
