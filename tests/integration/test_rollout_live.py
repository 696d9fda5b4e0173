"""Rollout safety with real ``vidrank serve`` processes on loopback: shadow scoring under load,
drift metrics, explanations, and an automatic canary rollback that a second replica follows."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.harness import AUTH, Server, rank_body, vidrank_cmd, wait_until
from benchmarks.harness import metric_value as metric
from model.core.registry import Registry
from model.core.tasks import TASKS
from tests.conftest import SHIFTED_VERSION

Start = Callable[..., Server]
ROLLOUT_ENV = {
    "VIDRANK_ROLLOUT_CHECK_INTERVAL_S": "0.3",
    "VIDRANK_ROLLOUT_WINDOW_S": "60",
    "VIDRANK_CANARY_MIN_REQUESTS": "20",
}


def hammer(
    url: str, clients: int, per_client: int, n: int, bodies: list[dict] | None = None
) -> list[str]:
    """``clients`` threads each sending ``per_client`` /rank requests (of ``n`` made-up
    candidates, or taken in turn from ``bodies``); returns the failures."""
    failures: list[str] = []

    def client(seed: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for i in range(per_client):
                if bodies:
                    body = bodies[(seed * per_client + i) % len(bodies)]
                else:
                    body = rank_body(n, user_id=f"u{seed}-{i}", seed=seed * 1000 + i)
                try:
                    r = http.post("/rank", json=body)
                except httpx.HTTPError as e:
                    failures.append(repr(e))
                    continue
                if r.status_code != 200:
                    failures.append(r.text)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def test_shadow_under_load_adds_no_errors_and_its_queue_stays_bounded(
    start_server: Start, live_registry: Path, version: str
) -> None:
    capacity = 3
    env = {**ROLLOUT_ENV, "VIDRANK_SHADOW_QUEUE_SIZE": str(capacity)}
    server = start_server(live_registry, workers=2, env=env)
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as admin:
        body = {"version": "v2", "percent": 100, "reason": "live shadow"}
        assert admin.put("/admin/shadow", json=body).status_code == 200

        def every_worker_shadows() -> bool:  # fresh connections land on either worker
            return all(
                httpx.get(f"{server.url}/models", timeout=10).json()["serving"]["shadow"]
                for _ in range(16)
            )

        wait_until(every_worker_shadows, 30, "both workers to load the shadow")
        depths: list[int] = []
        stop = threading.Event()

        def watch_queue() -> None:  # the queue never holds more than its capacity
            while not stop.is_set():
                shadow = admin.get("/models").json()["shadow"]
                if shadow is not None:
                    depths.append(shadow["queue"]["depth"])
                time.sleep(0.01)

        watcher = threading.Thread(target=watch_queue)
        watcher.start()
        clients, per_client = 4, 15
        try:
            failures = hammer(server.url, clients, per_client, 200)
        finally:
            stop.set()
            watcher.join()
        assert not failures, failures[:3]
        sent = clients * per_client
        text = ""

        def all_accounted() -> bool:  # every sampled request was compared or dropped
            nonlocal text
            text = admin.get("/metrics").text
            outcomes = metric(text, "vidrank_shadow_requests_total")
            return outcomes == sent and metric(text, "vidrank_shadow_queue_depth") == 0

        wait_until(all_accounted, 60, "the shadow queue to drain")
        compared = metric(text, "vidrank_shadow_requests_total", {"outcome": "compared"})
        dropped = metric(text, "vidrank_shadow_requests_total", {"outcome": "dropped"})
        assert compared > 0 and compared + dropped == sent, text
        assert metric(text, "vidrank_shadow_requests_total", {"outcome": "failed"}) == 0
        assert depths and max(depths) <= capacity
        labels = {"version": version, "shadow": "v2"}
        assert metric(text, "vidrank_shadow_kendall_tau_count", labels) == compared
        # Same weights: every compared request agreed on its top 10.
        assert metric(text, "vidrank_shadow_top10_overlap_sum", labels) == compared
        # Every response was a 200; none waited for the shadow (the access log's latency ends
        # when the response is written, and no request failed).
        assert (
            metric(text, "vidrank_http_requests_total", {"route": "/rank", "status": "200"}) == sent
        )
    server.stop()
    assert "Traceback" not in server.logs()


def test_explain_and_drift_metrics_over_http(
    start_server: Start,
    live_registry: Path,
    version: str,
    shifted_bundle: Path,
    heldout_bodies: list[dict],
) -> None:
    Registry(live_registry).publish(shifted_bundle)
    server = start_server(live_registry, env=ROLLOUT_ENV)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        # Traffic drawn from the held-out data, which the manifest's distribution describes.
        r = http.post("/rank", json={**heldout_bodies[0], "explain": True})
        assert r.status_code == 200, r.text
        for item in r.json()["items"]:
            total = 0.0
            for task in TASKS:
                total += item["explain"][task]
            assert total == item["score"]
        for body in heldout_bodies[1:11]:
            assert http.post("/rank", json=body).status_code == 200

        def counted(served: str, n: int) -> bool:  # the monitor moved the counts into Prometheus
            like = {"task": "like", "version": served}
            return metric(http.get("/metrics").text, "vidrank_prediction_count", like) == n

        wait_until(lambda: counted(version, 1100), 30, "the prediction histograms")
        text = http.get("/metrics").text
        healthy = {}
        for task in TASKS:
            psi = metric(text, "vidrank_prediction_psi", {"task": task, "version": version})
            assert 0 <= psi < 0.1  # serving looks like the held-out data
            healthy[task] = psi
        # The shifted export in production, on the same traffic: its like predictions move, and
        # its PSI with them; its click predictions are the healthy model's, and so is their PSI.
        r = http.post(f"/admin/models/{SHIFTED_VERSION}/activate", headers=AUTH)
        assert r.status_code == 200, r.text
        for body in heldout_bodies[:11]:
            assert http.post("/rank", json=body).status_code == 200
        wait_until(lambda: counted(SHIFTED_VERSION, 1100), 30, "the shifted version's histograms")
        text = http.get("/metrics").text
        like = {"task": "like", "version": SHIFTED_VERSION}
        assert metric(text, "vidrank_prediction_psi", like) > 1.0
        click = {"task": "click", "version": SHIFTED_VERSION}
        assert metric(text, "vidrank_prediction_psi", click) == pytest.approx(healthy["click"])
        assert metric(text, "vidrank_prediction_bucket", {**like, "le": "0.05"}) == 0


def models(server: Server) -> Any:
    return httpx.get(f"{server.url}/models", timeout=10).json()


def canary_status(server: Server) -> Any:
    return models(server)["serving"]["canary"]


def test_shifted_canary_rolled_back_and_second_replica_converges(
    start_server: Start,
    live_registry: Path,
    version: str,
    shifted_bundle: Path,
    heldout_bodies: list[dict],
) -> None:
    registry = Registry(live_registry)
    registry.publish(shifted_bundle)
    a = start_server(live_registry, env=ROLLOUT_ENV)
    b = start_server(live_registry, env=ROLLOUT_ENV)
    # The PSI bound is what this test is about; a latency bound would judge the machine's load.
    policy = {"max_psi": 0.5, "min_requests": 20, "max_p99_ratio": 1000.0}
    with httpx.Client(base_url=a.url, headers=AUTH, timeout=60) as admin:
        # A healthy canary (the same weights) under the same traffic: judged, and kept.
        body = {"version": "v2", "percent": 50, "policy": policy, "reason": "healthy"}
        assert admin.put("/admin/canary", json=body).status_code == 200
        wait_until(lambda: canary_status(b) is not None, 30, "replica b to serve the canary")

        def judged(canary: str) -> bool:  # the monitor judged >= min_requests of its traffic
            health = models(a)["canary_health"]
            return bool(health and health["version"] == canary and health["requests"] >= 20)

        deadline = time.monotonic() + 60
        while not judged("v2"):
            assert time.monotonic() < deadline, "the healthy canary was never judged"
            assert not hammer(a.url, 2, 20, 100, heldout_bodies)
        health = models(a)["canary_health"]
        assert health["verdict"] is None and health["psi"]["like"] < 0.5, health
        assert registry.read_aliases().canary is not None
        assert canary_status(a)["version"] == "v2" and canary_status(b)["version"] == "v2"
        # The shifted export as canary; only replica a gets traffic, so only a can judge it.
        body = {"version": SHIFTED_VERSION, "percent": 50, "policy": policy, "reason": "shifted"}
        assert admin.put("/admin/canary", json=body).status_code == 200
        deadline = time.monotonic() + 60
        while registry.read_aliases().canary is not None:
            assert time.monotonic() < deadline, f"no rollback: {models(a)['canary_health']}"
            assert not hammer(a.url, 2, 20, 100, heldout_bodies)
    # Replica b converges on the removal by polling the registry.
    wait_until(lambda: canary_status(b) is None, 30, "replica b to drop the canary")
    assert canary_status(a) is None
    assert registry.read_aliases().production == version  # production is never rolled back
    rollbacks = [
        metric(
            httpx.get(f"{s.url}/metrics").text, "vidrank_canary_rollbacks_total", {"reason": "psi"}
        )
        for s in (a, b)
    ]
    assert rollbacks == [1.0, 0.0]
    last = registry.history.read()[-1]
    assert (last["action"], last["actor"], last["from"], last["to"]) == (
        "auto_rollback", "auto-rollback", SHIFTED_VERSION, None
    )  # fmt: skip
    assert last["reason"].startswith("psi: PSI of like")
    assert any(r.get("msg") == "canary rolled back automatically" for r in a.log_records())
    # The CLI prints the same history.
    out = subprocess.run(
        vidrank_cmd("models", "history", "--registry", str(live_registry)),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    lines = out.splitlines()
    assert "auto_rollback" in lines[-1] and f"{SHIFTED_VERSION} -> -" in lines[-1]
    assert "canary_set" in lines[-2] and "admin-api" in lines[-2] and "shifted" in lines[-2]
