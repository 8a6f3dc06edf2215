import pytest

from hbp_compile._torch_compat import reset_dynamo


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no dynamo cache shared between tests."""
    reset_dynamo()
    yield
    reset_dynamo()
