"""File-system model registry: immutable published bundles plus a small aliases file (stdlib only).

Layout::

    <root>/versions/<version>/{model.onnx, manifest.json}   immutable once published
    <root>/versions/.tmp-<uuid>/                             a publish in progress (never listed)
    <root>/aliases.json                                      production / previous / canary / shadow
    <root>/history.jsonl                                     one line per aliases change (audit)
    <root>/.lock                                             flock serialising aliases updates

The directory may be local (the embedded default) or a volume shared by every replica (NFS, a
ReadWriteMany PVC, a compose volume). Safety rests on two primitives that hold there too:

* fsync + rename. A version is staged in a temp directory, fsynced (files and directory), then
  renamed into place in one step, so no reader ever sees a half-copied version (TF Serving #1086).
  Renaming a directory onto an existing non-empty directory fails, so of several concurrent
  publishers of one version exactly one wins and the others get ``VersionExists``.
  ``aliases.json`` is replaced the same way (temp file + fsync + ``os.replace`` + fsync of the
  directory), so pollers read either the old or the new file, never a torn one.
* ``fcntl.flock`` on ``<root>/.lock``. Every aliases change is a read-modify-write under an
  exclusive lock, so concurrent activations from several processes never lose an update. On NFS
  the Linux client implements flock with byte-range locks (NLM / NFSv4), which are cluster-wide.

The registry is the fleet's source of truth: the admin API writes ``aliases.json`` and every
replica polls it (``aliases_stamp``) and converges. Every change also appends a line to
``history.jsonl`` (``model.core.history``) under the same lock: who (``actor``), why
(``reason``), from which version to which.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model.core.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    VERSION_RE,
    Bundle,
    BundleError,
    load_bundle,
)
from model.core.errors import VidrankError, shown
from model.core.fileio import (
    copy_durable,
    fsync_dir,
    json_bytes,
    replace_durable,
    utc_now_iso,
    write_durable,
)
from model.core.history import HISTORY_FILE, History, history_line
from model.core.policy import CanaryPolicy, InvalidPolicy

__all__ = [
    "ALIASES_FILE",
    "MAX_PREVIOUS",
    "VERSION_RE",
    "Aliases",
    "AliasesMissing",
    "Canary",
    "InvalidCanary",
    "InvalidShadow",
    "InvalidVersionName",
    "NothingToRollBack",
    "Registry",
    "RegistryError",
    "Shadow",
    "RegistryUnavailable",
    "VersionExists",
    "VersionNotFound",
]

VERSIONS_DIR = "versions"
ALIASES_FILE = "aliases.json"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"
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


# -- aliases -----------------------------------------------------------------------------------


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


# -- the registry ------------------------------------------------------------------------------


class Registry:
    """A model registry rooted at a directory (local, or a volume shared by replicas)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    @property
    def versions_root(self) -> Path:
        """``<root>/versions``: one sub-directory per published version."""
        return self.root / VERSIONS_DIR

    @property
    def aliases_path(self) -> Path:
        """``<root>/aliases.json``."""
        return self.root / ALIASES_FILE

    @property
    def history(self) -> History:
        """``<root>/history.jsonl``: every aliases change, oldest first."""
        return History(self.root / HISTORY_FILE)

    # -- versions ------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        """Published versions, oldest first (publish time, then name).

        Temp directories of publishes in progress (or of crashed ones) are never listed: their
        names start with a dot, which ``VERSION_RE`` rejects.
        """
        try:
            entries = list(os.scandir(self.versions_root))
        except FileNotFoundError:
            return []
        found: list[tuple[int, str]] = []
        for entry in entries:
            if not VERSION_RE.fullmatch(entry.name):
                continue
            try:
                if entry.is_dir():
                    found.append((entry.stat().st_mtime_ns, entry.name))
            except FileNotFoundError:
                continue  # vanished while listing (removed by an operator)
        return [name for _, name in sorted(found)]

    def has(self, version: str) -> bool:
        """Whether ``version`` is published (False for names that are not valid at all)."""
        if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
            return False
        return (self.versions_root / version).is_dir()

    def version_dir(self, version: str) -> Path:
        """Directory of ``version`` (which may not exist); rejects invalid names.

        Validating here is also what keeps names like ``../x`` out of the file system.
        """
        return self.versions_root / check_version_name(version)

    def bundle(self, version: str, *, verify: bool = True) -> Bundle:
        """Load (and by default checksum-verify) a published version's bundle.

        Raises ``VersionNotFound`` if absent and ``BundleError`` if the bundle is invalid.
        """
        path = self.version_dir(version)
        if not path.is_dir():
            raise VersionNotFound(f"version {shown(version)!r} is not published")
        bundle = load_bundle(path, verify=verify)
        if bundle.version != version:
            raise BundleError(
                f"manifest of {version} names version {bundle.version!r}; a registry directory "
                "must hold the bundle of its own name"
            )
        return bundle

    def publish(self, src: Path | str | Bundle, version: str | None = None) -> str:
        """Publish the bundle at ``src`` as ``version`` (default: the manifest's) atomically.

        The source is verified (unless it is a ``Bundle``, which ``load_bundle`` or
        ``write_bundle`` already verified), copied into ``versions/.tmp-<uuid>/``, fsynced,
        verified again and renamed to ``versions/<version>``; only then is it visible. If the
        name differs from the manifest's, the copy's manifest is rewritten to it (the sha256
        covers model.onnx only, so it stays valid). Only the bundle's two files are copied.

        Raises ``BundleError`` for an invalid source, ``InvalidVersionName`` and
        ``VersionExists`` (also when a concurrent publisher of the same name wins the race).
        The temp directory is removed on any failure.
        """
        source = src if isinstance(src, Bundle) else load_bundle(Path(src), verify=True)
        name = check_version_name(source.version if version is None else version)
        final = self.versions_root / name
        if final.exists():  # cheap early refusal; the rename below is the real guard
            raise VersionExists(f"version {name!r} is already published")
        self.versions_root.mkdir(parents=True, exist_ok=True)
        tmp = self.versions_root / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            self._stage(source, tmp, name)
            self._commit(tmp, final, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return name

    def _stage(self, source: Bundle, tmp: Path, name: str) -> None:
        """Copy the bundle into ``tmp``, make it durable and verify the copy."""
        copy_durable(source.onnx_path, tmp / MODEL_FILE)
        if name == source.version:
            copy_durable(source.manifest_path, tmp / MANIFEST_FILE)
        else:
            manifest = dict(source.manifest, version=name)
            write_durable(tmp / MANIFEST_FILE, json_bytes(manifest))
        fsync_dir(tmp)
        staged = load_bundle(tmp, verify=True)  # re-read from disk: catches a bad copy
        if staged.version != name:
            raise BundleError(f"staged manifest names {staged.version!r}, expected {name!r}")

    def _commit(self, tmp: Path, final: Path, name: str) -> None:
        """Rename the staged directory into place; this single step is the publish."""
        # The directory's mtime is the publish time that versions() sorts by. Set it from the
        # fine-grained user-space clock: the kernel's file timestamps are coarse (a few ms), so
        # two quick publishes could otherwise tie and sort by name instead.
        now_ns = time.time_ns()
        os.utime(tmp, ns=(now_ns, now_ns))
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise VersionExists(f"version {name!r} is already published") from e
            raise
        fsync_dir(self.versions_root)

    def cleanup_temp(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove temp directories left by crashed publishes; return their names.

        Only directories older than ``older_than_s`` are removed, so a publish still copying
        (possibly from another host sharing the volume) is left alone.
        """
        removed: list[str] = []
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(self.versions_root))
        except FileNotFoundError:
            return removed
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) and entry.is_dir(follow_symlinks=False):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        shutil.rmtree(entry.path)
                        removed.append(entry.name)
                except FileNotFoundError:
                    continue
        return sorted(removed)

    # -- aliases -------------------------------------------------------------------------------
    def read_aliases(self, *, missing_ok: bool = True) -> Aliases:
        """Current aliases; ``Aliases(None)`` when none have been written yet.

        With ``missing_ok=False`` a missing file (or registry directory) raises
        ``AliasesMissing`` instead: a serving replica must tell "no file" from "no production".
        Needs no lock: the file is only ever replaced whole.
        """
        try:
            raw = self.aliases_path.read_bytes()
        except FileNotFoundError:
            if missing_ok:
                return Aliases(None)
            what = ALIASES_FILE if self.root.is_dir() else "the registry directory"
            raise AliasesMissing(f"{what} is missing") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RegistryError(f"{ALIASES_FILE} is not valid JSON: {e}") from e
        return Aliases.from_dict(data)

    def aliases_stamp(self) -> tuple[int, int] | None:
        """A cheap change token for ``aliases.json``: ``(size, 64-bit content hash)``.

        ``None`` when the file does not exist. A content hash rather than (mtime, size): two
        updates within one timestamp tick can have equal sizes, and NFS clients cache attributes
        for seconds, whereas open() + read revalidates (close-to-open consistency). The file is a
        few hundred bytes, so reading it is as cheap as a stat.
        """
        try:
            data = self.aliases_path.read_bytes()
        except FileNotFoundError:
            return None
        digest = hashlib.blake2b(data, digest_size=8).digest()
        return (len(data), int.from_bytes(digest, "big"))

    def activate(
        self, version: str, *, actor: str = "library", reason: str | None = None
    ) -> Aliases:
        """Make ``version`` production; the old production goes onto ``previous``.

        Raises ``VersionNotFound`` if ``version`` is not published. Re-activating the current
        production pushes nothing. A canary or shadow of ``version`` is cleared (it is now
        production). This only checks that the version exists; loading and warming it is the
        service's job. ``actor`` and ``reason`` go to the history line.
        """

        def change(cur: Aliases) -> Aliases:
            self._require(version)
            previous = cur.previous
            if cur.production is not None and cur.production != version:
                previous = (*previous, cur.production)[-MAX_PREVIOUS:]
            return _without(replace(cur, production=version, previous=previous), version)

        return self._update(change, Change("activate", actor, reason))

    def rollback(
        self, expected: str | None = None, *, actor: str = "library", reason: str | None = None
    ) -> Aliases:
        """Make the most recent ``previous`` version production again (popping it).

        The current production is discarded, not pushed, so repeated rollbacks walk back in
        history. Raises ``NothingToRollBack`` when ``previous`` is empty. ``expected`` is the
        target the caller verified: if another writer changed the stack since, nothing changes
        and ``RegistryError`` says so.
        """

        def change(cur: Aliases) -> Aliases:
            if not cur.previous:
                raise NothingToRollBack("nothing to roll back to: no previous production version")
            target = cur.previous[-1]
            if expected is not None and target != expected:
                raise RegistryError(
                    f"the rollback target changed from {expected} to {target} meanwhile; retry"
                )
            self._require(target)
            return _without(replace(cur, production=target, previous=cur.previous[:-1]), target)

        return self._update(change, Change("rollback", actor, reason))

    def set_canary(
        self,
        version: str,
        percent: float,
        policy: CanaryPolicy | None = None,
        *,
        actor: str = "library",
        reason: str | None = None,
    ) -> Aliases:
        """Send ``percent`` of traffic to ``version`` (replacing any current canary).

        ``policy`` (optional) holds this canary's bounds for automatic rollback. Raises
        ``VersionNotFound``, ``InvalidCanary`` for a percent outside (0, 100], and
        ``RegistryError`` when there is no production version or ``version`` already is it.
        """
        canary = Canary(version, percent, policy)  # validate before taking the lock

        def change(cur: Aliases) -> Aliases:
            self._require(version)
            self._check_beside_production(cur, version, "canary")
            return replace(cur, canary=canary)

        return self._update(change, Change("canary_set", actor, reason))

    def clear_canary(self, *, actor: str = "library", reason: str | None = None) -> Aliases:
        """Stop the canary (a no-op apart from ``updated_at`` when there is none)."""
        return self._update(
            lambda cur: replace(cur, canary=None), Change("canary_clear", actor, reason)
        )

    def remove_canary(
        self, version: str, *, actor: str = "auto-rollback", reason: str | None = None
    ) -> Aliases | None:
        """Remove the canary if it still is ``version`` (an automatic rollback).

        Returns the new aliases, or None, writing nothing, when the canary is already another
        version or none: a replica that judged an older canary must not remove a newer one.
        """

        def change(cur: Aliases) -> Aliases | None:
            if cur.canary is None or cur.canary.version != version:
                return None
            return replace(cur, canary=None)

        return self._update_if(change, Change("auto_rollback", actor, reason))

    def set_shadow(
        self, version: str, percent: float, *, actor: str = "library", reason: str | None = None
    ) -> Aliases:
        """Have ``version`` also score ``percent`` of requests, off the response path.

        Raises ``VersionNotFound``, ``InvalidShadow`` for a percent outside (0, 100], and
        ``RegistryError`` when there is no production version or ``version`` already is it.
        """
        shadow = Shadow(version, percent)

        def change(cur: Aliases) -> Aliases:
            self._require(version)
            self._check_beside_production(cur, version, "shadow")
            return replace(cur, shadow=shadow)

        return self._update(change, Change("shadow_set", actor, reason))

    def clear_shadow(self, *, actor: str = "library", reason: str | None = None) -> Aliases:
        """Stop shadow scoring (a no-op apart from ``updated_at`` when there is none)."""
        return self._update(
            lambda cur: replace(cur, shadow=None), Change("shadow_clear", actor, reason)
        )

    def deactivate(self, *, actor: str = "library", reason: str | None = None) -> Aliases:
        """Serve nothing: ``production`` becomes null (pushed onto ``previous``), no canary.

        The one way to take the model away from every replica on purpose; ``rollback`` brings
        it back. A missing or broken aliases file never does this.
        """

        def change(cur: Aliases) -> Aliases:
            if cur.production is None:
                return replace(cur, canary=None, shadow=None)
            previous = (*cur.previous, cur.production)[-MAX_PREVIOUS:]
            return replace(cur, production=None, previous=previous, canary=None, shadow=None)

        return self._update(change, Change("deactivate", actor, reason))

    def check_writable(self) -> None:
        """Raise ``RegistryUnavailable`` unless aliases can be written (the lock can be taken).

        Lets a caller refuse before it spends seconds loading a model it could not activate.
        """
        with self._locked():
            pass

    # -- internals -----------------------------------------------------------------------------
    def _require(self, version: str) -> None:
        check_version_name(version)
        if not self.has(version):
            raise VersionNotFound(f"version {shown(version)!r} is not published")

    @staticmethod
    def _check_beside_production(cur: Aliases, version: str, role: str) -> None:
        if cur.production is None:
            raise RegistryError(f"no production version: activate one before a {role}")
        if cur.production == version:
            raise RegistryError(f"{version} is already production; it cannot be the {role}")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on ``<root>/.lock`` (cross-process, and across NFS clients).

        An ``OSError`` on the way (read-only volume, permissions) is ``RegistryUnavailable``.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unavailable("cannot take the registry lock", e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _update(self, change: Callable[[Aliases], Aliases], why: Change) -> Aliases:
        """Read-modify-write ``aliases.json`` under the lock, so no concurrent update is lost."""
        new = self._update_if(change, why)
        assert new is not None
        return new

    def _update_if(
        self, change: Callable[[Aliases], Aliases | None], why: Change
    ) -> Aliases | None:
        """Like ``_update``, but ``change`` may return None: then nothing is written."""
        with self._locked():
            cur = self.read_aliases()
            changed = change(cur)
            if changed is None:
                return None
            now = utc_now_iso()
            new = replace(changed, updated_at=now)
            try:
                replace_durable(self.aliases_path, json_bytes(new.to_dict()))
            except OSError as e:
                raise _unavailable(f"cannot write {ALIASES_FILE}", e) from e
            self.history.append(why.line(now, cur, new))
            return new


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


def _unavailable(what: str, e: OSError) -> RegistryUnavailable:
    """The error of a failed registry write, naming the cause but not the path."""
    reason = e.strerror or type(e).__name__
    return RegistryUnavailable(f"registry is not writable: {what} ({reason})")


def _drop_canary_of(canary: Canary | None, version: str) -> Canary | None:
    return None if canary is not None and canary.version == version else canary
