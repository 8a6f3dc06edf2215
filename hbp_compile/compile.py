"""Compile stage: hand the rewritten program to Inductor, or run it as it is (``backend="eager"``).

What Inductor compiles, each once whatever the depth L (DESIGN.md §6):

* the prologue and epilogue around the chains: the rewritten aten graph goes through
  ``torch.compile`` (dynamo → aot_autograd → Inductor); each chain call and each recurrence is a
  graph break, so the code around it is compiled with its ordinary autograd backward;
* per group, the layer function that the chain's forward calls L times;
* per group, the split layer partitioned by aot_autograd's partitioner (``engine/saved.py``): its
  saving forward vmapped over the layers (run once per backward) and its backward graph vmapped
  (the batched VJP every Highway-BP iteration calls), each a ``GraphKernel``;
* the reverse scans along the residual path (a C kernel on the CPU, Triton on CUDA).

Everything a chain's backward runs is compiled by the backend's compile-time training step
(``verify.dry_run``), inside the first call's forward: no user backward compiles anything, which
torch's compile machinery does not support (DESIGN.md §1a).

Random ops use eager's generator (Inductor's ``fallback_random``), so a compiled forward draws the
same dropout masks as the model does in eager mode. Every function is compiled under a code object
of its own: dynamo caches per code object and, past ``recompile_limit`` entries, silently runs
eager, which would happen to a shared one (``vmap``'s wrapper) after a few groups.
"""
from __future__ import annotations

import contextlib
import itertools
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.fx as fx

from .detect.ops import is_mutating
from .graph_utils import copy_graph

INDUCTOR_OPTIONS = {"fallback_random": True}

_fresh_ids = itertools.count()


def _autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    """(device, dtype) of each device type autocast is on for: the CPU, and CUDA where present."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((d, torch.get_autocast_dtype(d)) for d in devices if torch.is_autocast_enabled(d))


def without_autocast() -> contextlib.AbstractContextManager:
    """Autocast off (CPU, and CUDA where present) while the pass's own graphs run or are traced.

    The aten graphs hold autocast's decisions as explicit casts (a float32 region the model computed
    with autocast disabled, Llama's rotary embedding, stays float32 there); running or tracing them
    under the user's ``torch.autocast`` would apply it a second time, on a graph that already has it.

    >>> with torch.autocast("cpu", dtype=torch.bfloat16), without_autocast():
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    stack = contextlib.ExitStack()
    for device, _ in _autocast_state():
        stack.enter_context(torch.autocast(device, enabled=False))
    return stack


def fresh_function(fn: Callable[..., Any], name: str = "hbp_fn") -> Callable[..., Any]:
    """A function calling ``fn`` whose code object is new, so that dynamo gives it its own cache.

    >>> f = fresh_function(abs, "my_abs")
    >>> f(-2), f.__name__.startswith("my_abs")
    (2, True)
    """

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    code = call.__code__.replace(co_name=f"{name}_{next(_fresh_ids)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


class GraphKernel:
    """A function of tensors called many times per step: Inductor's artifact called directly, no dynamo.

    A layer function runs L times per forward, and a group's batched VJP k+1 times per backward;
    through ``torch.compile`` each call paid guard evaluation, a warning filter and aot_autograd's
    runtime wrappers (121 µs against 39 µs for a small pre-LN MLP layer). Here ``fn`` (an aten
    ``GraphModule``, or any function of tensors) is compiled on the first call, once per signature
    (shapes, strides, dtypes, devices) of the tensors it is called with; every later call is a dict
    lookup and the artifact. It is traced once, on fake tensors with Inductor's decompositions, and
    handed to Inductor's inner compiler without aot_autograd's two traces of its own
    (``_torch_compat.inductor_compile_function``); what that path declines takes the proven one (a
    ``make_fx`` trace on the real inputs, then ``torch._inductor.compile``). The graph runs as
    traced: outputs that would be ``None`` are not allowed. The graphs are functional (no op mutates),
    so their views are compiled as reshapes (``views_as_reshapes``).

    Its results carry no autograd history: the engine calls it inside the chain's forward and
    backward, where nothing differentiates through it. So ``requires_grad`` is not part of the
    signature, and the artifact is an inference graph (the chain's first layer reads ``h_0``, which
    requires grad, and its other layers states that do not: one compile, not two).

    >>> g = torch.fx.symbolic_trace(lambda x: x * 2)
    >>> GraphKernel(g, "eager")(torch.ones(2))
    tensor([2., 2.])
    """

    def __init__(self, fn: Callable[..., Any], backend: str):
        self.fn = fn
        self.backend = backend
        self._compiled: dict[tuple, Callable[..., Any]] = {}
        self._graph: fx.GraphModule | None = None  # the first graph handed to Inductor (for the dumps)
        self._first_call: tuple | None = None  # eager: the first call's arguments, tensors as _TensorSpec

    def __call__(self, *args: Any) -> Any:
        if self.backend == "eager":
            if self._first_call is None:
                self._first_call = tuple(_TensorSpec.of(a) if isinstance(a, torch.Tensor) else a for a in args)
            return self.fn(*args)
        key = tuple((a.shape, a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else repr(a) for a in args)
        fn = self._compiled.get(key)
        if fn is None:
            with torch.no_grad():
                fn = self._compiled[key] = self._compile(args)
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args)
        return fn(*args)

    def _compile(self, args: tuple) -> Callable[..., Any]:
        from ._torch_compat import (inductor_compile_function, inductor_compile_graph, make_fx,
                                    outside_dynamo_tracing)

        source = self.fn
        if isinstance(source, fx.GraphModule):
            # a copy: Inductor rewrites the module it compiles (boxed calling convention), and the
            # original may be shared (the dumps, the eager backend)
            source = views_as_reshapes(fx.GraphModule(source, copy_graph(source.graph)))
        with warnings.catch_warnings():  # compile time only: Inductor reads `.grad` of non-leaf inputs
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            direct = inductor_compile_function(source, args, INDUCTOR_OPTIONS)
            if direct is not None:
                compiled, gm = direct
            else:  # the former path: an aten graph traced on the real inputs, through aot_autograd
                gm = source
                if not isinstance(gm, fx.GraphModule):
                    with outside_dynamo_tracing():
                        gm = views_as_reshapes(make_fx(source)(*args))
                compiled = inductor_compile_graph(gm, args, INDUCTOR_OPTIONS)
        if self._graph is None:
            self._graph = gm
        return compiled

    def traced_graph(self) -> fx.GraphModule | None:
        """The aten graph this kernel runs, for the dumps: the one Inductor compiled (its first
        signature), or under ``backend="eager"`` ``fn`` traced on fakes of its first call's arguments.
        None before the first call.

        >>> kernel = GraphKernel(lambda x: torch.func.vmap(torch.sin)(x), "eager")
        >>> _ = kernel(torch.ones(3, 2))
        >>> [n.target for n in kernel.traced_graph().graph.nodes if n.op == "call_function"]
        [<OpOverload(op='aten.sin', overload='default')>]
        """
        from ._torch_compat import FakeTensorMode, make_fx, outside_dynamo_tracing

        if self._graph is not None or self._first_call is None:
            return self._graph
        with FakeTensorMode():
            args = [a.fake() if isinstance(a, _TensorSpec) else a for a in self._first_call]
        with outside_dynamo_tracing(), torch.no_grad():
            return make_fx(self.fn, tracing_mode="fake")(*args)


class _TensorSpec(NamedTuple):
    """What tracing needs of a tensor argument, without keeping the tensor alive."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @staticmethod
    def of(t: torch.Tensor) -> _TensorSpec:
        return _TensorSpec(tuple(t.shape), t.stride(), t.dtype, t.device)

    def fake(self) -> torch.Tensor:
        """An empty tensor like the original (a fake one under a ``FakeTensorMode``)."""
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)


def _without_grad_attribute_warning(compiled: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with warnings.catch_warnings():
            # Dynamo reads `.grad` of every tensor input while it builds guards, and inputs computed
            # under autograd are not leaves: torch warns about its own read, which is harmless.
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            return compiled(*args)

    return run


def _convolution(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    # torch 2.13's Inductor computes a wrong weight gradient on the CPU for some 1x1 convolutions of
    # stride > 1 (e.g. 4 -> 8 channels: off by the gradient's own size; eager is right). A 1x1
    # convolution of stride s is the stride-1 convolution of the input subsampled by s, which it
    # compiles correctly; same values, same gradients.
    if (not transposed and all(k == 1 for k in w.shape[2:]) and all(p == 0 for p in padding)
            and any(s != 1 for s in stride)):
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        stride = [1] * len(stride)
    return torch.ops.aten.convolution.default(x, w, b, stride, padding, dilation, transposed, output_padding,
                                              groups)


def without_inductor_conv_bug(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose convolutions avoid the Inductor bug of ``_convolution`` (same values).

    >>> g = torch.fx.symbolic_trace(lambda x, w: torch.ops.aten.convolution.default(
    ...     x, w, None, [2, 2], [0, 0], [1, 1], False, [0, 0], 1))
    >>> x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 1, 1)
    >>> torch.equal(without_inductor_conv_bug(g)(x, w), g(x, w))
    True
    """
    graph = copy_graph(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.convolution.default:
            node.target = _convolution
    return fx.GraphModule(gm, graph)


# view ops that are views for any strides; ``view`` needs compatible strides, and under vmap a
# batched value's strides may not be (GPT-2's attention backward on CUDA), so ``view`` and
# ``view_copy`` become ``reshape``, which copies only when it must
_ALWAYS_VIEWS = frozenset({"t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
                           "alias", "detach", "unbind", "split", "split_with_sizes", "diagonal", "narrow"})


def views_as_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (changed in place and returned) with ``view`` as ``reshape`` and ``*_copy`` ops as views.

    Functionalization writes views as ``*_copy`` ops (``t_copy``, ``view_copy``), which vmap has no
    batching rule for (a slow per-layer fallback). And a ``view`` decided on one tensor's strides may
    not apply to another's: a graph traced through vmap on real tensors, then retraced by Inductor on
    fake ones whose strides differ (an ``expand`` in GPT-2's attention with a KV cache, or under
    autocast), failed with "Cannot view a tensor". In these functional graphs nothing is mutated, so
    the view itself (``reshape`` for ``view``, which copies only when it must) computes the same values.

    >>> g = torch.fx.symbolic_trace(lambda x: torch.ops.aten.view.default(x, [4]))
    >>> views_as_reshapes(g)(torch.ones(2, 2).t()).shape
    torch.Size([4])
    """
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not hasattr(target, "overloadpacket") or target.namespace != "aten":
            continue
        packet = target.overloadpacket.__name__
        if target in (torch.ops.aten.view_copy.default, torch.ops.aten.view.default,
                      torch.ops.aten._unsafe_view.default):
            if not any(is_mutating(user) for user in node.users):  # a view written through stays a view
                node.target = torch.ops.aten.reshape.default
        elif packet.endswith("_copy") and packet[: -len("_copy")] in _ALWAYS_VIEWS:
            view = getattr(torch.ops.aten, packet[: -len("_copy")])
            if hasattr(view, target._overloadname):
                node.target = getattr(view, target._overloadname)
    gm.recompile()
    return gm


@torch.compiler.disable
def run_opaque(target: Callable[..., Any], autocast: tuple[tuple[str, torch.dtype], ...], *args: Any) -> Any:
    """``target(*args)`` as a graph break (dynamo runs it as it is, between two compiled graphs),
    under the autocast the graph was captured with."""
    with contextlib.ExitStack() as stack:
        for device, dtype in autocast:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        return target(*args)


def opaque_recurrences(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` (changed in place) with each recurrence custom op called through ``run_opaque``.

    The op is one node that aot_autograd would trace the Python backward of: it stays out of the
    compiled graphs. And its forward is the module's own fused kernel (``torch.gru`` ...), a
    composite whose matmuls autocast decides at run time, not explicit casts in the aten graph:
    the pass's graphs run with autocast off (``without_autocast``), so the op gets back the autocast
    state that is current now, while the graph is captured (dynamo guards on it), and computes
    exactly as the model's ``nn.GRU`` under the user's ``torch.autocast``.
    """
    state = _autocast_state()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.hbp.recurrence.default:
            node.args = (node.target, state, *node.args)
            node.target = run_opaque
    gm.recompile()
    return gm


def compile_rewritten(gm: fx.GraphModule, backend: str) -> Callable[..., Any]:
    """The forward of the rewritten aten graph ``gm`` (its recurrences already ``opaque_recurrences``),
    with everything outside the chains and the recurrences compiled by Inductor, run with autocast
    off. ``gm`` itself is left as it is (the dumps print it)."""
    if backend == "eager":
        return _autocast_off(gm.forward)
    # ChainModule.forward and run_opaque are graph breaks: Inductor compiles the code around them.
    # Resumed after a chain's graph break with its outputs, which are not leaves.
    # Made on the first call, not here: a torch.compile'd function created while dynamo compiles the
    # user's frame (this runs inside its backend) never compiled anything when called later: the code
    # around the chains ran uncompiled.
    compiled: list[Callable[..., Any]] = []

    def run(*args: Any) -> Any:
        if not compiled:
            compiled.append(torch.compile(fresh_function(without_inductor_conv_bug(gm), "hbp_graph"),
                                          backend="inductor", dynamic=False, options=INDUCTOR_OPTIONS))
        return compiled[0](*args)

    return _autocast_off(_without_grad_attribute_warning(run))


def _autocast_off(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        with without_autocast():
            return fn(*args)

    return run
