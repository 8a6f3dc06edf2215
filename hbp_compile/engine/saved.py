"""The chain's backward from aot_autograd's partition of the split layer.

aot_autograd partitions the split layer ``(x_r, x_g, *externals, *draws) -> y`` into a *saving
forward*, which also returns what its backward reads, and that *backward graph*, whose result is
linear in the cotangent. ``SavedGroup`` vmaps the backward graph over a group's stacked saved values
and calls it for every VJP of a backward. The saved values come from:

* ``recompute=True`` (default): one run of the saving forward inside the backward, vmapped over the
  group's layers (the chain's forward keeps only the states, like activation checkpointing);
* ``recompute=False``: the chain's forward, which runs the saving forward once per layer and keeps
  its values (memory like backprop's). Groups with random ops (dropout) keep recomputing: their
  forward must draw as the model does, and the split layer replays draws instead of making them.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .._torch_compat import (FakeTensorMode, default_partition, layer_norm_backward_in_aten_ops, make_fx,
                             outside_dynamo_tracing)
from ..compile import GraphKernel, views_as_reshapes
from ..detect.model import ResidualKind
from ..detect.ops import is_mutating
from ..graph_utils import closure, inputs
from .memory import nbytes


@dataclass(frozen=True)
class SavedLayer:
    """One group's split layer, partitioned: ``forward`` returns ``(*outputs, *saved)``, and
    ``backward(*saved, *tangents)`` returns the gradients of ``(x_r, x_g, *externals)``."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    num_outputs: int
    tangents: tuple[tuple[torch.Size, torch.dtype], ...]  # per layer: y's, then each side output's
    backend: str
    chunk: int | None = None  # layers per call of the batched backward (None: all at once)
    _variants: dict = field(default_factory=dict, compare=False, repr=False)
    # the GraphKernels among the variants, by what they compute (``kernels``)
    _kernels: dict = field(default_factory=dict, compare=False, repr=False)

    def run_forward(self) -> Callable[..., tuple[torch.Tensor, ...]]:
        if "forward" not in self._variants:
            self._variants["forward"] = self._kernels["forward"] = GraphKernel(self.forward, self.backend)
        return self._variants["forward"]

    def batched_forward(self, in_dims: tuple[int | None, ...]) -> Callable[..., tuple[torch.Tensor, ...]]:
        """``forward`` vmapped over the group's layers (``in_dims``: 0 stacked, None broadcast): what
        ``recompute=True`` runs once per backward to get every layer's saved values at once."""
        key = ("forward", in_dims)
        if key not in self._variants:
            self._variants[key] = self._kernels["batched_forward"] = GraphKernel(
                torch.func.vmap(self.forward, in_dims=in_dims), self.backend)
        return self._variants[key]

    def batched_backward(self, wanted: tuple[int, ...], broadcast: tuple[int, ...]) -> Callable[..., tuple]:
        """``backward`` vmapped over layers, returning only the gradients of inputs ``wanted`` (0 = x_r,
        1 = x_g, 2 + p = external p): the others are not computed. Externals in ``broadcast`` are one
        tensor for the whole group, so their per-layer gradients are summed."""
        key = (wanted, broadcast)
        if key not in self._variants:
            graph = fx.Graph()
            out = graph.graph_copy(self.backward.graph, {})
            present = [i for i in wanted if out[i] is not None]  # None: the output does not depend on it
            graph.output(tuple(out[i] for i in present))
            graph.eliminate_dead_code()
            _narrow_output_masks(graph)
            batched = torch.func.vmap(fx.GraphModule(self.backward, graph))

            def present_grads(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
                return tuple(g.sum(0) if i - 2 in broadcast else g for i, g in zip(present, batched(*args)))

            name = {(1,): "batched_vjp", (0,): "residual_jacobian"}.get(wanted, "weight_vjp")
            kernel = self._kernels[name] = GraphKernel(present_grads, self.backend)

            def run(*args: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                if not present:
                    return tuple(None for _ in wanted)
                grads = dict(zip(present, _in_chunks(kernel, args, self.chunk, [i - 2 in broadcast for i in present])))
                return tuple(grads.get(i) for i in wanted)

            self._variants[key] = run
        return self._variants[key]


    def kernels(self) -> dict[str, GraphKernel]:
        """The kernels built so far, by what they compute (the dumps show the graph of each):
        ``forward`` (per layer, ``recompute=False``), ``batched_forward`` (the saved values of every
        layer), ``batched_vjp`` (the block VJP of each iteration), ``residual_jacobian`` (K of a
        non-identity residual, once per backward) and ``weight_vjp`` (the externals' gradients)."""
        return dict(self._kernels)


def _narrow_output_masks(graph: fx.Graph) -> None:
    """Turn off the outputs nobody reads of the backward ops that compute several gradients at once
    (``convolution_backward``, the norms' backwards: their ``output_mask``). Dead-code elimination
    drops a weight gradient's ``getitem`` but not the op's work: an input VJP of a convolution block
    still computed every weight gradient, the dearest part of an iteration."""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        names = [a.name for a in schema.arguments]
        if "output_mask" not in names or not all(u.target is operator.getitem for u in node.users):
            continue
        position = names.index("output_mask")
        mask = node.kwargs.get("output_mask", node.args[position] if position < len(node.args) else None)
        if mask is None:
            continue
        read = {u.args[1] for u in node.users}
        narrowed = [bool(m) and i in read for i, m in enumerate(mask)]
        if position < len(node.args):
            node.args = (*node.args[:position], narrowed, *node.args[position + 1:])
        else:
            node.kwargs = {**node.kwargs, "output_mask": narrowed}


def _in_chunks(kernel: Callable[..., tuple[torch.Tensor, ...]], args: Sequence[torch.Tensor], chunk: int | None,
               summed: Sequence[bool]) -> tuple[torch.Tensor, ...]:
    """``kernel(*args)`` over the layer dim (dim 0 of every arg) ``chunk`` layers at a time: the
    temporaries of one call exist for one chunk only. Per-layer outputs are concatenated, outputs
    already summed over the layers (``summed``: broadcast externals) are added up."""
    layers = args[0].shape[0]
    if chunk is None or chunk >= layers:
        return kernel(*args)
    out: list[torch.Tensor] = []
    for start in range(0, layers, chunk):
        part = kernel(*(a[start: start + chunk] for a in args))
        if not out:  # the full outputs, written chunk by chunk (a cat would hold every part as well)
            out = [p.clone() if s else p.new_empty((layers, *p.shape[1:])) for p, s in zip(part, summed)]
        for j, (p, s) in enumerate(zip(part, summed)):
            if s:
                if start:
                    out[j] += p
            else:
                out[j][start: start + chunk] = p
    return tuple(out)


def partition_split_layer(split_fn: fx.GraphModule, example: Sequence[torch.Tensor], need_grad: Sequence[bool],
                          side_differentiable: Sequence[bool], backend: str,
                          chunk: int | None = None) -> SavedLayer:
    """Trace ``split_fn``'s joint forward-backward on fake tensors shaped like one layer's inputs
    (``x_r``, ``x_g`` first) and split it with aot_autograd's default partitioner. Cotangents flow
    into ``y`` and the side outputs marked differentiable (the chain gives no others)."""
    mode = FakeTensorMode()
    with mode:
        primals = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).requires_grad_(bool(g))
                   for t, g in zip(example, need_grad)]
        outputs = split_fn(*primals)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    differentiable = [0] + [1 + j for j, d in enumerate(side_differentiable) if d and outputs[1 + j].requires_grad]
    with mode:
        tangent_values = [torch.empty_like(outputs[i]) for i in differentiable]

    def joint(primals: list[torch.Tensor], tangents: list[torch.Tensor]) -> tuple:
        # aot_autograd's convention: placeholders named primals_* and tangents_*, outputs then grads
        leaves = [p.detach().requires_grad_(p.requires_grad) for p in primals]
        with torch.enable_grad():
            out = split_fn(*leaves)
            out = out if isinstance(out, tuple) else (out,)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad([out[i] for i in differentiable], wanted, tangents, allow_unused=True))
        return (*out, *(next(grads) if leaf.requires_grad else None for leaf in leaves))

    with outside_dynamo_tracing():
        joint_gm = make_fx(joint, tracing_mode="fake")(primals, tangent_values)
    _tag_forward_nodes(joint_gm, len(outputs))
    _recompute_cheap_values_in_backward(joint_gm)
    forward, backward = default_partition(joint_gm, None, num_fwd_outputs=len(outputs))
    # The partitioner returns lazily compiled graph modules, whose first-call `_lazy_forward` dynamo
    # refuses to trace (it skips torch.fx): plain GraphModules have their code from the start.
    forward, backward = fx.GraphModule(forward, forward.graph), fx.GraphModule(backward, backward.graph)
    for gm in (forward, backward):
        views_as_reshapes(gm)
    _mixed_precision_norm_backwards_in_aten_ops(backward)
    tangents = tuple((outputs[i].shape, outputs[i].dtype) for i in differentiable)
    return SavedLayer(forward, backward, len(outputs), tangents, backend, chunk)


def _tag_forward_nodes(joint_gm: fx.GraphModule, num_fwd_outputs: int) -> None:
    """Mark the nodes the forward outputs are computed from as forward nodes, as aot_autograd does
    while it traces a joint graph. The default partitioner keeps the ops before the last tagged node
    in the forward and saves what the backward reads of them; untagged, it found no forward op at
    all and the backward recomputed the whole layer, every matmul included, in each VJP call."""
    (outputs,) = (n.args[0] for n in joint_gm.graph.nodes if n.op == "output")
    starts = [a for a in outputs[:num_fwd_outputs] if isinstance(a, fx.Node)]

    def computed(node: fx.Node) -> bool:
        return node.op != "placeholder"

    for node in {*filter(computed, starts), *closure(starts, inputs, computed)}:
        node.meta["partitioner_tag"] = "is_forward"


# ops whose outputs the backward reads from the saving forward; the rest (pointwise ops, norms,
# softmax, views) it computes again from those and the layer's inputs
_SAVED_OPS = frozenset({
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default, torch.ops.aten.convolution.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
})


def _is_saved(node: fx.Node) -> bool:
    """An input of the layer, an output of an op in ``_SAVED_OPS`` (one of a multi-output one's), or
    of an op that writes into an input (a training batch norm's running statistics): run again, it
    would write again."""
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]  # type: ignore[assignment]
    return node.op != "call_function" or node.target in _SAVED_OPS or is_mutating(node)


def _recompute_cheap_values_in_backward(joint_gm: fx.GraphModule) -> None:
    """Give the backward its own copy of every forward value it reads that is neither a layer input
    nor a matmul's, convolution's or attention's output, computed again from those, so that the
    partitioner saves only them. The saved values of a group's layers stay alive through all its
    iterations: saving every intermediate made the ReLU ResNet's backward peak 2.0 × backprop's
    against 1.36 × (its norms' and ReLUs' outputs beside the convolutions'), while computing the
    cheap ops again costs each VJP a few passes over memory, not a matmul. A weight's ``t`` or
    ``detach`` is recomputed too: the saved value is the stacked input itself, which the
    weight-gradient call can restack per chunk from the parameters (``SavedGroup.side_grads``)."""
    graph = joint_gm.graph
    nodes = list(graph.nodes)
    # the partitioner's split: the forward is every node up to the last primal or forward-tagged one
    last_forward = max(i for i, n in enumerate(nodes) if n.meta.get("partitioner_tag") == "is_forward"
                       or (n.op == "placeholder" and not n.name.startswith("tangents")))
    forward, backward_start = set(nodes[: last_forward + 1]), nodes[last_forward + 1]
    copies: dict[fx.Node, fx.Node] = {}  # one copy per value, shared by all its backward readers

    def copy(n: fx.Node) -> fx.Node:
        if _is_saved(n):
            return n
        if n not in copies:
            args = {a: copy(a) for a in n.all_input_nodes}
            with graph.inserting_before(backward_start):  # the copies open the backward
                copies[n] = graph.node_copy(n, args.__getitem__)
            copies[n].meta.pop("partitioner_tag", None)
        return copies[n]

    for node in nodes[: last_forward + 1]:
        if _is_saved(node):
            continue
        # (a copy reads only saved values and other copies: never one of these nodes)
        for user in [u for u in node.users if u not in forward and u.op != "output"]:
            user.replace_input_with(node, copy(node))
    graph.eliminate_dead_code()
    joint_gm.recompile()


def _mixed_precision_norm_backwards_in_aten_ops(gm: fx.GraphModule) -> None:
    """A layer norm's backward whose gradient or input is not in its weight's dtype (a bfloat16 state
    normalized with float32 weights: autocast, or a model kept in bfloat16 with float32 norms) in
    plain aten ops. vmap's batching rule for ``native_layer_norm_backward`` refuses mixed dtypes
    ("expected scalar type BFloat16 but found Float", torch 2.13), though the kernel takes them; the
    ops compute in float32 and cast each gradient back to its input's dtype, as the kernel does.
    Inductor decomposes the op the same way, so only the eager backend sees a difference."""
    changed = False
    for node in gm.graph.nodes:
        if node.target is not torch.ops.aten.native_layer_norm_backward.default:
            continue
        dtypes = {a.meta["val"].dtype for a in (node.args[0], node.args[1], node.args[5])
                  if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)}
        if len(dtypes) > 1:
            node.target, changed = layer_norm_backward_in_aten_ops, True
    if changed:
        gm.recompile()


RESTACK_MIN_BYTES = 2 ** 20  # stacked weights below this are kept through the weight-gradient call
RESTACK_CHUNKS = 4  # calls the weight-gradient call is split into when it restacks


class SavedGroup:
    """A group's backward from its stacked saved values: residual Jacobian, block VJP, side-output and
    weight gradients."""

    def __init__(self, prog, saved: SavedLayer, values: Sequence[torch.Tensor],
                 sides_need_grad: Sequence[bool], like: torch.Tensor,
                 restackable: dict[int, tuple[int, ...]] | None = None):
        self.prog, self.saved = prog, saved
        self.values = list(values)  # each saved value of every layer, stacked
        # values that are stacked copies of per-layer parameters: index -> the parameters' side indices
        self.restackable = restackable or {}
        self.like = like  # a stacked state: shape, dtype and device of the group's cotangents
        self.leaves: list[tuple[int, int | tuple[int, ...]]] = [
            (p, idx) for p, idx in prog.stacked if any(sides_need_grad[i] for i in idx)
        ] + [(p, i) for p, i in prog.broadcast if sides_need_grad[i]]
        self.broadcast = tuple(p for p, _ in prog.broadcast)
        self.side_cotangents: list[torch.Tensor] = []
        self.zero_side_cotangents = [like.new_zeros((len(prog.layers), *shape), dtype=dtype)
                                     for shape, dtype in saved.tangents[1:]]

    def held_bytes(self, sides: Sequence[torch.Tensor]) -> tuple[int, int]:
        """(activations, weights): bytes of the stacked saved values, the stacked copies of per-layer
        parameters among them counted as weights (a value laid out as its layers' parameters, stacked)."""
        # runs on every backward: the sets are built once per call, not once per saved value
        stacked = [sides[idx[0]] for _, idx in self.prog.stacked]
        shapes = {(len(self.prog.layers), *s.shape) for s in stacked}
        dtypes = {s.dtype for s in stacked}
        weights = [v for v in self.values if tuple(v.shape) in shapes and v.dtype in dtypes]
        weight_bytes = nbytes(weights)
        return nbytes(self.values) - weight_bytes, weight_bytes

    def _grads(self, wanted: tuple[int, ...], cotangent: torch.Tensor, *, sides: bool = False,
               layers: slice = slice(None)) -> tuple:
        """Gradients of inputs ``wanted`` for ``cotangent`` on y, and on the side outputs either their
        cotangents (``sides``) or zeros: within the iterations they entered ``a`` once already. Over
        the group's ``layers`` (``cotangent`` has their rows only)."""
        side = self.side_cotangents if sides else self.zero_side_cotangents
        return self.saved.batched_backward(wanted, self.broadcast)(*(v[layers] for v in self.values), cotangent,
                                                                   *(c[layers] for c in side))

    def side_output_cotangents(self, grads: Sequence[torch.Tensor | None], offsets: Sequence[int]) -> torch.Tensor | None:
        """Take the cotangents of the group's differentiable side outputs (zeros where the loss does not
        read one); return their gradient on the input states."""
        n = len(self.prog.layers)
        given = False
        differentiable = [j for j, d in enumerate(self.prog.side_differentiable) if d]
        for j, (shape, dtype) in zip(differentiable, self.saved.tangents[1:]):
            cot = self.like.new_zeros((n, *shape), dtype=dtype)
            for i, p in enumerate(self.prog.layers):
                g = grads[offsets[p] + j]
                if g is not None:
                    cot[i], given = g, True
            self.side_cotangents.append(cot)
        if not given:
            return None
        return self._grads((1,), torch.zeros_like(self.like), sides=True)[0]

    def residual_jacobian(self) -> torch.Tensor:
        if self.prog.kind is ResidualKind.IDENTITY:
            return torch.ones_like(self.like)
        # the cotangent of ones as one element expanded: a stack of ones would be one more state stack
        # at the moment K is built
        (k,) = self._grads((0,), self.like.new_ones((1,) * self.like.dim()).expand_as(self.like))
        return torch.zeros_like(self.like) if k is None else k

    def block_vjp(self, cotangent: torch.Tensor, layers: slice = slice(None)) -> torch.Tensor:
        """``w_{i+1} J_{i+1}`` for the group's ``layers`` (``cotangent``: their output rows of ``w``)."""
        (v,) = self._grads((1,), cotangent, layers=layers)
        return torch.zeros_like(cotangent) if v is None else v

    def side_grads(self, cotangent: torch.Tensor, sides: Sequence[torch.Tensor] = ()
                   ) -> list[tuple[torch.Tensor, int | tuple[int, ...]]]:
        """The weight and side-input gradients: ``(stacked gradient, its sides)`` or ``(gradient, side)``.

        The last call of a backward, so the stacked weight copies can go first: where they weigh more
        than the other saved values (a deep stack of MLPs), the call runs over chunks of layers, each
        restacking its own layers' parameters. The peak then holds the gradients and one chunk of
        weights instead of the gradients and every weight. Unlike ``_in_chunks``, each chunk's
        gradients are returned as they are (their slices become the parameters' ``.grad``): a full
        buffer written chunk by chunk would hold one more chunk of gradients at the peak."""
        if not self.leaves:
            return []
        wanted = tuple(2 + p for p, _ in self.leaves)
        chunk = self._restacking_chunk()
        if chunk is None or not sides:
            grads = self._grads(wanted, cotangent, sides=True)
            return [(g, where) for g, (_, where) in zip(grads, self.leaves) if g is not None]
        weights = nbytes(self.values[j] for j in self.restackable)
        restacked = {j: idx for j, idx in self.restackable.items()  # the large ones; small ones are sliced
                     if nbytes([self.values[j]]) * 8 >= weights}
        for j in restacked:
            self.values[j] = None  # type: ignore[call-overload]  # freed: restacked per chunk below
        kernel = self.saved.batched_backward(wanted, self.broadcast)
        found: list[tuple[torch.Tensor, int | tuple[int, ...]]] = []
        summed: dict[int, torch.Tensor] = {}
        for start in range(0, len(self.prog.layers), chunk):
            part = slice(start, start + chunk)
            values = [torch.stack([sides[i] for i in restacked[j][part]]).detach() if v is None else v[part]
                      for j, v in enumerate(self.values)]
            grads = kernel(*values, cotangent[part], *(c[part] for c in self.side_cotangents))
            for n, (g, (p, where)) in enumerate(zip(grads, self.leaves)):
                if g is None:
                    continue
                if p in self.broadcast:  # one tensor for the group: its chunks' gradients add up
                    summed[n] = g if n not in summed else summed[n] + g
                else:
                    found.append((g, where[part]))
        return found + [(g, self.leaves[n][1]) for n, g in summed.items()]

    def _restacking_chunk(self) -> int | None:
        """Layers per chunk of the weight-gradient call when restacking pays (see ``side_grads``): the
        stacked weights outweigh the other saved values and weigh ``RESTACK_MIN_BYTES`` or more (below
        that, the extra calls cost more than the memory is worth). About a quarter of the group, or
        the ``chunk`` option; a divisor of the group's size, so that every chunk has one shape (one
        compiled kernel)."""
        layers = len(self.prog.layers)
        if not self.restackable or layers < 2:
            return None
        weights = nbytes(self.values[j] for j in self.restackable)
        if weights < RESTACK_MIN_BYTES or 2 * weights < nbytes(self.values):
            return None
        wanted = self.saved.chunk or -(-layers // RESTACK_CHUNKS)
        chunk = min(c for c in range(wanted, layers + 1) if layers % c == 0)
        return chunk if chunk < layers else None
