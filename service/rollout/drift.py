"""Prediction drift per version: Prometheus histograms and a rolling PSI against training.

On the request path :meth:`DriftMonitor.observe` bins the request's predictions of all tasks at
once (one ``searchsorted`` and one ``bincount`` over the 3 x N values; the bins are those of
``model.core.distribution``) and adds the counts to the version's rolling window: a few
microseconds, no Python loop over predictions and no Prometheus call. Off the request path the
rollout monitor (``service/rollout/canary.py``) calls :meth:`DriftMonitor.refresh`, which moves the
counts gathered since its last call into ``vidrank_prediction{task,version}`` (so the histograms
lag by at most one check interval) and sets ``vidrank_prediction_psi{task,version}``: the
population stability index of the window against the distribution the bundle's manifest stores
(held-out predictions at training time). A bundle without a stored distribution still gets its
histograms, but no PSI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from model.core.distribution import PREDICTION_EDGES, Reference
from model.core.metrics import psi
from model.core.tasks import TASKS
from service import metrics
from service.rollout.window import SlidingCounts
from service.scoring.scorer import Scorer

EDGES = np.asarray(PREDICTION_EDGES, dtype=np.float64)
# Below this many predictions in the window the PSI of ~35 bins is mostly sampling noise.
MIN_PSI_PREDICTIONS = 500


def bin_tasks(stacked: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts [tasks, len(edges) + 1] of stacked predictions [tasks, N] (``le`` bins)."""
    tasks, n = stacked.shape
    width = len(edges) + 1
    idx = np.searchsorted(edges, stacked.ravel(), side="left")
    for i in range(1, tasks):  # each task's bins after the previous task's
        idx[i * n : (i + 1) * n] += i * width
    return np.bincount(idx, minlength=tasks * width).reshape(tasks, width)


class VersionDrift:
    """One version's served predictions: the windows behind its histograms and its PSI."""

    def __init__(
        self,
        version: str,
        reference: Reference | None,
        window_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.version = version
        self.reference = reference
        self._binned = SlidingCounts((len(TASKS), len(EDGES) + 1), window_s, clock=clock)
        # A manifest binned otherwise than this service gets a window of its own for the PSI.
        self._rebinned: SlidingCounts | None = None
        if reference is not None and not reference.same_edges(EDGES):
            shape = (len(TASKS), len(reference.edges) + 1)
            self._rebinned = SlidingCounts(shape, window_s, clock=clock)
        self._sums = np.zeros(len(TASKS))
        self._flushed = np.zeros((len(TASKS), len(EDGES) + 1), dtype=np.int64)
        self._flushed_sums = np.zeros(len(TASKS))
        self._lock = threading.Lock()

    def observe(self, preds: Mapping[str, np.ndarray]) -> None:
        """Count one request's predictions (vectorised over tasks and candidates)."""
        # concatenate + reshape: cheaper than np.stack for three small arrays
        stacked = np.concatenate([preds[task] for task in TASKS]).reshape(len(TASKS), -1)
        self._binned.add(bin_tasks(stacked, EDGES))
        if self._rebinned is not None:
            assert self.reference is not None
            self._rebinned.add(bin_tasks(stacked, self.reference.edges))
        sums = stacked.sum(axis=1, dtype=np.float64)
        if not np.isfinite(sums).all():  # a NaN prediction must not poison the histogram's sum
            sums = np.nansum(stacked, axis=1, dtype=np.float64)
        with self._lock:
            self._sums += sums

    def flush(self) -> None:
        """Add what was counted since the last flush to the Prometheus histograms."""
        counts = self._binned.all_time
        with self._lock:
            sums = self._sums.copy()
            delta, delta_sums = counts - self._flushed, sums - self._flushed_sums
            self._flushed, self._flushed_sums = counts, sums
        for i, task in enumerate(TASKS):
            if delta[i].any():
                child = metrics.PREDICTION.labels(task, self.version)
                metrics.observe_counts(child, delta[i], float(delta_sums[i]))

    def psi(self, span_s: float | None = None) -> dict[str, float]:
        """PSI per task over the last ``span_s`` seconds; NaN with too few predictions."""
        if self.reference is None:
            return {}
        window = self._rebinned if self._rebinned is not None else self._binned
        served = window.total(span_s)
        out: dict[str, float] = {}
        for i, task in enumerate(TASKS):
            expected = self.reference.counts.get(task)
            if expected is not None:
                enough = served[i].sum() >= MIN_PSI_PREDICTIONS
                out[task] = psi(expected, served[i]) if enough else float("nan")
        return out

    def reset(self) -> None:
        """Empty the windows (a canary starts judged on its own traffic only)."""
        for window in (self._binned, self._rebinned):
            if window is not None:
                window.clear()


class DriftMonitor:
    """Drift state of every version this process scores (served or shadow)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._versions: dict[str, VersionDrift] = {}
        self._lock = threading.Lock()

    def of(self, scorer: Scorer) -> VersionDrift:
        """The drift state of ``scorer``'s version (created on first use)."""
        found = self._versions.get(scorer.version)
        if found is not None:
            return found
        with self._lock:
            found = self._versions.get(scorer.version)
            if found is None:
                found = VersionDrift(scorer.version, scorer.reference, self.window_s, self._clock)
                self._versions[scorer.version] = found
            return found

    def observe(self, scorer: Scorer, preds: Mapping[str, np.ndarray]) -> None:
        """Count the predictions ``scorer`` made for one request."""
        self.of(scorer).observe(preds)

    def get(self, version: str) -> VersionDrift | None:
        return self._versions.get(version)

    def retain(self, versions: Iterable[str]) -> None:
        """Forget versions no longer scored here, and their series."""
        keep = set(versions)
        with self._lock:
            gone = [v for v in self._versions if v not in keep]
            for version in gone:
                del self._versions[version]
        for version in gone:
            for task in TASKS:
                for metric in (metrics.PREDICTION, metrics.PREDICTION_PSI):
                    try:
                        metric.remove(task, version)
                    except KeyError:
                        pass

    def refresh(self) -> dict[str, dict[str, float]]:
        """Flush every version's histograms, compute its PSI over the window and set the
        gauges (off the request path); returns the PSI values."""
        out: dict[str, dict[str, float]] = {}
        for version, drift in list(self._versions.items()):
            drift.flush()
            out[version] = drift.psi()
            for task, value in out[version].items():
                metrics.PREDICTION_PSI.labels(task, version).set(value)
        return out
