"""Overload rows of ``make bench``: answered vs shed latency at c=8 and c=512 (500 candidates).

wrk reports one latency distribution for all responses; these rows need them apart (how fast a
ranked answer comes back vs how fast a 503 does) plus client-side timeouts at 2 s, so this is a
small asyncio client (uvloop when installed): one coroutine per keep-alive connection sends
pre-built requests back to back, like wrk, and records status and latency per response. A
request without an answer within ``timeout_s`` counts as a timeout; its connection is closed and
a new one opened, as an HTTP client with that timeout would.

It is Python, so it costs the machine more CPU per request than wrk: the figures understate what
the server does with a C client, never overstate it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.stats import percentiles_ms

HOST = "127.0.0.1"


@dataclass
class OverloadResult:
    """One run: answered (200) and shed (503) latencies apart, timeouts, other outcomes."""

    connections: int
    duration_s: float
    answered: int
    shed: int
    timeouts: int
    statuses: dict[str, int]
    errors: int
    answered_rps: float
    answered_ms: dict[str, float] = field(default_factory=dict)
    shed_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_requests(bodies: list[bytes], path: str = "/rank") -> list[bytes]:
    """Complete HTTP/1.1 keep-alive requests, one per body."""
    return [
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), HOST.encode(), len(b), b)
        for b in bodies
    ]


class _Tally:
    def __init__(self) -> None:
        self.latency: dict[int, list[float]] = {}
        self.timeouts = 0
        self.errors = 0

    def add(self, status: int, seconds: float) -> None:
        self.latency.setdefault(status, []).append(seconds)


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def _connection(
    port: int, requests: list[bytes], offset: int, stop_at: float, timeout_s: float, t: _Tally
) -> None:
    i = offset
    reader = writer = None
    while time.perf_counter() < stop_at:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            assert reader is not None
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            async with asyncio.timeout(timeout_s):
                status = await _read_response(reader)
            t.add(status, time.perf_counter() - start)
        except TimeoutError:
            t.timeouts += 1
            writer = _close(writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            t.errors += 1
            writer = _close(writer)
            await asyncio.sleep(0.01)
    _close(writer)


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()
    return None


async def _run(
    port: int, requests: list[bytes], connections: int, duration_s: float, timeout_s: float
) -> tuple[_Tally, float]:
    tally = _Tally()
    start = time.perf_counter()
    stop_at = start + duration_s
    await asyncio.gather(
        *(_connection(port, requests, 7 * c, stop_at, timeout_s, tally) for c in range(connections))
    )
    return tally, time.perf_counter() - start


def run_overload(
    port: int, bodies: list[bytes], connections: int, duration_s: float, timeout_s: float = 2.0
) -> OverloadResult:
    """``connections`` keep-alive clients for ``duration_s`` against HOST:``port``."""
    requests = build_requests(bodies)
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    tally, elapsed = runner(_run(port, requests, connections, duration_s, timeout_s))
    answered = tally.latency.get(200, [])
    shed = tally.latency.get(503, [])
    counts = Counter({str(k): len(v) for k, v in tally.latency.items()})
    return OverloadResult(
        connections=connections,
        duration_s=round(elapsed, 2),
        answered=len(answered),
        shed=len(shed),
        timeouts=tally.timeouts,
        statuses=dict(counts),
        errors=tally.errors,
        answered_rps=round(len(answered) / elapsed, 1) if elapsed else 0.0,
        answered_ms=percentiles_ms(answered) if answered else {},
        shed_ms=percentiles_ms(shed) if shed else {},
    )
