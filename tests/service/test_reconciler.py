"""Reconciler without HTTP: convergence, failed loads, release of old sessions, canary routing."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest

from model.core.registry import Registry, RegistryUnavailable
from service.errors import NotReady, SwapFailed
from service.rollout.background import BACKOFF_MAX_S as RETRY_MAX_S
from service.rollout.reconciler import (
    SHADOW_THREADS,
    Reconciler,
    ServingState,
    canary_bucket,
)
from tests.service.service_helpers import corrupt_copy, publish_as, sample


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def reconciler(registry: Path, clock: FakeClock | None = None) -> Reconciler:
    return Reconciler(Registry(registry), 1, (1, 10), **({"clock": clock} if clock else {}))


def test_empty_registry_is_not_ready(tmp_path: Path) -> None:
    m = reconciler(tmp_path / "empty")
    assert m.poll_once() is False
    assert not m.ready
    with pytest.raises(NotReady):
        m.state.pick("u")


def test_two_reconcilers_converge_on_one_activation(registry_dir: Path, version: str) -> None:
    publish_as(registry_dir, version, "v2")
    a, b = reconciler(registry_dir), reconciler(registry_dir)
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
    m = reconciler(registry_dir, clock)
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
    m = reconciler(registry_dir)
    m.poll_once()
    before = m.state
    with pytest.raises(SwapFailed, match="onnxruntime cannot load"):
        m.activate("bad")
    assert m.state is before
    assert Registry(registry_dir).read_aliases().production == version


def test_old_session_released_after_in_flight_requests(registry_dir: Path, version: str) -> None:
    publish_as(registry_dir, version, "v2")
    m = reconciler(registry_dir)
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
    m = reconciler(registry_dir)
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
    m = reconciler(registry_dir)
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
    m = reconciler(registry_dir)
    m.poll_once()
    assert m.describe() == {
        "production": version,
        "canary": {"version": "v2", "percent": 25.0},
        "shadow": None,
    }
    share = sum(m.state.pick(u).version == "v2" for u in range(4000)) / 4000
    assert 0.22 < share < 0.28
    Registry(registry_dir).activate("v2")  # promoting the canary clears it
    m.poll_once()
    assert m.describe() == {"production": "v2", "canary": None, "shadow": None}


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


def test_shadow_has_a_one_thread_session_of_its_own(registry_dir: Path, version: str) -> None:
    publish_as(registry_dir, version, "v2")
    m = Reconciler(Registry(registry_dir), 2, (1, 10))
    m.poll_once()
    m.set_shadow("v2", 50)
    shadow = m.state.shadow
    assert shadow is not None and shadow.threads == SHADOW_THREADS and m.state.shadow_percent == 50
    assert m.state.production is not None and m.state.production.threads == 2
    # v2 as canary too: the canary gets its own full session, the shadow keeps its one.
    m.set_canary("v2", 10)
    assert m.state.canary is not None and m.state.canary.threads == 2
    assert m.state.shadow is shadow
    # Another replica converges on the same roles from the aliases file.
    other = Reconciler(Registry(registry_dir), 2, (1, 10))
    other.poll_once()
    assert other.state.roles() == {"production": version, "canary": "v2", "shadow": "v2"}
    assert other.state.shadow is not None and other.state.shadow.threads == SHADOW_THREADS
    m.clear_shadow()
    assert m.state.shadow is None and m.state.canary is not None


# -- registry faults keep the last known good model (issue 10, defect 2) -------------------------


def test_missing_aliases_file_keeps_serving(registry_dir: Path, version: str) -> None:
    m = reconciler(registry_dir)
    m.poll_once()
    good = m.state.production
    faults = sample("vidrank_registry_faults_total", {"reason": "aliases_missing"})
    saved = (registry_dir / "aliases.json").read_bytes()
    (registry_dir / "aliases.json").unlink()
    assert m.poll_once() is False
    assert m.state.production is good and m.ready
    assert m.health.status == "aliases_missing"
    assert m.status()["status"] == "aliases_missing" and m.status()["since"]
    assert sample("vidrank_registry_ok") == 0
    m.poll_once()  # the same fault is counted once, not once per poll
    assert sample("vidrank_registry_faults_total", {"reason": "aliases_missing"}) == faults + 1
    (registry_dir / "aliases.json").write_bytes(saved)
    m.poll_once()
    assert m.health.status == "ok" and sample("vidrank_registry_ok") == 1
    assert m.state.production is good


def test_missing_registry_directory_keeps_serving(registry_dir: Path, version: str) -> None:
    m = reconciler(registry_dir)
    m.poll_once()
    good = m.state.production
    moved = registry_dir.with_name("registry-away")
    registry_dir.rename(moved)  # e.g. a volume that failed to mount
    m.poll_once()
    assert m.state.production is good
    assert m.status()["error"] == "the registry directory is missing"
    moved.rename(registry_dir)
    m.poll_once()
    assert m.health.status == "ok" and m.state.production is good


@pytest.mark.parametrize("content", [b"", b"{ not json", b"{}", b'["v1"]'])
def test_broken_aliases_file_keeps_serving(
    registry_dir: Path, version: str, content: bytes
) -> None:
    m = reconciler(registry_dir)
    m.poll_once()
    good = m.state.production
    (registry_dir / "aliases.json").write_bytes(content)
    m.poll_once()
    assert m.state.production is good and m.health.status == "aliases_invalid"


def test_only_an_explicit_deactivate_empties_a_replica(registry_dir: Path, version: str) -> None:
    m = reconciler(registry_dir)
    m.poll_once()
    Registry(registry_dir).deactivate()
    m.poll_once()
    assert not m.ready and m.health.status == "ok" and m.converged
    Registry(registry_dir).rollback()
    m.poll_once()
    assert m.state.pick("u").version == version


# -- an alias ahead of its version directory converges (issue 10, defect 4) ---------------------


def test_alias_written_before_the_version_appears_converges(
    registry_dir: Path, version: str
) -> None:
    """NFS lag: the replica sees the alias first; it retries with back-off until the version is
    visible, without a restart, and says meanwhile that it lags."""
    clock = FakeClock()
    m = reconciler(registry_dir, clock)
    m.poll_once()
    publish_as(registry_dir, version, "v2")
    lagging = registry_dir / "versions" / "v2"
    hidden = registry_dir / "v2-in-flight"
    Registry(registry_dir).activate("v2")
    lagging.rename(hidden)  # the alias is visible, the version directory not yet
    retries = sample("vidrank_model_load_retries_total")
    m.poll_once()
    assert m.state.pick("u").version == version
    assert not m.converged and sample("vidrank_model_converged") == 0
    assert sample("vidrank_model_desired", {"version": "v2", "role": "production"}) == 1
    assert sample("vidrank_model_info", {"version": version, "role": "production"}) == 1
    assert m.status()["retrying"]["v2"]["attempts"] == 1
    clock.now += 0.5
    assert m.poll_once() is False  # backing off: not retried at every poll
    assert sample("vidrank_model_load_retries_total") == retries + 1
    clock.now += 5
    m.poll_once()  # due again, still missing: the wait doubles
    assert m.status()["retrying"]["v2"]["attempts"] == 2
    hidden.rename(lagging)  # the version shows up
    clock.now += 10
    assert m.poll_once() is True
    assert m.state.pick("u").version == "v2"
    assert m.converged and sample("vidrank_model_converged") == 1
    assert m.status()["retrying"] == {}


def test_retry_stops_when_the_alias_moves_on(registry_dir: Path, version: str) -> None:
    clock = FakeClock()
    m = reconciler(registry_dir, clock)
    m.poll_once()
    publish_as(registry_dir, version, "v2")
    Registry(registry_dir).activate("v2")
    (registry_dir / "versions" / "v2").rename(registry_dir / "gone")
    m.poll_once()
    assert "v2" in m.status()["retrying"]
    Registry(registry_dir).rollback()  # back to a version that is there
    m.poll_once()
    assert m.status()["retrying"] == {} and m.converged


# -- an unwritable registry changes nothing (issue 10, defect 6) ---------------------------------


def test_admin_change_on_an_unwritable_registry_changes_nothing(
    registry_dir: Path, version: str
) -> None:
    publish_as(registry_dir, version, "v2")
    m = reconciler(registry_dir)
    m.poll_once()
    before = m.state
    aliases = (registry_dir / "aliases.json").read_bytes()
    (registry_dir / ".lock").unlink(missing_ok=True)
    (registry_dir / ".lock").mkdir()  # the lock cannot be opened for writing, even as root
    for call in (lambda: m.activate("v2"), m.rollback, lambda: m.set_canary("v2", 10)):
        with pytest.raises(RegistryUnavailable):
            call()
        assert m.state is before
    assert (registry_dir / "aliases.json").read_bytes() == aliases


def test_failure_after_the_rename_serves_what_the_file_says(
    registry_dir: Path, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aliases.json was replaced but the directory fsync failed: the process must not keep
    serving the old version while the file (and so every other replica) says the new one."""
    import model.core.artifacts as registry_module

    publish_as(registry_dir, version, "v2")
    m = reconciler(registry_dir)
    m.poll_once()

    def replaced_then_failed(dest: Path, data: bytes) -> None:
        dest.write_bytes(data)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(registry_module, "replace_durable", replaced_then_failed)
    with pytest.raises(RegistryUnavailable):
        m.activate("v2")
    assert Registry(registry_dir).read_aliases().production == "v2"
    assert m.state.pick("u").version == "v2" and m.converged


def test_unreadable_aliases_recover_when_the_file_comes_back_unchanged(
    registry_dir: Path, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = reconciler(registry_dir)
    m.poll_once()
    good = m.state.production
    real = Registry.aliases_stamp

    def eio(self: Registry) -> object:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Registry, "aliases_stamp", eio)  # e.g. a hung NFS mount
    m.poll_once()
    assert m.health.status == "unreadable" and m.state.production is good
    monkeypatch.setattr(Registry, "aliases_stamp", real)  # back, with the same content
    m.poll_once()
    assert m.health.status == "ok" and m.state.production is good
