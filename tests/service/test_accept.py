"""service/http/accept.py: connections accepted at the pace of the worker's /rank places, on a
real listening socket over loopback (no server, no app)."""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable

import pytest

from service.http import accept
from service.http.accept import CALM_BACKLOG, Acceptor, Fresh
from service.http.admission import Admission, Ticket
from tests.service.service_helpers import sample


class Conn(asyncio.Protocol):
    """A connection as the acceptor sees it: its first bytes stand for a /rank request head,
    which takes a place if there is one (as the server's protocol does)."""

    def __init__(self, made: list[Conn], admission: Admission) -> None:
        self.fresh: Fresh | None = None
        self.made = made
        self.admission = admission
        self.ticket: Ticket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.append(self)

    def data_received(self, data: bytes) -> None:
        if self.fresh is not None:
            fresh, self.fresh = self.fresh, None
            fresh.settle(wake=False)
            self.ticket = self.admission.reserve()
            fresh.acceptor.wake()


class Listener(socket.socket):
    """A listening socket that records every backlog it is given."""

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.backlogs: list[int] = []
        self.bind(("127.0.0.1", 0))

    def listen(self, backlog: int = 0) -> None:
        self.backlogs.append(backlog)
        super().listen(backlog)


async def until(check: Callable[[], bool], what: str, timeout_s: float = 3.0) -> None:
    end = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.005)


async def connect(port: int, send: bytes = b"") -> asyncio.StreamWriter:
    """A client connection (complete once the kernel has it, accepted or not)."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    if send:
        writer.write(send)
        await writer.drain()
    return writer


def served(slots: int, max_queue: int, body: Callable[..., object], **patch: float) -> None:
    """Run ``body(acceptor, admission, made, port)`` against a live acceptor."""

    async def main() -> None:
        admission = Admission(slots, max_queue)
        made: list[Conn] = []
        listener = Listener()
        acceptor = Acceptor(listener, lambda: Conn(made, admission), admission, backlog=1)
        try:
            await body(acceptor, admission, made, listener.getsockname()[1])  # type: ignore[misc]
        finally:
            acceptor.close()
            await acceptor.wait_closed()

    asyncio.run(main())


def test_no_connection_is_accepted_while_every_place_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Full: a new connection waits in the kernel (short backlog) and is accepted the moment a
    place frees; calm again, the long backlog comes back."""
    monkeypatch.setattr(accept, "SAFETY_S", 60.0)  # no safety accepts in this test
    monkeypatch.setattr(accept, "PRESSURE_S", 0.3)
    pauses = sample("vidrank_accept_pauses_total")

    async def body(acceptor: Acceptor, admission: Admission, made: list[Conn], port: int) -> None:
        first = await connect(port, b"head")
        await until(lambda: len(made) == 1 and made[0].ticket is not None, "accepted, place taken")
        ticket = made[0].ticket  # its request took the one place
        assert ticket is not None
        second = await connect(port, b"head")
        await asyncio.sleep(0.3)
        assert len(made) == 1 and not acceptor.listening  # it waits, unread, in the kernel
        assert sample("vidrank_accept_pauses_total") == pauses + 1
        assert acceptor.sock.backlogs == [CALM_BACKLOG, 1]  # type: ignore[attr-defined]
        ticket.release()
        await until(lambda: len(made) == 2 and made[1].ticket is not None, "in once it freed")
        made[1].ticket.release()  # type: ignore[union-attr]
        await asyncio.sleep(0.35)  # calm for longer than PRESSURE_S
        third = await connect(port)
        await until(lambda: len(made) == 3, "accepted when calm")
        assert acceptor.sock.backlogs == [CALM_BACKLOG, 1, CALM_BACKLOG]  # type: ignore[attr-defined]
        for w in (first, second, third):
            w.close()

    served(1, 0, body)


def test_a_burst_queued_under_the_calm_backlog_is_let_in_to_be_refused_when_pressure_begins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections that queued in the kernel under the calm backlog while every place was taken
    are accepted (without places: their requests are refused at once) when the worker pauses,
    all but the short backlog's newest; without that they would wait for places one by one."""
    monkeypatch.setattr(accept, "SAFETY_S", 60.0)
    burst = 20

    async def body(acceptor: Acceptor, admission: Admission, made: list[Conn], port: int) -> None:
        assert admission.reserve() is not None and admission.room() == 0
        # connected by the kernel before the loop runs the acceptor again: all queued
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(burst)]
        assert accept.accept_queue_length(acceptor.sock) == burst
        for c in clients:
            c.sendall(b"head")
        await until(lambda: len(made) == burst - 1, "all but the short backlog let in")
        await until(lambda: all(c.fresh is None for c in made), "every head arrived")
        assert all(c.ticket is None for c in made)  # no place for any of them: refused
        assert not acceptor.listening and acceptor.sock.backlogs == [CALM_BACKLOG, 1]  # type: ignore[attr-defined]
        assert accept.accept_queue_length(acceptor.sock) == 1  # the newest still waits
        for c in clients:
            c.close()

    served(1, 0, body)


def test_a_freed_place_lets_in_one_connection_until_its_first_request_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under pressure an accepted connection holds a place until its request head arrives, so a
    freed place does not let in every waiting connection."""
    monkeypatch.setattr(accept, "SAFETY_S", 60.0)
    monkeypatch.setattr(accept, "FRESH_S", 60.0)

    async def body(acceptor: Acceptor, admission: Admission, made: list[Conn], port: int) -> None:
        tickets = [admission.reserve(), admission.reserve()]
        assert admission.room() == 0
        silent = await connect(port)  # waits: no place
        other = await connect(port, b"head")
        await asyncio.sleep(0.1)
        assert made == []
        tickets[0].release()  # type: ignore[union-attr]
        await until(lambda: len(made) == 1, "one accepted into the freed place")
        await asyncio.sleep(0.2)
        assert len(made) == 1 and admission.held == 1  # the silent one holds the place
        silent.write(b"head")  # its request head arrives and takes the place
        await silent.drain()
        await until(lambda: admission.held == 0, "the head settles the place")
        assert made[0].ticket is not None and admission.room() == 0
        await asyncio.sleep(0.1)
        assert len(made) == 1
        tickets[1].release()  # type: ignore[union-attr]
        await until(lambda: len(made) == 2, "the next connection in the next freed place")
        for w in (silent, other):
            w.close()

    served(1, 1, body)


def test_a_waiting_connection_still_gets_in_while_places_stay_taken() -> None:
    """No place frees for long (slow requests): one waiting connection is still accepted every
    SAFETY_S, so an admin call or a scrape behind /rank clients gets in."""

    async def body(acceptor: Acceptor, admission: Admission, made: list[Conn], port: int) -> None:
        assert admission.reserve() is not None
        probes = [await connect(port, b"GET /metrics") for _ in range(2)]
        await until(lambda: len(made) == 2, "both let in although no place freed", 2.0)
        assert admission.room() == 0 and not acceptor.listening
        for w in probes:
            w.close()

    served(1, 0, body)


def test_a_freed_place_goes_to_a_kept_alive_client_then_to_the_kernel_queue_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under pressure a freed place waits REFILL_S for the next request of the client it just
    answered (nothing accepted, nothing shed), but once every TURN_S it goes to a connection
    waiting in the kernel, which holds it: the kept-alive client's request is then the one
    refused."""
    monkeypatch.setattr(accept, "SAFETY_S", 60.0)
    monkeypatch.setattr(accept, "TURN_S", 0.5)
    monkeypatch.setattr(accept, "FRESH_S", 60.0)

    async def body(acceptor: Acceptor, admission: Admission, made: list[Conn], port: int) -> None:
        first = await connect(port, b"head")
        await until(lambda: len(made) == 1 and made[0].ticket is not None, "in, place taken")
        waiting = await connect(port)  # full: waits in the kernel
        await asyncio.sleep(0.05)
        assert len(made) == 1 and not acceptor.listening
        made[0].ticket.release()  # type: ignore[union-attr]  # the queue's turn: taken at once
        await until(lambda: len(made) == 2, "the waiting connection gets the freed place")
        assert admission.held == 1 and admission.reserve() is None  # kept-alive client refused
        waiting.write(b"head")
        await waiting.drain()
        await until(lambda: made[1].ticket is not None, "its request takes the place it held")
        third = await connect(port)
        await asyncio.sleep(0.05)
        made[1].ticket.release()  # type: ignore[union-attr]  # within TURN_S: no turn
        again = admission.reserve()  # the kept-alive client's next request, within REFILL_S
        assert again is not None
        await asyncio.sleep(0.1)
        assert len(made) == 2  # the third still waits: nothing accepted only to be shed
        again.release()
        await asyncio.sleep(0.5)  # past TURN_S: the next freed place is the queue's
        await until(lambda: len(made) == 3, "the third in its turn")
        for w in (first, waiting, third):
            w.close()

    served(1, 0, body)


def test_connections_that_send_nothing_do_not_slow_acceptance_when_calm() -> None:
    """A worker with room accepts as fast as clients connect: 50 connections that never send a
    byte (a Slowloris) are all accepted though there are 2 places (the connection cap and the
    header deadline bound them, not the acceptor)."""

    async def body(acceptor: Acceptor, admission: Admission, made: list[Conn], port: int) -> None:
        silent = [await connect(port) for _ in range(50)]
        await until(lambda: len(made) == 50, "all accepted")
        assert acceptor.listening and acceptor.sock.backlogs == [CALM_BACKLOG]  # type: ignore[attr-defined]
        for w in silent:
            w.close()

    served(1, 1, body)


def test_out_of_descriptors_stops_accepting_for_a_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """accept() failing with EMFILE leaves the connection waiting and the acceptor off the
    socket for RETRY_S (retrying at once would spin), then it takes the connection."""
    monkeypatch.setattr(accept, "RETRY_S", 0.3)

    class Exhausted(Listener):
        fail = 1

        def accept(self) -> tuple[socket.socket, object]:
            if self.fail:
                self.fail -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    async def main() -> None:
        admission, made = Admission(1, 1), list[Conn]()
        listener = Exhausted()
        acceptor = Acceptor(listener, lambda: Conn(made, admission), admission, backlog=1)
        try:
            client = await connect(listener.getsockname()[1], b"head")
            await until(lambda: not acceptor.listening, "off the socket after EMFILE", 1.0)
            await asyncio.sleep(0.15)
            assert made == []
            await until(lambda: len(made) == 1, "accepted after RETRY_S", 2.0)
            client.close()
        finally:
            acceptor.close()
            await acceptor.wait_closed()

    asyncio.run(main())
