"""The contract over a real ``vidrank serve`` (uvicorn on loopback): what only HTTP shows.

A request id with CR/LF used to be echoed into the ``x-request-id`` header after the response had
started, so the HTTP layer dropped the connection with no answer; and strings a client sent were
cached for good, so distinct long ids grew a worker's memory without bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from benchmarks.harness import Server, rank_body, rss_bytes
from service.scoring.request import MAX_DEPTH

Start = Callable[..., Server]


BAD_REQUEST_IDS = [
    *("a\r\nX-Injected: 1", "nul\x00byte", "bell\x07", "del\x7f", "tail\n", " edge"),
    *("nel\x85line", "csi\x9b", "ls\u2028line", "ps\u2029para"),  # C1 and Unicode line ends
]


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
        # The header follows the same rule (read as Latin-1: bytes 0x80-0x9f are C1): ignored.
        for raw in (b"nel\x85line", b"csi\x9bx", b"tab\tx"):
            r = http.post("/rank", json=rank_body(3), headers={"x-request-id": raw})
            assert r.status_code == 200 and r.headers["x-request-id"].isalnum(), raw
    server.stop()
    assert "Traceback" not in server.logs()


def _with_raw(body: dict[str, Any], key: str, raw: bytes) -> bytes:
    """``body`` as JSON with ``"context": {key: raw}``, ``raw`` spliced in unparsed."""
    body["context"] = {key: 0}
    return orjson.dumps(body).replace(b'"%s":0' % key.encode(), b'"%s":%s' % (key.encode(), raw))


def test_non_finite_numbers_are_422_at_any_depth_deep_bodies_400(
    start_server: Start, live_registry: Path
) -> None:
    """A number beyond a double's range is non-finite as NaN is; a NaN at any depth orjson
    accepts names its field; past orjson's nesting limit the body is malformed, NaN or not."""
    server = start_server(live_registry)
    headers = {"content-type": "application/json"}
    depth = MAX_DEPTH - 2  # the body and its context object are two levels
    cases = [
        (b"1" + b"0" * 400, 422, "context.big"),
        (b"-" + b"9" * 400, 422, "context.big"),
        (b"[" * depth + b"NaN" + b"]" * depth, 422, "context.big" + "[0]" * 20),
        (b"[" * (depth + 1) + b"NaN" + b"]" * (depth + 1), 400, None),
        (b'[[NaN]], "deep": ' + b"[" * (depth + 1) + b"]" * (depth + 1), 400, None),
    ]
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for raw, status, field in cases:
            r = http.post("/rank", content=_with_raw(rank_body(3), "big", raw), headers=headers)
            assert r.status_code == status, (raw[:30], r.text[:300])
            error = r.json()["error"]
            if field is None:
                assert error["code"] == "malformed_json", error
            else:
                assert error["details"]["field"].startswith(field), error
        depth_ok = b"[" * depth + b"]" * depth  # the limit itself is fine: ignored context
        r = http.post("/rank", content=_with_raw(rank_body(3), "big", depth_ok), headers=headers)
        assert r.status_code == 200, r.text[:300]
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
