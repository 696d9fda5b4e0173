"""Where feature views come from: the configured store, polled and switched off the request path.

The reconciler owns one :class:`FeatureSource` and calls it under its swap lock, so model and
snapshot changes are serialised and every ``ServingState`` it installs holds a view prepared for
exactly the versions it serves:

- ``prepare(view, scorer)`` while a model version loads: checks what the snapshot lacks (refused
  with ``FeatureStoreConflict`` when the store is required) and encodes the snapshot for the
  version's schema;
- ``cover(view, scorers)`` when a state is installed: the view with an encoding for every served
  schema (cheap: prepared before; never raises);
- ``poll(view, scorers)`` every poll interval: a new view when the active snapshot changed -
  load → verify → encode for every served schema → (the reconciler) swap; a failure keeps the old
  one serving and is logged and counted;
- ``activate(name, scorers)``: the same, then the alias is written (admin API).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from model.core.errors import VidrankError
from model.core.store.embedded import SnapshotStore
from model.core.store.encoded import EncodedSnapshot, encode_snapshot
from model.core.store.redis_store import RedisReader, RedisSnapshots, connect
from model.core.store.snapshot import ENTITY_IDS, Snapshot, SnapshotError, StoreUnavailable
from service import metrics
from service.errors import FeatureStoreConflict
from service.logging import log_fields
from service.rollout.background import Retries
from service.scoring.features import EmbeddedView, FeatureView, RedisView
from service.scoring.scorer import Scorer
from service.settings import Settings

log = logging.getLogger("vidrank.features")

_UNSEEN = object()


def build_source(settings: Settings) -> FeatureSource:
    """The source ``settings.feature_store`` names."""
    required = settings.feature_store_required
    if settings.feature_store == "off":
        return FeatureSource()
    if settings.feature_store == "embedded":
        store = SnapshotStore(settings.registry)
        cache = settings.feature_cache or store.encoded_root
        return EmbeddedSource(store, cache, required)
    return RedisSource(settings.feature_store, settings.feature_timeout_ms / 1000.0, required)


def _refuse_lacks(view: FeatureView, scorers: Sequence[Scorer], what: str) -> None:
    """With the store required, a snapshot/model pair that lacks features is refused (409)."""
    missing = {s.version: list(view.lacks(s.schema)) for s in scorers}
    missing = {v: m for v, m in missing.items() if m}
    if missing and view.required:
        raise FeatureStoreConflict(
            f"{what}: the feature store lacks features the model reads: {missing}",
            details={"lacks": missing},
        )
    for version, names in missing.items():
        log_fields(
            log, logging.WARNING, "feature store lacks model features",
            snapshot=view.snapshot, version=version, lacks=names,
        )  # fmt: skip


class FeatureSource:
    """No store (``VIDRANK_FEATURE_STORE=off``): requests carry their own features."""

    backend = "off"

    def __init__(self, required: bool = False, clock: Callable[[], float] = time.monotonic):
        self.required = required
        self._retries = Retries(clock)  # snapshots that failed, retried while still active

    def initial(self) -> FeatureView:
        return FeatureView(self.backend)

    def prepare(self, view: FeatureView, scorer: Scorer) -> None:
        """Check (and prepare) ``view`` for a version about to be served; may refuse it."""
        _refuse_lacks(view, [scorer], f"version {scorer.version}")

    def cover(self, view: FeatureView, scorers: Sequence[Scorer]) -> FeatureView:
        return view

    def poll(self, view: FeatureView, scorers: Sequence[Scorer]) -> FeatureView | None:
        return None

    def activate(self, name: str, scorers: Sequence[Scorer]) -> FeatureView:
        raise SnapshotError("no feature store is configured (VIDRANK_FEATURE_STORE=off)")

    def ready(self, view: FeatureView) -> str | None:
        """None when the store can serve (always, without a store), else why not."""
        return None

    def _failure(self, name: str, trigger: str, e: Exception) -> None:
        self._retries.failed(name)
        metrics.FEATURE_SWAP_FAILURES.labels(trigger).inc()
        reason = e.message if isinstance(e, VidrankError) else f"{type(e).__name__}: {e}"
        log_fields(
            log, logging.WARNING, "feature snapshot refused", snapshot=name, trigger=trigger,
            reason=reason,
        )  # fmt: skip


class EmbeddedSource(FeatureSource):
    """Snapshots in ``<registry>/features``, encoded per schema into a shared cache."""

    backend = "embedded"

    def __init__(
        self,
        store: SnapshotStore,
        cache: Path | None,
        required: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(required, clock)
        self.store = store
        self.cache = cache
        self._stamp: object = _UNSEEN
        self._memo: dict[tuple[str, str], EncodedSnapshot] = {}

    def initial(self) -> FeatureView:
        return FeatureView(self.backend, self.required)

    def _encode(self, snapshot: Snapshot, scorer: Scorer) -> EncodedSnapshot:
        key = (snapshot.digest, scorer.schema.digest)
        if key not in self._memo:
            start = time.perf_counter()
            enc = encode_snapshot(snapshot, scorer.schema, self.cache)
            log_fields(
                log, logging.INFO, "feature snapshot prepared", snapshot=snapshot.name,
                version=scorer.version, cached=enc.cached, cache_error=enc.cache_error,
                ms=round((time.perf_counter() - start) * 1000, 1),
            )  # fmt: skip
            self._memo[key] = enc
        return self._memo[key]

    def prepare(self, view: FeatureView, scorer: Scorer) -> None:
        super().prepare(view, scorer)
        if isinstance(view, EmbeddedView) and view.data is not None:
            self._encode(view.data, scorer)

    def cover(self, view: FeatureView, scorers: Sequence[Scorer]) -> FeatureView:
        if not isinstance(view, EmbeddedView) or view.data is None:
            return view
        wanted = {s.schema.digest: s for s in scorers}
        if wanted.keys() == view.prepared.keys():
            return view
        prepared = {}
        for digest, scorer in wanted.items():
            enc = view.prepared.get(digest)
            try:
                prepared[digest] = enc or self._encode(view.data, scorer)
            except Exception as e:  # a stored value this schema cannot encode: degrade, log
                self._failure(view.name, "prepare", e)
        keep = {(view.data.digest, d) for d in prepared}
        self._memo = {k: v for k, v in self._memo.items() if k in keep}
        return replace(view, prepared=prepared)

    def load(self, name: str, scorers: Sequence[Scorer]) -> EmbeddedView:
        """Load → verify → encode for every served schema; raises on any failure."""
        snapshot = self.store.load(name, verify=True)
        view = EmbeddedView(self.backend, self.required, None, snapshot)
        _refuse_lacks(view, scorers, f"snapshot {name}")
        return replace(view, prepared={s.schema.digest: self._encode(snapshot, s) for s in scorers})

    def poll(self, view: FeatureView, scorers: Sequence[Scorer]) -> FeatureView | None:
        stamp = self.store.aliases_stamp()
        name = view.snapshot
        retry_due = self._retries.any_due()
        if stamp == self._stamp and not retry_due:
            return None
        self._stamp = stamp
        active = self.store.read_aliases().active
        if active is None or active == name or self._retries.waiting(active):
            return None
        try:
            new = self.load(active, scorers)
        except Exception as e:  # anything: the old snapshot must keep serving
            self._failure(active, "poll", e)
            return replace(view, reason="unavailable") if view.snapshot is None else None
        self._retries.succeeded(active)
        return new

    def activate(self, name: str, scorers: Sequence[Scorer]) -> FeatureView:
        self.store.check_writable()  # 503 before seconds of loading a snapshot it cannot name
        try:
            view = self.load(name, scorers)
        except StoreUnavailable:
            raise  # the store's fault, not the snapshot's: it is not marked as failed
        except (SnapshotError, FeatureStoreConflict) as e:
            self._failure(name, "admin", e)
            raise
        self.store.activate(name)
        self._stamp = _UNSEEN  # re-read on the next poll: another writer may follow us
        return view

    def ready(self, view: FeatureView) -> str | None:
        return None if isinstance(view, EmbeddedView) else "no feature snapshot is loaded"


class RedisSource(FeatureSource):
    """The active snapshot named in Redis; rows are read per request
    (service/scoring/features.py)."""

    backend = "redis"

    def __init__(self, url: str, timeout_s: float, required: bool) -> None:
        super().__init__(required)
        self.client = connect(url, timeout_s)
        self.reader = RedisReader(self.client)

    def initial(self) -> FeatureView:
        return RedisView(self.backend, self.required, "no_snapshot", self.reader)

    def _view(self, name: str, manifest: dict) -> RedisView:
        columns = {e: tuple(manifest["entities"][e]["columns"]) for e in ENTITY_IDS}
        return RedisView(self.backend, self.required, None, self.reader, name, columns)

    def poll(self, view: FeatureView, scorers: Sequence[Scorer]) -> FeatureView | None:
        try:
            active = self.reader.active()
        except StoreUnavailable as e:  # keep serving the snapshot we know; requests degrade
            return replace(view, reason=e.reason) if view.snapshot is None else None
        if active is None:
            return replace(view, reason="no_snapshot") if view.snapshot is None else None
        name, manifest = active
        if name == view.snapshot or self._retries.waiting(name):
            return None
        new = self._view(name, manifest)
        try:
            _refuse_lacks(new, scorers, f"snapshot {name}")
        except FeatureStoreConflict as e:
            self._failure(name, "poll", e)
            return None
        return new

    def activate(self, name: str, scorers: Sequence[Scorer]) -> FeatureView:
        try:
            new = self._view(name, RedisSnapshots(self.client).manifest(name))
            _refuse_lacks(new, scorers, f"snapshot {name}")
        except StoreUnavailable:
            raise  # Redis down or paused (503): the snapshot is not marked as failed
        except (SnapshotError, FeatureStoreConflict) as e:
            self._failure(name, "admin", e)
            raise
        RedisSnapshots(self.client).activate(name)
        return new

    def ready(self, view: FeatureView) -> str | None:
        if view.snapshot is None:
            return f"no feature snapshot ({view.reason})"
        try:
            self.reader.ping()
        except StoreUnavailable as e:
            return f"feature store {e.reason}"
        return None
