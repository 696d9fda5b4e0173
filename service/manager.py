"""Model manager: which versions this process serves, and how they change while it serves.

Every change follows one path: load the bundle (checksum, schema) → create the session and check
it against the manifest → warm it up → swap one reference. A failure anywhere leaves the old
model serving. Loading never happens on the request path.

The request path only reads :attr:`ModelManager.state`, an immutable :class:`ServingState`, with
no lock: rebinding an attribute is atomic in Python, so a request sees either the old state or
the new one. Swaps are serialised by ``_swap_lock``. The state also holds the feature view
(service/features.py): the active feature snapshot, prepared for exactly the versions the state
serves, so a request never pairs a model with features prepared for another or from two
snapshots. Snapshot switches go through the same lock and the same one-reference swap.

Releasing the old model: nothing in the manager keeps a reference to a version it stopped serving
(no cache of previous versions, TF Serving #1215). A request that picked the old scorer holds a
reference until it returns, so Python's reference counting frees the scorer, and with it the
onnxruntime session, when the last such request finishes - no explicit ref-count is needed and
no in-flight request loses its session.

Admin changes (activate, rollback, canary) load and warm the target *before* writing the
registry's aliases, so a bundle that fails here never reaches the other replicas. Every replica
runs :meth:`poll_once` periodically (a background thread) and converges on the aliases file.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from model.core.bundle import BundleError
from model.core.errors import VidrankError
from model.core.registry import (
    Aliases,
    Canary,
    InvalidVersionName,
    Registry,
    RegistryError,
    VersionNotFound,
)
from service import metrics
from service.errors import FeatureStoreConflict, NotReady, SwapFailed
from service.feature_source import FeatureSource
from service.features import FeatureView
from service.logging import log_fields
from service.scorer import Scorer

log = logging.getLogger("vidrank.manager")

FAILED_RETRY_S = 60.0  # a version that failed to load is retried this often while still aliased
_UNSEEN = object()  # an aliases stamp that equals no real one
NO_FEATURES = FeatureView()


def canary_bucket(user_id: object) -> float:
    """A stable position in [0, 100) for a user: the same user always lands in the same place.

    The canonical id is its decimal/string form, so ``42`` and ``"42"`` are one user.
    """
    digest = hashlib.blake2b(str(user_id).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % 10_000) / 100.0


@dataclass(frozen=True)
class ServingState:
    """The versions this process serves; replaced whole on every swap."""

    production: Scorer | None = None
    canary: Scorer | None = None
    canary_percent: float = 0.0
    features: FeatureView = NO_FEATURES  # prepared for production and canary

    def pick(self, user_id: object) -> Scorer:
        """The scorer for a user: the canary for ``canary_percent`` of users, else production."""
        if self.production is None:
            raise NotReady("no model is loaded yet")
        if self.canary is not None and canary_bucket(user_id) < self.canary_percent:
            return self.canary
        return self.production

    def roles(self) -> dict[str, str]:
        """{role: version} of what is served."""
        out: dict[str, str] = {}
        if self.production is not None:
            out["production"] = self.production.version
        if self.canary is not None:
            out["canary"] = self.canary.version
        return out

    def loaded(self) -> dict[str, Scorer]:
        out = {}
        for s in (self.production, self.canary):
            if s is not None:
                out[s.version] = s
        return out


class ModelManager:
    """Loads, warms, swaps and polls model versions for one process (no HTTP here)."""

    def __init__(
        self,
        registry: Registry,
        intra_op_threads: int,
        warmup_sizes: tuple[int, ...],
        clock: Callable[[], float] = time.monotonic,
        features: FeatureSource | None = None,
    ) -> None:
        self.registry = registry
        self.intra_op_threads = intra_op_threads
        self.warmup_sizes = warmup_sizes
        self.features = features if features is not None else FeatureSource()
        self.state = ServingState(features=self.features.initial())
        self._clock = clock
        self._swap_lock = threading.Lock()
        self._stamp: object = _UNSEEN  # the first poll always converges
        self._failed: dict[str, float] = {}  # version -> when it last failed to load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_poll_error: str | None = None
        self._last_feature_error: str | None = None

    # -- request path -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True while a production model is loaded and warmed (an empty registry is not ready)."""
        return self.state.production is not None

    # -- loading ------------------------------------------------------------------------------
    def _load(self, version: str, trigger: str) -> Scorer:
        """Load, verify and warm ``version``; raises ``SwapFailed`` (or ``VersionNotFound``)."""
        start = time.perf_counter()
        try:
            bundle = self.registry.bundle(version)  # checksum + schema
            scorer = Scorer(bundle, self.intra_op_threads)  # session + I/O check
            warm_s = scorer.warm_up(self.warmup_sizes)
            self.features.prepare(self.state.features, scorer)  # lacks check; encode snapshot
        except (VersionNotFound, InvalidVersionName):  # 404, not a failed swap
            raise
        except Exception as e:  # anything at all: the old model must keep serving
            reason = _reason(e)
            self._failed[version] = self._clock()
            metrics.SWAP_FAILURES.labels(trigger).inc()
            log.warning(
                "model load failed",
                exc_info=not isinstance(e, BundleError | RegistryError),
                extra={"fields": {"version": version, "trigger": trigger, "reason": reason}},
            )
            details = e.details if isinstance(e, FeatureStoreConflict) else None
            # A client sees a domain error's own message (no paths in it); anything else, e.g.
            # an onnxruntime message naming the model's absolute path, stays in the log.
            public = e.message if isinstance(e, VidrankError) else f"{type(e).__name__} (see log)"
            raise SwapFailed(f"cannot serve version {version}: {public}", details=details) from e
        self._failed.pop(version, None)
        load_s = time.perf_counter() - start
        metrics.LOAD_SECONDS.observe(load_s)
        log_fields(
            log, logging.INFO, "model loaded", version=version, trigger=trigger,
            load_ms=round(load_s * 1000, 1), warmup_ms=round(warm_s * 1000, 1),
        )  # fmt: skip
        return scorer

    def _get(self, version: str, trigger: str) -> Scorer:
        """The scorer of ``version``: the one already served, else a freshly loaded one."""
        current = self.state.loaded().get(version)
        return current if current is not None else self._load(version, trigger)

    def _install(self, new: ServingState, trigger: str) -> None:
        """Swap the served state (holds ``_swap_lock``), its features prepared for its scorers."""
        old = self.state
        new = replace(new, features=self.features.cover(new.features, list(new.loaded().values())))
        if old == new:  # the same scorers and features (compared by identity) and canary share
            return
        self.state = new  # the swap: one reference, atomic for readers
        if old.features.snapshot != new.features.snapshot:
            metrics.set_snapshot(old.features.snapshot, new.features.snapshot)
            metrics.FEATURE_SWAPS.labels(trigger).inc()
            log_fields(
                log, logging.INFO, "feature snapshot swap", trigger=trigger,
                old=old.features.snapshot, new=new.features.snapshot,
            )  # fmt: skip
        if old.roles() == new.roles() and old.canary_percent == new.canary_percent:
            return
        metrics.set_served(old.roles(), new.roles())
        metrics.SWAPS.labels(trigger).inc()
        log_fields(
            log, logging.INFO, "model swap", trigger=trigger,
            old=old.roles(), new=new.roles(), canary_percent=new.canary_percent,
        )  # fmt: skip

    def _state_for(
        self, aliases: Aliases, trigger: str, ready: dict[str, Scorer] | None = None
    ) -> ServingState:
        """The state that serves ``aliases``, loading what is not loaded yet (never raises).

        ``ready`` holds scorers already loaded for this change. A version that fails to load keeps
        the current scorer in its role; one that failed recently is not retried until
        ``FAILED_RETRY_S`` passed (an explicit admin call always retries).
        """
        cur = self.state
        ready = ready or {}

        def obtain(version: str | None, fallback: Scorer | None) -> Scorer | None:
            if version is None:
                return None
            if version in ready:
                return ready[version]
            failed_at = self._failed.get(version)
            if failed_at is not None and self._clock() - failed_at < FAILED_RETRY_S:
                return fallback
            try:
                return self._get(version, trigger)
            except (SwapFailed, RegistryError):
                return fallback

        production = obtain(aliases.production, cur.production)
        if aliases.canary is None or production is None:
            return ServingState(production, features=cur.features)
        canary = obtain(aliases.canary.version, cur.canary)
        if canary is None or canary.version == production.version:
            return ServingState(production, features=cur.features)
        # A canary that failed to load keeps the previous canary at its previous percent.
        same = canary.version == aliases.canary.version
        percent = aliases.canary.percent if same else cur.canary_percent
        return ServingState(production, canary, percent, cur.features)

    # -- convergence --------------------------------------------------------------------------
    def poll_once(self, trigger: str = "poll") -> bool:
        """Converge on the registry's aliases, then on the active feature snapshot.

        True when something was swapped. Never raises: errors are logged, and the current
        versions and snapshot keep serving.
        """
        swapped = self._poll_models(trigger)
        return self._poll_features(trigger) or swapped

    def _poll_features(self, trigger: str) -> bool:
        try:
            with self._swap_lock:
                cur = self.state
                view = self.features.poll(cur.features, list(cur.loaded().values()))
                if view is None:
                    return False
                self._install(replace(cur, features=view), trigger)
                return self.state is not cur
        except Exception as e:  # a broken alias file fails every poll: one traceback, then lines
            repeated = repr(e) == self._last_feature_error
            self._last_feature_error = repr(e)
            log.warning(
                "feature store poll failed", exc_info=not repeated,
                extra={"fields": {"trigger": trigger, "error": repr(e)}},
            )  # fmt: skip
            return False

    def _poll_models(self, trigger: str) -> bool:
        try:
            stamp = self.registry.aliases_stamp()
            now = self._clock()
            retry_due = any(now - t >= FAILED_RETRY_S for t in tuple(self._failed.values()))
            if stamp == self._stamp and not retry_due:
                return False
            with self._swap_lock:
                stamp = self.registry.aliases_stamp()
                aliases = self.registry.read_aliases()
                before = self.state
                self._install(self._state_for(aliases, trigger), trigger)
                self._stamp = stamp
                self._last_poll_error = None
                wanted = {aliases.production, aliases.canary.version if aliases.canary else None}
                for version in [v for v in self._failed if v not in wanted]:
                    del self._failed[version]
                return self.state is not before
        except Exception as e:
            # A broken aliases file would fail every poll: the traceback once, then one line.
            repeated = repr(e) == self._last_poll_error
            self._last_poll_error = repr(e)
            log.warning(
                "registry poll failed",
                exc_info=not repeated,
                extra={"fields": {"trigger": trigger, "error": repr(e)}},
            )
            return False

    def start_polling(self, interval_s: float) -> None:
        """Run :meth:`poll_once` every ``interval_s`` seconds in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.poll_once()

        self._thread = threading.Thread(target=loop, name="vidrank-registry-poll", daemon=True)
        self._thread.start()

    def stop_polling(self, timeout_s: float = 10.0) -> None:
        """Stop the poller thread (a load in progress finishes first, up to ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    # -- admin --------------------------------------------------------------------------------
    def _apply(self, write: Callable[[], Aliases], ready: dict[str, Scorer]) -> Aliases:
        """Write the aliases (the fleet's source of truth), then serve them here at once."""
        aliases = write()
        # Re-read on the next poll: another replica may have written right after us.
        self._stamp = _UNSEEN
        self._install(self._state_for(aliases, "admin", ready), "admin")
        return aliases

    def activate(self, version: str) -> Aliases:
        """Load + verify + warm ``version``, then make it production in the registry and here.

        Raises ``VersionNotFound`` (404) or ``SwapFailed`` (409); on failure nothing changes.
        """
        with self._swap_lock:
            scorer = self._get(version, "admin")
            return self._apply(lambda: self.registry.activate(version), {version: scorer})

    def rollback(self) -> Aliases:
        """Make the previous production version production again (loaded and warmed first)."""
        with self._swap_lock:
            aliases = self.registry.read_aliases()
            if not aliases.previous:
                return self.registry.rollback()  # raises NothingToRollBack
            target = aliases.previous[-1]
            scorer = self._get(target, "admin")
            return self._apply(self.registry.rollback, {target: scorer})

    def set_canary(self, version: str, percent: float) -> Aliases:
        """Load + warm ``version``, then route ``percent`` of users to it."""
        Canary(version, percent)  # InvalidCanary (422) before any loading
        with self._swap_lock:
            scorer = self._get(version, "admin")
            return self._apply(
                lambda: self.registry.set_canary(version, percent), {version: scorer}
            )

    def clear_canary(self) -> Aliases:
        """Stop the canary; its session is released once its in-flight requests finish."""
        with self._swap_lock:
            return self._apply(self.registry.clear_canary, {})

    def activate_snapshot(self, name: str) -> dict[str, Any]:
        """Load + verify + prepare feature snapshot ``name``, then make it active here and in the
        store; raises SnapshotNotFound (404), SnapshotError / FeatureStoreConflict (409)."""
        with self._swap_lock:
            cur = self.state
            view = self.features.activate(name, list(cur.loaded().values()))
            self._install(replace(cur, features=view), "admin")
        return self.describe_features()

    def features_ready(self) -> str | None:
        """None when the feature store can serve, else why not (``/readyz`` when required)."""
        return self.features.ready(self.state.features)

    def describe_features(self) -> dict[str, Any]:
        """The feature store as served here: backend, snapshot, status, lacks per version."""
        st = self.state
        return st.features.describe(st.loaded())

    def describe(self) -> dict[str, Any]:
        """What this process serves, for /models."""
        st = self.state
        return {
            "production": st.production.version if st.production else None,
            "canary": (
                {"version": st.canary.version, "percent": st.canary_percent} if st.canary else None
            ),
        }


def _reason(e: Exception) -> str:
    """Why a load failed, for the log and the 409."""
    if isinstance(e, BundleError):
        return e.reason
    if isinstance(e, FeatureStoreConflict):
        return e.message
    return f"{type(e).__name__}: {e}"
