"""Admission for /rank: a bounded queue per worker, request deadlines, no work for absent clients.

A worker ranks ``slots`` requests at a time (a capacity limiter); the others wait. Without a
bound, an overloaded worker queues everything and answers everyone late (at 512 connections the
median reached 1.7 s and a quarter of the clients timed out), computing answers nobody reads.
So:

* at most ``max_queue`` requests wait per worker; one more is shed at once with ``503`` and
  ``Retry-After`` (``Overloaded``), before its body is even read;
* a request has a deadline: ``X-Request-Timeout-Ms`` if sent, else the server default
  (``VIDRANK_REQUEST_TIMEOUT_MS``; 0 = none), counted from the arrival of its first byte. When it
  passes while the request waits, the wait ends with ``504`` (``DeadlineExceeded``): the work
  never starts;
* when a slot frees, a request whose client has hung up is dropped without scoring (``499`` in
  the log, ``ClientGone``).

Every shed and drop is counted in ``vidrank_rank_shed_total{reason}``. Liveness, readiness and
the other routes never pass through here, so they stay fast however long the queue.

Under a storm most requests are sheds, so a shed must cost next to nothing: the worker's
connection protocol (``service/http/protocol.py``) asks :meth:`Admission.full` as soon as a
``POST /rank``'s headers are parsed and answers with :meth:`Admission.shed_app` - a few lines of
ASGI instead of the app's middleware, routing and exception handling. The route's own check
covers everything else (and the TestClient).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from starlette.types import Receive, Scope, Send

from service import metrics
from service.errors import (
    ClientGone,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    domain_error_body,
    http_headers,
)

TIMEOUT_HEADER = "x-request-timeout-ms"
MAX_TIMEOUT_MS = 600_000
_OVERLOADED = Overloaded("overloaded: this worker's queue of /rank requests is full; retry")
_SHED_BODY = domain_error_body(_OVERLOADED)
_SHED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(_SHED_BODY)),
    *((k.lower().encode(), v.encode()) for k, v in (http_headers(_OVERLOADED) or {}).items()),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]


def request_deadline(header: str | None, default_ms: int, arrived_at: float | None) -> float | None:
    """The monotonic deadline of a request, or None when it has none.

    ``header`` is the ``X-Request-Timeout-Ms`` value (a whole number of milliseconds, 1 to
    600000); a malformed one is a 422 naming the header.
    """
    if header is None:
        timeout_ms = default_ms
    else:
        value = header.strip()
        if not (value.isascii() and value.isdigit()) or not 0 < int(value) <= MAX_TIMEOUT_MS:
            raise InvalidRequest(
                f"must be a whole number of milliseconds from 1 to {MAX_TIMEOUT_MS}",
                f"headers.{TIMEOUT_HEADER}",
            )
        timeout_ms = int(value)
    if timeout_ms <= 0:
        return None
    start = arrived_at if arrived_at is not None else time.monotonic()
    return start + timeout_ms / 1000.0


class Admission:
    """The /rank slots of one worker and the bounded queue in front of them."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self.limiter = anyio.CapacityLimiter(slots)
        self.max_queue = max_queue
        self.waiting = 0  # admitted, not yet holding a slot (reading the body, or queued)

    @asynccontextmanager
    async def admit(
        self, deadline: float | None, client_gone: Callable[[], Awaitable[bool]]
    ) -> AsyncIterator[Callable[[], Awaitable[None]]]:
        """Admit a request (or shed it), then yield ``acquire``: wait for a slot, held until exit.

        ``acquire()`` raises ``DeadlineExceeded`` when the deadline passes first and
        ``ClientGone`` when the client left meanwhile.
        """
        if self.full():
            metrics.SHED.labels("queue_full").inc()
            raise _OVERLOADED
        self.waiting += 1
        metrics.QUEUE.inc()
        holding = False
        borrower = object()  # the request, not its task, holds the slot

        async def acquire() -> None:
            nonlocal holding
            await self._acquire(deadline, borrower)
            holding = True
            self._leave()
            if await client_gone():
                metrics.SHED.labels("client_gone").inc()
                raise ClientGone("client disconnected before its request was scored")

        try:
            yield acquire
        finally:
            if holding:
                self.limiter.release_on_behalf_of(borrower)
            else:
                self._leave()

    def full(self) -> bool:
        """Whether one more request would exceed the queue (every slot busy, queue full)."""
        return self.waiting >= self.max_queue and self.limiter.available_tokens < 1

    @staticmethod
    async def shed_app(scope: Scope, receive: Receive, send: Send) -> None:
        """The whole answer to a request shed before the app: 503, Retry-After, error body."""
        metrics.SHED.labels("queue_full").inc()
        metrics.HTTP_REQUESTS.labels("/rank", "POST", "503").inc()
        await send({"type": "http.response.start", "status": 503, "headers": _SHED_HEADERS})
        await send({"type": "http.response.body", "body": _SHED_BODY})

    async def _acquire(self, deadline: float | None, borrower: object) -> None:
        if deadline is not None and time.monotonic() >= deadline:
            metrics.SHED.labels("deadline").inc()
            raise DeadlineExceeded("the request's deadline passed before its work could start")
        wait_s = math.inf if deadline is None else deadline - time.monotonic()
        with anyio.move_on_after(wait_s) as scope:
            await self.limiter.acquire_on_behalf_of(borrower)
        if scope.cancelled_caught:
            metrics.SHED.labels("deadline").inc()
            raise DeadlineExceeded("the request's deadline passed while it waited for a slot")

    def _leave(self) -> None:
        if self.waiting:
            self.waiting -= 1
            metrics.QUEUE.dec()
