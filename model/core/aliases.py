"""Aliases: which model version serves in which role, and every change to them as a pure function.

``aliases.json`` holds ``production``, the rollback stack ``previous`` (most recent last), an
optional ``canary`` (a version receiving ``percent`` of users, with its own rollback policy) and
an optional ``shadow`` (a version also scoring ``percent`` of requests, off the response path).
The registry (``model.core.registry``), the service's admin calls and the CLI all change them
through the transitions below - pure functions from the current value to the next, so what a
rollout verb does is written once and tested on its own (``tests/model/core/test_aliases.py``).
The store applies a transition under its lock (``model.core.artifacts``); checks that need the
file system (is the version published?) stay with the caller. The history line of a change
(``model.core.history``) is a function of the old and new values too (``Change.line``).

The domain errors of the registry live here as well, since parsing and transitions raise them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from model.core.bundle import VERSION_RE
from model.core.errors import VidrankError, shown
from model.core.history import history_line
from model.core.policy import CanaryPolicy, InvalidPolicy

MAX_PREVIOUS = 20  # rollback depth; bounded so aliases.json stays small


class RegistryError(VidrankError):
    """A registry operation that cannot be carried out; the message says why."""

    code = "registry_conflict"


class VersionNotFound(RegistryError):
    """The named version is not published in the registry."""

    code = "version_not_found"


class VersionExists(RegistryError):
    """A version of that name is already published; published versions are immutable."""


class InvalidVersionName(RegistryError, ValueError):
    """The name does not match ``VERSION_RE`` (to a client: no such version)."""

    code = "version_not_found"


class InvalidCanary(RegistryError, ValueError):
    """A canary percent outside (0, 100] or otherwise malformed canary settings."""

    code = "invalid_request"


class InvalidShadow(RegistryError, ValueError):
    """A shadow percent outside (0, 100] or otherwise malformed shadow settings."""

    code = "invalid_request"


class AliasesMissing(RegistryError):
    """``aliases.json`` (or the registry directory itself) is not there.

    A fault, not an instruction: a replica keeps serving what it serves (only an explicit
    ``vidrank models deactivate`` takes the production model away).
    """

    code = "aliases_missing"


class RegistryUnavailable(RegistryError):
    """The registry cannot be written (read-only volume, permissions, full disk ...)."""

    code = "registry_unavailable"


class NothingToRollBack(RegistryError):
    """``rollback`` was asked for but the ``previous`` stack is empty."""

    code = "nothing_to_roll_back"


def check_version_name(version: Any) -> str:
    """``version`` if it is a valid version name, else ``InvalidVersionName``."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InvalidVersionName(
            f"invalid version name {shown(repr(version))}: must match {VERSION_RE.pattern}"
        )
    return version


def _check_percent(p: Any, what: str, error: type[RegistryError]) -> float:
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
        raise error(f"{what} percent must be a number, not {p!r}", "percent")
    if not 0 < p <= 100:
        raise error(f"{what} percent must be in (0, 100], not {p}", "percent")
    return float(p)


@dataclass(frozen=True)
class Canary:
    """A version that receives ``percent`` (0 < percent <= 100) of the traffic.

    ``policy`` holds the bounds past which the service removes it automatically (fields left
    out take the service's settings); it travels with the canary so the fleet shares it.
    """

    ROLE: ClassVar[str] = "canary"  # its key in aliases.json and its history events

    version: str
    percent: float
    policy: CanaryPolicy | None = None

    def __post_init__(self) -> None:
        check_version_name(self.version)
        object.__setattr__(self, "percent", _check_percent(self.percent, "canary", InvalidCanary))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"version", "percent"}`` (+ ``"policy"`` when one is set)."""
        out: dict[str, Any] = {"version": self.version, "percent": self.percent}
        if self.policy is not None:
            out["policy"] = self.policy.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Canary:
        """Parse the JSON form; raises ``RegistryError`` (or a subclass) when malformed."""
        if not isinstance(d, Mapping) or "version" not in d or "percent" not in d:
            raise RegistryError(f"canary must be an object with version and percent, not {d!r}")
        try:
            policy = CanaryPolicy.from_dict(d["policy"]) if d.get("policy") is not None else None
        except InvalidPolicy as e:
            raise RegistryError(f"invalid canary policy in the aliases: {e}") from e
        return cls(version=d["version"], percent=d["percent"], policy=policy)


@dataclass(frozen=True)
class Shadow:
    """A version that also scores ``percent`` of requests, off the response path, for comparison."""

    ROLE: ClassVar[str] = "shadow"

    version: str
    percent: float

    def __post_init__(self) -> None:
        check_version_name(self.version)
        object.__setattr__(self, "percent", _check_percent(self.percent, "shadow", InvalidShadow))

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"version", "percent"}``."""
        return {"version": self.version, "percent": self.percent}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Shadow:
        """Parse the JSON form; raises ``RegistryError`` (or a subclass) when malformed."""
        if not isinstance(d, Mapping) or "version" not in d or "percent" not in d:
            raise RegistryError(f"shadow must be an object with version and percent, not {d!r}")
        return cls(version=d["version"], percent=d["percent"])


@dataclass(frozen=True)
class Aliases:
    """Contents of ``aliases.json``; ``previous`` is the rollback stack, most recent last."""

    production: str | None
    previous: tuple[str, ...] = ()
    canary: Canary | None = None
    updated_at: str | None = None
    shadow: Shadow | None = None

    def __post_init__(self) -> None:
        if self.production is not None:
            check_version_name(self.production)
        # Accept any sequence (e.g. a JSON list) but store a tuple so the value stays immutable.
        object.__setattr__(self, "previous", tuple(check_version_name(v) for v in self.previous))

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as documented in docs/internals.md."""
        return {
            "production": self.production,
            "previous": list(self.previous),
            "canary": self.canary.to_dict() if self.canary is not None else None,
            "shadow": self.shadow.to_dict() if self.shadow is not None else None,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Aliases:
        """Parse the JSON form; raises ``RegistryError`` when malformed.

        ``production`` must be present (``null`` when deliberately empty): a file without it,
        such as ``{}``, is as broken as one that is not JSON, and changes nothing.
        """
        if not isinstance(d, Mapping):
            raise RegistryError(f"aliases must be a JSON object, not {type(d).__name__}")
        if "production" not in d:
            raise RegistryError("aliases must name 'production' (null when there is none)")
        previous = d.get("previous") or []
        canary = d.get("canary")
        shadow = d.get("shadow")  # absent in files written before shadows existed
        updated_at = d.get("updated_at")
        if not isinstance(previous, list):
            raise RegistryError("aliases 'previous' must be a list of version names")
        if updated_at is not None and not isinstance(updated_at, str):
            raise RegistryError("aliases 'updated_at' must be a string")
        try:
            return cls(
                production=d.get("production"),
                previous=tuple(previous),
                canary=Canary.from_dict(canary) if canary is not None else None,
                updated_at=updated_at,
                shadow=Shadow.from_dict(shadow) if shadow is not None else None,
            )
        except (InvalidVersionName, InvalidCanary, InvalidShadow) as e:
            # A bad name or percent in the *file* is a broken file (409, as for one that is not
            # JSON), not the caller's unknown version (404) or bad request (422).
            raise RegistryError(f"aliases are malformed: {e.message}") from None


# -- transitions ---------------------------------------------------------------------------------


def push_previous(previous: tuple[str, ...], old: str | None, new: str | None) -> tuple[str, ...]:
    """The rollback stack after ``new`` replaces ``old``: ``old`` pushed unless it is ``new``."""
    if old is None or old == new:
        return previous
    return (*previous, old)[-MAX_PREVIOUS:]


def activate(cur: Aliases, version: str) -> Aliases:
    """``version`` becomes production; the old one goes onto ``previous`` (not when equal).

    A canary or shadow of ``version`` is cleared: it is production now.
    """
    check_version_name(version)
    previous = push_previous(cur.previous, cur.production, version)
    return _without(replace(cur, production=version, previous=previous), version)


def rollback_target(cur: Aliases) -> str:
    """The version a rollback returns to; ``NothingToRollBack`` when ``previous`` is empty."""
    if not cur.previous:
        raise NothingToRollBack("nothing to roll back to: no previous production version")
    return cur.previous[-1]


def rollback(cur: Aliases, expected: str | None = None) -> Aliases:
    """The most recent ``previous`` version becomes production again (popped, not pushed).

    The current production is discarded, so repeated rollbacks walk back in history.
    ``expected`` is the target a caller verified: if it is no longer the target, the change is
    refused (another writer moved the stack meanwhile).
    """
    target = rollback_target(cur)
    if expected is not None and target != expected:
        raise RegistryError(
            f"the rollback target changed from {expected} to {target} meanwhile; retry"
        )
    return _without(replace(cur, production=target, previous=cur.previous[:-1]), target)


def set_beside(cur: Aliases, role: Canary | Shadow) -> Aliases:
    """A canary or shadow replaces the current one in its role; there must be another version
    in production."""
    _check_beside_production(cur, role.version, role.ROLE)
    in_role: dict[str, Any] = {role.ROLE: role}  # canary=... or shadow=...
    return replace(cur, **in_role)


set_canary = set_shadow = set_beside  # one transition, named for each role


def clear_canary(cur: Aliases) -> Aliases:
    """No canary (unchanged apart from ``updated_at`` when there is none)."""
    return replace(cur, canary=None)


def remove_canary(cur: Aliases, version: str) -> Aliases | None:
    """No canary if the canary still is ``version`` (an automatic rollback), else None.

    A replica that judged an older canary must not remove a newer one.
    """
    if cur.canary is None or cur.canary.version != version:
        return None
    return replace(cur, canary=None)


def clear_shadow(cur: Aliases) -> Aliases:
    """No shadow (unchanged apart from ``updated_at`` when there is none)."""
    return replace(cur, shadow=None)


def deactivate(cur: Aliases) -> Aliases:
    """Serve nothing: production null (pushed onto ``previous``), no canary, no shadow."""
    previous = push_previous(cur.previous, cur.production, None)
    return replace(cur, production=None, previous=previous, canary=None, shadow=None)


def _check_beside_production(cur: Aliases, version: str, role: str) -> None:
    if cur.production is None:
        raise RegistryError(f"no production version: activate one before a {role}")
    if cur.production == version:
        raise RegistryError(f"{version} is already production; it cannot be the {role}")


# -- history lines ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What an aliases update is, for its history line: action, actor and reason."""

    action: str
    actor: str
    reason: str | None = None

    def line(self, time: str, old: Aliases, new: Aliases) -> dict[str, Any]:
        """The history line of the change from ``old`` to ``new``."""
        role = _ROLE[self.action]
        before, after = _in_role(old, role), _in_role(new, role)
        percent = None
        if self.action in ("canary_set", "shadow_set"):
            percent = (new.canary if role == "canary" else new.shadow).percent  # type: ignore[union-attr]
        return history_line(time, self.action, self.actor, before, after, self.reason, percent)


_ROLE = {
    "activate": "production",
    "rollback": "production",
    "deactivate": "production",
    "canary_set": "canary",
    "canary_clear": "canary",
    "auto_rollback": "canary",
    "shadow_set": "shadow",
    "shadow_clear": "shadow",
}


def _in_role(aliases: Aliases, role: str) -> str | None:
    if role == "production":
        return aliases.production
    held = aliases.canary if role == "canary" else aliases.shadow
    return held.version if held is not None else None


def _without(aliases: Aliases, version: str) -> Aliases:
    """``aliases`` with a canary or shadow of ``version`` removed (it became production)."""
    return replace(
        aliases,
        canary=_drop_canary_of(aliases.canary, version),
        shadow=None
        if aliases.shadow is not None and aliases.shadow.version == version
        else aliases.shadow,
    )


def _drop_canary_of(canary: Canary | None, version: str) -> Canary | None:
    return None if canary is not None and canary.version == version else canary
