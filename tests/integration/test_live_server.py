"""Real ``vidrank serve`` processes on loopback: swap under load, convergence, drain, no torch."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from benchmarks.harness import (
    AUTH,
    HOST,
    Server,
    http_request,
    listening,
    metric_value,
    rank_body,
    wait_until,
)

Start = Callable[..., Server]
RANK_QUEUE = "vidrank_rank_queue"


def test_rank_health_metrics_over_http(
    start_server: Start, live_registry: Path, version: str
) -> None:
    server = start_server(live_registry)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/healthz").status_code == 200
        r = http.post("/rank", json={**rank_body(100), "top_k": 10, "request_id": "it-1"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request_id"] == "it-1" and body["model_version"] == version
        scores = [it["score"] for it in body["items"]]
        assert len(scores) == 10 and scores == sorted(scores, reverse=True)
        r = http.post("/rank", json={"user": {"user_id": 1}, "candidates": [{"video_id": 1.5}]})
        assert r.status_code == 422
        assert r.json()["error"]["details"]["field"] == "candidates[0].video_id"
        metrics = http.get("/metrics").text
        assert 'vidrank_http_requests_total{method="POST",route="/rank",status="200"}' in metrics
    server.stop()
    # One JSON access-log line per request, with the fields operators need and never the body.
    rank_lines = [
        rec
        for rec in server.log_records()
        if rec.get("msg") == "request" and rec["route"] == "/rank"
    ]
    assert {"request_id", "status", "latency_ms", "model_version", "candidates"} <= set(
        rank_lines[0]
    )
    assert any(rec["request_id"] == "it-1" and rec["candidates"] == 100 for rec in rank_lines)
    assert "duration_s" not in server.logs()


def test_swap_under_load(start_server: Start, live_registry: Path, version: str) -> None:
    """A client ranks continuously while activate/rollback alternate: no request fails."""
    server = start_server(live_registry)
    stop = threading.Event()
    statuses: list[int] = []
    versions: set[str] = set()
    failures: list[str] = []

    def client(seed: int) -> None:
        body = rank_body(200, seed=seed)
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post("/rank", json=body)
                except httpx.HTTPError as e:  # a dropped connection counts as a failure
                    failures.append(repr(e))
                    continue
                statuses.append(r.status_code)
                if r.status_code == 200:
                    versions.add(r.json()["model_version"])
                else:
                    failures.append(r.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as admin:
            for _ in range(10):
                r = admin.post("/admin/models/v2/activate")
                assert r.status_code == 200, r.text
                time.sleep(0.05)
                r = admin.post("/admin/models/rollback")
                assert r.status_code == 200, r.text
                assert r.json()["serving"]["production"] == version
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert len(statuses) > 50 and set(statuses) == {200}
    assert versions == {version, "v2"}


def test_swaps_rank_a_request_identically(
    start_server: Start, live_registry: Path, version: str
) -> None:
    """v2 is the same bundle as ``version``: after each swap (in a worker whose heap thresholds
    are pinned, so each load lands in fresh mappings) a fixed request ranks exactly as before."""
    server = start_server(live_registry)
    body = {**rank_body(300, seed=7), "top_k": 300}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:

        def ranked() -> tuple[str, list[dict[str, Any]]]:
            r = http.post("/rank", json=body)
            assert r.status_code == 200, r.text
            return r.json()["model_version"], r.json()["items"]

        served, first = ranked()
        assert served == version and len(first) == 300
        for target, path in (
            ("v2", "/admin/models/v2/activate"),
            (version, "/admin/models/rollback"),
        ):
            assert http.post(path).status_code == 200
            served, items = ranked()
            assert served == target and items == first
    server.stop()
    assert any(rec.get("msg") == "heap thresholds pinned" for rec in server.log_records())


def test_two_servers_converge_after_one_activation(
    start_server: Start, live_registry: Path, version: str
) -> None:
    a = start_server(live_registry)
    b = start_server(live_registry)
    r = httpx.post(f"{a.url}/admin/models/v2/activate", headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    wait_until(
        lambda: httpx.get(f"{b.url}/models").json()["serving"]["production"] == "v2",
        15,
        "the second server serving v2",
        b,
    )
    assert httpx.post(f"{b.url}/rank", json=rank_body(5)).json()["model_version"] == "v2"
    assert httpx.get(f"{b.url}/readyz").status_code == 200


def test_canary_stickiness_over_http(
    start_server: Start, live_registry: Path, version: str
) -> None:
    server = start_server(live_registry)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        r = http.put("/admin/canary", json={"version": "v2", "percent": 50}, headers=AUTH)
        assert r.status_code == 200, r.text
        per_user: dict[Any, set[str]] = {}
        for user in range(30):
            for i in range(5):
                body = rank_body(3, user_id=f"user-{user}", seed=i)
                per_user.setdefault(user, set()).add(
                    http.post("/rank", json=body).json()["model_version"]
                )
        assert all(len(v) == 1 for v in per_user.values())
        assert set().union(*per_user.values()) == {version, "v2"}


def queued(server: Server) -> float:
    """The server's /rank requests admitted and not yet scoring (reading the body, or waiting)."""
    return metric_value(http_request(server.port, "GET", "/metrics")[1].decode(), RANK_QUEUE)


def test_sigterm_drains_an_in_flight_request(start_server: Start, live_registry: Path) -> None:
    """A request in flight when SIGTERM arrives is answered in full, then the server exits 0.

    The client holds the request in flight itself: it sends the headers and half the body, waits
    until the server has admitted the request (the /rank queue gauge counts it while its body
    is read), sends SIGTERM, waits until the server stops accepting connections (it is shutting
    down), and only then sends the rest of the body.
    """
    server = start_server(live_registry)
    n = 200
    body = json.dumps(rank_body(n)).encode()
    head = (
        b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    half = len(body) // 2
    with socket.create_connection((HOST, server.port), timeout=60) as sock:
        sock.sendall(head + body[:half])
        wait_until(lambda: queued(server) == 1, 30, "the request admitted", server)
        server.signal()
        wait_until(lambda: not listening(server.port), 30, "the server shutting down", server)
        assert server.alive()  # still draining: the request is not answered yet
        sock.sendall(body[half:])
        response = http.client.HTTPResponse(sock)
        response.begin()
        answer = json.loads(response.read())
    assert response.status == 200, answer
    assert len(answer["items"]) == n
    assert server.wait() == 0
    assert "Traceback" not in server.logs()


def test_serves_with_torch_absent(
    start_server: Start, live_registry: Path, tmp_path: Path, version: str
) -> None:
    """The server process runs with any import of torch made impossible, and never tries."""
    site = tmp_path / "no_torch"
    site.mkdir()
    marker = tmp_path / "torch_import_attempted"
    (site / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            class _BlockTorch:
                def find_spec(self, name, path=None, target=None):
                    if name == "torch" or name.startswith("torch."):
                        open({str(marker)!r}, "a").write(name + "\\n")
                        raise ImportError("torch is blocked in this process")
                    return None

            sys.meta_path.insert(0, _BlockTorch())
            """
        )
    )
    server = start_server(live_registry, python_path=site)
    r = httpx.post(f"{server.url}/rank", json=rank_body(20), timeout=10)
    assert r.status_code == 200 and r.json()["model_version"] == version
    assert server.stop() == 0
    assert not marker.exists(), marker.read_text()


def test_service_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import model.core.features, model.core.bundle, model.core.registry, model.cli\n"
        "import service.http.app, service.http.server, service.rollout.reconciler\n"
        "import service.scoring.scorer, model.core.fusion\n"
        "from service.http.app import create_app\n"
        "from service.settings import Settings\n"
        "create_app(Settings(registry='/nonexistent'))\n"
        "heavy = [m for m in ('torch', 'onnx', 'pandas') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_two_workers(start_server: Start, live_registry: Path, version: str) -> None:
    server = start_server(live_registry, workers=2)
    body = rank_body(5)
    # Keep-alive requests on one connection. TCP_NODELAY on the listener the workers accept on
    # (without it each would wait ~45 ms) is checked on the socket: tests/service/test_server.py.
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for _ in range(60):
            r = http.post("/rank", json=body)
            assert r.status_code == 200 and r.json()["model_version"] == version
    # Fresh connections spread over both workers (SO_REUSEPORT, one socket each).
    for _ in range(40):
        assert httpx.post(f"{server.url}/rank", json=body, timeout=10).status_code == 200
    metrics = httpx.get(f"{server.url}/metrics").text  # aggregated over the workers
    line = f'vidrank_rank_requests_total{{model_version="{version}"}}'
    count = next(float(x.split()[-1]) for x in metrics.splitlines() if x.startswith(line))
    assert count >= 100
    assert server.stop() == 0
    pids = {
        rec["pid"]
        for rec in server.log_records()
        if rec.get("msg") == "request" and rec.get("route") == "/rank"
    }
    assert len(pids) == 2, pids


def test_supervisor_restarts_a_dead_worker(start_server: Start, live_registry: Path) -> None:
    import os
    import signal

    server = start_server(live_registry, workers=2)

    def worker_pids() -> list[int]:
        return [r["pid"] for r in server.log_records() if r.get("msg") == "worker starting"]

    wait_until(lambda: len(worker_pids()) == 2, 30, "two workers started", server)
    os.kill(worker_pids()[0], signal.SIGKILL)
    wait_until(lambda: len(worker_pids()) == 3, 30, "a third worker started", server)
    assert any(r.get("msg") == "worker died" for r in server.log_records())
    server.wait_ready()
    for _ in range(20):  # whichever worker a connection lands on, it answers
        assert httpx.post(f"{server.url}/rank", json=rank_body(3), timeout=10).status_code == 200
    assert server.stop() == 0
