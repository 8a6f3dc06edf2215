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
