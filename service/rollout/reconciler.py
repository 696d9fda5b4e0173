"""The reconciler: which versions (and feature snapshot) this process serves, and how they change.

Every change follows one path: load the bundle (checksum, schema) → create the session and check
it against the manifest → warm it up → swap one reference. A failure anywhere leaves the old
model serving. Loading never happens on the request path.

The request path only reads :attr:`Reconciler.state`, an immutable :class:`ServingState`, with
no lock: rebinding an attribute is atomic in Python, so a request sees either the old state or
the new one. Swaps are serialised by ``_swap_lock``. The state also holds the feature view
(service/scoring/features.py): the active feature snapshot, prepared for exactly the versions the
state serves, so a request never pairs a model with features prepared for another or from two
snapshots. Snapshot switches go through the same lock and the same one-reference swap.

Releasing the old model: nothing in the reconciler keeps a reference to a version it stopped serving
(no cache of previous versions, TF Serving #1215). A request that picked the old scorer holds a
reference until it returns, so Python's reference counting frees the scorer, and with it the
onnxruntime session, when the last such request finishes - no explicit ref-count is needed and
no in-flight request loses its session.

Admin changes (activate, rollback, canary, shadow) load and warm the target *before* writing the
registry's aliases, so a bundle that fails here never reaches the other replicas. If the write
fails (a read-only registry), the process serves whatever the file says afterwards: never a
version the fleet was not told about. Every replica runs :meth:`poll_once` periodically (a
background thread) and converges on the aliases file. Every change names its actor and reason,
which the registry records in ``history.jsonl``.

Registry faults keep the last known good model: a missing, empty or broken ``aliases.json`` (or a
missing registry directory) is logged, counted and shown in /models, and changes nothing. An
aliased version that cannot be loaded yet (not visible on a lagging NFS client, or broken) is
retried with exponential back-off until it loads or the alias moves on; ``vidrank_model_desired``
against ``vidrank_model_info`` (and ``vidrank_model_converged``) shows a replica that lags.

A shadow version is loaded with one intra-op thread: it scores on the shadow worker's single
thread, off the response path (``service/rollout/shadow.py``), and more threads would only compete
with the versions that answer requests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from model.core.aliases import rollback_target
from model.core.bundle import BundleError
from model.core.errors import VidrankError
from model.core.fileio import utc_now_iso
from model.core.policy import CanaryPolicy
from model.core.registry import (
    Aliases,
    AliasesMissing,
    Canary,
    InvalidVersionName,
    Registry,
    RegistryError,
    RegistryUnavailable,
    Shadow,
    VersionNotFound,
)
from service import metrics
from service.errors import FeatureStoreConflict, NotReady, SwapFailed
from service.logging import log_fields
from service.rollout.background import Loop, Retries
from service.rollout.feature_source import FeatureSource
from service.scoring.features import FeatureView
from service.scoring.scorer import Scorer

log = logging.getLogger("vidrank.reconciler")
ACTOR = "admin-api"  # the history's actor for changes made through this reconciler's admin calls

# An aliased version that failed to load is retried by the one back-off policy (Retries) for
# as long as it stays aliased (an explicit admin call always retries at once).
SHADOW_THREADS = 1  # intra-op threads of a shadow-only session (see the module docstring)
_UNSEEN = object()  # an aliases stamp that equals no real one
NO_FEATURES = FeatureView()


@dataclass(frozen=True)
class RegistryHealth:
    """What the last poll made of the registry: ``ok``, or the fault that kept the old model."""

    status: str = "ok"  # ok | aliases_missing | aliases_invalid | unreadable
    error: str | None = None
    since: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.error, "since": self.since}


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
    shadow: Scorer | None = None
    shadow_percent: float = 0.0
    canary_policy: CanaryPolicy | None = None  # the canary's own bounds, from aliases.json
    features: FeatureView = NO_FEATURES  # prepared for every scorer of the state

    def pick(self, user_id: object) -> Scorer:
        """The scorer for a user: the canary for ``canary_percent`` of users, else production."""
        if self.production is None:
            raise NotReady("no model is loaded yet")
        if self.canary is not None and canary_bucket(user_id) < self.canary_percent:
            return self.canary
        return self.production

    def roles(self) -> dict[str, str]:
        """{role: version} of what is served (and shadowed)."""
        out: dict[str, str] = {}
        for role, scorer in (
            ("production", self.production),
            ("canary", self.canary),
            ("shadow", self.shadow),
        ):
            if scorer is not None:
                out[role] = scorer.version
        return out

    def scorers(self) -> list[Scorer]:
        """Every scorer loaded for this state (a version may have two: served and shadow)."""
        return [s for s in (self.production, self.canary, self.shadow) if s is not None]

    def loaded(self) -> dict[str, Scorer]:
        """{version: scorer} of the state (the feature view is prepared per version)."""
        return {s.version: s for s in self.scorers()}


class Reconciler:
    """Brings what one process serves to the desired aliases (models, then the active snapshot):
    loads, warms, swaps and polls, and applies admin changes (no HTTP here)."""

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
        self._retries = Retries(clock)  # aliased versions that failed to load
        self._desired: dict[str, str] = {}  # {role: version} the aliases name
        self.health = RegistryHealth()
        self._poller = Loop("vidrank-registry-poll", self.poll_once)
        self._last_feature_error: str | None = None

    # -- request path -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True while a production model is loaded and warmed (an empty registry is not ready)."""
        return self.state.production is not None

    # -- loading ------------------------------------------------------------------------------
    def _load(self, version: str, trigger: str, threads: int | None = None) -> Scorer:
        """Load, verify and warm ``version``; raises ``SwapFailed`` (or ``VersionNotFound``)."""
        start = time.perf_counter()
        try:
            bundle = self.registry.bundle(version)  # checksum + schema
            scorer = Scorer(bundle, threads or self.intra_op_threads)  # session + I/O check
            warm_s = scorer.warm_up(self.warmup_sizes)
            self.features.prepare(self.state.features, scorer)  # lacks check; encode snapshot
        except (VersionNotFound, InvalidVersionName):  # 404, not a failed swap
            raise
        except Exception as e:  # anything at all: the old model must keep serving
            raise _refused(version, trigger, e) from e
        self._retries.succeeded(version)
        load_s = time.perf_counter() - start
        metrics.LOAD_SECONDS.observe(load_s)
        log_fields(
            log, logging.INFO, "model loaded", version=version, trigger=trigger,
            load_ms=round(load_s * 1000, 1), warmup_ms=round(warm_s * 1000, 1),
        )  # fmt: skip
        return scorer

    def _get(
        self, version: str, trigger: str, threads: int | None = None, *, on_disk: bool = False
    ) -> Scorer:
        """The scorer of ``version``: one already loaded with as many threads, else a new one.

        The thread count must match: a canary must not inherit the shadow's one-thread session
        (its latency is judged against production's), nor a shadow a canary's many threads.
        ``on_disk`` (every admin change): a loaded copy is reused only if the published bundle
        still verifies, so a bundle corrupted after it was loaded is refused (409) by every
        worker alike - also by one that has it loaded - never served to the fleet anew.
        """
        threads = threads or self.intra_op_threads
        for current in self.state.scorers():
            if current.version == version and current.threads == threads:
                if on_disk:
                    self._verify(version, trigger)
                return current
        return self._load(version, trigger, threads)

    def _verify(self, version: str, trigger: str) -> None:
        """Checksum the published bundle of ``version``; ``SwapFailed`` when it fails."""
        try:
            self.registry.bundle(version)
        except (VersionNotFound, InvalidVersionName):
            raise
        except Exception as e:
            raise _refused(version, trigger, e) from e

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
            shadow_percent=new.shadow_percent,
        )  # fmt: skip

    def _state_for(
        self, aliases: Aliases, trigger: str, ready: dict[str, Scorer] | None = None
    ) -> ServingState:
        """The state that serves ``aliases``, loading what is not loaded yet (never raises).

        ``ready`` holds scorers already loaded for this change. A version that fails to load
        keeps the current scorer in its role and is retried with back-off (``_retry_later``).
        """
        cur = self.state
        ready = ready or {}

        def obtain(version: str, fallback: Scorer | None, threads: int | None) -> Scorer | None:
            loaded = ready.get(version)
            if loaded is not None and loaded.threads == (threads or self.intra_op_threads):
                return loaded
            if self._retries.waiting(version):
                return fallback
            try:
                return self._get(version, trigger, threads)
            except (SwapFailed, RegistryError) as e:
                self._retry_later(version, e)
                return fallback

        if aliases.production is None:
            return ServingState(features=cur.features)
        production = obtain(aliases.production, cur.production, None)
        if production is None:
            return ServingState(features=cur.features)
        canary = _role(aliases.canary, cur.canary, cur.canary_percent, production, obtain)
        shadow = _role(aliases.shadow, cur.shadow, cur.shadow_percent, production, obtain)
        policy = aliases.canary.policy if aliases.canary is not None and canary[0] else None
        return ServingState(production, *canary, *shadow, policy, cur.features)

    def _retry_later(self, version: str, error: Exception) -> None:
        """Schedule the next attempt at an aliased version that did not load (doubling waits)."""
        retry = self._retries.failed(version)
        metrics.LOAD_RETRIES.inc()
        log_fields(
            log, logging.WARNING, "aliased version not loaded; will retry", version=version,
            attempt=retry.attempts, retry_in_s=self._retries.wait_s(retry.attempts),
            reason=str(error),
        )  # fmt: skip

    # -- reconciling --------------------------------------------------------------------------
    def poll_once(self, trigger: str = "poll") -> bool:
        """Reconcile: the desired aliases - the registry's model versions, then the active
        feature snapshot - become one ServingState, installed in one swap.

        True when something was swapped. Never raises: a registry fault is logged, counted and
        kept in :attr:`health`, other errors are logged, and the current versions and snapshot
        keep serving.
        """
        with self._swap_lock:
            before = self.state
            target = self._models_target(trigger)
            desired = before if target is None else target[0]
            self._install(self._features_target(desired, trigger), trigger)
            if target is not None:
                self._served(target[1])
            return self.state is not before

    def _models_target(
        self, trigger: str, ready: dict[str, Scorer] | None = None
    ) -> tuple[ServingState, Aliases] | None:
        """The state the registry's aliases ask for (and the aliases), loading what is missing;
        None when they did not change, or cannot be read (a fault: the served versions stay).

        ``ready``: scorers already loaded for an admin change, used if the aliases name them.
        """
        try:
            stamp = self.registry.aliases_stamp()
            # While a fault lasts, look again every poll: the registry may be back unchanged.
            if stamp == self._stamp and not self._retries.any_due() and self.health.status == "ok":
                return None
            aliases = self._read_aliases(stamp)
        except Exception as e:  # unreadable registry (EIO, permissions): try again next poll
            self._fault("unreadable", e)
            return None
        if aliases is None:
            return None
        return self._state_for(aliases, trigger, ready), aliases

    def _read_aliases(self, stamp: object) -> Aliases | None:
        """The registry's aliases, or None (recorded as a fault) when missing or invalid."""
        try:
            aliases = self.registry.read_aliases(missing_ok=False)
        except AliasesMissing as e:
            self._fault("aliases_missing", e)
        except RegistryUnavailable as e:  # EIO, permissions: look again next poll
            self._fault("unreadable", e)
            return None
        except RegistryError as e:  # not JSON, or not valid aliases
            self._fault("aliases_invalid", e)
        else:
            self._stamp = stamp
            return aliases
        self._stamp = stamp  # the same broken file is not read again until it changes
        return None

    def _features_target(self, state: ServingState, trigger: str) -> ServingState:
        """``state`` with the active feature snapshot, prepared for its scorers (or as it was:
        a snapshot that fails to load keeps the old one serving, see FeatureSource.poll)."""
        try:
            view = self.features.poll(state.features, list(state.loaded().values()))
        except Exception as e:  # a broken alias file fails every poll: one traceback, then lines
            repeated = repr(e) == self._last_feature_error
            self._last_feature_error = repr(e)
            log.warning(
                "feature store poll failed", exc_info=not repeated,
                extra={"fields": {"trigger": trigger, "error": repr(e)}},
            )  # fmt: skip
            return state
        return state if view is None else replace(state, features=view)

    def _converge(self, trigger: str, ready: dict[str, Scorer] | None = None) -> None:
        """Serve what the registry's aliases say now (holds ``_swap_lock``)."""
        self._stamp = _UNSEEN
        target = self._models_target(trigger, ready)
        if target is not None:
            self._install(target[0], trigger)
            self._served(target[1])

    def _served(self, aliases: Aliases) -> None:
        """After serving ``aliases``: the registry is healthy; publish desired vs served."""
        self._healthy()
        self._track(aliases)

    def _fault(self, status: str, error: Exception) -> None:
        """Record a registry fault; the served versions stay. Logged and counted once per fault."""
        text = str(error)
        if not isinstance(error, RegistryError):
            text = f"{type(error).__name__}: {text}"
        if (self.health.status, self.health.error) == (status, text):
            return
        self.health = RegistryHealth(status, text, utc_now_iso())
        metrics.REGISTRY_FAULTS.labels(status).inc()
        metrics.REGISTRY_OK.set(0)
        log_fields(
            log, logging.WARNING, "registry fault; keeping the served versions", status=status,
            error=text, serving=self.state.roles(),
        )  # fmt: skip

    def _healthy(self) -> None:
        if self.health.status != "ok":
            log_fields(log, logging.INFO, "registry readable again", was=self.health.status)
            self.health = RegistryHealth()
        metrics.REGISTRY_OK.set(1)

    def _track(self, aliases: Aliases) -> None:
        """Forget retries of versions no longer aliased; publish desired vs served."""
        desired = {"production": aliases.production}
        for role, alias in (("canary", aliases.canary), ("shadow", aliases.shadow)):
            # A canary or shadow of the production version itself is not served as one.
            if alias is not None and aliases.production not in (None, alias.version):
                desired[role] = alias.version
        self._retries.retain(v for v in desired.values() if v is not None)
        self._desired = metrics.set_desired(
            self._desired, {r: v for r, v in desired.items() if v is not None}, self.state.roles()
        )

    @property
    def converged(self) -> bool:
        """Whether this process serves exactly the versions the aliases last read name."""
        return self.state.roles() == self._desired

    def start_polling(self, interval_s: float) -> None:
        """Run :meth:`poll_once` every ``interval_s`` seconds in a daemon thread."""
        self._poller.start(interval_s)

    def stop_polling(self, timeout_s: float = 10.0) -> None:
        """Stop the poller thread (a load in progress finishes first, up to ``timeout_s``)."""
        self._poller.stop(timeout_s)

    # -- admin --------------------------------------------------------------------------------
    def _change(
        self, write: Callable[..., Aliases], load: tuple[str, int | None] | None, **args: Any
    ) -> Aliases:
        """One admin change, the same for every rollout verb: refuse at once when the registry
        cannot be written (503), load + verify + warm the version the change will serve (if
        any), write the aliases through the registry's transition, then serve them here."""
        with self._swap_lock:
            ready: dict[str, Scorer] = {}
            if load is not None:
                self.registry.check_writable()
                version, threads = load
                ready[version] = self._get(version, "admin", threads, on_disk=True)
            return self._apply(partial(write, actor=ACTOR, **args), ready)

    def _apply(self, write: Callable[[], Aliases], ready: dict[str, Scorer]) -> Aliases:
        """Write the aliases (the fleet's source of truth), then serve them here at once.

        A failed write (``RegistryUnavailable``) may or may not have replaced the file (a rename
        can succeed before a later fsync fails): serve whatever the file says now, then raise.
        """
        try:
            aliases = write()
        except RegistryUnavailable:
            self._converge("admin", ready)
            raise
        # Re-read on the next poll: another replica may have written right after us.
        self._stamp = _UNSEEN
        self._install(self._state_for(aliases, "admin", ready), "admin")
        self._served(aliases)
        return aliases

    def activate(self, version: str, reason: str | None = None) -> Aliases:
        """Load + verify + warm ``version``, then make it production in the registry and here.

        Raises ``VersionNotFound`` (404), ``SwapFailed`` (409) or ``RegistryUnavailable`` (503,
        checked before loading); on failure nothing changes.
        """
        return self._change(self.registry.activate, (version, None), version=version, reason=reason)

    def rollback(self, reason: str | None = None) -> Aliases:
        """Make the previous production version production again (loaded and warmed first).

        Raises ``NothingToRollBack`` when there is none; should another writer move the stack
        meanwhile, the registry refuses the change (``expected``) and nothing changes.
        """
        self.registry.check_writable()  # 503 before "nothing to roll back", as before loading
        target = rollback_target(self.registry.read_aliases())
        return self._change(self.registry.rollback, (target, None), expected=target, reason=reason)

    def set_canary(
        self,
        version: str,
        percent: float,
        policy: CanaryPolicy | None = None,
        reason: str | None = None,
    ) -> Aliases:
        """Load + warm ``version``, then route ``percent`` of users to it."""
        Canary(version, percent, policy)  # InvalidCanary (422) before any loading
        return self._change(
            self.registry.set_canary, (version, None), version=version, percent=percent,
            policy=policy, reason=reason,
        )  # fmt: skip

    def clear_canary(self, reason: str | None = None) -> Aliases:
        """Stop the canary; its session is released once its in-flight requests finish."""
        return self._change(self.registry.clear_canary, None, reason=reason)

    def set_shadow(self, version: str, percent: float, reason: str | None = None) -> Aliases:
        """Load + warm ``version`` (one intra-op thread), then shadow ``percent`` of requests."""
        Shadow(version, percent)  # InvalidShadow (422) before any loading
        return self._change(
            self.registry.set_shadow, (version, SHADOW_THREADS), version=version, percent=percent,
            reason=reason,
        )  # fmt: skip

    def clear_shadow(self, reason: str | None = None) -> Aliases:
        """Stop shadow scoring."""
        return self._change(self.registry.clear_shadow, None, reason=reason)

    def remove_canary(self, version: str, reason: str) -> bool:
        """Automatic rollback: remove canary ``version`` from the registry and stop serving it.

        False (and nothing written) when the registry's canary is no longer ``version``: another
        replica removed it first, or an operator replaced it. Production is never touched.
        """
        with self._swap_lock:
            aliases = self.registry.remove_canary(version, actor="auto-rollback", reason=reason)
            if aliases is None:
                self._stamp = _UNSEEN  # converge on whatever the registry says now
                return False
            self._stamp = _UNSEEN
            self._install(self._state_for(aliases, "auto-rollback"), "auto-rollback")
            return True

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
            "shadow": (
                {"version": st.shadow.version, "percent": st.shadow_percent} if st.shadow else None
            ),
        }

    def status(self) -> dict[str, Any]:
        """Registry health and convergence of this process, for /models."""
        return {
            **self.health.to_dict(),
            "desired": dict(self._desired),
            "converged": self.converged,
            "retrying": self._retries.status(),
        }


def _refused(version: str, trigger: str, e: Exception) -> SwapFailed:
    """A version that failed to load or verify: logged, counted, and the 409 to raise."""
    metrics.SWAP_FAILURES.labels(trigger).inc()
    log.warning(
        "model load failed",
        exc_info=not isinstance(e, BundleError | RegistryError),
        extra={"fields": {"version": version, "trigger": trigger, "reason": _reason(e)}},
    )
    details = e.details if isinstance(e, FeatureStoreConflict) else None
    # A client sees a domain error's own message (no paths in it); anything else, e.g.
    # an onnxruntime message naming the model's absolute path, stays in the log.
    public = e.message if isinstance(e, VidrankError) else f"{type(e).__name__} (see log)"
    return SwapFailed(f"cannot serve version {version}: {public}", details=details)


def _reason(e: Exception) -> str:
    """Why a load failed, for the log and the 409."""
    if isinstance(e, BundleError):
        return e.reason
    if isinstance(e, FeatureStoreConflict):
        return e.message
    return f"{type(e).__name__}: {e}"


def _role(
    alias: Canary | Shadow | None,
    current: Scorer | None,
    current_percent: float,
    production: Scorer,
    obtain: Callable[[str, Scorer | None, int | None], Scorer | None],
) -> tuple[Scorer | None, float]:
    """A canary's or shadow's scorer and percent, or (None, 0) when there is none or it is
    production itself. A shadow scores on ``SHADOW_THREADS``, off the response path.

    One that failed to load keeps the current scorer in the role at its current percent.
    """
    if alias is None:
        return None, 0.0
    threads = SHADOW_THREADS if isinstance(alias, Shadow) else None
    scorer = obtain(alias.version, current, threads)
    if scorer is None or scorer.version == production.version:
        return None, 0.0
    same = scorer.version == alias.version
    return scorer, alias.percent if same else current_percent
