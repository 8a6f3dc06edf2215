"""Kernels per training step, forward and backward, counted from torch.profiler's events.

On CUDA a kernel is a device event: what the GPU launched. On a CPU there is no launch to see, so a
kernel is an operator call that computes: an aten op that is not a view, an allocation or a
composite (those only call other ops), or a kernel Inductor generated (recorded because
``cpp.enable_kernel_profile`` is set), counted at the outermost such call (``addmm`` once, not the
``copy_`` it runs inside). Counts do not move between runs the way times do, and on a GPU the time of
an overhead-bound step follows them.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU(), torch.nn.Linear(4, 4))
>>> x = torch.randn(2, 4)
>>> count_step_kernels(lambda: model(x).sum(), "cpu")   # addmm gelu addmm sum; ones_like, 3 mm, 2 sum, gelu_backward
(4, 7)
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# not computations: results of allocation and conjugation/negation bits
_NOT_KERNELS = {"empty", "empty_strided", "empty_like", "resolve_conj", "resolve_neg", "lift_fresh", "set_",
                "record_stream", "_local_scalar_dense", "item", "is_nonzero", "zeros_like_"}


def enable_kernel_events() -> None:
    """Make Inductor's generated CPU kernels visible to the profiler (set before compiling)."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


@functools.cache
def _computes(name: str) -> bool:
    if name.startswith("graph_") and ("cpp_fused" in name or "triton" in name):
        return True  # a kernel Inductor generated
    if not name.startswith("aten::"):
        return False
    op_name = name[len("aten::"):]
    if op_name in _NOT_KERNELS:
        return False
    packet = getattr(torch.ops.aten, op_name, None)
    if packet is None:
        return False
    overloads = [getattr(packet, o) for o in packet.overloads()]
    if any(o._schema.returns and o._schema.returns[0].alias_info is not None and not o._schema.is_mutable
           for o in overloads):
        return False  # a view: no data moves
    def composite(o) -> bool:
        name = o._schema.name + (f".{o._schema.overload_name}" if o._schema.overload_name else "")
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd")
        except RuntimeError:  # a TorchScript-only overload, not in the dispatcher
            return False

    return not any(composite(o) for o in overloads)


def _count(prof, device: str) -> int:
    events = prof.events()
    if device == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    counted = 0
    for event in events:
        if not _computes(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _computes(parent.name):
            parent = parent.cpu_parent
        counted += parent is None
    return counted


def count_step_kernels(loss_fn: Callable[[], torch.Tensor], device: str) -> tuple[int, int]:
    """(forward kernels, backward kernels) of one training step ``loss_fn().backward()``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as forward:
        loss = loss_fn()
        if device == "cuda":
            torch.cuda.synchronize()
    with profile(activities=activities) as backward:
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
    return _count(forward, device), _count(backward, device)
