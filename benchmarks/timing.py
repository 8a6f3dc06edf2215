"""The one timing loop of every benchmark script: median wall time of a callable, after warm-up."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(step: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``step()`` over ``repeats`` calls (the caller warms up first).

    >>> median_seconds(lambda: None, 3) < 1.0
    True
    """
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
