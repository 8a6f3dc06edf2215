"""What the pipeline records about each captured graph: ``backend.py`` fills one ``GraphRecord`` per
graph dynamo captures, ``inspect/`` (report, dumps) and the API read them. No stage is imported here
but for types.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx as fx

if TYPE_CHECKING:  # types only: the records hold what those stages produced
    from .detect import Detection
    from .recurrent.swap import Recurrence

class Fallback(enum.Enum):
    """Why a captured graph trains with exact backprop: one reason per pipeline stage."""

    GRAD_DISABLED = "gradients are disabled (inference): nothing to rewrite"
    UNSUPPORTED = "the graph uses a feature Highway-BP cannot honour"
    RECURRENCE_FAILED = "rewriting a recurrence failed"
    CAPTURE_FAILED = "lowering to an aten graph failed"
    DETECTION_FAILED = "detecting residual chains failed"
    NO_CHAIN = "no residual chain found"
    REWRITE_FAILED = "the rewrite failed"
    FORWARD_MISMATCH = "the rewritten forward does not reproduce the model's"
    DRY_RUN_FAILED = "the rewritten graph failed its compile-time training step"
    COMPILE_FAILED = "compiling the rewritten graph failed"

    @property
    def is_failure(self) -> bool:
        """A failure (raised under ``strict``), as opposed to a graph with nothing to rewrite."""
        return self not in (Fallback.GRAD_DISABLED, Fallback.NO_CHAIN)


class HbpError(RuntimeError):
    """Raised instead of falling back to exact backprop when ``strict=True`` (or ``HBP_STRICT=1``)."""


@dataclass
class GraphRecord:
    """What happened to one graph dynamo captured.

    >>> record = GraphRecord(index=0, dynamo_graph=fx.symbolic_trace(lambda x: x + 1))
    >>> record.fallback, record.num_layers
    (None, 0)
    """

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
    dry_run_peak: int | None = None  # bytes, the compile-time training step's peak (measured for dumps)
    # the input shapes this graph's rewrite is for, when dynamo traced it with symbolic sizes (shapes.py)
    input_shapes: str = ""

    @property
    def num_layers(self) -> int:
        """Residual layers rewritten, counting every time step of a swapped RNN layer as one."""
        if self.fallback is not None:
            return 0
        steps = sum(r.steps * r.num_chains for r in self.recurrences if r.swapped)
        return steps + (sum(c.num_layers for c in self.detection.chains) if self.detection else 0)
