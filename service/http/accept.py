"""Accept a worker's connections at the pace of its /rank places.

A shed at the request head (``service/http/protocol.py``) is cheap for one request, but not for
clients that retry at once - a closed-loop load generator, a retry loop that ignores
``Retry-After``. At 64 such clients sending 500-candidate bodies (75 kB) two workers answered
~15,000 503s a second, each body read and skipped by an event loop that holds the GIL; the rank
threads were left a third of the two cores and answered req/s fell to 0.43 of what 8 clients
get. Cheaper sheds do not help: the clients only send the next one sooner.

So a shed ends its connection (``Connection: close``, once its body is skipped), and a worker
whose places (``slots + VIDRANK_MAX_QUEUE``) are all taken stops accepting connections: a client
that was shed reconnects, and its connection waits in the kernel, which costs the worker
nothing.

* **Calm** (no place missing for ``PRESSURE_S``): connections are accepted as fast as they
  come, into a listen backlog of ``CALM_BACKLOG``, so a burst of new clients never waits for a
  TCP retry, and clients that connect and send nothing (a Slowloris, idle pool connections)
  slow nobody down (the connection cap and header deadline bound them).
* **Under pressure**: the backlog shrinks to ``VIDRANK_ACCEPT_BACKLOG``; beyond it the kernel
  turns connections away and clients come back on TCP's own back-off (1 s, then 3 s). What the
  calm backlog still holds beyond the short one is accepted at once and refused at its request
  head (a burst of new clients gets its 503s now instead of waiting there for places freeing one
  by one). Accepting stops while every place is taken. A freed place first waits ``REFILL_S`` for
  the request the client just answered on a kept-alive connection sends next (taking it spares a
  new connection that would be shed), except once every ``TURN_S``, when a connection waiting in
  the kernel gets it at once. A connection accepted into a place holds it until its request head
  arrives (at most ``FRESH_S``), so the request that is refused is the one that has just arrived -
  its 503 is immediate - never the one that waited. With no place freeing for ``SAFETY_S`` one
  waiting connection is let in regardless, so an admin call or a scrape is not stuck behind slow
  /rank work.

Requests that get in are answered in about the time the places ahead of them take; the others
wait to connect, before their request exists. Liveness and readiness probes do not belong in
that wait: ``VIDRANK_HEALTH_PORT`` serves them on a listener of their own that always accepts
(``service/http/server.py``). One kernel behaviour shows in the tail: when the accept queue
fills between a client's SYN and its ACK, Linux drops the ACK, the client believes it is
connected and sends its request, and the request waits for the server's SYN-ACK retry (1 s) -
or, once SYN cookies are in play, the connection is reset; both are counted in the overload
benchmark (connect waits, errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import socket
import struct
import time
from collections.abc import Callable
from typing import Protocol

from service import metrics
from service.http.admission import Admission

CALM_BACKLOG = 1024  # listen backlog while the worker has room
PRESSURE_S = 1.0  # the worker counts as under pressure this long after its places were all taken
FRESH_S = 0.01  # under pressure, a connection holds a place until its first request head or this
REFILL_S = 0.005  # under pressure, a freed place waits this long for its kept-alive client...
TURN_S = 0.02  # ...except once every TURN_S, when it goes to a connection waiting in the kernel
SAFETY_S = 0.25  # paused with no place freeing: one waiting connection accepted this often
RETRY_S = 1.0  # out of descriptors or memory: accepting again after this (as asyncio's server)
# struct tcp_info: eight one-byte fields, then u32s (rto, ato, snd_mss, rcv_mss, unacked, ...)
TCP_INFO_BYTES = 104
TCPI_UNACKED_AT = 24
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def accept_queue_length(sock: socket.socket) -> int:
    """Connections the kernel holds for the listening ``sock``, not yet accepted (Linux: the
    ``tcpi_unacked`` field of a listener's ``TCP_INFO``, what ``ss -l`` shows as Recv-Q); 0
    where the platform does not say."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    except (AttributeError, OSError):
        return 0
    return struct.unpack_from("=I", info, TCPI_UNACKED_AT)[0] if len(info) >= 28 else 0


class Fresh:
    """A newly accepted connection until its first request head: under pressure it holds a
    place, released once (its head arrives - the request then takes the place -, it closes, or
    ``FRESH_S`` passes)."""

    __slots__ = ("acceptor", "timer", "holds")

    def __init__(self, acceptor: Acceptor, holds: bool) -> None:
        self.acceptor = acceptor
        self.holds = holds
        self.timer: asyncio.TimerHandle | None = None
        if holds:
            acceptor.admission.held += 1
            self.timer = acceptor.loop.call_later(FRESH_S, self.settle)

    def settle(self, wake: bool = True) -> None:
        """Give the held place back (``wake=False``: its own request is about to take it)."""
        if self.holds:
            self.holds = False
            assert self.timer is not None
            self.timer.cancel()
            self.acceptor.admission.held -= 1
            if wake:
                self.acceptor.wake()


class AcceptedProtocol(Protocol):
    """What the acceptor needs of a connection's protocol: somewhere to keep its ``Fresh``."""

    fresh: Fresh | None


class Acceptor:
    """Accepts connections on the listening ``sock`` for ``make_protocol()`` while ``admission``
    has room; stands in for an ``asyncio.Server`` in uvicorn's list (``close``/``wait_closed``)."""

    def __init__(
        self,
        sock: socket.socket,
        make_protocol: Callable[[], AcceptedProtocol],
        admission: Admission,
        backlog: int,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.make_protocol = make_protocol
        self.admission = admission
        self.backlog = backlog  # under pressure
        self.pressed_at = -math.inf  # monotonic time the places were last all taken
        self.pressed = False  # listening with the short backlog
        self.turn_at = -math.inf  # when the kernel's waiting connections last had a place
        self.listening = False
        self.closed = False
        self._refill_timer: asyncio.TimerHandle | None = None
        self._safety_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        sock.listen(CALM_BACKLOG)
        sock.setblocking(False)
        admission.on_release = self.wake
        self._listen()

    # -- room --------------------------------------------------------------------------
    def under_pressure(self) -> bool:
        """Whether the places were all taken within ``PRESSURE_S`` (now included)."""
        now = time.monotonic()
        if self.admission.room() <= 0:
            self.pressed_at = now
        return now - self.pressed_at < PRESSURE_S

    def wake(self) -> None:
        """A place may have freed: a /rank request finished, or a fresh connection settled.

        Under pressure a freed place first waits ``REFILL_S`` for the request a client just
        answered on a kept-alive connection sends next (taking it spares a new connection that
        would be shed; the places hold ``VIDRANK_MAX_QUEUE`` requests of work, so the rank
        thread does not notice), except once every ``TURN_S``, when the connections waiting in
        the kernel get it at once (the kept-alive client's request is then the one shed, at
        once) - so nothing waits there much longer than ``TURN_S`` while places keep freeing."""
        if self.listening or self.closed or self.admission.room() <= 0:
            return
        if not self.under_pressure():
            self._listen()
        elif time.monotonic() - self.turn_at >= TURN_S:
            self.turn_at = time.monotonic()
            self._listen()
        elif self._refill_timer is None:
            self._refill_timer = self.loop.call_later(REFILL_S, self._refill)

    def _refill(self) -> None:
        self._refill_timer = None
        if not self.listening and not self.closed and self.admission.room() > 0:
            self._listen()

    # -- accepting ---------------------------------------------------------------------
    def _listen(self) -> None:
        self.listening = True
        self._cancel_timers()
        self.loop.add_reader(self.sock, self._accept_ready)

    def _pause(self) -> None:
        self.listening = False
        self.loop.remove_reader(self.sock)
        metrics.ACCEPT_PAUSES.inc()
        if not self.pressed:
            self.pressed = True
            self.sock.listen(self.backlog)  # Linux takes a new backlog on a listening socket
            self._drain()
        self._safety_timer = self.loop.call_later(SAFETY_S, self._safety)

    def _accept_ready(self) -> None:
        while self.admission.room() > 0:
            pressure = self.under_pressure()
            if not pressure and self.pressed:  # calm again: bursts of new clients get in
                self.pressed = False
                self.sock.listen(CALM_BACKLOG)
            if not self._accept_one(holds=pressure):
                return
        self.pressed_at = time.monotonic()
        self._pause()

    def _drain(self) -> None:
        """Pressure has just begun: accept, without places, what the calm backlog holds beyond
        the short one.

        A new backlog does not evict the connections already queued under the calm one (up to
        ``CALM_BACKLOG``): a burst of new clients would wait there for places freeing one at a
        time, hundreds of them for seconds (a fresh server hit by 512 clients at once: 69 to 95
        of them timed out at 2 s). Accepted now, each request finds no place when its head
        arrives and gets its 503 and ``Retry-After`` at once, as any request beyond
        ``slots + VIDRANK_MAX_QUEUE`` does; the ``backlog`` newest stay queued, as under
        pressure."""
        for _ in range(max(0, accept_queue_length(self.sock) - self.backlog)):
            if not self._accept_one(holds=False):
                return

    def _safety(self) -> None:
        """No place has freed for ``SAFETY_S``: let one waiting connection in regardless, so a
        request of another kind (an admin call, a scrape) is not stuck behind /rank clients."""
        self._safety_timer = None
        if not self.listening and not self.closed:
            self._accept_one(holds=False)
            self._safety_timer = self.loop.call_later(SAFETY_S, self._safety)

    def _accept_one(self, holds: bool) -> bool:
        """Accept one waiting connection; False when none is waiting."""
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:  # ECONNABORTED...: that connection is lost, not the listener
            metrics.CONNECTIONS_CLOSED.labels("accept_failed").inc()
            if e.errno in OUT_OF_RESOURCES and self.listening:  # retrying now would only spin
                self.listening = False
                self.loop.remove_reader(self.sock)
                self._cancel_timers()
                self._refill_timer = self.loop.call_later(RETRY_S, self._refill)
            return False
        conn.setblocking(False)
        fresh = Fresh(self, holds)

        def protocol() -> AcceptedProtocol:
            made = self.make_protocol()
            made.fresh = fresh
            return made

        task = self.loop.create_task(self._connect(protocol, conn, fresh))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _connect(
        self, protocol: Callable[[], AcceptedProtocol], conn: socket.socket, fresh: Fresh
    ) -> None:
        try:
            await self.loop.connect_accepted_socket(protocol, conn)  # type: ignore[type-var]
        except OSError:  # the client left before its transport was made
            fresh.settle()
            conn.close()

    def _cancel_timers(self) -> None:
        for timer in (self._refill_timer, self._safety_timer):
            if timer is not None:
                timer.cancel()
        self._refill_timer = self._safety_timer = None

    # -- asyncio.Server's part, for uvicorn's shutdown ------------------------------------
    def close(self) -> None:
        """Stop accepting; connections already in keep draining (uvicorn's graceful shutdown)."""
        if self.closed:
            return
        self.closed = True
        self._cancel_timers()
        if self.listening:
            self.listening = False
            self.loop.remove_reader(self.sock)
        self.admission.on_release = None
        with contextlib.suppress(OSError):
            self.sock.close()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
