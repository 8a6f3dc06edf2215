"""The benchmark suite's bookkeeping and the examples' plumbing (not their numbers: those are
measured by the scripts themselves). Each example runs for a few steps with the eager rewrite."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.suite import (Row, markdown, measure, measure_interleaved, merge_tables,  # noqa: E402
                              rows_from_markdown, run_one, write_section)
from benchmarks.workloads import Workload, workloads  # noqa: E402
from hbp_compile import hbp_compile  # noqa: E402


def test_write_section_replaces_only_between_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- suite:begin -->\nold\n<!-- suite:end -->\noutro\n")
    write_section(doc, "new table")
    assert doc.read_text() == "intro\n<!-- suite:begin -->\nnew table\n<!-- suite:end -->\noutro\n"


def test_a_rerun_of_some_workloads_replaces_only_their_tables():
    w1, w2 = workloads()[:2]
    first = markdown([Row(w.name, "eager backprop", None, 0.01, 0.1, 10.0, 1.0) for w in (w1, w2)], [w1, w2], "cpu", 5)
    rerun = markdown([Row(w2.name, "eager backprop", None, 0.02, 0.1, 10.0, 1.0)], [w2], "cpu", 5)
    merged = merge_tables(first, rerun, "python -m benchmarks --only d=512")
    assert [r.step_s for r in rows_from_markdown(merged)] == [0.01, 0.02]
    assert "Rewritten since by `python -m benchmarks --only d=512` (Measured by" in merged and merged.count("###") == 2
    again = merge_tables(merged, rerun, "python -m benchmarks --only d=512")
    assert again.count("Rewritten since by") == 1  # a rerun of the same tables replaces the line
    other = merge_tables(merged, markdown([Row(w1.name, "eager backprop", None, 0.03, 0.1, 10.0, 1.0)], [w1], "cpu", 5),
                         "python -m benchmarks --only L=64")
    assert other.count("Rewritten since by") == 2 and [r.step_s for r in rows_from_markdown(other)] == [0.03, 0.02]


def test_markdown_reports_ratios_to_eager_backprop_and_failures():
    w = workloads()[0]
    rows = [Row(w.name, "eager backprop", None, 0.010, 0.1, 1000.0, 1.0),
            Row(w.name, "HBP k=1", 1, 0.005, 2.0, 1500.0, 0.99),
            Row(w.name, "HBP k=3", 3, float("nan"), 0, 0, 0, error="failed: RuntimeError: boom")]
    text = markdown(rows, [w], "cpu", 5)
    assert "| HBP k=1 | 5.0 | nan–nan | 0.50 | 2.0 | 1.50 | 0.9900 | 0 / 0 |  |" in text
    assert "failed: RuntimeError: boom" in text


def test_an_hbp_method_that_fell_back_is_reported_as_a_fallback():
    """A model the pass leaves to exact backprop must show as a fallback, never as an HBP number."""
    plain = Workload("plain MLP (no chain)", lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(),
                                                                          torch.nn.Linear(4, 3)),
                     lambda g: (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)),
                     lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    torch.manual_seed(0)
    init = plain.make_model()
    batch = plain.make_batch(torch.Generator().manual_seed(0))
    exact = torch.cat([p.detach().flatten() for p in init.parameters()])  # any vector: cosine is not checked
    with pytest.warns(UserWarning, match="nothing in the model was rewritten"):
        row = measure(plain, "HBP k=3", 3, lambda m: hbp_compile(m, k=3, backend="eager"), 2, "cpu", exact,
                      init, batch)
    assert row.error.startswith("fell back to exact backprop (no layer rewritten)")
    text = markdown([Row(plain.name, "eager backprop", None, 0.01, 0.1, 10.0, 1.0), row], [plain], "cpu", 2)
    assert "| HBP k=3 | fell back to exact backprop (no layer rewritten) | | | | | | | |" in text
    assert [r.method for r in rows_from_markdown(text)] == ["eager backprop"]


def test_interleaved_mode_reports_kernels_depths_and_spread(monkeypatch):
    """Methods alternate in one process; every row has its kernel counts, the HBP row its depth and
    backprop's, which the backprop row shows; the median lies within the min–max."""
    from tests.models import PreLNMLP

    depth = 6
    stack = Workload("6 pre-LN blocks", lambda: torch.nn.Sequential(*[PreLNMLP(8, 16) for _ in range(depth)]),
                     lambda g: (torch.randn(4, 8, generator=g),), lambda m, b: m(b[0]).pow(2).mean())
    chosen = [("eager backprop", None, lambda m: m),
              ("HBP k=1", 1, lambda m: hbp_compile(m, k=1, backend="eager"))]
    rows = measure_interleaved(stack, 3, "cpu", chosen=chosen)
    backprop, hbp = rows
    assert hbp.error == "" and hbp.depth == 2 and hbp.depth_backprop == depth and backprop.depth is None
    for row in rows:
        assert row.kernels_forward > 0 and row.kernels_backward > 0
        assert row.step_min_s <= row.step_s <= row.step_max_s
    assert hbp.kernels_backward < backprop.kernels_backward  # one batched VJP per iteration, not one per layer
    text = markdown(rows, [stack], "cpu", 3, interleaved=True)
    backprop_line = next(line for line in text.splitlines() if line.startswith("| eager backprop"))
    assert backprop_line.endswith(f"| {depth} |") and "alternating step by step" in text


def test_one_method_measured_in_its_own_process_reports_a_row():
    row = run_one(workloads()[0].name, "eager backprop", 2, "cpu")
    assert row.error == "" and row.step_s > 0 and row.peak_bytes > 0 and row.kernels_backward > 0
    assert row.cosine == pytest.approx(1.0)


def test_replot_reads_back_the_numbers_the_page_holds():
    w = workloads()[0]
    rows = [Row(w.name, "eager backprop", None, 0.010, 0.1, 1000.0, 1.0),
            Row(w.name, "HBP k=10, γ=0.2, recompute=False", 10, 0.025, 2.0, 1500.0, 0.9986),
            Row(w.name, "HBP k=3", 3, float("nan"), 0, 0, 0, error="failed: RuntimeError: boom")]
    back = rows_from_markdown("intro\n" + markdown(rows, [w], "cpu", 5))
    assert [(r.workload, r.method, r.k) for r in back] == [(w.name, "eager backprop", None),
                                                           (w.name, rows[1].method, 10)]
    assert back[1].step_s == pytest.approx(0.025) and back[1].peak_bytes == 1.5 and back[1].cosine == 0.9986


@pytest.mark.parametrize("script,args", [
    ("digits_resnet.py", ["--epochs", "2", "--ks", "1", "--seeds", "0", "--depth", "4"]),
    ("char_gru.py", ["--steps", "3", "--ks", "1", "--length", "16", "--hidden", "16"]),
    ("gpt2_tiny.py", ["--steps", "3", "--ks", "1", "--length", "16", "--layers", "2", "--width", "16"]),
])
def test_examples_run_and_print_their_table(script, args, tmp_path):
    pytest.importorskip("sklearn")
    plot = tmp_path / "plot.png"
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args, "--backend", "eager",
                          "--plot", str(plot)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| HBP k=1" in out.stdout
    assert plot.exists()


def test_trainer_example_trains_saves_and_reloads(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--steps", "2", "--layers", "2",
                          "--length", "16", "--backend", "eager", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Highway-BP rewrote 4 residual layers" in out.stdout
    assert "reloaded weights equal the trained ones: True" in out.stdout


def test_recurrence_study_prints_the_table_it_would_write(monkeypatch, capsys):
    from benchmarks import rnn

    monkeypatch.setenv("HBP_BACKEND", "eager")
    rnn.main(["--cells", "gru", "--steps", "8", "--width", "4", "--batch", "2", "--k", "1", "--repeats", "1",
              "--compile-max-steps", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert out.startswith("Written by `python -m benchmarks.rnn --cells gru --steps 8")
    assert "| module | gru | 8 | HBP k=1 |" in out and "| module | gru | 8 | eager backprop |" in out


def test_cost_model_counts_highway_bp_at_the_algorithm_s_bound():
    """The cost model's FLOP count sees the rewrite (not the original model, which dynamo would run
    under torch's FlopCounterMode), on a stack of L pre-LN two-matmul blocks (d -> h -> d, batch B):
    each iteration costs exactly one block-input VJP per layer (two matmuls of 2·B·d·h FLOPs, issue
    31's bound: no forward recomputed inside the VJP), and k = 0 exactly backprop's step plus the
    recomputed forward (two matmuls a layer). The input VJP k = 0 could skip is still run: the layer
    norm's weight gradient needs the gradient at its output, one input VJP away."""
    from benchmarks.cost_model import fit_line, step_flops

    from .models import mlp_stack

    assert fit_line([0, 1, 3, 10], [2.0, 3.5, 6.5, 17.0]) == (2.0, 1.5)
    depth, d, h, batch = 4, 8, 16, 5
    model = mlp_stack(depth, d=d, hidden=h).double()
    workload = Workload("stack", lambda: model, None, lambda m, b: m(b[0]).pow(2).sum())
    x = (torch.randn(batch, 3, dtype=torch.float64),)
    block_matmul = 2 * batch * d * h
    flops = {k: step_flops(hbp_compile(model, k=k, backend="eager"), workload, x) for k in (0, 1, 3)}
    backprop = step_flops(model, workload, x)
    assert flops[1] - flops[0] == (flops[3] - flops[1]) / 2 == depth * 2 * block_matmul
    assert flops[0] == backprop + depth * 2 * block_matmul


def test_a_convolution_block_s_iteration_costs_its_input_vjp_only():
    """One iteration of a ReLU ResNet's chain costs exactly both convolutions' input VJPs (each as
    many FLOPs as the convolution): ``convolution_backward`` computes what its ``output_mask`` asks
    for, and the engine's batched VJP turns off the weight gradients it does not read (issue 31's
    first-iteration jump). k = 0 costs backprop's step and the recomputed forward, less each first
    convolution's input VJP, which no weight gradient needs (backprop skips it in the first layer
    only, whose input needs no gradient). torch's FLOP formula counts a grouped convolution's weight
    gradient once per group, and a batched VJP is one: the cost model counts its own."""
    from benchmarks.cost_model import step_flops

    from .test_chunk import _ConvBlock  # a ReLU basic block without norms

    depth, channels, batch, side = 4, 4, 2, 6
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[_ConvBlock(channels) for _ in range(depth)]).double()
    workload = Workload("convs", lambda: model, None, lambda m, b: m(b[0]).pow(2).sum())
    x = (torch.randn(batch, channels, side, side, dtype=torch.float64),)
    conv = 2 * batch * channels * channels * 9 * side * side  # one convolution's forward FLOPs
    flops = {k: step_flops(hbp_compile(model, k=k, backend="eager"), workload, x) for k in (0, 1, 3)}
    backprop = step_flops(model, workload, x)
    assert flops[1] - flops[0] == (flops[3] - flops[1]) / 2 == depth * 2 * conv
    assert flops[0] == backprop + depth * 2 * conv - (depth - 1) * conv
