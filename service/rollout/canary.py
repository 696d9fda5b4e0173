"""Automatic canary rollback: per-version traffic windows, the policy's verdict, the monitor.

The ranker records every request's outcome per version (:class:`Traffic`: requests, server
errors, ranking latency, in rolling windows). The :class:`RolloutMonitor` thread wakes every
``rollout_check_interval_s`` and

1. updates every scored version's prediction histograms and PSI (``vidrank_prediction`` and
   ``vidrank_prediction_psi``, ``service/rollout/drift.py``);
2. judges the canary, if there is one, by its policy (the canary's own bounds from
   ``aliases.json`` over the service's settings): once the canary has ``min_requests`` in the
   window, a server-error ratio above ``max_error_ratio``, a p99 above ``max_p99_ratio`` times
   production's, or any task's PSI above ``max_psi`` removes it from the registry
   (:meth:`Reconciler.remove_canary`): logged, counted in
   ``vidrank_canary_rollbacks_total{reason}`` and recorded in ``history.jsonl`` with actor
   ``auto-rollback``. Every other replica converges on the aliases file. Production is never
   rolled back automatically: only the canary is ever removed.

Each replica judges its own traffic, so the first replica to see a bound crossed removes the
canary; the removal is conditional on the canary still being that version, so a replica judging
late never removes a newer canary. A canary's windows start empty when it starts (in this
process), so it is judged on its own traffic only.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from model.core.policy import CanaryPolicy
from service import metrics
from service.logging import log_fields
from service.rollout.background import Loop
from service.rollout.drift import DriftMonitor
from service.rollout.reconciler import Reconciler
from service.rollout.window import SlidingCounts

log = logging.getLogger("vidrank.canary")

# Ranking latency bins for p99: 0.1 ms to 10 s in ~12 % steps (a p99 ratio of 2 is many bins).
LATENCY_EDGES = np.geomspace(1e-4, 10.0, 101)
_LATENCY_EDGES = LATENCY_EDGES.tolist()  # bisect on a list: a scalar lookup without numpy
REASONS = ("error_ratio", "p99_latency", "psi")


@dataclass(frozen=True)
class TrafficSummary:
    """One version's requests, server errors and p99 ranking latency over a span."""

    requests: int
    errors: int
    p99_s: float  # NaN without requests

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class _VersionTraffic:
    """requests, server errors, then the latency bins, in one window."""

    def __init__(self, window_s: float, clock: Callable[[], float]) -> None:
        self.window = SlidingCounts(2 + len(LATENCY_EDGES) + 1, window_s, clock=clock)

    def record(self, seconds: float, error: bool) -> None:
        latency_bin = 2 + bisect.bisect_left(_LATENCY_EDGES, seconds)
        if error:
            self.window.add_at(0, 1, latency_bin)
        else:
            self.window.add_at(0, latency_bin)

    def summary(self, span_s: float | None) -> TrafficSummary:
        counts = self.window.total(span_s)
        return TrafficSummary(int(counts[0]), int(counts[1]), _quantile(counts[2:], 0.99))

    def clear(self) -> None:
        self.window.clear()


def _quantile(counts: np.ndarray, q: float) -> float:
    """The upper edge of the bin holding quantile ``q`` (NaN when empty)."""
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    i = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
    return float(LATENCY_EDGES[min(i, len(LATENCY_EDGES) - 1)])


class Traffic:
    """Per-version request outcomes over the rolling window (thread-safe)."""

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._versions: dict[str, _VersionTraffic] = {}
        self._lock = threading.Lock()

    def record(self, version: str, seconds: float, error: bool) -> None:
        """Count one ranked request (``error``: it failed on the server's side)."""
        found = self._versions.get(version)
        if found is None:
            with self._lock:
                found = self._versions.setdefault(
                    version, _VersionTraffic(self.window_s, self._clock)
                )
        found.record(seconds, error)

    def summary(self, version: str, span_s: float | None = None) -> TrafficSummary:
        found = self._versions.get(version)
        if found is None:
            return TrafficSummary(0, 0, float("nan"))
        return found.summary(span_s)

    def reset(self, version: str) -> None:
        found = self._versions.get(version)
        if found is not None:
            found.clear()

    def retain(self, versions: Iterable[str]) -> None:
        keep = set(versions)
        with self._lock:
            for version in [v for v in self._versions if v not in keep]:
                del self._versions[version]


@dataclass(frozen=True)
class Verdict:
    """Why a canary must go: the bound crossed (a ``REASONS`` label) and the figures."""

    reason: str
    detail: str


def judge(
    policy: CanaryPolicy,
    canary: TrafficSummary,
    production: TrafficSummary,
    psi: Mapping[str, float],
) -> Verdict | None:
    """The first bound ``canary`` crosses, or None (also while it has too few requests).

    ``policy`` is complete (every field set). The latency bound needs production traffic in the
    same window too; PSI values that are NaN (too few predictions, no reference) are skipped, and
    a PSI verdict names the task that moved most first, then any other over the bound.
    """
    assert policy.min_requests is not None
    if canary.requests < policy.min_requests:
        return None
    n = f"over {canary.requests} canary requests"
    if policy.max_error_ratio is not None and canary.error_ratio > policy.max_error_ratio:
        return Verdict(
            "error_ratio",
            f"error ratio {canary.error_ratio:.3f} > {policy.max_error_ratio} ({canary.errors} "
            f"server errors {n})",
        )
    if policy.max_p99_ratio is not None and production.requests >= policy.min_requests:
        ratio = canary.p99_s / production.p99_s
        if math.isfinite(ratio) and ratio > policy.max_p99_ratio:
            return Verdict(
                "p99_latency",
                f"p99 {canary.p99_s * 1000:.1f} ms is {ratio:.2f}x production's "
                f"{production.p99_s * 1000:.1f} ms (> {policy.max_p99_ratio}x) {n}",
            )
    if policy.max_psi is not None:
        over = sorted(
            ((v, t) for t, v in psi.items() if math.isfinite(v) and v > policy.max_psi),
            reverse=True,
        )
        if over:  # the task that moved most first; the others over the bound after it
            (value, task), rest = over[0], over[1:]
            also = "".join(f"; {t} {v:.3f}" for v, t in rest)
            return Verdict("psi", f"PSI of {task} {value:.3f} > {policy.max_psi} {n}{also}")
    return None


def _health(
    version: str,
    policy: CanaryPolicy,
    canary: TrafficSummary,
    production: TrafficSummary,
    psi: Mapping[str, float],
    verdict: Verdict | None,
) -> dict[str, Any]:
    """What the last judgement saw, as /models shows it (NaN becomes None)."""

    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "version": version,
        "policy": policy.to_dict(),
        "requests": canary.requests,
        "errors": canary.errors,
        "p99_ms": num(canary.p99_s * 1000),
        "production_requests": production.requests,
        "production_p99_ms": num(production.p99_s * 1000),
        "psi": {task: num(v) for task, v in psi.items()},
        "verdict": None if verdict is None else asdict(verdict),
    }


class RolloutMonitor:
    """The background thread that publishes PSI and judges the canary (see the module doc)."""

    def __init__(
        self,
        reconciler: Reconciler,
        drift: DriftMonitor,
        traffic: Traffic,
        default_policy: CanaryPolicy,
        auto_rollback: bool,
    ) -> None:
        self.reconciler = reconciler
        self.drift = drift
        self.traffic = traffic
        self.default_policy = default_policy
        self.auto_rollback = auto_rollback
        self._canary: str | None = None  # the canary judged so far (its windows were reset)
        self.health: dict[str, Any] | None = None  # the last judgement, for /models
        self._loop = Loop("vidrank-rollout-monitor", self.check_once)

    def check_once(self) -> Verdict | None:
        """One round: histograms and PSI, then the canary's verdict (acted on if enabled)."""
        state = self.reconciler.state
        served = state.roles().values()
        self.drift.retain(served)
        self.traffic.retain(served)
        self.drift.refresh()
        canary = state.canary
        if canary is None or state.production is None:
            self._canary, self.health = None, None
            return None
        if canary.version != self._canary:  # a new canary: judge it on its own traffic only
            self._canary = canary.version
            self.traffic.reset(canary.version)
            if (d := self.drift.get(canary.version)) is not None:
                d.reset()
        policy = (state.canary_policy or CanaryPolicy()).over(self.default_policy)
        mine = self.traffic.summary(canary.version, policy.window_s)
        production = self.traffic.summary(state.production.version, policy.window_s)
        drift = self.drift.get(canary.version)
        psi = drift.psi(policy.window_s) if drift is not None else {}
        verdict = judge(policy, mine, production, psi)
        self.health = _health(canary.version, policy, mine, production, psi, verdict)
        if verdict is not None and self.auto_rollback:
            self._roll_back(canary.version, verdict)
        return verdict

    def _roll_back(self, version: str, verdict: Verdict) -> None:
        try:
            removed = self.reconciler.remove_canary(version, f"{verdict.reason}: {verdict.detail}")
        except Exception:  # the registry is unreachable: the next round tries again
            fields = {"version": version, "reason": verdict.reason}
            log.exception("automatic canary rollback failed", extra={"fields": fields})
            return
        if removed:
            metrics.CANARY_ROLLBACKS.labels(verdict.reason).inc()
            log_fields(
                log, logging.WARNING, "canary rolled back automatically",
                version=version, reason=verdict.reason, detail=verdict.detail,
            )  # fmt: skip

    def start(self, interval_s: float) -> None:
        """Run :meth:`check_once` every ``interval_s`` seconds in a daemon thread."""
        self._loop.start(interval_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the monitor thread (a round in progress finishes first)."""
        self._loop.stop(timeout_s)
