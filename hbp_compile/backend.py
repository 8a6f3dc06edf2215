"""The dynamo backend: capture -> detect -> rewrite for every graph dynamo hands over.

One ``HbpBackend`` object is built per option set and reused, since a new backend per call makes
dynamo recompile (pytorch #168373). It keeps a ``GraphRecord`` per captured graph: the chains found,
or a ``Fallback`` reason with the exception behind it. A graph that cannot be rewritten runs the
captured graph as is (exact backprop) and says so with a ``UserWarning`` — never silently.
"""
from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .capture import to_aten_graph
from .compile import compile_rewritten
from .detect import Detection, find_residual_chains
from .inspect.dumps import write_dumps
from .options import HbpOptions
from .recurrent.cell_loops import CELL_CALLS, swap_cell_loops
from .recurrent.scan_hop import rewrite_scans
from .recurrent.swap import RNN_CALLS, Recurrence, swap_recurrences
from .rewrite import rewrite_chains
from .verify import forward_mismatch, needs_forward_check

log = logging.getLogger("hbp_compile")


class Fallback(enum.Enum):
    """Why a captured graph trains with exact backprop."""

    GRAD_DISABLED = "gradients are disabled (inference): nothing to rewrite"
    CAPTURE_FAILED = "lowering to an aten graph failed"
    NO_CHAIN = "no residual chain found"
    REWRITE_FAILED = "the rewrite failed"
    FORWARD_MISMATCH = "the rewritten forward does not reproduce the model's"


@dataclass
class GraphRecord:
    """What happened to one graph dynamo captured."""

    index: int
    dynamo_graph: fx.GraphModule
    aten_graph: fx.GraphModule | None = None
    detection: Detection | None = None
    rewritten: fx.GraphModule | None = None
    fallback: Fallback | None = None
    reason: str = ""
    exception: BaseException | None = field(default=None, repr=False)
    recurrences: tuple[Recurrence, ...] = ()
    aten_code: str = ""  # the aten graph before the rewrite edits it in place (kept for dumps)

    @property
    def num_layers(self) -> int:
        """Residual layers rewritten, counting every time step of a swapped RNN layer as one."""
        if self.fallback is not None:
            return 0
        steps = sum(r.steps * r.num_chains for r in self.recurrences if r.swapped)
        return steps + (sum(c.num_layers for c in self.detection.chains) if self.detection else 0)


class HbpBackend:
    """``torch.compile`` backend applying Highway-BP to every captured graph.

    >>> backend = HbpBackend(HbpOptions(k=3, backend="eager"))
    >>> compiled = torch.compile(torch.nn.Linear(2, 2), backend=backend)
    """

    def __init__(self, options: HbpOptions, *, explain_only: bool = False):
        self.options = options
        self.explain_only = explain_only
        self.records: list[GraphRecord] = []

    def __repr__(self) -> str:
        o = self.options
        return f"HbpBackend(k={o.k}, gamma={o.gamma}, backend={o.backend!r}, recompute={o.recompute})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], **_: object) -> Callable:
        record = GraphRecord(index=len(self.records), dynamo_graph=gm)
        self.records.append(record)
        compiled = self._compile(record, gm, example_inputs)
        if self.options.debug_dir:
            try:
                write_dumps(record, self.options)
            except Exception as exc:  # noqa: BLE001 - dumps must never break training
                log.warning("hbp_compile: could not write dumps for graph %d: %s", record.index, exc)
        return compiled

    def _compile(self, record: GraphRecord, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        if not torch.is_grad_enabled():
            return self._fallback(record, Fallback.GRAD_DISABLED, warn=False)
        to_capture = gm
        if any(node.target in RNN_CALLS or node.target in CELL_CALLS for node in gm.graph.nodes):
            to_capture = fx.GraphModule(gm, _copy_graph(gm.graph))
            k, gamma, tol = self.options.max_iterations, self.options.gamma, self.options.stop_tol
            backend = self.options.backend
            record.recurrences = (swap_recurrences(to_capture, k=k, gamma=gamma, tol=tol, backend=backend)
                                  + swap_cell_loops(to_capture, k=k, gamma=gamma, min_steps=self.options.min_layers,
                                                    tol=tol, backend=backend))
        try:
            record.aten_graph = to_aten_graph(to_capture, example_inputs)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: train exactly, and say why
            return self._fallback(record, Fallback.CAPTURE_FAILED, f"{type(exc).__name__}: {exc}", exc)
        if self.options.debug_dir:
            record.aten_code = record.aten_graph.print_readable(print_output=False)
        try:
            record.recurrences += rewrite_scans(
                record.aten_graph, k=self.options.max_iterations, gamma=self.options.gamma,
                backend=self.options.backend, tol=self.options.stop_tol)
        except Exception as exc:  # noqa: BLE001
            return self._fallback(record, Fallback.REWRITE_FAILED, f"{type(exc).__name__}: {exc}", exc)
        record.detection = find_residual_chains(record.aten_graph.graph, min_layers=self.options.min_layers)
        swapped = any(r.swapped for r in record.recurrences)
        if not record.detection.chains and not swapped:
            why = "; ".join([*record.detection.notes, *(r.describe() for r in record.recurrences)])
            return self._fallback(record, Fallback.NO_CHAIN, why)
        if self.explain_only:
            return gm.forward
        check_forward = needs_forward_check(record.aten_graph.graph)
        try:
            record.rewritten = rewrite_chains(
                record.aten_graph, record.detection.chains, k=self.options.max_iterations,
                gamma=self.options.gamma, backend=self.options.backend, recompute=self.options.recompute,
                tol=self.options.stop_tol,
            ) if record.detection.chains else record.aten_graph
        except Exception as exc:  # noqa: BLE001
            return self._fallback(record, Fallback.REWRITE_FAILED, f"{type(exc).__name__}: {exc}", exc)
        if check_forward:
            # compiled layer functions round differently from eager: equal up to rounding is the check
            mismatch = forward_mismatch(gm.forward, record.rewritten.forward, example_inputs,
                                        exact=self.options.backend == "eager")
            if mismatch:
                return self._fallback(record, Fallback.FORWARD_MISMATCH, mismatch)
        log.info("graph %d: %d residual layer(s) rewritten, backend %s", record.index, record.num_layers,
                 self.options.backend)
        return compile_rewritten(record.rewritten, self.options.backend)

    def _fallback(self, record: GraphRecord, why: Fallback, detail: str = "",
                  exc: BaseException | None = None, *, warn: bool = True) -> Callable:
        record.fallback, record.reason, record.exception = why, detail, exc
        message = f"hbp_compile: graph {record.index} trains with exact backprop: {why.value}"
        if detail:
            message += f" ({detail})"
        log.info(message)
        if warn and not self.explain_only:
            warnings.warn(message, UserWarning, stacklevel=2)
        return record.dynamo_graph.forward


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy to rewrite, so that a fallback still runs dynamo's own graph."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    return copy


def hbp_backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], *,
                options: dict | None = None) -> Callable:
    """Entry point of ``torch.compile(model, backend="hbp", options={...})``."""
    return backend_for(HbpOptions.from_mapping(options))(gm, example_inputs)


_BACKENDS: dict[HbpOptions, HbpBackend] = {}


def backend_for(options: HbpOptions) -> HbpBackend:
    """The one backend object for an option set (built once, then reused)."""
    if options not in _BACKENDS:
        _BACKENDS[options] = HbpBackend(options)
    return _BACKENDS[options]
