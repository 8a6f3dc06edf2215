"""``benchmarks/device_check.sh --smoke``: the GPU check's code path on the CPU with tiny sizes."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke_runs_and_writes_its_page(tmp_path):
    page = tmp_path / "page.md"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_PAGE": str(page), "OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = page.read_text()
    assert "smoke run" in text
    from benchmarks.gpu import cases

    for case in cases(smoke=True):  # every workload the GPU run times, each at a tiny size
        assert f"## {case.name}" in text
    assert text.count("| HBP k=3 | ") == len(cases(smoke=True))
    assert "fell back" not in text and "failed" not in text and "not measured (time budget)" not in text
    assert (tmp_path / "cuda_tests.log").exists()
