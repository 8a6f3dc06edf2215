import os

import pytest

# Strict by default: a stage of the pass that fails raises instead of falling back, so a bug cannot
# pass as a fallback. Tests that expect a fallback say strict=False.
os.environ.setdefault("HBP_STRICT", "1")

from hbp_compile._torch_compat import reset_dynamo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no dynamo cache shared between tests."""
    reset_dynamo()
    yield
    reset_dynamo()
