"""The scans against a plain sequential loop of ``w_i = c_i + w_{i+1} k_i``."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hbp_compile.engine.scans import reverse_cumsum, reverse_linear_scan


def sequential(c, k):
    w = c.clone()
    for i in range(c.shape[0] - 2, -1, -1):
        w[i] = c[i] + w[i + 1] * (k[i] if isinstance(k, torch.Tensor) else k)
    return w


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), width=st.integers(1, 5), seed=st.integers(0, 2**16), scalar=st.booleans())
def test_linear_scan_matches_loop(n, width, seed, scalar):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, width, generator=g, dtype=torch.float64)
    k = 0.7 if scalar else torch.randn(n - 1, width, generator=g, dtype=torch.float64)
    assert torch.allclose(reverse_linear_scan(c, k), sequential(c, k), rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_cumsum_is_identity_scan(n, seed):
    c = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.allclose(reverse_cumsum(c), sequential(c, 1.0), rtol=1e-12, atol=1e-12)


def test_scan_broadcasts_per_layer_scalars():
    c = torch.randn(6, 2, 3, dtype=torch.float64)
    k = torch.randn(5, 1, 1, dtype=torch.float64)
    assert torch.allclose(reverse_linear_scan(c, k), sequential(c, k), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), width=st.integers(1, 5), seed=st.integers(0, 2**16),
       kind=st.sampled_from(["identity", "scalar", "diagonal"]), native=st.booleans(), rows=st.integers(0, 3))
def test_residual_scan_with_block_vjps(n, width, seed, kind, native, rows):
    """The C kernel and the torch fallback both equal the loop ``w_i = c_i + v_i + k_i w_{i+1}``."""
    from unittest import mock

    from hbp_compile.engine import native_scan
    from hbp_compile.engine.scans import ResidualScan

    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, width, generator=g, dtype=torch.float64)
    v = torch.randn(max(n - rows, 0), width, generator=g, dtype=torch.float64)
    k = {"identity": None, "scalar": 0.8, "diagonal": torch.randn(n - 1, width, generator=g, dtype=torch.float64)}[kind]
    expected = c.clone()
    expected[: v.shape[0]] += v
    expected = sequential(expected, 1.0 if k is None else k)
    scan = ResidualScan(k, n)
    with mock.patch.object(native_scan, "available", native_scan.available if native else (lambda t: False)):
        for _ in range(2):  # built once, applied as often as an iteration needs
            assert torch.allclose(scan(c, v), expected, rtol=1e-12, atol=1e-12)


def test_native_scan_float32_matches_loop_exactly():
    """The C kernel rounds as torch does (no fused multiply-adds): bit-equal to the loop in float32."""
    from hbp_compile.engine import native_scan
    from hbp_compile.engine.scans import ResidualScan

    if not native_scan.available(torch.zeros(1)):
        import pytest
        pytest.skip("no C compiler: the CPU scans use torch ops")
    c, k = torch.randn(257, 8, 32), torch.rand(256, 8, 32)
    assert torch.equal(ResidualScan(k, 257)(c), sequential(c, k))
