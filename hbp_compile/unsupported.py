"""Features of a captured graph that Highway-BP cannot honour, found before anything is rewritten.

Lowering to aten (``capture.py``) keeps the *forward* of these features and loses what they do to
the *backward*: a custom ``torch.autograd.Function`` becomes its forward ops, differentiated as
they are (a straight-through ``round`` would get a zero gradient), and a tensor hook registered
inside the forward disappears. Training such a graph with the rewrite would be silently wrong, so
the backend refuses it: the graph trains with exact backprop (dynamo's own graph keeps both), with
a warning that names the feature and where it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import module_path

_CUSTOM_FUNCTION = "autograd_function_apply"
_HOOKS = ("register_hook", "trace_wrapped")


def _hop_name(node: fx.Node) -> str | None:
    if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
        return node.target.name()
    return None


def _where(node: fx.Node) -> str:
    path = module_path(node)
    return f"in `{path}`" if path else "at the model's top level"


def find_unsupported_features(gm: fx.GraphModule) -> tuple[str, ...]:
    """One sentence per feature of dynamo's graph ``gm`` that the rewritten backward would drop.

    >>> import torch.fx as fx
    >>> find_unsupported_features(fx.symbolic_trace(torch.nn.Linear(2, 2)))
    ()
    """
    found: list[str] = []
    for node in gm.graph.nodes:
        name = _hop_name(node)
        if name == _CUSTOM_FUNCTION:
            found.append(f"a custom torch.autograd.Function is called {_where(node)}: Highway-BP would "
                         "differentiate its forward ops instead of using its backward; call it outside "
                         "the residual blocks, or leave this model to exact backprop")
        elif name in _HOOKS:
            found.append(f"a tensor hook (Tensor.register_hook) is registered {_where(node)} during the "
                         "forward: the rewritten backward would not run it; register hooks on parameters "
                         "or on the model's output instead, or leave this model to exact backprop")
    return tuple(dict.fromkeys(found))
