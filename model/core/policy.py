"""A canary's health policy: the bounds past which the service removes it (stdlib only).

A policy travels in ``aliases.json`` with the canary it belongs to, so every replica judges the
canary by the same bounds; fields it leaves out take the service's settings. The service
evaluates it (``service/rollout/canary.py``); this module only says what a valid policy is.

- ``max_error_ratio``: the canary's server errors / its requests over the window;
- ``max_p99_ratio``: the canary's p99 ranking latency / production's over the same window;
- ``max_psi``: the population stability index of any task's predictions (the canary's window
  against the distribution stored in its manifest at training time);
- ``min_requests``: the canary requests (in the window) before any bound is judged;
- ``window_s``: how far back the service looks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from model.core.errors import VidrankError

_BOUNDS = ("max_error_ratio", "max_p99_ratio", "max_psi")


class InvalidPolicy(VidrankError, ValueError):
    """A malformed canary policy; ``field`` names the key (``policy.max_psi``)."""

    code = "invalid_request"


@dataclass(frozen=True)
class CanaryPolicy:
    """Bounds for automatic canary rollback; None leaves a field to the defaults."""

    max_error_ratio: float | None = None
    max_p99_ratio: float | None = None
    max_psi: float | None = None
    min_requests: int | None = None
    window_s: float | None = None

    def __post_init__(self) -> None:
        for name in _BOUNDS:
            _check_positive(getattr(self, name), f"policy.{name}")
        if self.max_error_ratio is not None and self.max_error_ratio > 1:
            raise InvalidPolicy("must be a fraction in (0, 1]", "policy.max_error_ratio")
        _check_positive(self.window_s, "policy.window_s")
        m = self.min_requests
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise InvalidPolicy("must be a positive integer", "policy.min_requests")

    def over(self, base: CanaryPolicy) -> CanaryPolicy:
        """This policy with its unset fields taken from ``base``."""
        mine = {k: v for k, v in asdict(self).items() if v is not None}
        return replace(base, **mine)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: only the fields that are set."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any) -> CanaryPolicy:
        """Parse the JSON form; raises ``InvalidPolicy`` naming the offending key."""
        if not isinstance(d, Mapping):
            raise InvalidPolicy("must be an object of bounds", "policy")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise InvalidPolicy(f"unknown key; expected {sorted(known)}", f"policy.{key}")
        return cls(**{k: v for k, v in d.items() if v is not None})


def _check_positive(v: Any, where: str) -> None:
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise InvalidPolicy(f"must be a finite number > 0, not {v!r}", where)
