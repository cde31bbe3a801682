"""The one timing helper every rate in the package and the benchmarks is measured with.

This machine is shared and noisy (one Faiss flat rate moved 4,790 -> 8,950 QPS between two runs), so a rate
is never one pass, nor the best of a few (the best rewards a lucky pass): it is the median of at least
`REPEATS` timed passes, after whatever warm-up the caller does. Single-query latency percentiles are taken per
round and the median over rounds is reported, likewise.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPEATS = 3  # passes per rate: the median of at least 3


def median_time(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Median wall time (s) of `repeats` calls of `fn()` (repeats >= 1; 1 is one pass, not a median)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def latency_ms(
    calls: Sequence[Callable[[], Any]], rounds: int = REPEATS
) -> tuple[float | None, float | None]:
    """Single-call latency: each round calls every one of `calls` back to back (as a server would), timing
    each; returns the median over rounds of the round's p50 and p99, in ms ((None, None) without calls)."""
    if not calls:
        return None, None
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    p50, p99 = [], []
    for _ in range(int(rounds)):
        times = np.empty(len(calls))
        for j, call in enumerate(calls):
            t0 = time.perf_counter()
            call()
            times[j] = time.perf_counter() - t0
        p50.append(np.percentile(times * 1e3, 50))
        p99.append(np.percentile(times * 1e3, 99))
    return float(np.median(p50)), float(np.median(p99))
