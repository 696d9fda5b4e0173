"""service/http/admission.py without HTTP: the bounded queue, deadlines and absent clients."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from service.errors import ClientGone, DeadlineExceeded, InvalidRequest, Overloaded
from service.http.admission import Admission, request_deadline
from tests.service.service_helpers import sample


async def present() -> bool:
    return False


async def gone() -> bool:
    return True


def run(main: Callable[[], Awaitable[None]]) -> None:
    anyio.run(main)


def test_sheds_beyond_the_queue_and_admits_again_after() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=2)
        release = anyio.Event()
        order: list[str] = []

        async def request(name: str) -> None:
            async with adm.admit(None, present) as acquire:
                await acquire()
                order.append(name)
                await release.wait()

        shed = sample("vidrank_rank_shed_total", {"reason": "queue_full"})
        async with anyio.create_task_group() as tg:
            for name in ("running", "queued-1", "queued-2"):
                tg.start_soon(request, name)
                await anyio.sleep(0.01)
            assert adm.waiting == 2 and order == ["running"]
            with pytest.raises(Overloaded):  # at once: the third in the queue is one too many
                async with adm.admit(None, present):
                    pass
            assert sample("vidrank_rank_shed_total", {"reason": "queue_full"}) == shed + 1
            release.set()
        assert order == ["running", "queued-1", "queued-2"] and adm.waiting == 0
        async with adm.admit(None, present) as acquire:  # room again
            await acquire()

    run(main)


def test_no_queue_still_admits_while_a_slot_is_free() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=0)
        async with adm.admit(None, present) as acquire:
            await acquire()
            with pytest.raises(Overloaded):
                async with adm.admit(None, present):
                    pass

    run(main)


def test_deadline_ends_the_wait_and_the_work_never_starts() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=4)
        dropped = sample("vidrank_rank_shed_total", {"reason": "deadline"})
        async with adm.admit(None, present) as hold:
            await hold()
            started = False
            with pytest.raises(DeadlineExceeded):
                async with adm.admit(time.monotonic() + 0.05, present) as acquire:
                    await acquire()
                    started = True
            assert not started and adm.waiting == 0
        # A deadline already past is dropped even with a free slot.
        with pytest.raises(DeadlineExceeded):
            async with adm.admit(time.monotonic() - 1, present) as acquire:
                await acquire()
        assert sample("vidrank_rank_shed_total", {"reason": "deadline"}) == dropped + 2

    run(main)


def test_a_client_that_left_is_not_scored_and_frees_its_slot() -> None:
    async def main() -> None:
        adm = Admission(slots=1, max_queue=1)
        with pytest.raises(ClientGone):
            async with adm.admit(None, gone) as acquire:
                await acquire()
        assert adm.limiter.borrowed_tokens == 0 and adm.waiting == 0

    run(main)


def test_request_deadline_parsing() -> None:
    assert request_deadline(None, 0, None) is None
    assert request_deadline(None, 250, 100.0) == 100.25
    assert request_deadline("40", 250, 100.0) == pytest.approx(100.04)
    for bad in ("0", "x", "-1", "600001", " "):
        with pytest.raises(InvalidRequest):
            request_deadline(bad, 250, 100.0)
