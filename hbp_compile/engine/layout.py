"""Where each state's cotangent lives in the backward: one stacked tensor per run of equal shape.

A chain's states keep one shape between layers that have no residual path (``K = 0``): across such
a layer nothing is carried along the residual path, so the scan splits into independent scans, one
per run, and each run's cotangents stack into one tensor. A chain without shape changes is one run.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..detect.model import ResidualKind

# (run index, offsets of the states inside that run) pieces, in state order
Plan = tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True)
class StateRuns:
    """``runs[r] = (first, last)`` state indices; a new run starts after every ``K = 0`` layer."""

    runs: tuple[tuple[int, int], ...]

    @classmethod
    def from_kinds(cls, kinds: Sequence[ResidualKind]) -> "StateRuns":
        runs, start = [], 0
        for i, kind in enumerate(kinds, start=1):  # layer i maps state i-1 to state i
            if kind is ResidualKind.ZERO:
                runs.append((start, i - 1))
                start = i
        runs.append((start, len(kinds)))
        return cls(tuple(runs))

    def locate(self, state: int) -> tuple[int, int]:
        for r, (first, last) in enumerate(self.runs):
            if first <= state <= last:
                return r, state - first
        raise IndexError(state)

    def plan(self, states: Sequence[int]) -> Plan:
        """How to gather ``states`` (ascending) from the per-run tensors."""
        pieces: list[tuple[int, list[int]]] = []
        for state in states:
            r, offset = self.locate(state)
            if pieces and pieces[-1][0] == r:
                pieces[-1][1].append(offset)
            else:
                pieces.append((r, [offset]))
        return tuple((r, tuple(offsets)) for r, offsets in pieces)


def row_index(offsets: Sequence[int]) -> slice | list[int]:
    """Rows ``offsets`` (ascending) as a slice when they are consecutive (a group's layers in a row,
    the usual case): indexing then gives a view, and ``+=`` adds in place, with no state-stack-sized
    copy per iteration."""
    if all(b == a + 1 for a, b in zip(offsets, offsets[1:])):
        return slice(offsets[0], offsets[-1] + 1)
    return list(offsets)


def gather(per_run: Sequence[torch.Tensor | Sequence[torch.Tensor]], plan: Plan) -> torch.Tensor:
    """The rows of ``plan``, in order (a view where they are one slice of one run's stack; a run may
    also be given as a list of its rows, which are then stacked)."""
    pieces = [held[row_index(offsets)] if isinstance(held, torch.Tensor) else torch.stack([held[o] for o in offsets])
              for held, offsets in ((per_run[r], offsets) for r, offsets in plan)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class CotangentRows:
    """``a``, the cotangents the outside gives the states, kept as the rows that are not zero: the
    last state's and the taps' (the side outputs' gradients add the rows of their layers). Most chains
    are read at their end only, and a dense ``(L+1, …)`` stack of zeros would cost one state stack of
    memory through every iteration.

    >>> runs = StateRuns(((0, 3),))
    >>> a = CotangentRows(runs)
    >>> a.add(3, torch.ones(2)); a.add(1, torch.ones(2))
    >>> w = [torch.zeros(4, 2)]; a.add_into(w); w[0][:, 0]
    tensor([0., 1., 0., 1.])
    """

    def __init__(self, runs: StateRuns):
        self.runs = runs
        self._rows: list[dict[int, torch.Tensor]] = [{} for _ in runs.runs]
        # per run, once every row is in: (rows, their values stacked), or None when no row is
        self._stacked: list[tuple[slice | list[int], torch.Tensor] | None] | None = None

    def add(self, state: int, g: torch.Tensor) -> None:
        r, offset = self.runs.locate(state)
        rows = self._rows[r]
        rows[offset] = g.clone() if offset not in rows else rows[offset] + g

    def scatter_add(self, plan: Plan, values: torch.Tensor) -> None:
        """Add ``values`` (one row per state of ``plan``, in its order)."""
        start = 0
        for r, offsets in plan:
            first, _ = self.runs.runs[r]
            for offset, row in zip(offsets, values[start: start + len(offsets)]):
                self.add(first + offset, row)
            start += len(offsets)

    def _freeze(self) -> list[tuple[slice | list[int], torch.Tensor] | None]:
        if self._stacked is None:
            self._stacked = [(row_index(sorted(rows)), torch.stack([rows[o] for o in sorted(rows)])) if rows else None
                             for rows in self._rows]
            self._rows = []  # the per-row tensors are now in the stacks
        return self._stacked

    def add_into(self, per_run: Sequence[torch.Tensor]) -> None:
        """``per_run[r][rows] += a[r][rows]`` for every run."""
        for r, target in enumerate(per_run):
            self.add_rows(target, r, 0, target.shape[0])

    def add_rows(self, target: torch.Tensor, r: int, lo: int, hi: int) -> None:
        """``target[i] += a[r][i]`` for the rows ``lo <= i < hi`` of run ``r`` (``target``: that run's
        tensor).

        >>> a = CotangentRows(StateRuns(((0, 3),))); a.add(3, torch.ones(2)); a.add(1, torch.ones(2))
        >>> w = torch.zeros(4, 2); a.add_rows(w, 0, 2, 4); w[:, 0]
        tensor([0., 0., 0., 1.])
        """
        piece = self._freeze()[r]
        if piece is None:
            return
        index, values = piece
        rows = range(index.start, index.stop) if isinstance(index, slice) else index
        if lo <= rows[0] and rows[-1] < hi:  # all of them: one indexed add
            target[index] += values
            return
        inside = [j for j, i in enumerate(rows) if lo <= i < hi]
        if inside:
            first, last = inside[0], inside[-1]
            if isinstance(index, slice):  # consecutive: one in-place add of a view
                target[rows[first]: rows[last] + 1] += values[first: last + 1]
            else:
                for j in inside:
                    target[rows[j]] += values[j]

    def held(self) -> list[torch.Tensor]:
        return [piece[1] for piece in self._freeze() if piece is not None]


# a state below this is kept as a tensor of its own: its copy into a stack would cost a kernel per
# layer in the forward (a launch on a GPU) for a few bytes of the backward's peak
STACK_STATE_MIN_BYTES = 64 * 2 ** 10


class StateStacks:
    """The chain's states as the forward computes them, written into one stacked tensor per run.

    A group's batched forward and VJPs read its layers' input states as one stacked tensor; kept as
    separate tensors, the states would be stacked again by every backward (a copy the size of all
    states). Here each state ``p < L`` of a run in ``stacked_runs`` is written into its run's stack as
    it is computed and the next layer reads that row, so a group whose layers are consecutive reads
    a view. Runs no group reads consecutively, and states under ``STACK_STATE_MIN_BYTES``, stay
    separate tensors, stacked where read. The last state ``h_L``, which no layer reads, stays a tensor
    of its own: the caller gets it as it is.

    >>> stacks = StateStacks(StateRuns(((0, 2),)), num_layers=2, min_bytes=0)
    >>> x = stacks.append(0, torch.zeros(3))
    >>> x = stacks.append(1, x + 1)
    >>> y = stacks.append(2, x + 1)
    >>> stacks.rows(((0, (0, 1)),))._base is stacks.per_run[0]   # the layers' inputs: a view
    True
    >>> [s.tolist() for s in stacks.states()]
    [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    """

    def __init__(self, runs: StateRuns, num_layers: int, stacked_runs: frozenset[int] | None = None,
                 min_bytes: int | None = None):
        self.runs, self.num_layers = runs, num_layers
        self.stacked_runs = frozenset(range(len(runs.runs))) if stacked_runs is None else stacked_runs
        self.min_bytes = STACK_STATE_MIN_BYTES if min_bytes is None else min_bytes
        # per run: its stack, or its states as a list
        self.per_run: list[torch.Tensor | list[torch.Tensor]] = [[] for _ in runs.runs]
        self.last: torch.Tensor | None = None

    def _rows(self, r: int) -> int:
        first, last = self.runs.runs[r]
        return min(last, self.num_layers - 1) - first + 1

    def append(self, p: int, y: torch.Tensor) -> torch.Tensor:
        """Keep state ``p`` (computed in state order); return it as the next layer should read it."""
        if p == self.num_layers:
            self.last = y
            return y
        r, offset = self.runs.locate(p)
        if offset == 0 and r in self.stacked_runs and self._rows(r) > 1 and \
                y.numel() * y.element_size() >= self.min_bytes:
            self.per_run[r] = _stack_like(y, self._rows(r))
        held = self.per_run[r]
        if isinstance(held, list):
            held.append(y)
            return y
        held[offset].copy_(y)
        return held[offset]

    def state(self, p: int) -> torch.Tensor:
        if p == self.num_layers:
            return self.last  # type: ignore[return-value]
        r, offset = self.runs.locate(p)
        return self.per_run[r][offset]

    def states(self) -> list[torch.Tensor]:
        return [self.state(p) for p in range(self.num_layers + 1)]

    def rows(self, plan: Plan) -> torch.Tensor:
        """The states of ``plan`` stacked: a view of one stack where they are consecutive rows of it."""
        return gather(self.per_run, plan)

    def saved(self) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """What the chain's forward saves for its backward (the stacks and separate states, then
        ``h_L``) and how to split it again (``restore``): per run, -1 for a stack, else a count."""
        flat: list[torch.Tensor] = []
        layout = []
        for held in self.per_run:
            flat.extend([held] if isinstance(held, torch.Tensor) else held)
            layout.append(-1 if isinstance(held, torch.Tensor) else len(held))
        return [*flat, self.last], tuple(layout)  # type: ignore[list-item]

    @classmethod
    def restore(cls, runs: StateRuns, num_layers: int, saved: Sequence[torch.Tensor],
                layout: Sequence[int]) -> "StateStacks":
        stacks, start = cls(runs, num_layers), 0
        for r, count in enumerate(layout):
            if count < 0:
                stacks.per_run[r], start = saved[start], start + 1
            else:
                stacks.per_run[r], start = list(saved[start: start + count]), start + count
        stacks.last = saved[-1]
        return stacks


def _stack_like(y: torch.Tensor, rows: int) -> torch.Tensor:
    """An empty ``(rows, *y.shape)`` whose rows are laid out as ``y`` (channels-last stays channels-last,
    so the layers read states of one layout and their compiled kernels see one set of strides)."""
    dense = y.is_contiguous() or (y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last))
    if not dense:
        return y.new_empty((rows, *y.shape))
    return y.new_empty_strided((rows, *y.shape), (y.numel(), *y.stride()))
