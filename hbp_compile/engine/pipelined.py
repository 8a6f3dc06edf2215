"""A run's Highway-BP iteration taken a chunk of layers at a time, top down: no stack of block VJPs.

One iteration of a fixed ``k`` (``engine/highway.py``) computes every block VJP ``v_i = w_{i+1} J_{i+1}``
from ``w^j`` and then scans ``w^{j+1}_i = a_i + v_i + K_{i+1} w^{j+1}_{i+1}`` in ``w^j``'s own buffer.
The VJPs of a run then live as one stack the size of the run's states next to the buffer. When one
group's layers fill a run and its VJPs are taken in chunks anyway (the ``chunk`` option, automatic
for convolution blocks), the scan can follow the chunks down instead:

* chunk ``[s, e)`` reads ``w^j`` rows ``s+1 … e``: no chunk below it reads them, so once its VJPs
  are taken, those rows are overwritten with ``w^{j+1}`` (row ``e`` needs ``v_e``, the chunk above's
  lowest row, kept as one row), scanned from row ``e+1``, which is final already;
* after the lowest chunk, row 0 is finished from the last carried row.

The values are those of the whole-run step, added in the same order (``a`` first, then the groups in
order), so the result does not depend on the chunk. At most one chunk of VJPs and one carried row
are alive besides the buffer.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .layout import CotangentRows
from .saved import SavedGroup
from .scans import ResidualScan

# (the group, the run's rows it adds to, one row per offset)
Contribution = tuple[object, tuple[int, ...], torch.Tensor]


def pipelined_runs(runs: Sequence[tuple[int, int]], groups: Sequence[object]) -> dict[int, SavedGroup]:
    """The runs whose layers one group fills alone and takes VJPs of in chunks: run -> that group."""
    found: dict[int, SavedGroup] = {}
    for b in groups:
        if not isinstance(b, SavedGroup) or len(b.prog.inputs) != 1:
            continue
        chunk, (r, offsets) = b.saved.chunk, b.prog.inputs[0]
        first, last = runs[r]
        if chunk is not None and chunk < len(offsets) and offsets == tuple(range(last - first)):
            found[r] = b
    return found


def pipelined_step(r: int, w: torch.Tensor, fill: SavedGroup, groups: Sequence[object], scan: ResidualScan,
                   a: CotangentRows, others: Sequence[Contribution],
                   block_vjp: Callable[[SavedGroup, torch.Tensor, slice], torch.Tensor]) -> None:
    """``w`` (run ``r``'s rows of ``w^j``) becomes ``w^{j+1}`` in place (module docstring).

    ``others``: the block VJPs of other groups that land in this run (taken from ``w^j`` before any
    run was overwritten), ``block_vjp(group, cotangent, layers)`` one chunk's VJPs."""
    layers, chunk = w.shape[0] - 1, fill.saved.chunk
    carry: torch.Tensor | None = None  # v of the row below the rows finished so far

    def finish(lo: int, hi: int, fresh: torch.Tensor | None) -> None:
        # rows lo .. hi-1: zero, a, then each group's VJPs in the groups' order, then the scan
        rows = w[lo:hi]
        rows.zero_()
        a.add_rows(w, r, lo, hi)
        for b in groups:
            if b is fill:
                if fresh is not None and hi - 1 > lo:
                    w[lo: hi - 1] += fresh
                if carry is not None:
                    w[hi - 1] += carry
            for source, offsets, values in others:
                if source is b:
                    for offset, value in zip(offsets, values):
                        if lo <= offset < hi:
                            w[offset] += value
        scan.scan_rows(w, lo, hi)

    for start in reversed(range(0, layers, chunk)):
        end = min(start + chunk, layers)
        v = block_vjp(fill, w[start + 1: end + 1], slice(start, end))  # rows start .. end-1
        finish(start + 1, end + 1, v[1:])
        carry = v[0].clone()  # the rest of this chunk's VJPs is freed with v
    finish(0, 1, None)
