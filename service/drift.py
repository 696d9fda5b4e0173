"""Prediction drift per version: Prometheus histograms and a rolling PSI against training.

On the request path :meth:`DriftMonitor.observe` bins the request's predictions once per task
(``searchsorted`` + ``bincount`` over the N values, see ``model.core.distribution``), adds the
bin counts to ``vidrank_prediction{task,version}`` in a few calls and to the version's rolling
window. The population stability index of the window against the distribution the bundle's
manifest stores (held-out predictions at training time) is computed off the request path, by the
rollout monitor (``service/canary.py``), which also sets ``vidrank_prediction_psi``. A bundle
without a stored distribution still gets its histograms, but no PSI.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from model.core.distribution import PREDICTION_EDGES, Reference, bin_counts
from model.core.metrics import psi
from model.core.tasks import TASKS
from service import metrics
from service.scorer import Scorer
from service.window import SlidingCounts

EDGES = np.asarray(PREDICTION_EDGES, dtype=np.float64)
# Below this many predictions in the window the PSI of ~35 bins is mostly sampling noise.
MIN_PSI_PREDICTIONS = 500


class VersionDrift:
    """One version's served predictions: its histogram children and its PSI windows."""

    def __init__(
        self,
        version: str,
        reference: Reference | None,
        window_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.version = version
        self.reference = reference
        self._children = {task: metrics.PREDICTION.labels(task, version) for task in TASKS}
        self._windows: dict[str, SlidingCounts] = {}
        self._rebin = False
        if reference is not None:
            self._rebin = not reference.same_edges(EDGES)
            width = len(reference.edges) + 1
            self._windows = {
                task: SlidingCounts(width, window_s, clock=clock)
                for task in TASKS
                if task in reference.counts
            }

    def observe(self, preds: Mapping[str, np.ndarray]) -> None:
        """Count one request's predictions (vectorised; a few Prometheus calls per task)."""
        for task in TASKS:
            values = preds[task]
            counts = bin_counts(values, EDGES)
            metrics.observe_counts(self._children[task], counts, float(np.nansum(values)))
            window = self._windows.get(task)
            if window is not None:
                if self._rebin:  # a manifest with other bins than this service's
                    assert self.reference is not None
                    counts = bin_counts(values, self.reference.edges)
                window.add(counts)

    def psi(self, span_s: float | None = None) -> dict[str, float]:
        """PSI per task over the last ``span_s`` seconds; NaN with too few predictions."""
        out: dict[str, float] = {}
        if self.reference is None:
            return out
        for task, window in self._windows.items():
            served = window.total(span_s)
            enough = served.sum() >= MIN_PSI_PREDICTIONS
            out[task] = psi(self.reference.counts[task], served) if enough else float("nan")
        return out

    def predictions(self, span_s: float | None = None) -> int:
        """Predictions per task counted in the window (0 without a reference)."""
        for window in self._windows.values():
            return int(window.total(span_s).sum())
        return 0

    def reset(self) -> None:
        """Empty the windows (a canary starts judged on its own traffic only)."""
        for window in self._windows.values():
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

    def publish_psi(self) -> dict[str, dict[str, float]]:
        """Compute every version's PSI over the window and set the gauges; returns them."""
        out: dict[str, dict[str, float]] = {}
        for version, drift in list(self._versions.items()):
            out[version] = drift.psi()
            for task, value in out[version].items():
                metrics.PREDICTION_PSI.labels(task, version).set(value)
        return out
