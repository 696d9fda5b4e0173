"""ModelManager without HTTP: convergence, failed loads, release of old sessions, canary routing."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest

from model.core.registry import Registry
from service.errors import NotReady, SwapFailed
from service.manager import RETRY_MAX_S, ModelManager, ServingState, canary_bucket
from tests.service.service_helpers import corrupt_copy, publish_as, sample


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manager(registry: Path, clock: FakeClock | None = None) -> ModelManager:
    return ModelManager(Registry(registry), 1, (1, 10), **({"clock": clock} if clock else {}))


def test_empty_registry_is_not_ready(tmp_path: Path) -> None:
    m = manager(tmp_path / "empty")
    assert m.poll_once() is False
    assert not m.ready
    with pytest.raises(NotReady):
        m.state.pick("u")


def test_two_managers_converge_on_one_activation(registry_dir: Path, version: str) -> None:
    publish_as(registry_dir, version, "v2")
    a, b = manager(registry_dir), manager(registry_dir)
    a.poll_once()
    b.poll_once()
    a.activate("v2")
    assert a.state.pick("u").version == "v2"
    assert b.state.pick("u").version == version  # until it polls
    assert b.poll_once() is True
    assert b.state.pick("u").version == "v2"
    assert b.poll_once() is False  # nothing changed since


def test_failed_poll_load_keeps_serving_and_backs_off(registry_dir: Path, version: str) -> None:
    clock = FakeClock()
    corrupt_copy(registry_dir, version, "bad", "checksum_mismatch")
    m = manager(registry_dir, clock)
    m.poll_once()
    good = m.state.production
    failures = sample("vidrank_model_swap_failures_total", {"trigger": "poll"})
    Registry(registry_dir).activate("bad")  # e.g. an operator with the CLI
    m.poll_once()
    assert m.state.production is good
    assert sample("vidrank_model_swap_failures_total", {"trigger": "poll"}) == failures + 1
    clock.now += 1
    m.poll_once()  # not retried every poll ...
    assert sample("vidrank_model_swap_failures_total", {"trigger": "poll"}) == failures + 1
    clock.now += RETRY_MAX_S
    m.poll_once()  # ... but after the back-off
    assert sample("vidrank_model_swap_failures_total", {"trigger": "poll"}) == failures + 2
    Registry(registry_dir).rollback()
    m.poll_once()
    assert m.state.production is good


def test_admin_activate_failure_raises_and_changes_nothing(
    registry_dir: Path, version: str
) -> None:
    corrupt_copy(registry_dir, version, "bad", "corrupt_onnx")
    m = manager(registry_dir)
    m.poll_once()
    before = m.state
    with pytest.raises(SwapFailed, match="onnxruntime cannot load"):
        m.activate("bad")
    assert m.state is before
    assert Registry(registry_dir).read_aliases().production == version


def test_old_session_released_after_in_flight_requests(registry_dir: Path, version: str) -> None:
    publish_as(registry_dir, version, "v2")
    m = manager(registry_dir)
    m.poll_once()
    in_flight = m.state.pick("u")  # a request holding the old scorer
    ref = weakref.ref(in_flight)
    m.activate("v2")
    assert m.state.pick("u").version == "v2"
    assert ref() is not None  # still usable by the request that picked it
    del in_flight  # the request returns
    gc.collect()
    assert ref() is None  # and nothing else kept the old model alive (TF Serving #1215)


def test_swaps_under_concurrent_scoring(registry_dir: Path, version: str) -> None:
    """Readers never see a half-swapped state or a released session."""
    publish_as(registry_dir, version, "v2")
    m = manager(registry_dir)
    m.poll_once()
    stop = threading.Event()
    errors: list[BaseException] = []
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            try:
                scorer = m.state.pick("u")
                inputs = scorer.schema.encode({}, {}, {"video_id": list(range(50))}, 50)
                assert scorer.score(inputs)["click"].shape == (50,)
                seen.add(scorer.version)
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for _ in range(4):
        m.activate("v2")
        m.rollback()
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {version, "v2"}


def test_poller_thread_converges(registry_dir: Path, version: str) -> None:
    publish_as(registry_dir, version, "v2")
    m = manager(registry_dir)
    m.poll_once()
    m.start_polling(0.05)
    try:
        Registry(registry_dir).activate("v2")
        deadline = time.monotonic() + 10
        while m.state.pick("u").version != "v2" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert m.state.pick("u").version == "v2"
    finally:
        m.stop_polling()


def test_canary_from_registry_and_percent(registry_dir: Path, version: str) -> None:
    publish_as(registry_dir, version, "v2")
    Registry(registry_dir).set_canary("v2", 25)
    m = manager(registry_dir)
    m.poll_once()
    assert m.describe() == {"production": version, "canary": {"version": "v2", "percent": 25.0}}
    share = sum(m.state.pick(u).version == "v2" for u in range(4000)) / 4000
    assert 0.22 < share < 0.28
    Registry(registry_dir).activate("v2")  # promoting the canary clears it
    m.poll_once()
    assert m.describe() == {"production": "v2", "canary": None}


def test_canary_bucket_is_stable_and_uniform() -> None:
    assert canary_bucket(42) == canary_bucket("42") == canary_bucket(42)
    assert all(0 <= canary_bucket(u) < 100 for u in range(1000))
    buckets = [canary_bucket(f"user-{i}") for i in range(20_000)]
    for lo in range(0, 100, 10):
        share = sum(lo <= b < lo + 10 for b in buckets) / len(buckets)
        assert 0.09 < share < 0.11


def test_serving_state_without_canary_serves_production() -> None:
    with pytest.raises(NotReady):
        ServingState().pick(1)
