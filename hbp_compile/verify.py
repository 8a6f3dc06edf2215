"""Compile-time checks of the rewritten graph: its forward is the model's, bit for bit, and one
training step (forward and backward) runs.

Deterministic, non-mutating graphs run the same aten ops in the same order and need no check. A
graph with random ops or buffer updates can go wrong in ways no static rule sees (a kernel that eager
mode picks differently from tracing draws other random numbers), so for those the backend runs the
captured graph and the rewritten one once on clones of the real example inputs, from the same
random-number state, and compares outputs and mutated inputs. The global RNG state is restored.

``dry_run`` then takes one training step of the rewritten graph on clones of the example inputs,
so every kernel of the backward (batched VJPs for weights and states, partitioned ``recompute=False``
graphs, scans, recurrence ops, Inductor's code for all of them) is built and run before the first
real step: a failure becomes a fallback with its reason instead of an error in the middle of
training. The compiled kernels are cached by shape, so the first real step reuses them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .compile import without_autocast
from .detect.ops import is_mutating, is_random


def needs_forward_check(graph: fx.Graph) -> bool:
    """Random ops or mutations anywhere in the graph."""
    return any(is_random(n) or is_mutating(n) for n in graph.nodes)


def _run(fn: Callable, inputs: Sequence[object], cpu_state: torch.Tensor, cuda_states: list) -> tuple:
    # Grad mode and requires_grad as in training: kernel choices depend on them (SDPA picks another
    # CPU kernel under no_grad, which draws its dropout differently).
    args = _clones(inputs)
    torch.random.set_rng_state(cpu_state)
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    with torch.enable_grad():
        out = fn(*args)
    return pytree.tree_leaves(out), args


def _rng_devices(inputs: Sequence[object]) -> list[int]:
    """The CUDA devices whose generators a run on ``inputs`` may draw from (none on the CPU)."""
    on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in inputs)
    return list(range(torch.cuda.device_count())) if on_cuda else []


def _clones(inputs: Sequence[object]) -> list[object]:
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in inputs]


def dry_run(gm: fx.GraphModule, inputs: Sequence[object], *, measure_peak: bool = False) -> int | None:
    """One forward and backward of ``gm`` on clones of ``inputs`` (random state restored, cotangents
    of ones, gradients discarded); the iteration counts it adds to ``hbp_iterations`` are reset.
    ``measure_peak``: take a second step and return its peak of allocated bytes (torch.profiler's
    memory timeline, for the dumps), else None."""
    log = logging.getLogger("hbp_compile")
    was_disabled, log.disabled = log.disabled, True  # its iteration counts are not the training's
    peak = None
    try:
        _step(gm, inputs)
        if measure_peak:
            # a second step, its inputs cloned beforehand: the first one compiled kernels, and neither
            # compilation nor the clones of the parameters belong in a training step's peak
            args = _clones(inputs)
            peak = peak_bytes(lambda: _step(gm, inputs, args), _device_of(inputs))
    finally:
        log.disabled = was_disabled
    for module in gm.modules():
        usage = getattr(getattr(module, "program", None), "usage", None)
        if usage is not None:
            usage.reset()
    return peak


def _device_of(inputs: Sequence[object]) -> str:
    devices = {str(t.device) for t in inputs if isinstance(t, torch.Tensor)}
    return next((d for d in sorted(devices) if d != "cpu"), "cpu")


def peak_bytes(step: Callable[[], None], device: str) -> int | None:
    """The most bytes allocated at once on ``device`` while ``step`` runs, from torch.profiler's
    memory timeline (None if unmeasurable). The dumps and the benchmark suite measure with it."""
    import json
    import os
    import tempfile
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(tmp, "timeline.json")
            prof.export_memory_timeline(path, device=device if device != "cuda" else "cuda:0")
            with open(path) as f:
                _, sizes = json.load(f)
    except Exception:  # noqa: BLE001 - a measurement for the dumps must never break training
        return None
    return int(max((sum(s) for s in sizes), default=0)) or None


def _step(gm: fx.GraphModule, inputs: Sequence[object], args: Sequence[object] | None = None) -> None:
    with torch.random.fork_rng(devices=_rng_devices(inputs)):
        args = _clones(inputs) if args is None else args
        with torch.enable_grad(), without_autocast():  # the aten graph carries autocast's casts
            outs = [o for o in pytree.tree_leaves(gm(*args))
                    if isinstance(o, torch.Tensor) and o.requires_grad and o.is_floating_point()]
            wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            if outs and wrt:
                torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)


def _identical(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            torch.nan_to_num(a.detach()), torch.nan_to_num(b.detach())) and torch.equal(a.isnan(), b.isnan())
    return type(a) is type(b) and a == b


def _close(a: object, b: object) -> bool:
    """Equal up to the rounding of differently fused kernels (Inductor's): 1e-3 of the tensor's scale.
    Another random draw or a missed buffer update moves elements by their own size, far beyond."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point():
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
            return False
        a, b = torch.nan_to_num(a.detach()).double(), torch.nan_to_num(b.detach()).double()
        scale = max(a.abs().max().item(), 1e-12) if a.numel() else 1.0
        return bool(((a - b).abs() <= 1e-3 * scale).all())
    return _identical(a, b)


def forward_mismatch(original: Callable, rewritten: Callable, inputs: Sequence[object], *,
                     exact: bool = True) -> str | None:
    """None when both give the same outputs and input mutations (bit for bit when ``exact``; up to
    kernel rounding otherwise, for compiled code); else what differs."""
    same = _identical if exact else _close
    devices = _rng_devices(inputs)
    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.random.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if devices else []
        want_out, want_args = _run(original, inputs, cpu_state, cuda_states)
        got_out, got_args = _run(rewritten, inputs, cpu_state, cuda_states)
    if len(want_out) != len(got_out) or not all(map(same, want_out, got_out)):
        return "the rewritten graph's outputs differ from the model's under the same random seed"
    if not all(map(same, want_args, got_args)):
        return "the rewritten graph updates buffers differently from the model"
    return None
