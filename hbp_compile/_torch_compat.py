"""Every private or semi-private torch import of the project lives here.

A torch upgrade that moves one of these should touch this file only.
"""
from __future__ import annotations

from torch._dynamo import register_backend as register_dynamo_backend  # noqa: F401
from torch._dynamo import reset as reset_dynamo  # noqa: F401
from torch import _guards
from torch._guards import detect_fake_mode  # noqa: F401
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: F401
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: F401
from torch.fx.experimental.symbolic_shapes import is_concrete_int  # noqa: F401
from torch.fx.traceback import preserve_node_meta  # noqa: F401
from torch._functorch.partitioners import default_partition  # noqa: F401
# the layer norm backward in plain aten ops, each input cast to the computation dtype (engine/saved.py)
from torch._decomp.decompositions import native_layer_norm_backward as layer_norm_backward_in_aten_ops  # noqa: F401
from torch._dynamo.exc import FailOnRecompileLimitHit as RecompileLimitHit  # noqa: F401
# what torch.compile returns for a module; the ecosystem (accelerate's unwrap_model, the Hugging Face
# Trainer's save_model, Lightning's from_compiled) recognizes compiled models by this class
from torch._dynamo.eval_frame import OptimizedModule  # noqa: F401



def capturing_rnns(*, fail_on_recompile_limit: bool = False):
    """Dynamo graph-breaks around ``nn.RNN``/``GRU``/``LSTM`` unless ``allow_rnn`` is set; with it, they
    reach the backend as one ``torch.lstm(...)``-style call that the recurrence pass can swap.

    ``fail_on_recompile_limit``: past ``recompile_limit``, dynamo silently runs a frame uncompiled;
    with this it raises ``RecompileLimitHit`` instead, so that the caller can say that Highway-BP
    stopped. One patch for both: each ``config.patch`` costs about 18 µs on every training call."""
    from torch._dynamo import config

    if fail_on_recompile_limit:
        return config.patch(allow_rnn=True, fail_on_recompile_limit_hit=True)
    return config.patch(allow_rnn=True)


def compile_context(backend, dynamic=None):
    """The dynamo context that ``torch.compile(fn, backend=backend, dynamic=dynamic)`` applies: what an
    ``OptimizedModule`` keeps as ``dynamo_ctx`` (Lightning wraps ``training_step`` with it)."""
    import torch._dynamo

    return torch._dynamo.optimize(backend=backend, dynamic=dynamic)


def recompile_limit() -> int:
    from torch._dynamo import config

    return config.recompile_limit


def _static_shape_fake_mode():
    """A fake mode with a shape environment, for a compile in a tracing context of its own (called
    from inside the backend, whose frame has one). Inductor's FX graph cache bypasses a compile
    without a shape environment ("No shape env"), so every process, and every model with the same
    layer, would generate and compile its code again; static shapes keep the artifact specialized."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), static_shapes=True)


def inductor_compile_function(fn, example_inputs, options):
    """``fn`` (a function of tensors returning a pytree of tensors) compiled by Inductor without
    dynamo and without aot_autograd: ``(compiled, graph)``, or None where this path cannot take it.

    aot_autograd traces a graph twice before Inductor sees it (its metadata pass and its capture),
    on top of the trace that turned ``fn`` (a ``vmap`` of a layer graph) into aten ops. The engine's
    kernels are inference graphs of functional aten ops, which need neither pass: ``fn`` is traced
    once, on fake tensors with the example inputs' strides, with Inductor's own decompositions and
    under the Python dispatcher (as aot_autograd traces), then goes through the joint-graph passes
    that Inductor applies to an inference graph, and to ``compile_fx_inner`` (post-grad passes,
    code generation, the FX graph cache): the Python side of GPT-2's 8 kernels compiles in 4.4 s
    instead of 10.4 s, to bit-equal code (``python -m benchmarks.kernel_compile``).
    Returns None (the caller takes ``inductor_compile_graph``) when an argument is not a tensor, when
    the trace meets what only the real-tensor trace handles (a view whose strides fake tensors do not
    reproduce), or when Inductor raises on the graph (no CUDA machine has run this path yet): the
    slower path is the proven one."""
    import logging

    import torch
    import torch.utils._pytree as pytree
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor import config
    from torch._inductor.compile_fx import _recursive_joint_graph_passes, compile_fx_inner
    from torch._inductor.decomposition import select_decomp_table

    if not all(isinstance(a, torch.Tensor) for a in example_inputs):
        return None
    spec = []

    def flat(*args):
        leaves, tree = pytree.tree_flatten(fn(*args))
        spec.append(tree)
        return tuple(leaves)

    with config.patch(options):
        fake_mode = _static_shape_fake_mode()
        with _guards.tracing(_guards.TracingContext(fake_mode)):
            fakes = [fake_mode.from_tensor(a, static_shapes=True) for a in example_inputs]
            try:
                with fake_mode, enable_python_dispatcher():
                    gm = make_fx(flat, decomposition_table=select_decomp_table())(*fakes)
            except RuntimeError:  # e.g. "Cannot view a tensor ...": the real-tensor trace handles it
                return None
            output = gm.graph.output_node()
            # keep the outputs' strides (what compile_fx asks for a dynamo graph's user outputs)
            output.meta["user_visible_output_idxs"] = list(range(len(output.args[0])))
            try:
                device = example_inputs[0].device if example_inputs else None
                gm = _recursive_joint_graph_passes(gm, input_device=device)
                compiled = compile_fx_inner(gm, fakes, is_inference=True)
            except Exception as exc:  # noqa: BLE001 - a device or graph this path was not proven on
                logging.getLogger("hbp_compile").debug("direct Inductor compile declined (%s): the former path", exc)
                return None
    tree = spec[0]

    def run(*args):
        return pytree.tree_unflatten(list(compiled(list(args))), tree)

    return run, gm


def inductor_compile_graph(gm, example_inputs, options):
    """An aten ``GraphModule`` compiled by Inductor without dynamo, through aot_autograd (the path
    every ``torch.compile`` takes): the result runs with no guard evaluation per call (it assumes
    the example inputs' shapes, strides and dtypes)."""
    import copy

    from torch._inductor import compile as inductor_compile

    # Some graphs (a batch norm's running statistics) make aot_autograd meet a float symbol it cannot
    # place, in its first pass, before any code generation: those compile without the cache.
    try:
        with _guards.tracing(_guards.TracingContext(_static_shape_fake_mode())):
            return inductor_compile(copy.deepcopy(gm), list(example_inputs), options=options)
    except KeyError:
        with outside_dynamo_tracing():
            return inductor_compile(gm, list(example_inputs), options=options)


def trace_artifact(name: str, text: str) -> None:
    """Emit ``text`` as a structured-trace artifact (shown by tlparse when ``TORCH_TRACE`` is set)."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=lambda: text)


def outside_dynamo_tracing():
    """Our own fake-tensor tracing must not add symbols to the shape env of the dynamo frame that
    is calling the backend (its guards would then refer to symbols with no source)."""
    return _guards.tracing(None)


__all__ = [
    "default_partition",
    "layer_norm_backward_in_aten_ops",
    "FakeTensorMode",
    "capturing_rnns",
    "RecompileLimitHit",
    "recompile_limit",
    "outside_dynamo_tracing",
    "detect_fake_mode",
    "inductor_compile_function",
    "inductor_compile_graph",
    "is_concrete_int",
    "make_fx",
    "preserve_node_meta",
    "register_dynamo_backend",
    "reset_dynamo",
    "trace_artifact",
]
