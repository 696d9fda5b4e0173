"""Shadow scoring: a sampled share of requests also ranked by another version, off the path.

The ranker samples ``shadow_percent`` of requests and hands a :class:`ShadowJob` (the request's
encoder input and encoded tensors, the served predictions and ranking) to the route, which attaches
:meth:`ShadowScorer.submit` to the response as a background task: it runs after the response has
been written and only puts the job into a bounded queue (``put_nowait``), dropping and counting it
when the queue is full. One worker thread with a one-thread onnxruntime session takes jobs from the
queue, scores them with the shadow version, ranks them with the fusion the request would get from
that version, and compares the two rankings: top-10 overlap, Kendall's tau over all candidates, and
the mean absolute difference of each task's predictions. Nothing here can fail or slow a /rank
response: a failing job is counted and logged, never raised.

The worker runs at the normal CPU priority on purpose: a niced thread that the kernel preempts
while it holds the GIL makes the request threads wait for that GIL (priority inversion). Under
saturation the shadow takes its share of CPU and the bounded queue drops what it cannot score,
so throughput drops by at most the shadow's own work.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model.core.fusion import ProfileStore, fuse, rank_order, resolve
from model.core.metrics import kendall_tau, top_k_overlap
from model.core.tasks import TASKS
from service import metrics
from service.rollout.background import Loop
from service.rollout.drift import DriftMonitor
from service.rollout.reconciler import Reconciler
from service.scoring.request import EncoderInput
from service.scoring.scorer import Scorer

log = logging.getLogger("vidrank.shadow")

TOP_K = 10
_STOP = object()


@dataclass(slots=True)
class ShadowJob:
    """One sampled request, as the served version saw it."""

    served: Scorer
    shadow: Scorer
    given: EncoderInput  # to encode again when the shadow's schema differs
    inputs: Mapping[str, np.ndarray]  # the served version's encoded tensors
    preds: Mapping[str, np.ndarray]
    order: np.ndarray  # the served ranking (all candidates, best first)
    fusion: Any  # the request's fusion field, resolved against the shadow's default


@dataclass(frozen=True)
class Comparison:
    """How the shadow ranked one request compared with the served version."""

    top10_overlap: float
    kendall_tau: float
    abs_diff: dict[str, float]  # task -> mean |served - shadow|


def compare(
    order_a: np.ndarray,
    order_b: np.ndarray,
    preds_a: Mapping[str, np.ndarray],
    preds_b: Mapping[str, np.ndarray],
) -> Comparison:
    """Compare two rankings of the same candidates (index arrays, best first) and predictions.

    Kendall's tau is taken over the candidates' positions in the two rankings, i.e. over the
    orders as served (ties already broken by input order), so it is defined even for tied or
    NaN scores.
    """
    n = len(order_a)
    pos_a, pos_b = np.empty(n, np.int64), np.empty(n, np.int64)
    pos_a[order_a] = np.arange(n)
    pos_b[order_b] = np.arange(n)
    diff = {
        t: float(np.mean(np.abs(np.asarray(preds_a[t], np.float64) - preds_b[t]))) for t in TASKS
    }
    tau = kendall_tau(pos_a, pos_b) if n > 1 else float("nan")
    return Comparison(top_k_overlap(order_a, order_b, TOP_K), tau, diff)


@dataclass
class ShadowStats:
    """Running means of the comparisons for one shadow version (this process)."""

    version: str
    compared: int = 0
    dropped: int = 0
    stale: int = 0
    failed: int = 0
    _sums: dict[str, float] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def add(self, c: Comparison) -> None:
        self.compared += 1
        values = {"top10_overlap": c.top10_overlap, "kendall_tau": c.kendall_tau}
        values.update({f"abs_diff.{t}": v for t, v in c.abs_diff.items()})
        for key, value in values.items():
            if math.isfinite(value):
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1

    def mean(self, key: str) -> float | None:
        n = self._counts.get(key, 0)
        return self._sums[key] / n if n else None

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "compared": self.compared,
            "dropped": self.dropped,
            "stale": self.stale,
            "failed": self.failed,
            "mean_top10_overlap": self.mean("top10_overlap"),
            "mean_kendall_tau": self.mean("kendall_tau"),
            "mean_abs_diff": {t: self.mean(f"abs_diff.{t}") for t in TASKS},
        }


class ShadowScorer:
    """The bounded queue and the worker thread that score shadow jobs."""

    def __init__(
        self,
        reconciler: Reconciler,
        drift: DriftMonitor,
        profiles: ProfileStore | None,
        capacity: int,
    ) -> None:
        self.reconciler = reconciler
        self.drift = drift
        self.profiles = profiles
        self.capacity = capacity
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=capacity)
        self._stats: ShadowStats | None = None
        self._lock = threading.Lock()
        self._worker = Loop("vidrank-shadow", self._step, wake=self._wake)
        self._last_error: str | None = None

    # -- the response side (event loop) --------------------------------------------------------
    async def submit(self, job: ShadowJob) -> None:
        """Queue ``job`` without waiting; count it as dropped when the queue is full."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            metrics.SHADOW_REQUESTS.labels("dropped").inc()
            self._count(job.shadow.version, "dropped")
            return
        metrics.SHADOW_QUEUE.set(self._queue.qsize())

    # -- the worker ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread."""
        self._worker.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker after the job in hand (queued jobs are discarded)."""
        self._worker.stop(timeout_s)

    def _wake(self, timeout_s: float) -> None:
        """Unblock the worker with the stop marker."""
        while True:  # make room for the stop marker: queued work is not worth waiting for
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:  # requests still arriving keep it full: the thread is a daemon
            pass

    def _step(self) -> bool:
        """Score the next job (waiting for one); False at the stop marker."""
        job = self._queue.get()
        if job is _STOP:
            return False
        metrics.SHADOW_QUEUE.set(self._queue.qsize())
        self.process(job)
        return True

    def process(self, job: ShadowJob) -> Comparison | None:
        """Score and compare one job; never raises (failures are counted and logged)."""
        if self.reconciler.state.shadow is not job.shadow:  # the shadow changed since sampling
            metrics.SHADOW_REQUESTS.labels("stale").inc()
            self._count(job.shadow.version, "stale")
            return None
        start, start_cpu = time.perf_counter(), time.thread_time()
        try:
            comparison = self._compare(job)
        except Exception as e:
            metrics.SHADOW_REQUESTS.labels("failed").inc()
            self._count(job.shadow.version, "failed")
            repeated = repr(e) == self._last_error
            self._last_error = repr(e)
            log.warning(
                "shadow scoring failed",
                exc_info=not repeated,
                extra={"fields": {"shadow": job.shadow.version, "error": repr(e)}},
            )
            return None
        metrics.SHADOW_SECONDS.observe(time.perf_counter() - start)
        metrics.SHADOW_CPU_SECONDS.inc(time.thread_time() - start_cpu)
        metrics.SHADOW_REQUESTS.labels("compared").inc()
        self._record(job, comparison)
        return comparison

    def _compare(self, job: ShadowJob) -> Comparison:
        shadow = job.shadow
        inputs = job.inputs
        if shadow.schema_key != job.served.schema_key:
            g = job.given
            inputs = shadow.schema.encode(g.user, g.context, g.items, g.n)
        preds = shadow.score(inputs)
        spec = resolve(self.profiles, job.fusion, shadow.default_fusion)
        order = rank_order(fuse(spec, preds))
        self.drift.observe(shadow, preds)
        return compare(job.order, order, job.preds, preds)

    def _record(self, job: ShadowJob, c: Comparison) -> None:
        served, shadow = job.served.version, job.shadow.version
        metrics.SHADOW_TOP10.labels(served, shadow).observe(c.top10_overlap)
        if math.isfinite(c.kendall_tau):
            metrics.SHADOW_TAU.labels(served, shadow).observe(c.kendall_tau)
        for task, value in c.abs_diff.items():
            metrics.SHADOW_ABS_DIFF.labels(served, shadow, task).observe(value)
        with self._lock:
            self._stats_for(shadow).add(c)

    def _count(self, version: str, outcome: str) -> None:
        with self._lock:
            stats = self._stats_for(version)
            setattr(stats, outcome, getattr(stats, outcome) + 1)

    def _stats_for(self, version: str) -> ShadowStats:
        """The running stats of ``version``, restarted when the shadow version changes."""
        if self._stats is None or self._stats.version != version:
            self._stats = ShadowStats(version)
        return self._stats

    def describe(self) -> dict[str, Any] | None:
        """The shadow section of /models: what is shadowed and how it compares (this process)."""
        state = self.reconciler.state
        if state.shadow is None:
            return None
        with self._lock:
            stats = self._stats_for(state.shadow.version).summary()
        return {
            **stats,
            "percent": state.shadow_percent,
            "queue": {"depth": self._queue.qsize(), "capacity": self.capacity},
        }
