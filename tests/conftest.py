import os

import pytest

# Strict by default: a stage of the pass that fails raises instead of falling back, so a bug cannot
# pass as a fallback. Tests that expect a fallback say strict=False.
os.environ.setdefault("HBP_STRICT", "1")
# Inductor checks which vector ISAs the C++ compiler can build for by compiling and loading a probe
# library per ISA, in a child Python each time a process first compiles (about 2.6 s a process, 8 s
# with an empty cache). The suite starts some twenty processes that compile (xdist workers, the DDP
# ranks, the device check, the interpreter's pytest), on one kind of machine: trust the CPU's flags
# (/proc/cpuinfo), which Inductor reads anyway. The kernels are the same: it picks the same ISA.
# TORCHINDUCTOR_VEC_ISA_OK=0 in the environment turns the probe back on.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")

from hbp_compile._torch_compat import reset_dynamo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no dynamo cache shared between tests."""
    reset_dynamo()
    yield
    reset_dynamo()
