#!/usr/bin/env bash
# The project's one prepared GPU check (issue 19): prints the device, runs the CUDA exactness tests,
# then times the headline workloads into docs/benchmarks-gpu.md (python -m benchmarks.gpu).
#
#   bash benchmarks/device_check.sh            # on a CUDA machine: within 8 minutes on one H100
#     (tests stopped at TEST_TIMEOUT=200 s; no new method started after BUDGET_S=240 s of benchmarks)
#   bash benchmarks/device_check.sh --smoke    # the same code path on the CPU, tiny sizes (CI runs it)
#   BENCH_ONLY='GRU T=16' bash benchmarks/device_check.sh --smoke   # one workload (the CI test's pieces)
#   SKIP_TESTS=1 ...                           # the benchmarks only (the CI test runs the tests once)
#
# Uses .venv/bin/python when there is one, else $PYTHON or python3 (a GPU image's own torch), with
# this checkout on PYTHONPATH. Logs and the page also go to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS=${OUT:-$(mktemp -d)}
smoke=""
page=${BENCH_PAGE:-docs/benchmarks-gpu.md}
if [ "${1:-}" = "--smoke" ]; then
  smoke="--smoke"
  page=${BENCH_PAGE:-$LOGS/benchmarks-gpu-smoke.md}
fi

echo "== device"
date -u +%FT%TZ
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

echo "== CUDA exactness tests (skipped without a GPU)"
if [ -n "${SKIP_TESTS:-}" ]; then
  # the suite runs this script once per workload, and the CUDA tests in one of those runs only
  echo "not run: SKIP_TESTS is set" | tee "$LOGS/cuda_tests.log"
  tests_rc=0
else
  # one process (-o addopts: a GPU image's own Python may lack pytest-xdist, which the suite's -n needs)
  timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_devices.py 2>&1 | tee "$LOGS/cuda_tests.log" | tail -25
  tests_rc=${PIPESTATUS[0]}
fi

echo "== benchmarks ($page)"
"$PY" -m benchmarks.gpu $smoke ${BENCH_ONLY:+--only "$BENCH_ONLY"} --budget-s "${BUDGET_S:-240}" --out "$page" 2>&1 | tee "$LOGS/benchmarks.log" | tail -60
bench_rc=${PIPESTATUS[0]}
echo "== done: tests rc=$tests_rc, benchmarks rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
