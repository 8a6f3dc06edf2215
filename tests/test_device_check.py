"""``benchmarks/device_check.sh --smoke``: the GPU check's code path on the CPU with tiny sizes, one
workload per test (``BENCH_ONLY``), so that the suite's workers run them side by side; the first one
also runs the script's CUDA tests (``SKIP_TESTS`` in the others: they would be skipped the same way)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import cases

ROOT = Path(__file__).resolve().parents[1]

SMOKE = [case.name for case in cases(smoke=True)]


@pytest.mark.parametrize("workload", SMOKE)
def test_device_check_smoke_runs_and_writes_its_page(tmp_path, workload):
    page = tmp_path / "page.md"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_PAGE": str(page), "OUT": str(tmp_path),
           "BENCH_ONLY": workload}
    runs_tests = workload == SMOKE[0]  # the CUDA tests (all skipped on the CPU) once, not per workload
    if not runs_tests:
        env["SKIP_TESTS"] = "1"
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = page.read_text()
    assert "smoke run" in text
    assert f"## {workload}" in text and text.count("\n## ") == 2  # this workload and the scans
    assert text.count("| HBP k=3 | ") == 1 and "| HBP k=0 | " in text
    assert "fell back" not in text and "failed" not in text and "not measured (time budget)" not in text
    log = (tmp_path / "cuda_tests.log").read_text()
    assert ("skipped" in log and "error" not in log.lower()) if runs_tests else log.startswith("not run: SKIP_TESTS")
