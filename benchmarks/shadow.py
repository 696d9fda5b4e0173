"""What shadow scoring costs: one server, the reference N, no shadow vs a 100 % shadow, in turns.

The shadow is a copy of the served model under another name: the same work as a real candidate
version, and identical rankings (so the run also checks the comparison end to end: top-10
overlap 1). Modes alternate (none, shadow, none, shadow) on one server process so that drift of
the machine's load hits both alike; each mode reports the median of its runs. Between runs the
shadow queue is left to drain, so no run inherits the previous one's backlog.

What the issue asks of the figures: at c=1 the p50 with a shadow stays within noise of the p50
without (the shadow scores after the response was sent, usually on the idle core), and at c=8 the
throughput drops by no more than the shadow's own scoring work. That bound is

    cpu_none / (cpu_none + compared_share * shadow_cpu)

the throughput the server would keep if it spent, on top of every request's own CPU, the shadow's
scoring CPU for the share of requests it compared (under saturation the bounded queue drops the
rest).
"""

from __future__ import annotations

import json
import time
from statistics import median
from typing import Any

from benchmarks.harness import ADMIN_TOKEN, Server, http_request, metric_value

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MODES = ("none", "shadow")
ROUNDS = 2
POLL_INTERVAL_S = 0.5  # the server's: how soon every worker follows a shadow change
SETTLE_S = 3.0  # a few polls plus loading and warming the shadow in the other workers


def set_shadow(server: Server, version: str | None) -> None:
    """Shadow ``version`` at 100 % (None: no shadow) through the admin API."""
    if version is None:
        status, body = http_request(server.port, "DELETE", "/admin/shadow", headers=AUTH)
    else:
        payload = json.dumps({"version": version, "percent": 100, "reason": "benchmark"}).encode()
        status, body = http_request(server.port, "PUT", "/admin/shadow", payload, AUTH)
    if status != 200:
        raise RuntimeError(f"shadow {version}: HTTP {status} {body[:300]!r}")
    time.sleep(SETTLE_S)  # every worker now serves the change (idle: no load runs meanwhile)


def shadow_counters(server: Server) -> dict[str, float]:
    """The shadow's outcome counters and scoring time so far (all workers)."""
    text = http_request(server.port, "GET", "/metrics")[1].decode()
    out = {
        outcome: metric_value(text, "vidrank_shadow_requests_total", {"outcome": outcome})
        for outcome in ("compared", "dropped", "stale", "failed")
    }
    out["scoring_s"] = metric_value(text, "vidrank_shadow_scoring_seconds_sum")
    out["cpu_s"] = metric_value(text, "vidrank_shadow_cpu_seconds_total")
    out["queue_depth"] = metric_value(text, "vidrank_shadow_queue_depth")
    return out


def drain(server: Server, timeout_s: float = 30.0) -> None:
    """Wait until no shadow request is queued."""
    deadline = time.monotonic() + timeout_s
    while shadow_counters(server)["queue_depth"] > 0 and time.monotonic() < deadline:
        time.sleep(0.05)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after if k != "queue_depth"}


def measure(
    server: Server, shadow_version: str, run: Any, connections: int
) -> dict[str, list[dict[str, Any]]]:
    """Alternate the modes; ``run(connections)`` is one load run returning its result dict."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(ROUNDS):
        for mode in MODES:
            set_shadow(server, shadow_version if mode == "shadow" else None)
            pair: dict[str, Any] = {}
            for key, c in (("c1", 1), ("c8", connections)):
                drain(server)
                before = shadow_counters(server)
                pair[key] = run(c)
                pair[key]["shadow"] = _delta(shadow_counters(server), before)
            runs[mode].append(pair)
    set_shadow(server, None)
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]], cores: int) -> dict[str, Any]:
    """Medians per mode, the p50 and throughput ratios, and the throughput bound."""
    out: dict[str, Any] = {}
    for mode, pairs in runs.items():
        c8 = [p["c8"] for p in pairs]
        cpu = [sum(r["server_cpu_s"].values()) * 1000 / r["requests"] for r in c8 if r["requests"]]
        compared = sum(r["shadow"]["compared"] for r in c8)
        requests = sum(r["requests"] for r in c8)
        out[mode] = {
            "p50_ms_c1": median(p["c1"]["latency_ms"]["p50"] for p in pairs),
            "p99_ms_c1": median(p["c1"]["latency_ms"]["p99"] for p in pairs),
            "rps_c8": median(r["rps"] for r in c8),
            "cpu_ms_per_request_c8": median(cpu) if cpu else None,
            "compared_share_c1": _share(pairs, "c1"),
            "compared_share_c8": compared / requests if requests else None,
            "shadow_ms_per_compared": _shadow_ms(pairs),  # CPU
            "shadow_wall_ms_per_compared": _shadow_ms(pairs, "scoring_s"),
            "errors": sum(sum(p[k]["errors"].values()) for p in pairs for k in ("c1", "c8")),
        }
    none, shadow = out["none"], out["shadow"]
    out["p50_ratio"] = shadow["p50_ms_c1"] / none["p50_ms_c1"]
    out["rps_ratio"] = shadow["rps_c8"] / none["rps_c8"]
    extra = (shadow["compared_share_c8"] or 0.0) * (shadow["shadow_ms_per_compared"] or 0.0)
    base = none["cpu_ms_per_request_c8"]
    out["rps_ratio_bound"] = base / (base + extra) if base else None
    out["cores"] = cores
    return out


def _share(pairs: list[dict[str, Any]], key: str) -> float | None:
    compared = sum(p[key]["shadow"]["compared"] for p in pairs)
    requests = sum(p[key]["requests"] for p in pairs)
    return compared / requests if requests else None


def _shadow_ms(pairs: list[dict[str, Any]], what: str = "cpu_s") -> float | None:
    """Shadow milliseconds (CPU, or wall with ``scoring_s``) per compared request."""
    seconds = sum(p[k]["shadow"][what] for p in pairs for k in ("c1", "c8"))
    compared = sum(p[k]["shadow"]["compared"] for p in pairs for k in ("c1", "c8"))
    return seconds * 1000 / compared if compared else None
