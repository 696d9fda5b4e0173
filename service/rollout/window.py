"""Counts over a rolling time window, for drift and canary checks (numpy; no Prometheus).

Prometheus keeps counters since process start; judging a canary or computing a population
stability index needs "the last five minutes" inside the process. A :class:`SlidingCounts` keeps
a ring of time slices, each an array of counts (histogram bins per task, or requests, errors and
latency bins): adding is one array addition into the current slice, and the window's total sums
the live slices. The window therefore advances in steps of one slice (``window_s / slices``).
It also keeps the counts since it was created (:attr:`SlidingCounts.all_time`), from which the
Prometheus histograms are updated off the request path.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np

SLICES = 30


class SlidingCounts:
    """``width`` counters summed over the last ``window_s`` seconds (thread-safe)."""

    def __init__(
        self,
        shape: int | tuple[int, ...],
        window_s: float,
        slices: int = SLICES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if min(dims) < 1 or slices < 1 or not window_s > 0:
            raise ValueError("shape and slices must be >= 1 and window_s > 0")
        self.window_s = window_s
        self.slice_s = window_s / slices
        self._clock = clock
        self._counts = np.zeros((slices, *dims), dtype=np.int64)
        self._ids = np.full(slices, -1, dtype=np.int64)  # which slice of time each row holds
        self._all_time = np.zeros(dims, dtype=np.int64)
        self._lock = threading.Lock()

    def _row(self) -> int:
        """The current slice's row, cleared when it last held an older slice. Holds the lock."""
        k = int(self._clock() // self.slice_s)
        row = k % len(self._ids)
        if self._ids[row] != k:
            self._counts[row] = 0
            self._ids[row] = k
        return row

    def add(self, counts: np.ndarray) -> None:
        """Add an array of counts (of the window's shape) to the current slice."""
        with self._lock:
            self._counts[self._row()] += counts
            self._all_time += counts

    def add_at(self, *indices: int) -> None:
        """Add 1 to each of a few counters (a 1-D window) of the current slice."""
        with self._lock:
            row = self._counts[self._row()]
            for i in indices:
                row[i] += 1
                self._all_time[i] += 1

    @property
    def all_time(self) -> np.ndarray:
        """Everything ever added (not reset by :meth:`clear`), a copy."""
        with self._lock:
            return self._all_time.copy()

    def total(self, span_s: float | None = None) -> np.ndarray:
        """Counts over the last ``span_s`` seconds (default and at most: the whole window)."""
        span = self.window_s if span_s is None else min(span_s, self.window_s)
        n = max(1, math.ceil(span / self.slice_s - 1e-9))
        with self._lock:
            k = int(self._clock() // self.slice_s)
            live = (self._ids > k - n) & (self._ids <= k)
            return self._counts[live].sum(axis=0)

    def clear(self) -> None:
        """Forget the window's counts (:attr:`all_time` keeps them)."""
        with self._lock:
            self._counts[:] = 0
            self._ids[:] = -1
