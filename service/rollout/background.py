"""The service's background machinery, written once: a loop thread, and one retry back-off.

- :class:`Loop`: one daemon thread running a step until stopped - every ``interval_s`` seconds
  (the registry and feature-store poll, the rollout monitor) or back to back when the step
  blocks by itself (the shadow worker waiting on its queue). A step that raises is logged and
  the loop goes on: one bad round must not end a background duty for the process's lifetime.
- :class:`Retries`: what failed to load (a model version, a feature snapshot) and when to try
  it again, by one policy - exponential back-off from ``BACKOFF_BASE_S`` doubling up to
  ``BACKOFF_MAX_S``, for as long as the thing is still wanted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vidrank.background")

BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 60.0


class Loop:
    """A daemon thread that runs ``step`` until :meth:`stop` (see the module docstring).

    ``interval_s=None``: the step runs back to back and blocks by itself; ``wake`` is then
    called by :meth:`stop` to unblock it, and a step returning False ends the loop.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        interval_s: float | None = None,
        wake: Callable[[float], None] | None = None,
    ) -> None:
        self.name = name
        self.step = step
        self.interval_s = interval_s
        self.wake = wake
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """Whether the thread has been started and not stopped."""
        return self._thread is not None

    def start(self, interval_s: float | None = None) -> None:
        """Start the thread, every ``interval_s`` seconds if given (a no-op when it runs)."""
        if self._thread is not None:
            return
        if interval_s is not None:
            self.interval_s = interval_s
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the step in hand (waiting up to ``timeout_s`` for it to finish)."""
        self._stop.set()
        if self._thread is None:
            return
        if self.wake is not None:
            self.wake(timeout_s)
        self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.interval_s is not None and self._stop.wait(self.interval_s):
                return
            try:
                done = self.step()
            except Exception:  # never let one bad round end the loop
                log.exception("background step failed", extra={"fields": {"loop": self.name}})
                continue
            # A periodic step's result is its own business (a poll that swapped nothing returns
            # False); only a blocking step says "stop" by returning False.
            if self.interval_s is None and done is False:
                return


@dataclass
class Retry:
    """One failed thing: how many attempts failed, and when the next one is due."""

    attempts: int
    due_at: float


class Retries:
    """Failed loads and their next attempt, by exponential back-off (one policy for all)."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        base_s: float = BACKOFF_BASE_S,
        max_s: float = BACKOFF_MAX_S,
    ) -> None:
        self._clock = clock
        self.base_s = base_s
        self.max_s = max_s
        self._failed: dict[str, Retry] = {}

    def failed(self, name: str) -> Retry:
        """Record a failed attempt at ``name``; the wait before the next doubles each time."""
        prev = self._failed.get(name)
        attempts = 1 if prev is None else prev.attempts + 1
        retry = Retry(attempts, self._clock() + self.wait_s(attempts))
        self._failed[name] = retry
        return retry

    def wait_s(self, attempts: int) -> float:
        """The back-off after ``attempts`` failed attempts."""
        return min(self.max_s, self.base_s * 2 ** (attempts - 1))

    def waiting(self, name: str) -> bool:
        """Whether ``name`` failed and its next attempt is not due yet."""
        retry = self._failed.get(name)
        return retry is not None and self._clock() < retry.due_at

    def any_due(self) -> bool:
        """Whether some failed thing may be tried again now."""
        now = self._clock()
        return any(now >= r.due_at for r in tuple(self._failed.values()))

    def succeeded(self, name: str) -> None:
        """``name`` loaded: forget its failures."""
        self._failed.pop(name, None)

    def retain(self, wanted: Iterable[str]) -> None:
        """Forget failures of things no longer wanted (no longer aliased)."""
        keep = set(wanted)
        for name in [n for n in self._failed if n not in keep]:
            del self._failed[name]

    def status(self) -> dict[str, dict[str, Any]]:
        """{name: {attempts, retry_in_s}} of every failed thing, for /models."""
        now = self._clock()
        return {
            name: {"attempts": r.attempts, "retry_in_s": round(max(0.0, r.due_at - now), 1)}
            for name, r in self._failed.items()
        }
