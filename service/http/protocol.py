"""uvicorn's httptools protocol with the bounds a public-facing worker needs.

uvicorn 0.54 has no request-read timeout: a connection that never sends (or trickles) its
request line and headers is kept for ever, and so is every such connection (a Slowloris client
holds thousands). ``limit_concurrency`` does not help: it answers 503 only once a request's
headers are complete, which a stalled client never reaches. So this subclass adds, per worker:

* a connection cap: beyond ``max_connections`` open connections, the connection idle the
  longest (no request in progress: kept alive between requests, or still sending a request line
  and headers - a stalled client) gives way, with a ``408``, so a new client and the liveness
  probe always get in; only when every connection is busy with a request does the new one get
  an immediate ``503`` with ``Retry-After`` and close, before any byte of it is read. (Refusing
  new connections instead let 1,100 stalled connections lock out /healthz and real clients.)
* a header deadline: from the first byte of every request the request line and headers must
  arrive within ``header_timeout_s``, else ``408`` and close; they may not exceed
  ``max_header_bytes`` either (``431`` and close) - httptools would otherwise collect any number
  of header lines. A new connection that has sent nothing yet gets ``SILENT_GRACE_S`` more
  (counted from its accept): under overload the kernel can complete a handshake whose client's
  first segment it dropped (the accept queue was full), and that client resends it only on
  TCP's back-off (0.2, 0.4, 0.8, 1.6, 3.2 s... after its first try), so a request can arrive
  seconds after its connection was accepted though its client never stalled (the likely way a
  patient client of the overload test got a ``408`` about once in ten runs). Silent ones cost
  nothing but a descriptor, and the connection cap bounds those;
* a body backstop: a request body must be complete ``body_timeout_s`` (+1 s) after its headers,
  else the connection is closed. The app answers ``408`` at ``body_timeout_s`` itself
  (``service/http/deadlines.py``) when it is reading the body; this catches bodies nobody reads
  (e.g. after an early 404/413), which uvicorn would otherwise keep draining.

Admission is decided here, when a ``POST /rank``'s head arrives: the request gets a place among
the worker's in-flight work (``Admission.reserve``, handed to the route in
``scope["state"]``) or, when there is none, the pre-built 503 bytes at once; its body is then
skipped as it arrives (httptools finds its end; nothing is buffered, nothing enters the app),
so a shed costs a few microseconds however large the body, and the connection ends once the
body is in: the client's retry comes through the worker's acceptor, which lets connections in
only as places free (``service/http/accept.py``). The protocol keeps reading once a
request is complete, so a client that hangs up while its request waits is noticed (the rank
thread then drops it). It also stamps
``scope["state"]["arrived_at"]`` (monotonic seconds) with the moment the request's first byte
arrived, which request deadlines count from.

Idle keep-alive connections between requests stay governed by uvicorn's ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import metrics
from service.http.accept import Fresh
from service.http.admission import SHED_BODY, SHED_HEADERS, TICKET, Admission, Client

BODY_GRACE_S = 1.0  # the app's own 408 comes first; this only closes what it never read
SILENT_GRACE_S = 10.0  # a new connection's first byte may come this much later (see above)


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-worker connection bounds (from ``Settings``)."""

    max_connections: int
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int = 64 * 1024
    admission: Admission | None = None  # sheds POST /rank before the app when it is full


def _canned(status: bytes, code: bytes, message: bytes, extra: bytes = b"") -> bytes:
    """A complete ``connection: close`` response with the service's error body."""
    body = b'{"error":{"code":"%s","message":"%s"}}' % (code, message)
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-content-type-options: nosniff\r\ncache-control: no-store\r\n%s"
        b"connection: close\r\n\r\n%s" % (status, len(body), extra, body)
    )


# The admission's 503 (same headers and body as the app would send); the connection then ends.
SHED = b"HTTP/1.1 503 Service Unavailable\r\n%sconnection: close\r\n\r\n%s" % (
    b"".join(b"%s: %s\r\n" % header for header in SHED_HEADERS),
    SHED_BODY,
)
OVER_CAPACITY = _canned(
    b"503 Service Unavailable",
    b"too_many_connections",
    b"this worker holds its maximum of open connections; retry",
    b"retry-after: 1\r\n",
)
MADE_ROOM = _canned(
    b"408 Request Timeout",
    b"request_timeout",
    b"connection closed while idle to make room for another; retry",
)
HEADER_TIMEOUT = _canned(
    b"408 Request Timeout", b"request_timeout", b"request headers did not arrive in time"
)
HEADERS_TOO_LARGE = _canned(
    b"431 Request Header Fields Too Large", b"headers_too_large", b"request headers are too large"
)


class GuardedProtocol(HttpToolsProtocol):
    """HttpToolsProtocol bounded by ``limits`` (set on the subclass ``guarded_protocol`` makes)."""

    limits: ClassVar[ConnectionLimits]
    # This worker's connections with no request in progress, the longest idle first (a dict
    # keeps insertion order; re-inserting moves one to the end).
    idle: ClassVar[dict[GuardedProtocol, None]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._in_headers = False  # reading a request line + headers
        self._header_bytes = 0
        self._rejected = False
        self._silent = False  # True from the accept until the first byte arrives
        self._shedding = False  # skipping the body of a request answered 503 at its head
        self._client = Client()
        self.fresh: Fresh | None = None  # set by the acceptor until the first request head

    # -- connection -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self._rejected = True
            metrics.CONNECTIONS_CLOSED.labels("max_connections").inc()
            transport.write(OVER_CAPACITY)
            transport.close()
            return
        self.idle[self] = None
        self._silent = True  # no byte yet: the header deadline waits for the first
        self._await_headers(self.limits.header_timeout_s + SILENT_GRACE_S)

    def _make_room(self) -> bool:
        """Close the connection idle the longest; False when every connection is busy."""
        victim = next(iter(self.idle), None)
        if victim is None:
            return False
        del self.idle[victim]
        victim._close_with(MADE_ROOM, "made_room")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle()
        self.idle.pop(self, None)
        self._client.gone = True
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        if self._silent:  # the first byte: from now the headers have the usual deadline
            self._silent = False
            if self._in_headers:
                self._await_headers()
        counting = self._in_headers
        super().data_received(data)
        # Still in the headers after this chunk: they alone exceed the bound.
        if counting and self._in_headers:
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._close_with(HEADERS_TOO_LARGE, "headers_too_large")

    # -- parser callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["state"]["arrived_at"] = time.monotonic()
        if not self._in_headers:  # a later request on a kept-alive connection
            self._await_headers()

    def _settle(self) -> None:
        """Closed before its first request head: the place it held is free again."""
        if self.fresh is not None:
            self.fresh.settle()
            self.fresh = None

    def on_headers_complete(self) -> None:
        fresh, self.fresh = self.fresh, None
        if fresh is not None:  # the place it held is this request's to take (or to give back)
            fresh.settle(wake=False)
        self._on_head()
        if fresh is not None:
            fresh.acceptor.wake()

    def _on_head(self) -> None:
        self.idle.pop(self, None)  # busy until its response is complete
        self._in_headers = False
        self._cancel_deadline()
        self._deadline = self.loop.call_later(
            self.limits.body_timeout_s + BODY_GRACE_S, self._body_timed_out
        )
        admission = self.limits.admission
        if admission is not None and self._is_rank():
            ticket = admission.reserve(self._client)
            if ticket is None and self._idle():
                self._shed()
                return
            if ticket is not None:
                self.scope["state"][TICKET] = ticket
            # else: a pipelined request behind one still answered; the route sheds it in turn.
        super().on_headers_complete()

    def _is_rank(self) -> bool:
        return self.parser.get_method() == b"POST" and self.url.split(b"?", 1)[0] == b"/rank"

    def _idle(self) -> bool:
        """No earlier response still owed on this connection (bytes may be written now)."""
        return self.cycle is None or self.cycle.response_complete

    def _shed(self) -> None:
        """Answer 503 now and skip the body as it arrives (uvicorn never sees this request);
        the connection ends once the body is in, so the client's retry comes through the
        acceptor, which waits for a free place (``service/http/accept.py``)."""
        metrics.SHED.labels("queue_full").inc()
        metrics.HTTP_REQUESTS.labels("/rank", "POST", "503").inc()
        self._shedding = True
        self.transport.write(SHED)
        # A client waiting for "100 Continue" never sends the body: close now. Otherwise read
        # the body to its end first (closing with unread bytes would reset the connection, and
        # the client could lose the 503 it has not read yet).
        if self.expect_100_continue:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self.idle.pop(self, None)
            self.idle[self] = None  # idle from now: the last to give way

    def on_body(self, body: bytes) -> None:
        if not self._shedding:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        if self._shedding:  # its 503 is out and its body skipped: the connection ends
            self._shedding = False
            self.transport.close()
            return
        super().on_message_complete()
        # uvicorn pauses reading while a large body waits for the app and resumes only when
        # the app next calls receive(); after the last chunk nobody does, so a client that
        # hangs up would go unnoticed. The request is whole: keep reading (a pipelined
        # request pauses it again), so the EOF of a departed client is seen and the app
        # can skip its work (``service/http/admission.py``).
        self.flow.resume_reading()

    # -- deadlines --------------------------------------------------------------------
    def _await_headers(self, within_s: float | None = None) -> None:
        """Expect a request line and headers within ``within_s`` (the header timeout)."""
        self._in_headers = True
        self._header_bytes = 0
        self._cancel_deadline()
        wait = self.limits.header_timeout_s if within_s is None else within_s
        self._deadline = self.loop.call_later(wait, self._header_timed_out)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _header_timed_out(self) -> None:
        self._deadline = None
        if self._in_headers:
            self._close_with(HEADER_TIMEOUT, "header_timeout")

    def _body_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            metrics.CONNECTIONS_CLOSED.labels("body_unread").inc()
            self.transport.close()

    def _close_with(self, response: bytes, reason: str) -> None:
        self._in_headers = False
        self._cancel_deadline()
        metrics.CONNECTIONS_CLOSED.labels(reason).inc()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits, "idle": {}})
