"""Ranking by ids with the Redis feature store: a real redis-server, started here, in-process app.

The server is ``redis-server`` from the OS (``.ci/run`` installs Debian's package), on a free
loopback port with its files in the test's temp directory.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import AUTH, HOST, REDIS_MISSING, RedisServer, find_redis_server
from model.core.features import id_keys
from model.core.store.redis_store import (
    Keys,
    RedisReader,
    RedisSnapshots,
    StoreUnavailable,
    connect,
)
from model.core.store.snapshot import EntityTable
from tests.service.service_helpers import sample
from tests.store_helpers import full_body, ids_body, items_of, shifted_tables

pytestmark = pytest.mark.skipif(find_redis_server() is None, reason=REDIS_MISSING)
Tables = dict[str, EntityTable]
VIDEOS = [3, 17, 250, 1999, 4000, 7999, 12, 640, 5120, 77]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def published(redis_server: RedisServer, feature_tables: tuple[Tables, dict]) -> RedisServer:
    """Snapshot s1 of the simulated world in Redis, active."""
    store = RedisSnapshots(connect(redis_server.url, 10.0))
    store.publish(feature_tables[0], "s1", feature_tables[1])
    store.activate("s1")
    return redis_server


@pytest.fixture
def redis_client(
    make_client: Callable[..., TestClient], published: RedisServer
) -> Callable[..., TestClient]:
    def make(**overrides: object) -> TestClient:
        return make_client(
            **{"feature_store": published.url, "feature_timeout_ms": 200, **overrides}
        )

    return make


def test_ranking_by_ids_equals_sending_the_stored_features(
    redis_client: Callable[..., TestClient], feature_tables: tuple
) -> None:
    client = redis_client()
    got = client.post("/rank", json=ids_body(42, VIDEOS))
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["feature_snapshot"] == "s1" and "degraded" not in body
    full = client.post("/rank", json=full_body(feature_tables[0], 42, VIDEOS)).json()
    assert items_of(body) == items_of(full)
    assert client.get("/models").json()["feature_store"] == {
        "backend": "redis",
        "snapshot": "s1",
        "required": False,
        "status": "ok",
        "lacks": {"v-tiny": []},
    }


def test_overrides_win_and_unknown_ids_take_defaults(
    redis_client: Callable[..., TestClient],
    make_client: Callable[..., TestClient],
    feature_tables: tuple,
) -> None:
    client = redis_client()
    body = ids_body(42, VIDEOS)
    body["candidates"][1]["features"] = {"duration_s": 900.0}
    body["user"]["features"] = {"fans_user_num": 10_000}
    full = full_body(feature_tables[0], 42, VIDEOS)
    full["candidates"][1]["features"]["duration_s"] = 900.0
    full["user"]["features"]["fans_user_num"] = 10_000
    assert items_of(client.post("/rank", json=body).json()) == items_of(
        client.post("/rank", json=full).json()
    )
    misses = sample("vidrank_feature_misses_total", {"entity": "item"})
    unknown = ids_body(42, [10_000_001, "nope"])
    got = client.post("/rank", json=unknown).json()
    assert sample("vidrank_feature_misses_total", {"entity": "item"}) == misses + 2
    # Without a store, the same items with the user's stored features sent: item defaults.
    bare = full_body(feature_tables[0], 42, [10_000_001, "nope"])
    off = make_client(feature_store="off").post("/rank", json=bare).json()
    assert len(got["items"]) == 2 and items_of(got) == items_of(off)


def test_garbage_in_the_store_degrades_and_is_counted(
    redis_client: Callable[..., TestClient], published: RedisServer
) -> None:
    client = redis_client()
    key = Keys().table("s1", "item")
    field = str(int(id_keys([VIDEOS[0]])[0]))
    published.command("HSET", key, field, "\xff not json")
    errors = sample("vidrank_feature_store_errors_total", {"reason": "garbage"})
    r = client.post("/rank", json=ids_body(42, VIDEOS))
    assert r.status_code == 200 and r.json()["degraded"] == ["feature_store"]
    assert sample("vidrank_feature_store_errors_total", {"reason": "garbage"}) == errors + 1
    published.command("HSET", key, field, '["wrong", "width"]')
    assert client.post("/rank", json=ids_body(42, VIDEOS)).json()["degraded"] == ["feature_store"]
    published.command("HSET", key, field, '[1,"NORMAL",2,"3",{"a":1},5]')  # a dict: not a value
    assert client.post("/rank", json=ids_body(42, VIDEOS)).json()["degraded"] == ["feature_store"]
    # A bad value the *request* sends is still the request's 422, not a degraded answer.
    body = ids_body(42, VIDEOS[1:])
    body["candidates"][0]["features"] = {"duration_s": "long"}
    r = client.post("/rank", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == "candidates[0].features.duration_s"


def test_redis_down_degrades_never_500_and_recovers(
    redis_client: Callable[..., TestClient], published: RedisServer
) -> None:
    client = redis_client()
    published.command("SAVE")
    published.stop()
    down = sample("vidrank_feature_store_errors_total", {"reason": "down"})
    for _ in range(3):
        r = client.post("/rank", json=ids_body(42, VIDEOS))
        assert r.status_code == 200 and r.json()["degraded"] == ["feature_store"]
    assert sample("vidrank_feature_store_errors_total", {"reason": "down"}) == down + 3
    assert client.get("/readyz").status_code == 200  # not required: still ready
    again = published.restart()
    try:
        r = client.post("/rank", json=ids_body(42, VIDEOS)).json()
        assert "degraded" not in r and r["feature_snapshot"] == "s1"
    finally:
        again.stop()


def test_required_store_answers_503_and_readiness_follows_it(
    redis_client: Callable[..., TestClient], published: RedisServer
) -> None:
    client = redis_client(feature_store_required=True)
    assert client.get("/readyz").status_code == 200
    published.command("SAVE")
    published.stop()
    r = client.post("/rank", json=ids_body(42, VIDEOS))
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "feature_store_unavailable"
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "feature store" in ready.json()["error"]["message"]
    again = published.restart()
    try:
        assert client.get("/readyz").status_code == 200
        assert client.post("/rank", json=ids_body(42, VIDEOS)).status_code == 200
    finally:
        again.stop()


def test_a_paused_redis_costs_at_most_the_budget(
    redis_client: Callable[..., TestClient], published: RedisServer
) -> None:
    client = redis_client(feature_timeout_ms=50)
    assert "degraded" not in client.post("/rank", json=ids_body(42, VIDEOS)).json()
    published.command("CLIENT", "PAUSE", "3000", "ALL")
    start = time.perf_counter()
    r = client.post("/rank", json=ids_body(42, VIDEOS))
    took = time.perf_counter() - start
    assert r.status_code == 200 and r.json()["degraded"] == ["feature_store"]
    assert took < 1.5, f"{took:.2f}s: the request waited for the paused Redis"  # pause is 3 s
    assert sample("vidrank_feature_store_errors_total", {"reason": "timeout"}) >= 1


class TricklingProxy:
    """A TCP proxy in front of Redis that passes requests at once and delivers every reply in
    ``piece``-byte slices, ``delay_s`` apart: a slow link, where no single wait is long."""

    def __init__(self, port: int, piece: int, delay_s: float) -> None:
        self.target, self.piece, self.delay_s = port, piece, delay_s
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                upstream = socket.create_connection((HOST, self.target))
                self.sockets += [client, upstream]
                threading.Thread(target=self._pump, args=(client, upstream, 0), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, 1), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: int) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                for i in range(0, len(data), self.piece if slow else len(data)):
                    time.sleep(self.delay_s * slow)
                    dst.sendall(data[i : i + self.piece] if slow else data)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_a_slow_redis_costs_one_budget_per_round_trip_not_one_per_socket_wait(
    published: RedisServer,
) -> None:
    """Every reply slice comes within the budget, the whole reply does not: past the budget the
    lookup is a timeout (degraded), not a success after many budgets' worth of small waits."""
    proxy = TricklingProxy(published.port, piece=48, delay_s=0.1)
    try:
        user_key, item_keys = int(id_keys([42])[0]), id_keys(VIDEOS)
        slow = RedisReader(connect(proxy.url, 5.0))  # a budget that covers the whole trickle
        user, items = slow.fetch("s1", user_key, item_keys)
        assert (
            sum(len(r) for r in [user or b"", *filter(None, items)]) > 8 * 48
        )  # 9+ slices: 0.9+ s
        tight = RedisReader(connect(proxy.url, 0.35))  # > one slice's wait, < the trickle
        tight.ping()  # connected: the round trip below is the pipeline alone
        with pytest.raises(StoreUnavailable) as raised:
            tight.fetch("s1", user_key, item_keys)
        assert raised.value.reason == "timeout"
    finally:
        proxy.close()


def test_snapshots_switch_atomically_and_old_ones_expire(
    redis_client: Callable[..., TestClient], published: RedisServer, feature_tables: tuple
) -> None:
    client = redis_client()
    first = client.post("/rank", json=ids_body(42, VIDEOS)).json()
    store = RedisSnapshots(connect(published.url, 10.0))
    store.publish(shifted_tables(feature_tables[0]), "s2", feature_tables[1])
    assert store.snapshots() == ["s1", "s2"] and store.active() == "s1"
    r = client.post("/admin/features/s2/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    second = client.post("/rank", json=ids_body(42, VIDEOS)).json()
    assert second["feature_snapshot"] == "s2" and items_of(second) != items_of(first)
    ttl = int(published.command("TTL", Keys().table("s1", "item")).strip(b":\r\n"))
    assert 0 < ttl <= 3600  # the replaced snapshot expires after the grace period
    assert int(published.command("TTL", Keys().table("s2", "item")).strip(b":\r\n")) == -1


def test_an_expired_snapshot_is_an_error_not_a_page_of_misses(
    redis_client: Callable[..., TestClient], published: RedisServer
) -> None:
    client = redis_client()
    assert "degraded" not in client.post("/rank", json=ids_body(42, VIDEOS)).json()
    for key in (Keys().manifest("s1"), Keys().table("s1", "item"), Keys().table("s1", "user")):
        published.command("DEL", key)  # what the grace-period expiry does
    misses = sample("vidrank_feature_misses_total", {"entity": "item"})
    r = client.post("/rank", json=ids_body(42, VIDEOS)).json()
    assert r["degraded"] == ["feature_store"]
    assert sample("vidrank_feature_store_errors_total", {"reason": "expired"}) >= 1
    assert sample("vidrank_feature_misses_total", {"entity": "item"}) == misses
