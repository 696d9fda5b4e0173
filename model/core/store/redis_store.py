"""The Redis feature store: snapshots as one hash per entity, an active-snapshot key (redis-py).

For a fleet: many replicas, features updated often, no shared volume. Keys (``P`` = the prefix,
``vidrank:features`` by default)::

    P:active                 the active snapshot's name; switched only after a complete write
    P:snapshots              sorted set of published snapshots (score: publish time)
    P:<snapshot>:manifest    JSON: format, created_at, source, per entity: id, rows, columns
    P:<snapshot>:user        hash: id key -> the row's values as a JSON array (manifest order)
    P:<snapshot>:item        the same for videos

A hash field is the decimal form of the encoder's 64-bit id key (``features.id_keys``), so ``42``
and ``"42"`` find the same row. One request is one pipelined round trip: ``HGET`` of the user and
``HMGET`` of every candidate, both in the snapshot the service is serving, so a response never
mixes two snapshots. A snapshot is written under a TTL (a crashed publish expires by itself),
made persistent once complete, and only then named by ``P:active``; the snapshot it replaces
expires after a grace period, long enough for every replica to have polled the new name.

The serving client has no retries, and one request's round trip - (re)connecting, the connection's
handshake, sending, every reply - shares one deadline, the budget from its start (``connect``'s
``timeout_s``): a slow or dead Redis costs a request about the budget, never a retry loop nor
the budget once per socket operation.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from model.core.fileio import utc_now_iso
from model.core.store.snapshot import (
    ENTITY_IDS,
    SNAPSHOT_FORMAT,
    EntityTable,
    Progress,
    SnapshotError,
    SnapshotNotFound,
    StoreUnavailable,
)

if TYPE_CHECKING:  # redis is imported when a store is used: serving without Redis never loads it
    import redis

PREFIX = "vidrank:features"
STAGING_TTL_S = 24 * 3600  # a publish that never completes disappears after this
KEEP_PREVIOUS_S = 3600  # a replaced snapshot stays readable this long
WRITE_CHUNK = 10_000  # hash fields per HSET


# When the current round trip started (see ``round_trip``); None: each socket call has the
# client's timeout, as for publishing and polling.
_ROUND_TRIP_START: ContextVar[float | None] = ContextVar("redis_round_trip", default=None)
_MIN_WAIT_S = 1e-4  # a spent budget still makes the call, with a wait too short to succeed


@contextmanager
def round_trip() -> Iterator[None]:
    """Within this block, every socket wait of the client ends by one deadline: the block's
    start plus the client's timeout, however many operations the round trip needs."""
    token = _ROUND_TRIP_START.set(time.monotonic())
    try:
        yield
    finally:
        _ROUND_TRIP_START.reset(token)


def _time_left(budget_s: float | None) -> float | None:
    """What is left of the current round trip's budget (None outside one)."""
    start = _ROUND_TRIP_START.get()
    if start is None or budget_s is None:
        return None
    return max(start + budget_s - time.monotonic(), _MIN_WAIT_S)


class _DeadlineSocket:
    """A connected socket whose blocking calls, within a round trip, wait at most for what is
    left of its budget; outside one (and for a shorter wait redis-py asks for, such as its
    zero-wait probe for stale data) the timeout redis-py set."""

    def __init__(self, sock: Any, budget_s: float | None) -> None:
        self._sock, self._budget_s = sock, budget_s
        self._wanted: float | None = sock.gettimeout()  # what redis-py last asked for

    def settimeout(self, value: float | None) -> None:
        self._wanted = value
        self._sock.settimeout(value)

    def _cut(self) -> None:
        left, wait = _time_left(self._budget_s), self._wanted
        if left is not None and (wait is None or left < wait):
            wait = left
        self._sock.settimeout(wait)

    def recv(self, *args: Any) -> Any:
        self._cut()
        return self._sock.recv(*args)

    def recv_into(self, *args: Any) -> Any:
        self._cut()
        return self._sock.recv_into(*args)

    def sendall(self, *args: Any) -> Any:
        self._cut()
        return self._sock.sendall(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@functools.cache
def _deadline_classes() -> dict[str, type]:
    """The URL scheme's connection class, its waits cut to the round trip's deadline."""
    import redis

    class Deadline:
        """Connect with the time left, then read and write through a ``_DeadlineSocket``."""

        socket_timeout: float | None
        socket_connect_timeout: float | None

        def connect_check_health(self, *args: Any, **kwargs: Any) -> Any:
            saved, left = self.socket_connect_timeout, _time_left(self.socket_timeout)
            self.socket_connect_timeout = saved if left is None else left
            try:
                return super().connect_check_health(*args, **kwargs)  # type: ignore[misc]
            finally:
                self.socket_connect_timeout = saved

        def _connect(self) -> _DeadlineSocket:
            return _DeadlineSocket(super()._connect(), self.socket_timeout)  # type: ignore[misc]

    bases = {
        "redis": redis.Connection,
        "rediss": redis.SSLConnection,
        "unix": redis.UnixDomainSocketConnection,
    }
    return {k: type(f"Deadline{b.__name__}", (Deadline, b), {}) for k, b in bases.items()}


def connect(url: str, timeout_s: float | None = None) -> redis.Redis:
    """A client with its own connection pool, no retries and ``timeout_s`` on every socket call
    (within ``round_trip``: on the whole round trip)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    scheme = url.partition("://")[0].lower()
    extra = {"connection_class": _deadline_classes()[scheme]} if timeout_s is not None else {}
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        **extra,
    )


@dataclass(frozen=True)
class Keys:
    """The key names of one prefix."""

    prefix: str = PREFIX

    @property
    def active(self) -> str:
        return f"{self.prefix}:active"

    @property
    def snapshots(self) -> str:
        return f"{self.prefix}:snapshots"

    def manifest(self, snapshot: str) -> str:
        return f"{self.prefix}:{snapshot}:manifest"

    def table(self, snapshot: str, entity: str) -> str:
        return f"{self.prefix}:{snapshot}:{entity}"


def _text(value: Any) -> str | None:
    """A reply as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def _unavailable(e: Exception) -> StoreUnavailable:
    import redis

    if isinstance(e, redis.TimeoutError):
        return StoreUnavailable("timeout", f"feature store timed out: {e}")
    return StoreUnavailable("down", f"feature store unreachable: {type(e).__name__}: {e}")


@contextmanager
def _answering() -> Iterator[None]:
    """Turn a Redis client error (down, paused past the timeout) into ``StoreUnavailable``."""
    import redis

    try:
        yield
    except redis.RedisError as e:
        raise _unavailable(e) from None


def _check_manifest(raw: Any, name: str) -> dict[str, Any]:
    if raw is None:
        raise SnapshotNotFound(f"snapshot {name!r} is not in the Redis store (or has expired)")
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise StoreUnavailable("garbage", f"manifest of {name} is not JSON: {e}") from None
    ok = isinstance(manifest, dict) and manifest.get("format") == SNAPSHOT_FORMAT
    entities = manifest.get("entities") if ok else None
    if not isinstance(entities, dict) or set(entities) != set(ENTITY_IDS):
        raise StoreUnavailable("garbage", f"manifest of {name} is not a snapshot manifest")
    for spec in entities.values():
        if not isinstance(spec, dict) or not isinstance(spec.get("columns"), dict):
            raise StoreUnavailable("garbage", f"manifest of {name} lacks its columns")
    return manifest


# -- serving -------------------------------------------------------------------------------------


class RedisReader:
    """The service's side: which snapshot is active, and the rows of one request."""

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self.client = client
        self.keys = Keys(prefix)

    def active(self) -> tuple[str, dict[str, Any]] | None:
        """(name, manifest) of the active snapshot, None when none is; StoreUnavailable."""
        import redis

        try:
            snapshot = _text(self.client.get(self.keys.active))
            if snapshot is None:
                return None
            raw = self.client.get(self.keys.manifest(snapshot))
        except redis.RedisError as e:
            raise _unavailable(e) from None
        return snapshot, _check_manifest(raw, snapshot)

    def ping(self) -> None:
        import redis

        try:
            self.client.ping()
        except redis.RedisError as e:
            raise _unavailable(e) from None

    def fetch(
        self, snapshot: str, user_key: int, item_keys: np.ndarray
    ) -> tuple[bytes | None, list[bytes | None]]:
        """The raw user row and item rows (None: not stored), in one pipelined round trip.

        The same round trip checks that the snapshot still exists: one that expired (a replica
        that could not poll for longer than the grace period) is an error, not a row of misses.
        """
        import redis

        fields = [b"%d" % k for k in item_keys.tolist()]
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self.keys.manifest(snapshot))
        pipe.hget(self.keys.table(snapshot, "user"), b"%d" % user_key)
        if fields:
            pipe.hmget(self.keys.table(snapshot, "item"), fields)
        try:
            with round_trip():
                out = pipe.execute()
        except redis.RedisError as e:
            raise _unavailable(e) from None
        if not out[0]:
            raise StoreUnavailable("expired", f"snapshot {snapshot} is no longer in the store")
        return out[1], (out[2] if fields else [])


def decode_rows(raw: Sequence[bytes | None], width: int) -> list[list[Any] | None]:
    """Rows of ``width`` values from their JSON (None where absent); StoreUnavailable on garbage."""
    present = [r for r in raw if r is not None]
    if not present:
        return [None] * len(raw)
    try:
        rows = orjson.loads(b"[" + b",".join(present) + b"]")
    except orjson.JSONDecodeError as e:
        raise StoreUnavailable("garbage", f"a stored row is not JSON: {e}") from None
    if set(map(type, rows)) != {list} or set(map(len, rows)) != {width}:
        raise StoreUnavailable("garbage", f"a stored row is not a list of {width} values")
    it = iter(rows)
    return [None if r is None else next(it) for r in raw]


# -- publishing ----------------------------------------------------------------------------------


class RedisSnapshots:
    """The publisher's side: write, list, inspect and activate snapshots."""

    def __init__(self, client: redis.Redis, prefix: str = PREFIX) -> None:
        self.client = client
        self.keys = Keys(prefix)

    def active(self) -> str | None:
        """The active snapshot's name (None before the first activation)."""
        with _answering():
            return _text(self.client.get(self.keys.active))

    def manifest(self, name: str) -> dict[str, Any]:
        """A snapshot's manifest; ``SnapshotNotFound`` when absent or expired."""
        with _answering():
            raw = self.client.get(self.keys.manifest(name))
        return _check_manifest(raw, name)

    def snapshots(self) -> list[str]:
        """Published snapshots that still exist, oldest first."""
        with _answering():
            return self._snapshots()

    def _snapshots(self) -> list[str]:
        names = [str(_text(n)) for n in self.client.zrange(self.keys.snapshots, 0, -1)]
        if not names:
            return []
        alive = self.client.exists  # one EXISTS per name: the list is short
        gone = [n for n in names if not alive(self.keys.manifest(n))]
        if gone:
            self.client.zrem(self.keys.snapshots, *gone)
        return [n for n in names if n not in gone]

    def publish(
        self,
        tables: Mapping[str, EntityTable],
        name: str,
        source: Mapping[str, Any],
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Write every row, then the manifest; the snapshot is complete (not yet active)."""
        if self.client.exists(self.keys.manifest(name)):
            raise SnapshotError(f"snapshot {name!r} is already in the Redis store")
        entities: dict[str, Any] = {}
        for entity, table in tables.items():
            key = self.keys.table(name, entity)
            self.client.unlink(key)  # leftovers of a crashed publish of the same name
            columns = table.feature_columns
            for start in range(0, table.rows, WRITE_CHUNK):
                self._write_chunk(key, table, columns, start)
                if progress is not None:
                    progress(f"{entity} {min(start + WRITE_CHUNK, table.rows)}/{table.rows}")
            entities[entity] = {
                "id": table.id_column,
                "rows": table.rows,
                "columns": {c: table.columns[c].kind for c in columns},
            }
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "snapshot": name,
            "created_at": utc_now_iso(),
            "source": dict(source),
            "entities": entities,
        }
        pipe = self.client.pipeline(transaction=True)
        for entity in tables:
            pipe.persist(self.keys.table(name, entity))
        pipe.set(self.keys.manifest(name), json.dumps(manifest, allow_nan=False))
        pipe.zadd(self.keys.snapshots, {name: time.time()})
        pipe.execute()
        return manifest

    def _write_chunk(
        self, key: str, table: EntityTable, columns: tuple[str, ...], start: int
    ) -> None:
        sel = slice(start, start + WRITE_CHUNK)
        fields = [b"%d" % k for k in table.keys[sel].tolist()]
        values = [table.columns[c].take(sel).tolist() for c in columns]
        dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
        rows = (
            [dumps(list(r)) for r in zip(*values, strict=True)] if columns else ["[]"] * len(fields)
        )
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(key, mapping=dict(zip(fields, rows, strict=True)))
        pipe.expire(key, STAGING_TTL_S)
        pipe.execute()

    def activate(self, name: str, keep_previous_s: int = KEEP_PREVIOUS_S) -> str | None:
        """Name ``name`` active (it must be complete); the old one expires after a grace period.

        Returns the snapshot it replaced.
        """
        self.manifest(name)  # SnapshotNotFound when absent or expired
        previous = self.active()
        with _answering():
            self._switch(name, previous, keep_previous_s)
        return previous

    def _switch(self, name: str, previous: str | None, keep_previous_s: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        for key in (self.keys.manifest(name), *(self.keys.table(name, e) for e in ENTITY_IDS)):
            pipe.persist(key)  # a snapshot activated again (a roll-back) must not expire
        pipe.set(self.keys.active, name)
        if previous is not None and previous != name:
            for e in ENTITY_IDS:
                pipe.expire(self.keys.table(previous, e), keep_previous_s)
            pipe.expire(self.keys.manifest(previous), keep_previous_s)
        pipe.execute()
