"""Wall-clock timing for the benchmark scripts."""
from __future__ import annotations

import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeats: int, warmup: bool = False) -> float:
    """The fastest of `repeats` calls, in seconds: the least disturbed by the rest of the machine."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
