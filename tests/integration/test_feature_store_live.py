"""The feature store under steady traffic: real ``vidrank serve`` processes over loopback.

Redis: a snapshot switch, a killed and restarted Redis, a paused Redis. Embedded: a snapshot
swap across two workers and a corrupt snapshot. Each response names the snapshot it used, and
the two snapshots give every candidate different scores, so a response that mixed them - or
that paired a snapshot with rows of the other - could not equal the answer expected for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from benchmarks.harness import (
    REDIS_MISSING,
    RedisServer,
    Server,
    find_redis_server,
    vidrank_cmd,
    wait_until,
)
from model.core.store.embedded import SnapshotStore
from model.core.store.redis_store import RedisSnapshots, connect
from model.core.store.snapshot import EntityTable
from tests.store_helpers import full_body, ids_body, items_of, shifted_tables

Start = Callable[..., Server]
Tables = dict[str, EntityTable]
VIDEOS = [3, 17, 250, 1999, 4000, 7999, 12, 640, 5120, 77, 901, 2222, 3333, 4444, 6001]
needs_redis = pytest.mark.skipif(find_redis_server() is None, reason=REDIS_MISSING)


@dataclass
class Traffic:
    """Threads posting the same ids-only request until stopped; every answer recorded."""

    url: str
    threads: int = 2
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for t in self._workers:
            t.start()

    def _run(self) -> None:
        body = ids_body(42, VIDEOS)
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    r = http.post("/rank", json=body)
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))
                    continue
                rec = {"t": start, "took": time.monotonic() - start, "status": r.status_code}
                if r.status_code == 200:
                    j = r.json()
                    rec.update(snapshot=j.get("feature_snapshot"), degraded=j.get("degraded"))
                    rec["items"] = items_of(j)
                self.records.append(rec)

    def since(self, t: float) -> list[dict[str, Any]]:
        return [r for r in list(self.records) if r["t"] >= t]

    def wait_for(self, check: Callable[[dict[str, Any]], bool], timeout: float) -> float:
        """Seconds until an answer started now or later satisfies ``check``."""
        start = time.monotonic()
        wait_until(lambda: any(check(r) for r in self.since(start)), timeout, "such an answer")
        return next(r["t"] for r in self.since(start) if check(r)) - start

    def wait_for_count(self, t: float, n: int, timeout: float = 30) -> None:
        """Wait until ``n`` answers started at ``t`` or later have come back."""
        wait_until(lambda: len(self.since(t)) >= n, timeout, f"{n} answers after {t}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(30)


@pytest.fixture
def traffic() -> Iterator[Callable[[str], Traffic]]:
    started: list[Traffic] = []

    def start(url: str) -> Traffic:
        started.append(Traffic(url))
        return started[-1]

    yield start
    for t in started:
        t.stop()


def expected(server: Server, tables: dict[str, Tables]) -> dict[str, list]:
    """{snapshot: the ranking of VIDEOS with that snapshot's values sent in the request}."""
    out = {}
    for name, t in tables.items():
        r = httpx.post(f"{server.url}/rank", json=full_body(t, 42, VIDEOS), timeout=10)
        out[name] = items_of(r.json())
    assert out["s1"] != out["s2"]
    for a, b in zip(out["s1"], out["s2"], strict=True):
        assert a[2] != b[2]  # every candidate's predictions differ between the snapshots
    return out


def pids_logging(server: Server, msg: str, snapshot: str) -> set[int]:
    """The server processes that logged ``msg`` about ``snapshot``."""
    records = server.log_records()
    return {r["pid"] for r in records if r.get("msg") == msg and r.get("snapshot") == snapshot}


def check_consistent(records: list[dict[str, Any]], want: dict[str, list]) -> set[str]:
    """Every answer that used a snapshot equals the ranking expected for that snapshot."""
    seen = set()
    for r in records:
        assert r["status"] == 200, r
        if r.get("degraded"):
            continue
        assert r["items"] == want[r["snapshot"]], f"answer of {r['snapshot']} differs"
        seen.add(r["snapshot"])
    return seen


@needs_redis
def test_redis_switch_kill_and_pause_under_traffic(
    start_server: Start,
    live_registry: Path,
    feature_tables: tuple[Tables, dict],
    tmp_path: Path,
    traffic: Callable[[str], Traffic],
) -> None:
    tables, source = feature_tables
    redis = RedisServer(tmp_path / "redis")
    try:
        store = RedisSnapshots(connect(redis.url, 10.0))
        store.publish(tables, "s1", source)
        store.publish(shifted_tables(tables), "s2", source)
        store.activate("s1")
        env = {
            "VIDRANK_FEATURE_STORE": redis.url,
            "VIDRANK_FEATURE_TIMEOUT_MS": "100",
            "VIDRANK_POLL_INTERVAL_S": "0.2",
        }
        server = start_server(live_registry, env=env)
        want = expected(server, {"s1": tables, "s2": shifted_tables(tables)})
        load = traffic(server.url)
        load.wait_for(lambda r: r.get("snapshot") == "s1", 10)

        # 1. Switch the active snapshot under traffic: no answer mixes the two.
        store.activate("s2")
        load.wait_for(lambda r: r.get("snapshot") == "s2" and not r.get("degraded"), 10)
        load.wait_for_count(time.monotonic(), 10)  # more answers after the switch
        assert check_consistent(load.records, want) == {"s1", "s2"}

        # 2. Kill Redis: degraded answers, never a 5xx; back within a second of its return.
        redis.command("SAVE")
        redis.signal(9)
        redis.wait(10)
        load.wait_for(lambda r: bool(r.get("degraded")), 10)
        load.wait_for_count(time.monotonic(), 5)  # Redis stays down for a few more answers
        redis = redis.restart()
        recovered = load.wait_for(lambda r: r.get("snapshot") == "s2" and not r.get("degraded"), 10)
        assert recovered <= 1.0, f"recovered {recovered:.2f}s after Redis came back"

        # 3. Pause Redis past the budget: answers degrade within the budget, not the pause.
        pause_at = time.monotonic()
        redis.command("CLIENT", "PAUSE", "2000", "ALL")
        load.wait_for_count(pause_at + 2.2, 1)  # an answer started after the pause came back
        during = [r for r in load.since(pause_at) if r["t"] < pause_at + 1.8]
        assert during and all(r["took"] < 1.0 for r in during), max(r["took"] for r in during)
        assert any(r.get("degraded") for r in during)
        load.stop()
        statuses = {r["status"] for r in load.records}
        assert statuses == {200} and not load.errors, (statuses, load.errors[:3])
        check_consistent(load.records, want)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'vidrank_feature_store_errors_total{reason="down"}' in metrics
        assert 'vidrank_feature_store_errors_total{reason="timeout"}' in metrics
    finally:
        redis.stop()


def test_embedded_swap_across_workers_and_a_corrupt_snapshot(
    start_server: Start,
    live_registry: Path,
    feature_tables: tuple[Tables, dict],
    traffic: Callable[[str], Traffic],
) -> None:
    import subprocess

    tables, source = feature_tables
    store = SnapshotStore(live_registry)
    store.publish(tables, "s1", source)
    store.publish(shifted_tables(tables), "s2", source)
    store.activate("s1")
    server = start_server(live_registry, workers=2, env={"VIDRANK_POLL_INTERVAL_S": "0.3"})
    want = expected(server, {"s1": tables, "s2": shifted_tables(tables)})
    load = traffic(server.url)
    load.wait_for(lambda r: r.get("snapshot") == "s1", 10)

    cli = vidrank_cmd("features", "activate", "s2", "--registry", str(live_registry))
    subprocess.run(cli, check=True, capture_output=True, timeout=60)
    load.wait_for(lambda r: r.get("snapshot") == "s2", 10)
    wait_until(lambda: len(pids_logging(server, "feature snapshot prepared", "s2")) == 2, 30,
               "both workers on s2", server)  # fmt: skip
    settled = time.monotonic()
    load.wait_for_count(settled, 10)  # answers started after it (slow on a busy machine)
    assert {r["snapshot"] for r in load.since(settled)} == {"s2"}

    # A corrupt snapshot named active behind the CLI's back: refused, s2 keeps serving.
    store.publish(tables, "s3", source)
    path = store.path("s3") / "user.register_days.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    store.activate("s3")
    wait_until(lambda: len(pids_logging(server, "feature snapshot refused", "s3")) == 2, 30,
               "both workers refused s3", server)  # fmt: skip
    load.wait_for_count(time.monotonic(), 10)  # answers after the refusal
    load.stop()
    assert not load.errors and check_consistent(load.records, want) == {"s1", "s2"}
    assert {r["snapshot"] for r in load.since(settled)} == {"s2"}
    done = subprocess.run(
        vidrank_cmd("features", "activate", "s3", "--registry", str(live_registry)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "sha256" in done.stderr
    server.stop()
    refusals = [r for r in server.log_records() if r.get("msg") == "feature snapshot refused"]
    assert refusals and all(r["snapshot"] == "s3" for r in refusals)
    assert len({r["pid"] for r in refusals}) == 2  # each worker refused it on its own
