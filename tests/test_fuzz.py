"""Property-based fuzzing: random residual networks are exact at k >= L and match the sequential
reference at a random small k (float64). Each example compiles two fresh models (about 1 s for both on
a 2-core CPU): 60 examples in five tests of 12, each drawing from its own seed, so that the suite's
workers run them side by side (200 in one test took 5 minutes of a 2-core CI run; issue 29 traded
the other 140 for the suite's time budget: the examples draw from the same space, and
``EXAMPLES_PER_SHARD`` raises them for a longer hunt)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from hbp_compile import hbp_compile
from hbp_compile._torch_compat import reset_dynamo

from .models import Gated, PostLN, PreLNAttention, PreLNMLP, ReLUResidual, Stack, make
from .reference import autograd_grads, highway_reference_grads, max_relative_error

BLOCKS = {
    "pre-ln-mlp-gelu": lambda d, h: PreLNMLP(d, h),
    "pre-ln-mlp-relu": lambda d, h: PreLNMLP(d, h, act=torch.relu),
    "pre-ln-mlp-tanh": lambda d, h: PreLNMLP(d, h, act=torch.tanh),
    "relu-residual": lambda d, h: ReLUResidual(d),
    "gated": lambda d, h: Gated(d),
    "post-ln": lambda d, h: PostLN(d),
    "attention": lambda d, h: PreLNAttention(d) if d % 2 == 0 else PreLNMLP(d, h),
}


@st.composite
def networks(draw):
    depth = draw(st.integers(2, 6))
    width = draw(st.sampled_from([2, 4, 6]))
    hidden = draw(st.sampled_from([3, 8]))
    kinds = draw(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=2))
    blocks = [BLOCKS[kinds[i % len(kinds)]](width, hidden) for i in range(depth)]
    taps = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    # attention needs a sequence dimension
    batch = (2, 3) if "attention" in kinds else draw(st.sampled_from([(2,), (2, 3)]))
    return make(Stack(blocks, 3, width, 2, taps), seed=seed), batch, seed


def check_random_network(net, k_small, gamma):
    model, batch, seed_ = net
    reset_dynamo()
    torch.manual_seed(seed_)
    x = torch.randn(*batch, 3, dtype=torch.float64)
    depth = len(model.layers)
    _, exact = autograd_grads(model, x)
    compiled = hbp_compile(model, k=depth, backend="eager")
    for p in model.parameters():
        p.grad = None
    compiled(x).backward()
    assert compiled.hbp_report.num_layers == depth, str(compiled.hbp_report)
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, exact) < 1e-8
    want = highway_reference_grads(model, x, k_small, gamma)
    reset_dynamo()
    truncated = hbp_compile(model, k=k_small, gamma=gamma, backend="eager")
    for p in model.parameters():
        p.grad = None
    truncated(x).backward()
    assert max_relative_error({n: p.grad for n, p in model.named_parameters()}, want) < 1e-8


SHARDS, EXAMPLES_PER_SHARD = 5, 12


def _fuzz_shard(shard: int):
    # a fixed seed per shard (reproducible, as derandomize was), different examples in each
    @seed(shard)
    @settings(max_examples=EXAMPLES_PER_SHARD, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(net=networks(), k_small=st.integers(0, 2), gamma=st.sampled_from([0.0, 0.0, 0.5]))
    def test_random_residual_networks(net, k_small, gamma):
        check_random_network(net, k_small, gamma)

    test_random_residual_networks.__name__ = f"test_random_residual_networks_{shard}"
    return test_random_residual_networks


for _shard in range(SHARDS):
    globals()[f"test_random_residual_networks_{_shard}"] = _fuzz_shard(_shard)
