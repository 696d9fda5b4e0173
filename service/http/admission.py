"""Admission for /rank: in-flight work bounded per worker, request deadlines, no work for absent
clients.

A worker ranks ``slots`` requests at a time, each in a rank thread of its own; the others wait.
Without a bound, an overloaded worker queues everything and answers everyone late (at 512
connections the median reached 1.7 s and a quarter of the clients timed out), computing answers
nobody reads. So:

* at most ``slots + max_queue`` /rank requests are in flight per worker (reading their body,
  queued or ranking); one more is shed at once with ``503`` and ``Retry-After``
  (``Overloaded``). The worker's connection protocol (``service/http/protocol.py``) decides when
  a request's head arrives (:meth:`Admission.reserve`), so a shed request's body is neither read
  by the app nor parsed, and its 503 is pre-built bytes;
* a request has a deadline: ``X-Request-Timeout-Ms`` if sent, else the server default
  (``VIDRANK_REQUEST_TIMEOUT_MS``; 0 = none), counted from the arrival of its first byte. When it
  passes while the request waits, the wait ends with ``504`` (``DeadlineExceeded``): the work
  never starts;
* a request whose client has hung up by the time a rank thread takes it is dropped without
  scoring (``499`` in the log, ``ClientGone``).

The queue is the rank threads' own (a ``ThreadPoolExecutor``): a thread that finishes one request
takes the next at once. Handing slots out from the event loop instead (a capacity limiter, then
a thread per request) left the rank thread idle about 40 % of the time under overload (py-spy, 64
clients, 500 candidates): every hand-off waited for the loop to get through the sheds and reads
of its other connections first.

Every shed and drop is counted in ``vidrank_rank_shed_total{reason}``. Liveness, readiness and
the other routes never pass through here, so they stay fast however long the queue.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio

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
TICKET = "rank_ticket"  # scope["state"] key of the place the protocol reserved for a request
OVERLOADED = Overloaded("overloaded: this worker's queue of /rank requests is full; retry")
SHED_BODY = domain_error_body(OVERLOADED)
SHED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(SHED_BODY)),
    *((k.lower().encode(), v.encode()) for k, v in (http_headers(OVERLOADED) or {}).items()),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]
T = TypeVar("T")


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


class Client:
    """Whether a connection's client is gone: set by the protocol, read by the rank thread."""

    __slots__ = ("gone",)

    def __init__(self) -> None:
        self.gone = False


class Ticket:
    """One admitted request's place among the worker's in-flight /rank work."""

    __slots__ = ("admission", "client", "started", "released")

    def __init__(self, admission: Admission, client: Client) -> None:
        self.admission = admission
        self.client = client
        self.started = False  # a rank thread took it (set there; read here once it is done)
        self.released = False

    def release(self) -> None:
        """Give the place back (idempotent; event loop only)."""
        if not self.released:
            self.released = True
            self.admission.in_flight -= 1
            if not self.started:
                metrics.QUEUE.dec()
            if self.admission.on_release is not None:
                self.admission.on_release()


class Admission:
    """The /rank rank threads of one worker and the bound on the work in front of them."""

    def __init__(self, slots: int, max_queue: int) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self.in_flight = 0  # holding a ticket: reading the body, queued or ranking
        # Called on the event loop each time a place frees: the worker's acceptor resumes
        # accepting connections (service/http/accept.py).
        self.on_release: Callable[[], None] | None = None
        self.held = 0  # places held for accepted connections until their first request head
        # Threads start on first use and idle between requests; the interpreter joins them at
        # exit, after uvicorn's graceful shutdown has waited for every request in flight.
        self._pool = ThreadPoolExecutor(slots, thread_name_prefix="vidrank-rank")

    def room(self) -> int:
        """Places free for more /rank requests: ``slots + max_queue`` minus those in flight and
        those held for connections just accepted (``service/http/accept.py``)."""
        return self.slots + self.max_queue - self.in_flight - self.held

    def reserve(self, client: Client | None = None) -> Ticket | None:
        """A place for one more request, or None when none is free (``room``)."""
        if self.room() <= 0:
            return None
        self.in_flight += 1
        metrics.QUEUE.inc()
        return Ticket(self, client or Client())

    @asynccontextmanager
    async def admit(self, reserved: Ticket | None) -> AsyncIterator[Ticket]:
        """The request's ticket (the protocol's, else a new one), released on exit; sheds with
        ``Overloaded`` when there is no room."""
        ticket = reserved or self.reserve()
        if ticket is None:
            metrics.SHED.labels("queue_full").inc()
            raise OVERLOADED
        try:
            yield ticket
        finally:
            ticket.release()

    async def run(
        self,
        ticket: Ticket,
        deadline: float | None,
        fn: Callable[..., T],
        *args: Any,
    ) -> T:
        """``fn(*args)`` in a rank thread once one is free; ``DeadlineExceeded`` (504) when the
        deadline passes first, ``ClientGone`` when the client left meanwhile."""
        job: Future[T] = self._pool.submit(_start, ticket, deadline, fn, *args)
        waiting = asyncio.wrap_future(job)
        wait_s = math.inf if deadline is None else deadline - time.monotonic()
        with anyio.move_on_after(wait_s):
            return await asyncio.shield(waiting)
        if job.cancel():  # still queued: it never runs
            metrics.SHED.labels("deadline").inc()
            raise DeadlineExceeded("the request's deadline passed while it waited for a slot")
        return await waiting  # it started just in time: its answer stands


def _start(ticket: Ticket, deadline: float | None, fn: Callable[..., T], *args: Any) -> T:
    """A queued request reaching its rank thread: drop it if late or abandoned, else run it."""
    ticket.started = True
    metrics.QUEUE.dec()
    if deadline is not None and time.monotonic() >= deadline:
        metrics.SHED.labels("deadline").inc()
        raise DeadlineExceeded("the request's deadline passed before its work could start")
    if ticket.client.gone:
        metrics.SHED.labels("client_gone").inc()
        raise ClientGone("client disconnected before its request was scored")
    return fn(*args)
