"""The rollout-safety parts without HTTP: windows, traffic, the canary verdict, shadow comparison,
the shadow queue's bound and the bulk histogram update."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from model.core.distribution import PREDICTION_EDGES, bin_counts
from model.core.policy import CanaryPolicy
from service import metrics
from service.rollout.canary import Traffic, TrafficSummary, judge
from service.rollout.drift import EDGES, bin_tasks
from service.rollout.shadow import ShadowJob, ShadowScorer, compare
from service.rollout.window import SlidingCounts
from tests.service.service_helpers import sample


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_counts_forget_old_slices() -> None:
    clock = Clock()
    w = SlidingCounts(3, window_s=10.0, slices=10, clock=clock)
    w.add(np.array([1, 0, 2]))
    clock.now += 4
    w.add_at(1, 1, 2)
    np.testing.assert_array_equal(w.total(), [1, 2, 3])
    np.testing.assert_array_equal(w.total(span_s=2), [0, 2, 1])  # only the recent slices
    clock.now += 7  # the first slice is now older than the window
    np.testing.assert_array_equal(w.total(), [0, 2, 1])
    clock.now += 100
    np.testing.assert_array_equal(w.total(), [0, 0, 0])
    w.add(np.array([1, 1, 1]))  # a reused row starts from zero
    np.testing.assert_array_equal(w.total(), [1, 1, 1])
    w.clear()
    assert w.total().sum() == 0
    np.testing.assert_array_equal(w.all_time, [2, 3, 4])  # everything ever added
    grid = SlidingCounts((2, 3), window_s=10.0, clock=clock)
    grid.add(np.array([[1, 0, 0], [0, 0, 4]]))
    np.testing.assert_array_equal(grid.total(), [[1, 0, 0], [0, 0, 4]])


def test_traffic_summary_and_p99() -> None:
    clock = Clock()
    t = Traffic(window_s=60.0, clock=clock)
    for i in range(1000):
        t.record("v1", 0.010 if i < 985 else 0.200, error=i % 100 == 0)
    s = t.summary("v1")
    assert (s.requests, s.errors) == (1000, 10) and s.error_ratio == pytest.approx(0.01)
    assert 0.2 <= s.p99_s <= 0.2 * 1.13  # the bin edge above the 99th percentile (~12 % bins)
    assert t.summary("other").requests == 0 and math.isnan(t.summary("other").p99_s)
    clock.now += 61
    assert t.summary("v1").requests == 0
    t.record("v1", 0.01, False)
    t.reset("v1")
    assert t.summary("v1").requests == 0
    t.retain(["v2"])
    assert t.summary("v1").requests == 0


POLICY = CanaryPolicy(max_error_ratio=0.05, max_p99_ratio=2.0, max_psi=0.25, min_requests=100)
HEALTHY = TrafficSummary(requests=500, errors=0, p99_s=0.010)


def test_judge_bounds() -> None:
    calm = {"click": 0.01, "like": 0.02}
    assert judge(POLICY, HEALTHY, HEALTHY, calm) is None
    v = judge(POLICY, TrafficSummary(500, 50, 0.01), HEALTHY, calm)
    assert v is not None and v.reason == "error_ratio" and "0.100 > 0.05" in v.detail
    v = judge(POLICY, TrafficSummary(500, 0, 0.031), HEALTHY, calm)
    assert v is not None and v.reason == "p99_latency" and "3.10x" in v.detail
    v = judge(POLICY, HEALTHY, HEALTHY, {"click": 0.01, "like": 3.2})
    assert v is not None and v.reason == "psi" and "like 3.200 > 0.25" in v.detail
    # Several tasks over the bound: the one that moved most is named first, the others after.
    v = judge(POLICY, HEALTHY, HEALTHY, {"click": 0.01, "watch_time": 0.7, "like": 3.2})
    assert v is not None and v.detail.startswith("PSI of like 3.200 > 0.25")
    assert v.detail.endswith("; watch_time 0.700")


def test_judge_waits_for_enough_requests_and_skips_unknowns() -> None:
    shifted = {"like": 9.0}
    assert judge(POLICY, TrafficSummary(99, 99, 1.0), HEALTHY, shifted) is None
    # Production with too few requests: no latency verdict (nothing to compare against).
    assert judge(POLICY, TrafficSummary(500, 0, 1.0), TrafficSummary(5, 0, 0.01), {}) is None
    assert judge(POLICY, HEALTHY, HEALTHY, {"like": float("nan")}) is None
    # A bound left out of the policy is not judged.
    no_psi = CanaryPolicy(max_error_ratio=0.05, min_requests=100)
    assert judge(no_psi, HEALTHY, HEALTHY, shifted) is None


def test_compare_rankings_and_predictions() -> None:
    n = 50
    preds = {"click": np.linspace(0, 1, n), "watch_time": np.full(n, 5.0), "like": np.zeros(n)}
    order = np.arange(n)[::-1]
    same = compare(order, order, preds, preds)
    assert same.top10_overlap == 1.0 and same.kendall_tau == pytest.approx(1.0)
    assert same.abs_diff == {"click": 0.0, "watch_time": 0.0, "like": 0.0}
    other = {**preds, "like": np.full(n, 0.25)}
    flipped = compare(order, order[::-1], preds, other)
    assert flipped.top10_overlap == 0.0 and flipped.kendall_tau == pytest.approx(-1.0)
    assert flipped.abs_diff["like"] == pytest.approx(0.25)
    one = compare(np.array([0]), np.array([0]), {t: v[:1] for t, v in preds.items()}, preds)
    assert one.top10_overlap == 1.0 and math.isnan(one.kendall_tau)


class _Scorer:
    version = "shadow-v"


def test_shadow_queue_drops_and_counts_when_full() -> None:
    class Reconciler:
        state: Any = None

    shadow = ShadowScorer(Reconciler(), None, None, capacity=3)  # type: ignore[arg-type]
    job = ShadowJob(_Scorer(), _Scorer(), None, {}, {}, np.arange(1), None)  # type: ignore[arg-type]
    before = sample("vidrank_shadow_requests_total", {"outcome": "dropped"})

    async def burst() -> None:
        for _ in range(10):
            await shadow.submit(job)

    asyncio.run(burst())  # no worker running: the queue fills at its bound
    assert shadow._queue.qsize() == 3
    assert sample("vidrank_shadow_requests_total", {"outcome": "dropped"}) == before + 7
    assert shadow._stats is not None and shadow._stats.dropped == 7


def test_observe_counts_equals_observing_every_value() -> None:
    """The bulk update writes exactly what Histogram.observe would, value by value."""
    reg = CollectorRegistry()
    one = Histogram("one", "x", ["task"], buckets=PREDICTION_EDGES, registry=reg)
    bulk = Histogram("bulk", "x", ["task"], buckets=PREDICTION_EDGES, registry=reg)
    values = np.r_[np.random.default_rng(1).uniform(0, 1, 300), [0.0, 1.0, 5.0, 700.0]]
    for v in values:
        one.labels("click").observe(float(v))
    counts = bin_counts(values, np.asarray(PREDICTION_EDGES))
    metrics.observe_counts(bulk.labels("click"), counts, float(values.sum()))
    text = generate_latest(reg).decode()
    got = [
        line.replace("bulk_", "one_", 1) for line in text.splitlines() if line.startswith("bulk_")
    ]
    want = [line for line in text.splitlines() if line.startswith("one_")]
    assert len(want) == len(PREDICTION_EDGES) + 1 + 3  # buckets, +Inf, count, sum, created
    assert [g.split(" ")[0] for g in got] == [w.split(" ")[0] for w in want]
    for g, w in zip(got, want, strict=True):
        if "_created" not in g:
            assert float(g.split(" ")[1]) == pytest.approx(float(w.split(" ")[1]))


def test_bin_tasks_is_bin_counts_per_task() -> None:
    rng = np.random.default_rng(2)
    stacked = np.stack([rng.uniform(0, 1, 40), rng.exponential(30, 40), rng.uniform(0, 0.1, 40)])
    counts = bin_tasks(stacked.astype(np.float32), EDGES)
    assert counts.shape == (3, len(EDGES) + 1)
    for i in range(3):
        np.testing.assert_array_equal(counts[i], bin_counts(stacked[i].astype(np.float32), EDGES))


def test_a_periodic_loop_keeps_running_whatever_its_step_returns() -> None:
    """A poll that swapped nothing returns False; the periodic loop must poll on regardless
    (a blocking loop, by contrast, ends when its step returns False)."""
    import threading

    from service.rollout.background import Loop

    calls: list[int] = []
    enough = threading.Event()

    def poll() -> bool:
        calls.append(1)
        if len(calls) == 3:
            enough.set()
        return False

    loop = Loop("test-poll", poll)
    loop.start(0.01)
    try:
        assert enough.wait(60), calls
    finally:
        loop.stop()
    assert not loop.running and len(calls) >= 3

    ends = Loop("test-worker", lambda: bool(calls.append(1)))  # returns False at once
    ends.start()
    ends._thread.join(60)  # type: ignore[union-attr]
    assert not ends._thread.is_alive()  # type: ignore[union-attr]
    ends.stop()
