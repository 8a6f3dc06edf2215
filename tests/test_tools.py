"""The benchmark suite's bookkeeping and the examples' plumbing (not their numbers: those are
measured by the scripts themselves). Each example runs for a few steps with the eager rewrite."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.suite import Row, markdown, rows_from_markdown, run_one, write_section  # noqa: E402
from benchmarks.workloads import workloads  # noqa: E402


def test_write_section_replaces_only_between_its_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- suite:begin -->\nold\n<!-- suite:end -->\noutro\n")
    write_section(doc, "new table")
    assert doc.read_text() == "intro\n<!-- suite:begin -->\nnew table\n<!-- suite:end -->\noutro\n"


def test_markdown_reports_ratios_to_eager_backprop_and_failures():
    w = workloads()[0]
    rows = [Row(w.name, "eager backprop", None, 0.010, 0.1, 1000.0, 1.0),
            Row(w.name, "HBP k=1", 1, 0.005, 2.0, 1500.0, 0.99),
            Row(w.name, "HBP k=3", 3, float("nan"), 0, 0, 0, error="RuntimeError: boom")]
    text = markdown(rows, [w], "cpu", 5)
    assert "| HBP k=1 | 5.0 | 0.50 | 2.0 | 1.50 | 0.9900 |" in text
    assert "failed: RuntimeError: boom" in text


def test_one_method_measured_in_its_own_process_reports_a_row():
    row = run_one(workloads()[0].name, "eager backprop", 2, "cpu")
    assert row.error == "" and row.step_s > 0 and row.peak_bytes > 0
    assert row.cosine == pytest.approx(1.0)


def test_replot_reads_back_the_numbers_the_page_holds():
    w = workloads()[0]
    rows = [Row(w.name, "eager backprop", None, 0.010, 0.1, 1000.0, 1.0),
            Row(w.name, "HBP k=10, γ=0.2, recompute=False", 10, 0.025, 2.0, 1500.0, 0.9986),
            Row(w.name, "HBP k=3", 3, float("nan"), 0, 0, 0, error="RuntimeError: boom")]
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
