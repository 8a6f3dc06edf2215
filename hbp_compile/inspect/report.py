"""The ``explain()`` report: per captured region, the chain found or why not."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..detect.model import Chain
from ..options import HbpOptions
from .depth import backward_depths

if TYPE_CHECKING:
    from ..records import GraphRecord


def backward_depth(chain: Chain, k: int) -> tuple[int, int, int]:
    """Sequential depth of the backward: (backprop VJPs, Highway-BP VJPs, scan steps on its longest path)."""
    return backward_depths(chain.num_layers, k)


@dataclass(frozen=True)
class Report:
    """What ``explain()`` found. ``print(report)`` shows it; ``num_layers`` counts residual layers."""

    records: tuple["GraphRecord", ...]
    options: HbpOptions

    @property
    def num_layers(self) -> int:
        return sum(r.num_layers for r in self.records)

    @property
    def chains(self) -> tuple[Chain, ...]:
        return tuple(c for r in self.records if r.fallback is None and r.detection for c in r.detection.chains)

    @property
    def fallbacks(self) -> tuple[GraphRecord, ...]:
        return tuple(r for r in self.records if r.fallback is not None)

    def backward_depths(self) -> tuple[int, int]:
        """The sequential depth of the rewritten chains' and recurrences' backward, in block (or step)
        VJPs on the longest path, summed over them (one runs after the other): (backprop, Highway-BP).
        Scan steps are not counted; the rest of the graph adds the same to both."""
        backprop = highway = 0
        for record in self.records:
            if record.fallback is not None or record.detection is None:
                continue
            for recurrence in record.recurrences:
                if recurrence.swapped:
                    backprop += recurrence.steps
                    highway += min(self.options.max_iterations, recurrence.steps) + 1
            for chain in record.detection.chains:
                bp, hbp, _ = backward_depth(chain, self.options.max_iterations)
                backprop, highway = backprop + bp, highway + hbp
        return backprop, highway

    def __str__(self) -> str:
        return "\n".join(format_report(self.records, self.options))


def format_report(records: Sequence["GraphRecord"], options: HbpOptions) -> list[str]:
    total = sum(r.num_layers for r in records)
    k = options.k if options.k != "auto" else (
        f"auto (tol={options.tol:g}" + (f", at most {options.k_max})" if options.k_max is not None else ")"))
    lines = [f"hbp_compile: {len(records)} captured region(s), {total} residual layer(s), "
             f"k={k}, gamma={options.gamma}"]
    if options.k == "auto":
        lines.append("  (k=auto: the depths below are the worst case, at the iteration cap)")
    for record in records:
        if record.input_shapes:
            lines.append(f"region {record.index}: rewritten for inputs of shapes {record.input_shapes} "
                         "(dynamo's graph has symbolic sizes: one rewrite per shape)")
        if record.fallback is not None:
            lines.append(f"region {record.index}: exact backprop: {record.fallback.value}")
            if record.reason:
                lines.append(f"  reason: {record.reason}")
            continue
        assert record.detection is not None
        for ri, recurrence in enumerate(record.recurrences):
            lines.append(f"region {record.index} recurrence {ri}: {recurrence.describe()}")
            if recurrence.swapped:
                steps, passes = recurrence.steps, min(options.max_iterations, recurrence.steps) + 1
                # the longest path of depth.highway_dag(T, k), in closed form (T can be thousands)
                lines.append(f"  backward depth (longest path) in step VJPs per layer: backprop {steps}, "
                             f"highway {passes} (+ {passes * steps.bit_length()} scan steps)")
        for ci, chain in enumerate(record.detection.chains):
            taps = ", ".join(f"h{t}" for t in chain.taps) or "none"
            lines.append(f"region {record.index} chain {ci}: {chain.num_layers} layers, "
                         f"{len(chain.groups)} group(s), taps: {taps}")
            width = max([len(layer.module_path) for layer in chain.layers] + [6])
            lines.append(f"  {'layer':>5}  {'module':<{width}}  group  {'kind':<8}  residual")
            for layer in chain.layers:
                lines.append(f"  {layer.index:>5}  {layer.module_path or '?':<{width}}  {layer.group:>5}  "
                             f"{layer.kind.value:<8}  {layer.formula}")
            bp, hbp, scan = backward_depth(chain, options.max_iterations)
            lines.append(f"  backward depth (longest path) in block VJPs: backprop {bp}, highway {hbp} "
                         f"(+ {scan} scan steps)")
        for note in record.detection.notes:
            lines.append(f"  note: {note}")
    return lines
