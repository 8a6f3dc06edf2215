"""The backward's work does not grow with depth: the same number of aten kernels at L=16 and L=64.

Highway-BP's backward is k+1 batched VJPs and scans over all layers at once; a per-layer Python
loop in the engine (a VJP, a copy or a clone per layer) would show up here as kernels that grow with L.
Views (unbind, select, detach, ...) launch nothing and are not counted.
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hbp_compile import hbp_compile

from .models import make, mlp_stack


class KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        returns = func._schema.returns
        if not (returns and returns[0].alias_info is not None):  # a view launches no kernel
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_kernels(depth: int, k: int) -> collections.Counter:
    model = make(mlp_stack(depth, d=8, hidden=16))
    x = torch.randn(4, 3, dtype=torch.float64)
    compiled = hbp_compile(model, k=k, backend="eager")
    for _ in range(2):  # the second step: nothing left to build or trace
        model.zero_grad(set_to_none=True)
        loss = compiled(x)
        counter = KernelCounter()
        with counter:
            loss.backward()
    assert compiled.hbp_report.num_layers == depth
    return counter.counts


def test_backward_kernels_do_not_grow_with_depth():
    shallow, deep = backward_kernels(16, k=3), backward_kernels(64, k=3)
    assert deep["bmm"] > 0, "the counter sees the batched VJPs"
    assert sum(deep.values()) == sum(shallow.values()), (shallow, deep)


def recurrence_backward_kernels(steps: int) -> collections.Counter:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.GRU(3, 5)).double()
    x = torch.randn(steps, 2, 3, dtype=torch.float64)
    compiled = hbp_compile(model[0], k=3, backend="eager")
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        loss = compiled(x)[0].pow(2).sum()
        counter = KernelCounter()
        with counter:
            loss.backward()
    return counter.counts


def test_recurrence_backward_kernels_do_not_grow_with_steps():
    short, long = recurrence_backward_kernels(16), recurrence_backward_kernels(64)
    assert long["mm"] > 0
    assert sum(long.values()) == sum(short.values()), (short, long)
