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
    # Opening a connection: a shed ends its connection, and a worker with no free place accepts
    # none (its short accept queue full, the kernel drops the SYN until TCP retries): this is
    # the wait a client spends before it can send, outside the request latencies above.
    connects: int = 0
    connect_ms: dict[str, float] = field(default_factory=dict)

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
        self.connects: list[float] = []  # seconds from connect() to connected

    def add(self, status: int, seconds: float) -> None:
        self.latency.setdefault(status, []).append(seconds)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status of the next response and whether the connection stays open after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    keep = True
    for line in head.split(b"\r\n"):
        name = line[:16].lower()
        if name.startswith(b"content-length:"):
            length = int(line[15:])
        elif name.startswith(b"connection:"):
            keep = b"close" not in line[11:].lower()
    await reader.readexactly(length)
    return status, keep


async def _connection(
    port: int, requests: list[bytes], offset: int, stop_at: float, timeout_s: float, t: _Tally
) -> None:
    i = offset
    reader = writer = None
    while time.perf_counter() < stop_at:
        try:
            if writer is None:
                start = time.perf_counter()
                try:  # a connect still waiting when the run ends is abandoned, not counted
                    async with asyncio.timeout(max(stop_at - start, 0.001)):
                        reader, writer = await asyncio.open_connection(HOST, port)
                except TimeoutError:
                    break
                t.connects.append(time.perf_counter() - start)
            assert reader is not None
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            async with asyncio.timeout(timeout_s):
                status, keep = await _read_response(reader)
            t.add(status, time.perf_counter() - start)
            if not keep:  # the server ends the connection after this answer (a shed): reconnect
                _close(writer)
                writer = None
        except TimeoutError:
            t.timeouts += 1
            _close(writer)
            writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError):
            t.errors += 1
            _close(writer)
            writer = None
            await asyncio.sleep(0.01)
    _close(writer)


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        with contextlib.suppress(Exception):
            writer.close()


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
        connects=len(tally.connects),
        connect_ms=percentiles_ms(tally.connects) if tally.connects else {},
    )
