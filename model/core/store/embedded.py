"""The embedded feature store: snapshots in the registry directory, aliased and polled like models.

Layout, next to the model versions (stdlib + numpy)::

    <registry>/features/<snapshot>/      one snapshot (model/core/store/snapshot.py), immutable
    <registry>/features/.tmp-<uuid>/     a publish in progress (never listed)
    <registry>/features/aliases.json     {"active": "s2", "previous": ["s1"], "updated_at": ...}
    <registry>/features/.lock            flock serialising alias updates
    <registry>/features/.encoded/        tables encoded per (snapshot, model schema), shared by
                                         the workers of a machine or a fleet (store/encoded.py)

The alias has a file of its own rather than a key in the models' ``aliases.json``: a snapshot
switch then never looks like a model change to the model poller and vice versa, and each file
stays a plain read-modify-write under its own lock. Both follow the registry's rules: publish =
stage in a temp directory, fsync, verify, rename; aliases = replaced whole (temp file + fsync +
rename) under an exclusive flock, so a poller reads the old file or the new one, never a torn one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model.core.bundle import VERSION_RE
from model.core.fileio import fsync_dir, json_bytes, replace_durable, utc_now_iso
from model.core.store.snapshot import (
    EntityTable,
    Progress,
    Snapshot,
    SnapshotError,
    SnapshotNotFound,
    StoreUnavailable,
    load_snapshot,
    write_snapshot,
)

FEATURES_DIR = "features"
ALIASES_FILE = "aliases.json"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"
ENCODED_DIR = ".encoded"
MAX_PREVIOUS = 20


class SnapshotExists(SnapshotError):
    """A snapshot of that name is already published; published snapshots are immutable."""

    code = "snapshot_exists"


def check_snapshot_name(name: Any) -> str:
    """``name`` if it is a valid snapshot name (the version-name rules), else SnapshotNotFound."""
    if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
        raise SnapshotNotFound(f"invalid snapshot name {name!r}: must match {VERSION_RE.pattern}")
    return name


@dataclass(frozen=True)
class FeatureAliases:
    """Contents of ``features/aliases.json``: the active snapshot and the ones before it."""

    active: str | None
    previous: tuple[str, ...] = ()
    updated_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "previous": list(self.previous),
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> FeatureAliases:
        if not isinstance(d, dict):
            raise SnapshotError(f"{WHERE} must hold a JSON object")
        active, previous = d.get("active"), d.get("previous") or []
        if active is not None:
            check_snapshot_name(active)
        if not isinstance(previous, list):
            raise SnapshotError(f"{WHERE}: 'previous' must be a list")
        return cls(active, tuple(check_snapshot_name(p) for p in previous), d.get("updated_at"))


class SnapshotStore:
    """Feature snapshots under ``<registry>/features`` (local, or a volume shared by replicas)."""

    def __init__(self, registry_root: Path | str) -> None:
        self.root = Path(registry_root) / FEATURES_DIR

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r})"

    @property
    def aliases_path(self) -> Path:
        return self.root / ALIASES_FILE

    @property
    def encoded_root(self) -> Path:
        """Where tables encoded for a model schema are cached (see store/encoded.py)."""
        return self.root / ENCODED_DIR

    # -- snapshots ----------------------------------------------------------------------------
    def snapshots(self) -> list[str]:
        """Published snapshots, oldest first (temp and cache directories start with a dot)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if VERSION_RE.fullmatch(entry.name) and entry.is_dir():
                found.append((entry.stat().st_mtime_ns, entry.name))
        return [name for _, name in sorted(found)]

    def path(self, name: str) -> Path:
        return self.root / check_snapshot_name(name)

    def has(self, name: str) -> bool:
        return (
            isinstance(name, str) and bool(VERSION_RE.fullmatch(name)) and self.path(name).is_dir()
        )

    def load(self, name: str, *, verify: bool = True) -> Snapshot:
        """Load (and by default checksum-verify) a published snapshot."""
        path = self.path(name)
        if not path.is_dir():
            raise SnapshotNotFound(f"snapshot {name!r} is not published")
        snapshot = load_snapshot(path, verify=verify)
        if snapshot.name != name:
            raise SnapshotError(f"{name}: its manifest names snapshot {snapshot.name!r}")
        return snapshot

    def manifest(self, name: str) -> dict[str, Any]:
        """A snapshot's manifest, read without verifying the tables."""
        path = self.path(name) / "manifest.json"
        try:
            return dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            raise SnapshotNotFound(f"snapshot {name!r} is not published") from None
        except ValueError as e:
            raise SnapshotError(f"{name}: manifest is not valid JSON: {e}") from None

    def publish(
        self,
        tables: Mapping[str, EntityTable],
        name: str,
        source: Mapping[str, Any],
        progress: Progress | None = None,
    ) -> Snapshot:
        """Write ``tables`` as snapshot ``name`` atomically: stage, fsync, verify, rename."""
        check_snapshot_name(name)
        final = self.root / name
        if final.exists():
            raise SnapshotExists(f"snapshot {name!r} is already published")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            write_snapshot(tmp, name, tables, source, progress)
            load_snapshot(tmp, verify=True)  # re-read from disk: catches a bad write
            now_ns = time.time_ns()  # publish time, which snapshots() sorts by
            os.utime(tmp, ns=(now_ns, now_ns))
            try:
                os.rename(tmp, final)
            except OSError as e:
                raise SnapshotExists(f"snapshot {name!r} is already published") from e
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.load(name, verify=False)

    # -- aliases ------------------------------------------------------------------------------
    def active(self) -> str | None:
        """The active snapshot's name (None before the first activation)."""
        return self.read_aliases().active

    def read_aliases(self) -> FeatureAliases:
        """The current alias; ``FeatureAliases(None)`` before any snapshot was activated."""
        try:
            raw = self.aliases_path.read_bytes()
        except FileNotFoundError:
            return FeatureAliases(None)
        except OSError as e:
            raise _unavailable("unreadable", f"cannot read {WHERE}", e) from e
        try:
            return FeatureAliases.from_dict(json.loads(raw))
        except ValueError as e:
            raise SnapshotError(f"{WHERE} is not valid JSON: {e}") from e

    def aliases_stamp(self) -> tuple[int, int] | None:
        """A cheap change token for the alias file (size, content hash), as for models."""
        try:
            data = self.aliases_path.read_bytes()
        except FileNotFoundError:
            return None
        return len(data), int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

    def activate(self, name: str) -> FeatureAliases:
        """Make ``name`` the active snapshot; the old one goes onto ``previous``."""

        def change(cur: FeatureAliases) -> FeatureAliases:
            if not self.has(name):
                raise SnapshotNotFound(f"snapshot {name!r} is not published")
            previous = cur.previous
            if cur.active is not None and cur.active != name:
                previous = (*previous, cur.active)[-MAX_PREVIOUS:]
            return replace(cur, active=name, previous=previous)

        return self._update(change)

    def check_writable(self) -> None:
        """Raise ``StoreUnavailable`` unless the alias can be written (the lock can be taken)."""
        with self._locked():
            pass

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _unavailable("unwritable", "cannot take the feature store's lock", e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _update(self, change: Callable[[FeatureAliases], FeatureAliases]) -> FeatureAliases:
        with self._locked():
            new = replace(change(self.read_aliases()), updated_at=utc_now_iso())
            try:
                replace_durable(self.aliases_path, json_bytes(new.to_dict()))
            except OSError as e:
                raise _unavailable("unwritable", f"cannot write {WHERE}", e) from e
            return new


WHERE = f"{FEATURES_DIR}/{ALIASES_FILE}"  # how messages name the alias file: never a full path


def _unavailable(reason: str, what: str, e: OSError) -> StoreUnavailable:
    """The error of a failed store access, naming the cause but not the path."""
    return StoreUnavailable(
        reason, f"feature store is not available: {what} ({e.strerror or type(e).__name__})"
    )
