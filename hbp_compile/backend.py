"""The dynamo backend: capture -> detect -> rewrite for every graph dynamo hands over.

One ``HbpBackend`` object is built per option set and reused, since a new backend per call makes
dynamo recompile (pytorch #168373). It keeps a ``GraphRecord`` per captured graph: the chains found,
or a ``Fallback`` reason with the exception behind it. A graph that cannot be rewritten runs the
captured graph as is (exact backprop) and says so with a ``UserWarning`` — never silently. Every
stage's failure takes the same path (``_stage``): one ``Fallback`` reason per stage, and with
``strict=True`` (or ``HBP_STRICT=1``) an ``HbpError`` instead of the fallback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.fx as fx

from .capture import mark_requires_grad, to_aten_graph
from .compile import compile_rewritten, opaque_recurrences
from .detect import find_residual_chains, find_state_pairs, pack_state_pairs
from .graph_utils import copy_graph
from .inspect.dumps import write_dumps
from .options import HbpOptions
from .records import Fallback, GraphRecord, HbpError
from .recurrent.cell_loops import CELL_CALLS, swap_cell_loops
from .recurrent.scan_hop import rewrite_scans
from .recurrent.swap import RNN_CALLS, Recurrence, swap_recurrences
from .rewrite import rewrite_chains
from .shapes import PerShape, symbolic_inputs
from .unsupported import find_unsupported_features
from .verify import dry_run, forward_mismatch, needs_forward_check

log = logging.getLogger("hbp_compile")


class _StageFailed(Exception):
    def __init__(self, why: Fallback, detail: str):
        super().__init__(detail)
        self.why, self.detail = why, detail


@contextlib.contextmanager
def _stage(why: Fallback) -> Iterator[None]:
    """Any exception of the stage becomes this stage's fallback (the one path every failure takes)."""
    try:
        yield
    except _StageFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug of the pass must not break training: fall back, say why
        raise _StageFailed(why, f"{type(exc).__name__}: {exc}") from exc


class HbpBackend:
    """``torch.compile`` backend applying Highway-BP to every captured graph.

    >>> backend = HbpBackend(HbpOptions(k=3, backend="eager"))
    >>> compiled = torch.compile(torch.nn.Linear(2, 2), backend=backend)
    """

    def __init__(self, options: HbpOptions, *, explain_only: bool = False, quiet_no_chain: bool = False):
        self.options = options
        self.explain_only = explain_only
        # A graph with no chain beside a rewritten one (a loss, a feature extractor) is no failure:
        # with ``quiet_no_chain`` the caller (HighwayModule) warns once if *nothing* was rewritten.
        self.quiet_no_chain = quiet_no_chain
        self.records: list[GraphRecord] = []

    def __repr__(self) -> str:
        o = self.options
        return f"HbpBackend(k={o.k}, gamma={o.gamma}, backend={o.backend!r}, recompute={o.recompute})"

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], **_: object) -> Callable:
        symbolic = symbolic_inputs(gm)
        if symbolic and not self.explain_only:
            # one dynamo graph for every shape: rewritten at each shape it is called with (shapes.py)
            log.info("hbp_compile: a graph with symbolic sizes: rewritten once per input shape")
            return PerShape(gm, self._compile_graph, symbolic)
        return self._compile_graph(gm, example_inputs)

    def _compile_graph(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                       input_shapes: str = "") -> Callable:
        record = GraphRecord(index=len(self.records), dynamo_graph=gm, input_shapes=input_shapes)
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
        try:
            return self._rewrite(record, gm, example_inputs)
        except _StageFailed as failed:
            return self._fallback(record, failed.why, failed.detail, failed.__cause__)

    def _rewrite(self, record: GraphRecord, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Callable:
        o = self.options
        with _stage(Fallback.CAPTURE_FAILED):
            unsupported = find_unsupported_features(gm)
        if unsupported:
            raise _StageFailed(Fallback.UNSUPPORTED, "; ".join(unsupported))
        to_capture, swapped = self._swap_recurrences(gm)
        self._lower(record, to_capture, example_inputs, swapped)
        if o.debug_dir:
            record.aten_code = record.aten_graph.print_readable(print_output=False)
        if not record.detection.chains and not any(r.swapped for r in record.recurrences):
            why = "; ".join([*record.detection.notes, *(r.describe() for r in record.recurrences)])
            raise _StageFailed(Fallback.NO_CHAIN, why)
        chains = record.detection.chains
        try:
            self._rewrite_and_rehearse(record, gm, example_inputs)
        except _StageFailed as failed:
            if len(chains) < 2 or (o.strict and not self.explain_only):
                raise
            self._keep_the_chains_that_work(record, gm, to_capture, example_inputs, swapped, failed)
        if self.explain_only:
            return gm.forward
        with _stage(Fallback.COMPILE_FAILED):
            compiled = compile_rewritten(record.rewritten, o.backend)
        log.info("graph %d: %d residual layer(s) rewritten, backend %s", record.index, record.num_layers, o.backend)
        return compiled

    def _swap_recurrences(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple[Recurrence, ...]]:
        o = self.options
        if not any(node.target in RNN_CALLS or node.target in CELL_CALLS for node in gm.graph.nodes):
            return gm, ()
        with _stage(Fallback.RECURRENCE_FAILED):
            to_capture = fx.GraphModule(gm, copy_graph(gm.graph))
            swapped = (swap_recurrences(to_capture, k=o.max_iterations, gamma=o.gamma, tol=o.stop_tol, backend=o.backend)
                       + swap_cell_loops(to_capture, k=o.max_iterations, gamma=o.gamma, min_steps=o.min_layers,
                                         tol=o.stop_tol, backend=o.backend))
        return to_capture, swapped

    def _lower(self, record: GraphRecord, to_capture: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
               swapped: tuple[Recurrence, ...]) -> None:
        """Aten graph, scan-HOP recurrences and chains of ``to_capture`` (deterministic: lowering again
        gives the same chains in the same order, which the per-chain fallback relies on)."""
        o = self.options
        with _stage(Fallback.CAPTURE_FAILED):
            record.aten_graph = to_aten_graph(to_capture, example_inputs)
            mark_requires_grad(record.aten_graph, example_inputs)
        with _stage(Fallback.RECURRENCE_FAILED):
            record.recurrences = swapped + rewrite_scans(record.aten_graph, k=o.max_iterations, gamma=o.gamma,
                                                         backend=o.backend, tol=o.stop_tol)
        with _stage(Fallback.DETECTION_FAILED):
            graph = record.aten_graph.graph
            record.detection = find_residual_chains(graph, min_layers=o.min_layers)
            # recurrences with a pair of states (an LSTM by hand) outside the chains found: pack
            # each pair into one state, and detect again
            claimed = {n for chain in record.detection.chains for layer in chain.layers for n in (layer.x, *layer.nodes)}
            pair_runs = find_state_pairs(graph, claimed=claimed, min_steps=o.min_layers)
            if pair_runs:
                pack_state_pairs(record.aten_graph, pair_runs)
                record.detection = find_residual_chains(graph, min_layers=o.min_layers)

    def _rewrite_and_rehearse(self, record: GraphRecord, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor],
                              keep: Sequence[int] | None = None) -> None:
        """Rewrite the chains (all, or those in ``keep``), check the forward, take the compile-time step."""
        o = self.options
        if keep is not None:
            record.detection = dataclasses.replace(
                record.detection, chains=tuple(record.detection.chains[i] for i in keep))
        check_forward = needs_forward_check(record.aten_graph.graph)
        with _stage(Fallback.REWRITE_FAILED):
            record.rewritten = rewrite_chains(
                record.aten_graph, record.detection.chains, k=o.max_iterations, gamma=o.gamma,
                backend=o.backend, recompute=o.recompute, tol=o.stop_tol, chunk=o.chunk,
            ) if record.detection.chains else record.aten_graph
            opaque_recurrences(record.rewritten)
        if check_forward:
            with _stage(Fallback.DRY_RUN_FAILED):
                # compiled layer functions round differently from eager: equal up to rounding is the check
                mismatch = forward_mismatch(gm.forward, compile_rewritten(record.rewritten, "eager"), example_inputs,
                                            exact=o.backend == "eager")
            if mismatch:
                raise _StageFailed(Fallback.FORWARD_MISMATCH, mismatch)
        with _stage(Fallback.DRY_RUN_FAILED):
            record.dry_run_peak = dry_run(record.rewritten, example_inputs, measure_peak=bool(o.debug_dir))
        for recurrence in record.recurrences:  # as dry_run does for the chains: its counts are not training's
            recurrence.usage.reset()

    def _keep_the_chains_that_work(self, record: GraphRecord, gm: fx.GraphModule, to_capture: fx.GraphModule,
                                   example_inputs: Sequence[torch.Tensor], swapped: tuple[Recurrence, ...],
                                   failed: _StageFailed) -> None:
        """The graph's chains failed together: try each alone, and rewrite those that work. The others
        train with exact backprop, each with a warning and a note. When none works alone (or all do,
        and only their combination fails), the whole graph falls back with the first failure."""
        chains = record.detection.chains
        kept, dropped = [], []
        for i in range(len(chains)):
            self._lower(record, to_capture, example_inputs, swapped)
            try:
                self._rewrite_and_rehearse(record, gm, example_inputs, keep=[i])
                kept.append(i)
            except _StageFailed as alone:
                dropped.append((i, alone))
        if not kept or not dropped:
            raise failed
        self._lower(record, to_capture, example_inputs, swapped)
        self._rewrite_and_rehearse(record, gm, example_inputs, keep=kept)
        notes = []
        for i, alone in dropped:
            chain = chains[i]
            where = chain.layers[0].module_path or chain.h0.name
            message = (f"hbp_compile: graph {record.index}: the chain of {chain.num_layers} layers from `{where}` "
                       f"trains with exact backprop: {alone.why.value} ({alone.detail}); the graph's other "
                       "chains keep Highway-BP")
            notes.append(message.removeprefix("hbp_compile: "))
            log.info(message)
            if not self.explain_only:
                warnings.warn(message, UserWarning, stacklevel=4)
        record.detection = dataclasses.replace(record.detection, notes=record.detection.notes + tuple(notes))

    def _fallback(self, record: GraphRecord, why: Fallback, detail: str = "",
                  exc: BaseException | None = None, *, warn: bool = True) -> Callable:
        record.fallback, record.reason, record.exception = why, detail, exc
        message = f"hbp_compile: graph {record.index} trains with exact backprop: {why.value}"
        if detail:
            message += f" ({detail})"
        log.info(message)
        if self.explain_only:
            return record.dynamo_graph.forward
        if self.options.strict and why.is_failure:
            raise HbpError(f"{message} [strict mode: unset HBP_STRICT / pass strict=False to fall back "
                           "instead]") from exc
        if why is Fallback.NO_CHAIN and (self.quiet_no_chain or self.rewrote_something):
            warn = False  # the logger and the report have it
        if warn:
            warnings.warn(message, UserWarning, stacklevel=2)
        return record.dynamo_graph.forward

    @property
    def rewrote_something(self) -> bool:
        return any(r.fallback is None and r.rewritten is not None for r in self.records)

    def nothing_rewritten(self) -> str | None:
        """When every graph so far was left alone for want of a chain (and no failure warned already):
        why, graph by graph. None otherwise."""
        if not self.records or any(r.fallback is not Fallback.NO_CHAIN for r in self.records):
            return None
        return "; ".join(f"graph {r.index}: {r.reason or r.fallback.value}" for r in self.records)


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
