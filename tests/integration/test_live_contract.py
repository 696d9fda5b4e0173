"""The contract over a real ``vidrank serve`` (uvicorn on loopback): what only HTTP shows.

A request id with CR/LF used to be echoed into the ``x-request-id`` header after the response had
started, so the HTTP layer dropped the connection with no answer; and strings a client sent were
cached for good, so distinct long ids grew a worker's memory without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from benchmarks.harness import Server, rank_body, rss_bytes

Start = Callable[..., Server]


BAD_REQUEST_IDS = ["a\r\nX-Injected: 1", "nul\x00byte", "bell\x07", "del\x7f", "tail\n", " edge"]


def test_control_characters_in_request_id_are_a_422_not_a_dropped_connection(
    start_server: Start, live_registry: Path
) -> None:
    server = start_server(live_registry)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for i, request_id in enumerate(BAD_REQUEST_IDS):
            r = http.post("/rank", json=rank_body(3, request_id=request_id))
            assert r.status_code == 422, (request_id, r.text)
            assert r.json()["error"]["details"]["field"] == "request_id"
            assert "X-Injected" not in r.headers
            ok = http.post("/rank", json=rank_body(3, request_id=f"fine-{i}"))  # same connection
            assert ok.status_code == 200 and ok.headers["x-request-id"] == f"fine-{i}"
    server.stop()
    assert "Traceback" not in server.logs()


def test_distinct_long_ids_do_not_grow_memory(start_server: Start, live_registry: Path) -> None:
    """Requests with distinct 4 MB ids are refused; the worker keeps none of them."""
    server = start_server(live_registry)
    (pid,) = server.worker_pids()

    def send(i: int) -> None:
        body = rank_body(2)
        body["candidates"][1]["video_id"] = f"{i:04d}" + "v" * (4 << 20)
        body["candidates"][0]["features"]["music_id"] = f"{i:04d}" + "m" * (1 << 20)
        r = httpx.post(f"{server.url}/rank", json=body, timeout=30)
        assert r.status_code == 422, r.text[:300]
        assert r.json()["error"]["details"]["field"] == "candidates[1].video_id"
        assert len(r.content) < 1000  # the id is not echoed back

    for i in range(3):  # warm up: parser buffers and the allocator reach their steady size
        send(i)
    rss_before = rss_bytes(pid) or 0
    for i in range(3, 17):  # 14 x 5 MB of distinct strings: ~70 MB if they were kept
        send(i)
    grown = (rss_bytes(pid) or 0) - rss_before
    assert grown < 20 << 20, f"RSS grew by {grown / 2**20:.0f} MiB (pid {pid})"
    assert httpx.post(f"{server.url}/rank", json=rank_body(5)).status_code == 200
