"""Latency sampling shared by the in-process benchmarks: one awaited call at a time, percentiles in µs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] / 1000

    return {"p50_us": pct(50), "p90_us": pct(90), "p99_us": pct(99), "mean_us": statistics.fmean(ordered) / 1000,
            "n": len(ordered)}


async def measure(call: Callable[[int], Awaitable[object]], count: int, warmup: int) -> dict[str, float]:
    """Await ``call(i)`` ``warmup`` times unmeasured, then ``count`` times, timing each alone."""
    for i in range(warmup):
        await call(i)
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(count):
        started = clock()
        await call(warmup + i)
        samples.append(clock() - started)
    return percentiles(samples)
