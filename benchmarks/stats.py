"""Summary statistics for latency samples (medians and tail percentiles, never means alone)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """min/mean/p50/p90/p99/p999/max in milliseconds of samples given in seconds."""
    if not samples_s:
        return {k: float("nan") for k in ("min", "mean", *PERCENTILES, "max")}
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    out = {"min": float(ms.min()), "mean": float(ms.mean())}
    out.update({k: float(np.percentile(ms, q)) for k, q in PERCENTILES.items()})
    out["max"] = float(ms.max())
    return out


def time_calls(
    fn: Callable[[], object], min_time_s: float, min_calls: int = 20, warmup: int = 5
) -> tuple[list[float], list[float]]:
    """Call ``fn`` until both ``min_time_s`` and ``min_calls`` are reached.

    Returns (wall seconds, CPU seconds of the calling thread) per call. With one intra-op thread
    onnxruntime computes on the calling thread, so its CPU time is the compute time without the
    waits a busy machine adds: the two agree on a quiet machine.
    """
    for _ in range(warmup):
        fn()
    wall: list[float] = []
    cpu: list[float] = []
    end = time.perf_counter() + min_time_s
    while len(wall) < min_calls or time.perf_counter() < end:
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - start_cpu)
        wall.append(time.perf_counter() - start)
    return wall, cpu


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b
