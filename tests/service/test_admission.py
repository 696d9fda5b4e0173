"""service/http/admission.py: the bound on work in flight, deadlines, absent clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from service.errors import ClientGone, DeadlineExceeded, InvalidRequest, Overloaded
from service.http.admission import Admission, Client, request_deadline
from tests.service.service_helpers import sample


def run(main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main)


def test_sheds_beyond_the_queue_and_admits_again_after() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=2)
        release = threading.Event()
        order: list[str] = []

        def work(name: str) -> None:
            order.append(name)
            release.wait(10)

        async def request(name: str) -> None:
            async with adm.admit(None) as ticket:
                await adm.run(ticket, None, work, name)

        shed = sample("vidrank_rank_shed_total", {"reason": "queue_full"})
        queued = sample("vidrank_rank_queue")
        async with anyio.create_task_group() as tg:
            for name in ("running", "queued-1", "queued-2"):
                tg.start_soon(request, name)
                await anyio.sleep(0.05)
            assert adm.in_flight == 3 and order == ["running"]
            assert sample("vidrank_rank_queue") == queued + 2
            assert adm.reserve() is None  # from the protocol: no place
            with pytest.raises(Overloaded):  # from the route: at once, 503
                async with adm.admit(None):
                    pass
            assert sample("vidrank_rank_shed_total", {"reason": "queue_full"}) == shed + 1
            release.set()
        assert order == ["running", "queued-1", "queued-2"] and adm.in_flight == 0
        assert sample("vidrank_rank_queue") == queued
        async with adm.admit(adm.reserve()) as ticket:  # room again; the protocol's ticket
            assert await adm.run(ticket, None, len, "abc") == 3

    run(main)


def test_no_queue_still_admits_while_a_slot_is_free() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=0)
        async with adm.admit(None):
            with pytest.raises(Overloaded):
                async with adm.admit(None):
                    pass

    run(main)


def test_deadline_ends_the_wait_and_the_work_never_starts() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=4)
        dropped = sample("vidrank_rank_shed_total", {"reason": "deadline"})
        busy, release = threading.Event(), threading.Event()
        started: list[str] = []

        def hold() -> None:
            busy.set()
            release.wait(10)

        async with anyio.create_task_group() as tg:
            async with adm.admit(None) as holder:
                tg.start_soon(adm.run, holder, None, hold)
                await anyio.to_thread.run_sync(busy.wait)
                with pytest.raises(DeadlineExceeded):
                    async with adm.admit(None) as ticket:
                        await adm.run(ticket, time.monotonic() + 0.05, started.append, "late")
                assert adm.in_flight == 1  # the late one gave its place back at once
                release.set()
        assert not started and adm.in_flight == 0
        # A deadline already past is dropped even with a free slot.
        with pytest.raises(DeadlineExceeded):
            async with adm.admit(None) as ticket:
                await adm.run(ticket, time.monotonic() - 1, started.append, "past")
        assert not started
        assert sample("vidrank_rank_shed_total", {"reason": "deadline"}) == dropped + 2

    run(main)


def test_a_client_that_left_is_not_scored_and_frees_its_place() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=1)
        client = Client()
        client.gone = True
        started: list[str] = []
        gone = sample("vidrank_rank_shed_total", {"reason": "client_gone"})
        with pytest.raises(ClientGone):
            async with adm.admit(adm.reserve(client)) as ticket:
                await adm.run(ticket, None, started.append, "gone")
        assert not started and adm.in_flight == 0
        assert sample("vidrank_rank_shed_total", {"reason": "client_gone"}) == gone + 1

    run(main)


def test_the_next_request_starts_without_the_event_loop() -> None:
    """A rank thread takes the next queued request as soon as it finishes one, even while the
    event loop is busy (here: blocked outright) - the slot never idles waiting for the loop."""

    async def main() -> None:
        adm = Admission(slots=1, max_queue=2)
        done: list[str] = []
        second_done = threading.Event()

        def work(name: str) -> None:
            done.append(name)
            if name == "b":
                second_done.set()

        async with anyio.create_task_group() as tg:
            for name in ("a", "b"):
                ticket = adm.reserve()
                assert ticket is not None
                tg.start_soon(adm.run, ticket, None, work, name)
            await anyio.sleep(0)  # both submitted
            # The loop now blocks: b must still run (a capacity limiter would need the loop).
            assert second_done.wait(10), done
            assert done == ["a", "b"]

    run(main)


def test_request_deadline_parsing() -> None:
    assert request_deadline(None, 0, None) is None
    assert request_deadline(None, 250, 100.0) == 100.25
    assert request_deadline("40", 250, 100.0) == pytest.approx(100.04)
    for bad in ("0", "x", "-1", "600001", " "):
        with pytest.raises(InvalidRequest):
            request_deadline(bad, 250, 100.0)
