"""Prometheus collectors (prometheus-client) and the /metrics exposition.

The collectors are module-level (prometheus-client registers each name once per process). With
several worker processes the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before any worker imports this module; every worker then writes its samples to memory-mapped files
there and :func:`exposition` aggregates all workers, whichever one answers the scrape.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from model.core.distribution import PREDICTION_EDGES

# Request latencies sit in the millisecond range; the buckets resolve 1-50 ms finely.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
CANDIDATE_BUCKETS = (0, 1, 10, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 5000)
MAX_UNKNOWN_FEATURE_LABELS = 200  # client-chosen names must not grow the series without bound
# Unknown names counted by name per request: the cost of a request must not grow with how many
# names a client invents (900k names once cost 1.5 s of counter updates per request).
UNKNOWN_NAMES_BY_LABEL_PER_REQUEST = 16
UNKNOWN_LABEL_CHARS = 64

HTTP_REQUESTS = Counter(
    "vidrank_http_requests_total", "HTTP requests by route, method and status.",
    ["route", "method", "status"],
)  # fmt: skip
HTTP_LATENCY = Histogram(
    "vidrank_http_request_duration_seconds", "Request latency (server side) by route.",
    ["route"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
CANDIDATES = Histogram(
    "vidrank_rank_candidates", "Candidates per /rank request.", buckets=CANDIDATE_BUCKETS
)
INFERENCE_SECONDS = Histogram(
    "vidrank_inference_seconds", "onnxruntime session.run time per /rank request.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
RANK_BY_VERSION = Counter(
    "vidrank_rank_requests_total", "Ranked requests by the model version that served them.",
    ["model_version"],
)  # fmt: skip
UNKNOWN_FEATURES = Counter(
    "vidrank_unknown_features_total",
    "Requests that sent a feature name the serving model does not know (ignored), by name "
    "(at most 16 names per request; names beyond the first 200 seen count as _other).",
    ["feature"],
)
UNKNOWN_FEATURE_NAMES = Counter(
    "vidrank_unknown_feature_names_total",
    "Unknown feature names received, all of them (each counted once per request).",
)
MODEL_INFO = Gauge(
    "vidrank_model_info", "1 for each version this process serves, by role (production/canary).",
    ["version", "role"], multiprocess_mode="livemax",
)  # fmt: skip
READY = Gauge(
    "vidrank_ready", "1 while a production model is loaded and warmed.",
    multiprocess_mode="livemin",
)  # fmt: skip
SWAPS = Counter(
    "vidrank_model_swaps_total", "Model swaps that completed, by trigger (admin/poll/startup).",
    ["trigger"],
)  # fmt: skip
SWAP_FAILURES = Counter(
    "vidrank_model_swap_failures_total",
    "Versions that failed to load, verify or warm up (the old model kept serving), by trigger.",
    ["trigger"],
)
LOAD_SECONDS = Histogram(
    "vidrank_model_load_seconds", "Time to load, verify and warm up one version.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)  # fmt: skip
MODEL_DESIRED = Gauge(
    "vidrank_model_desired",
    "1 for each version the registry's aliases name, by role; compare with vidrank_model_info.",
    ["version", "role"], multiprocess_mode="livemax",
)  # fmt: skip
CONVERGED = Gauge(
    "vidrank_model_converged",
    "1 while this process serves exactly the versions the aliases name (0: lagging, retrying).",
    multiprocess_mode="livemin",
)  # fmt: skip
LOAD_RETRIES = Counter(
    "vidrank_model_load_retries_total",
    "Scheduled retries of an aliased version that did not load (missing yet, or broken).",
)
REGISTRY_OK = Gauge(
    "vidrank_registry_ok",
    "1 while the last poll read valid aliases; 0 while a fault keeps the last known good model.",
    multiprocess_mode="livemin",
)  # fmt: skip
REGISTRY_FAULTS = Counter(
    "vidrank_registry_faults_total",
    "Registry faults that kept the served versions, by reason "
    "(aliases_missing, aliases_invalid, unreadable).",
    ["reason"],
)
SHED = Counter(
    "vidrank_rank_shed_total",
    "/rank requests answered without scoring, by reason: queue_full (503), deadline (504), "
    "client_gone (the client hung up first).",
    ["reason"],
)
QUEUE = Gauge(
    "vidrank_rank_queue", "/rank requests admitted and waiting for a slot (summed over workers).",
    multiprocess_mode="livesum",
)  # fmt: skip
CONNECTIONS_CLOSED = Counter(
    "vidrank_connections_closed_total",
    "Connections closed to bound resources, by reason: max_connections (503), header_timeout "
    "(408), headers_too_large (431), body_timeout (408), body_unread, made_room (408), "
    "accept_failed.",
    ["reason"],
)
ACCEPT_PAUSES = Counter(
    "vidrank_accept_pauses_total",
    "Times a worker stopped accepting connections because its /rank places were all taken "
    "(new connections wait in the kernel's short accept queue until one frees).",
)
PROFILE_RELOAD_FAILURES = Counter(
    "vidrank_fusion_profile_reload_failures_total",
    "Fusion profile file loads that failed (the last good profiles stay in use).",
)
FEATURE_MISSES = Counter(
    "vidrank_feature_misses_total",
    "Ids the feature snapshot does not hold (scored with schema defaults), by entity.",
    ["entity"],
)
FEATURE_STORE_ERRORS = Counter(
    "vidrank_feature_store_errors_total",
    "Requests scored without stored features because the store failed, by reason.",
    ["reason"],
)
FEATURE_LOOKUP_SECONDS = Histogram(
    "vidrank_feature_lookup_seconds", "Feature-store lookup time per /rank request.",
    buckets=LATENCY_BUCKETS,
)  # fmt: skip
FEATURE_SNAPSHOT_INFO = Gauge(
    "vidrank_feature_snapshot_info", "1 for the feature snapshot this process serves.",
    ["snapshot"], multiprocess_mode="livemax",
)  # fmt: skip
FEATURE_SWAPS = Counter(
    "vidrank_feature_snapshot_swaps_total", "Feature snapshot switches, by trigger.", ["trigger"]
)
FEATURE_SWAP_FAILURES = Counter(
    "vidrank_feature_snapshot_failures_total",
    "Feature snapshots that failed to load, verify or prepare (the old one kept serving).",
    ["trigger"],
)

# -- rollout safety: drift, shadow scoring, canary rollbacks --------------------------------------
PREDICTION = Histogram(
    "vidrank_prediction",
    "Served predictions by task and version (probabilities, and expected watch seconds).",
    ["task", "version"],
    buckets=PREDICTION_EDGES,
)
PREDICTION_PSI = Gauge(
    "vidrank_prediction_psi",
    "Population stability index of the served predictions over the rolling window against the "
    "version's held-out training distribution (< 0.1 stable, > 0.25 shifted).",
    ["task", "version"],
    multiprocess_mode="livemax",
)
SHADOW_REQUESTS = Counter(
    "vidrank_shadow_requests_total",
    "Requests sampled for shadow scoring, by outcome (compared, dropped when the queue was "
    "full, stale when the shadow changed first, failed).",
    ["outcome"],
)
SHADOW_QUEUE = Gauge(
    "vidrank_shadow_queue_depth", "Shadow requests waiting to be scored.",
    multiprocess_mode="livesum",
)  # fmt: skip
SHADOW_SECONDS = Histogram(
    "vidrank_shadow_scoring_seconds",
    "Time to score and compare one shadow request (off the response path).",
    buckets=LATENCY_BUCKETS,
)
SHADOW_CPU_SECONDS = Counter(
    "vidrank_shadow_cpu_seconds_total",
    "CPU time the shadow worker spent scoring and comparing (its thread's CPU clock).",
)
SHADOW_TOP10 = Histogram(
    "vidrank_shadow_top10_overlap",
    "Share of the served top 10 that the shadow version also ranks in its top 10.",
    ["version", "shadow"],
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
SHADOW_TAU = Histogram(
    "vidrank_shadow_kendall_tau",
    "Kendall's tau between the served and the shadow ranking of one request's candidates.",
    ["version", "shadow"],
    buckets=(-0.5, 0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0),
)
SHADOW_ABS_DIFF = Histogram(
    "vidrank_shadow_abs_diff",
    "Mean absolute difference of served and shadow predictions per request, by task.",
    ["version", "shadow", "task"],
    buckets=(1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
CANARY_ROLLBACKS = Counter(
    "vidrank_canary_rollbacks_total",
    "Canaries this process removed automatically, by the bound they crossed.",
    ["reason"],
)

_unknown_labels: set[str] = set()


def observe_counts(child: Histogram, counts: np.ndarray, total: float) -> None:
    """Add already-binned observations to one labelled histogram in a few calls.

    ``counts`` has one entry per bucket (non-cumulative, the last one +Inf) and ``total`` is the
    sum of the values. prometheus-client has no bulk ``observe``, and one call per prediction
    would cost N calls per request; its children keep exactly these per-bucket values in
    ``_buckets`` and the sum in ``_sum`` (what ``observe`` increments, in both the in-memory and
    the multiprocess value class). tests/service/test_drift.py checks the exposition against
    observing every value one by one.
    """
    buckets = child._buckets  # noqa: SLF001 - see the docstring
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))
    child._sum.inc(total)  # noqa: SLF001


def count_unknown_features(names: set[str]) -> None:
    """Count a request's unknown names: all in one total, the first few by (bounded) label."""
    UNKNOWN_FEATURE_NAMES.inc(len(names))
    for name in itertools.islice(names, UNKNOWN_NAMES_BY_LABEL_PER_REQUEST):
        label = name[:UNKNOWN_LABEL_CHARS]
        if label not in _unknown_labels:
            if len(_unknown_labels) >= MAX_UNKNOWN_FEATURE_LABELS:
                label = "_other"
            else:
                _unknown_labels.add(label)
        UNKNOWN_FEATURES.labels(label).inc()


def set_served(old: dict[str, str], new: dict[str, str]) -> None:
    """Update ``vidrank_model_info`` from {role: version} before/after a swap."""
    for role, version in old.items():
        if new.get(role) != version:
            MODEL_INFO.labels(version, role).set(0)
    for role, version in new.items():
        MODEL_INFO.labels(version, role).set(1)
    READY.set(1 if "production" in new else 0)


def set_desired(old: dict[str, str], new: dict[str, str], served: dict[str, str]) -> dict[str, str]:
    """Update ``vidrank_model_desired`` from {role: version} before/after; returns ``new``."""
    for role, version in old.items():
        if new.get(role) != version:
            MODEL_DESIRED.labels(version, role).set(0)
    for role, version in new.items():
        MODEL_DESIRED.labels(version, role).set(1)
    CONVERGED.set(1 if served == new else 0)
    return new


def set_snapshot(old: str | None, new: str | None) -> None:
    """Update ``vidrank_feature_snapshot_info`` after a snapshot switch."""
    if old is not None and old != new:
        FEATURE_SNAPSHOT_INFO.labels(old).set(0)
    if new is not None:
        FEATURE_SNAPSHOT_INFO.labels(new).set(1)


def exposition(multiproc_dir: Path | None) -> tuple[bytes, str]:
    """The Prometheus text exposition (aggregated over workers in multiprocess mode)."""
    if multiproc_dir is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))
    return generate_latest(registry), CONTENT_TYPE_LATEST
