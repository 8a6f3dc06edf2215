"""Interleaved timing rounds, shared by the benchmarks that time several methods in one process.

Every method steps once per round, in an order shuffled every round (seeded, so a run can be
repeated): a slow spell of the machine hits every method alike, and no method always runs after
the same one. A fixed order biased the later methods by a few percent (one's caches, the other's);
measured on the memory benchmark, where identical models differed by that much.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Mapping


def interleaved_rounds(steps: Mapping[str, Callable[[], object]], repeats: int, seed: int = 0) -> None:
    """Call every step once per round for ``repeats`` rounds, in a shuffled order each round.

    >>> calls = []
    >>> interleaved_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    >>> sorted(calls), len(calls)
    (['a', 'a', 'a', 'b', 'b', 'b'], 6)
    """
    order, rng = list(steps), random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for label in order:
            steps[label]()
