"""Model manager: which versions this process serves, and how they change while it serves.

Every change follows one path: load the bundle (checksum, schema) → create the session and check
it against the manifest → warm it up → swap one reference. A failure anywhere leaves the old
model serving. Loading never happens on the request path.

The request path only reads :attr:`ModelManager.state`, an immutable :class:`ServingState`, with
no lock: rebinding an attribute is atomic in Python, so a request sees either the old state or
the new one. Swaps are serialised by ``_swap_lock``.

Releasing the old model: nothing in the manager keeps a reference to a version it stopped serving
(no cache of previous versions, TF Serving #1215). A request that picked the old scorer holds a
reference until it returns, so Python's reference counting frees the scorer, and with it the
onnxruntime session, when the last such request finishes - no explicit ref-count is needed and
no in-flight request loses its session.

Admin changes (activate, rollback, canary, shadow) load and warm the target *before* writing the
registry's aliases, so a bundle that fails here never reaches the other replicas. Every replica
runs :meth:`poll_once` periodically (a background thread) and converges on the aliases file.
Every change names its actor and reason, which the registry records in ``history.jsonl``.

A shadow version is loaded with one intra-op thread: it scores on the shadow worker's single
thread, off the response path (``service/shadow.py``), and more threads would only compete with
the versions that answer requests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from model.core.bundle import BundleError
from model.core.policy import CanaryPolicy
from model.core.registry import (
    Aliases,
    Canary,
    InvalidVersionName,
    Registry,
    RegistryError,
    Shadow,
    VersionNotFound,
)
from service import metrics
from service.errors import NotReady, SwapFailed
from service.logging import log_fields
from service.scorer import Scorer

log = logging.getLogger("vidrank.manager")
ACTOR = "admin-api"  # the history's actor for changes made through this manager's admin calls

FAILED_RETRY_S = 60.0  # a version that failed to load is retried this often while still aliased
SHADOW_THREADS = 1  # intra-op threads of a shadow-only session (see the module docstring)
_UNSEEN = object()  # an aliases stamp that equals no real one


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


class ModelManager:
    """Loads, warms, swaps and polls model versions for one process (no HTTP here)."""

    def __init__(
        self,
        registry: Registry,
        intra_op_threads: int,
        warmup_sizes: tuple[int, ...],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.intra_op_threads = intra_op_threads
        self.warmup_sizes = warmup_sizes
        self.state = ServingState()
        self._clock = clock
        self._swap_lock = threading.Lock()
        self._stamp: object = _UNSEEN  # the first poll always converges
        self._failed: dict[str, float] = {}  # version -> when it last failed to load
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_poll_error: str | None = None

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
        except (VersionNotFound, InvalidVersionName):  # 404, not a failed swap
            raise
        except Exception as e:  # anything at all: the old model must keep serving
            reason = e.reason if isinstance(e, BundleError) else f"{type(e).__name__}: {e}"
            self._failed[version] = self._clock()
            metrics.SWAP_FAILURES.labels(trigger).inc()
            log.warning(
                "model load failed",
                exc_info=not isinstance(e, BundleError | RegistryError),
                extra={"fields": {"version": version, "trigger": trigger, "reason": reason}},
            )
            raise SwapFailed(f"cannot serve version {version}: {reason}") from e
        self._failed.pop(version, None)
        load_s = time.perf_counter() - start
        metrics.LOAD_SECONDS.observe(load_s)
        log_fields(
            log, logging.INFO, "model loaded", version=version, trigger=trigger,
            load_ms=round(load_s * 1000, 1), warmup_ms=round(warm_s * 1000, 1),
        )  # fmt: skip
        return scorer

    def _get(self, version: str, trigger: str, threads: int | None = None) -> Scorer:
        """The scorer of ``version``: one already loaded with as many threads, else a new one.

        The thread count must match: a canary must not inherit the shadow's one-thread session
        (its latency is judged against production's), nor a shadow a canary's many threads.
        """
        threads = threads or self.intra_op_threads
        for current in self.state.scorers():
            if current.version == version and current.threads == threads:
                return current
        return self._load(version, trigger, threads)

    def _install(self, new: ServingState, trigger: str) -> None:
        """Swap the served state (holds ``_swap_lock``)."""
        old = self.state
        if old == new:  # the same scorers (compared by identity) and canary share
            return
        self.state = new  # the swap: one reference, atomic for readers
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

        ``ready`` holds scorers already loaded for this change. A version that fails to load keeps
        the current scorer in its role; one that failed recently is not retried until
        ``FAILED_RETRY_S`` passed (an explicit admin call always retries).
        """
        cur = self.state
        ready = ready or {}

        def obtain(version: str, fallback: Scorer | None, threads: int | None) -> Scorer | None:
            loaded = ready.get(version)
            if loaded is not None and loaded.threads == (threads or self.intra_op_threads):
                return loaded
            failed_at = self._failed.get(version)
            if failed_at is not None and self._clock() - failed_at < FAILED_RETRY_S:
                return fallback
            try:
                return self._get(version, trigger, threads)
            except (SwapFailed, RegistryError):
                return fallback

        if aliases.production is None:
            return ServingState()
        production = obtain(aliases.production, cur.production, None)
        if production is None:
            return ServingState()
        canary, canary_percent = None, 0.0
        if aliases.canary is not None:
            canary, canary_percent = _role(
                obtain(aliases.canary.version, cur.canary, None),
                aliases.canary, production, cur.canary_percent,
            )  # fmt: skip
        shadow, shadow_percent = None, 0.0
        if aliases.shadow is not None:
            shadow, shadow_percent = _role(
                obtain(aliases.shadow.version, cur.shadow, SHADOW_THREADS),
                aliases.shadow, production, cur.shadow_percent,
            )  # fmt: skip
        policy = aliases.canary.policy if aliases.canary is not None and canary else None
        return ServingState(production, canary, canary_percent, shadow, shadow_percent, policy)

    # -- convergence --------------------------------------------------------------------------
    def poll_once(self, trigger: str = "poll") -> bool:
        """Converge on the registry's aliases if they changed; True when something was swapped.

        Never raises: errors are logged, and the current versions keep serving.
        """
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
                wanted = {
                    aliases.production,
                    aliases.canary.version if aliases.canary else None,
                    aliases.shadow.version if aliases.shadow else None,
                }
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

    def activate(self, version: str, reason: str | None = None) -> Aliases:
        """Load + verify + warm ``version``, then make it production in the registry and here.

        Raises ``VersionNotFound`` (404) or ``SwapFailed`` (409); on failure nothing changes.
        """
        with self._swap_lock:
            scorer = self._get(version, "admin")
            write = partial(self.registry.activate, version, actor=ACTOR, reason=reason)
            return self._apply(write, {version: scorer})

    def rollback(self, reason: str | None = None) -> Aliases:
        """Make the previous production version production again (loaded and warmed first)."""
        write = partial(self.registry.rollback, actor=ACTOR, reason=reason)
        with self._swap_lock:
            aliases = self.registry.read_aliases()
            if not aliases.previous:
                return write()  # raises NothingToRollBack
            target = aliases.previous[-1]
            scorer = self._get(target, "admin")
            return self._apply(write, {target: scorer})

    def set_canary(
        self,
        version: str,
        percent: float,
        policy: CanaryPolicy | None = None,
        reason: str | None = None,
    ) -> Aliases:
        """Load + warm ``version``, then route ``percent`` of users to it."""
        Canary(version, percent, policy)  # InvalidCanary (422) before any loading
        with self._swap_lock:
            scorer = self._get(version, "admin")
            write = partial(
                self.registry.set_canary, version, percent, policy, actor=ACTOR, reason=reason
            )
            return self._apply(write, {version: scorer})

    def clear_canary(self, reason: str | None = None) -> Aliases:
        """Stop the canary; its session is released once its in-flight requests finish."""
        with self._swap_lock:
            return self._apply(partial(self.registry.clear_canary, actor=ACTOR, reason=reason), {})

    def set_shadow(self, version: str, percent: float, reason: str | None = None) -> Aliases:
        """Load + warm ``version`` (one intra-op thread), then shadow ``percent`` of requests."""
        Shadow(version, percent)  # InvalidShadow (422) before any loading
        with self._swap_lock:
            scorer = self._get(version, "admin", SHADOW_THREADS)
            write = partial(self.registry.set_shadow, version, percent, actor=ACTOR, reason=reason)
            return self._apply(write, {version: scorer})

    def clear_shadow(self, reason: str | None = None) -> Aliases:
        """Stop shadow scoring."""
        with self._swap_lock:
            return self._apply(partial(self.registry.clear_shadow, actor=ACTOR, reason=reason), {})

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


def _role(
    scorer: Scorer | None, alias: Canary | Shadow, production: Scorer, previous_percent: float
) -> tuple[Scorer | None, float]:
    """A canary's or shadow's scorer and percent, or (None, 0) when it is production itself.

    One that failed to load keeps the previous scorer in the role at its previous percent.
    """
    if scorer is None or scorer.version == production.version:
        return None, 0.0
    same = scorer.version == alias.version
    return scorer, alias.percent if same else previous_percent
