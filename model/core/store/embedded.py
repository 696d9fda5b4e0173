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
stays a plain read-modify-write under its own lock. Both are kept by the same code, the one
artifact store (``model.core.artifacts``): publish = stage in a temp directory, fsync, verify,
rename; aliases = replaced whole (temp file + fsync + rename) under an exclusive flock, so a
poller reads the old file or the new one, never a torn one; an ``OSError`` is
``StoreUnavailable`` (503); no message names a server path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from model.core.aliases import push_previous
from model.core.artifacts import ALIASES_FILE, ArtifactStore, Faults
from model.core.bundle import VERSION_RE
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
ENCODED_DIR = ".encoded"
WHERE = f"{FEATURES_DIR}/{ALIASES_FILE}"  # how messages name the alias file: never a full path


class SnapshotExists(SnapshotError):
    """A snapshot of that name is already published; published snapshots are immutable."""

    code = "snapshot_exists"


# An unknown or invalid name is a 404 (nothing to find); an unwritable store is a 503.
FAULTS = Faults("snapshot", "feature store", WHERE, SnapshotNotFound, SnapshotNotFound,
                SnapshotExists, SnapshotError, partial(StoreUnavailable, "unwritable"))  # fmt: skip


def check_snapshot_name(name: Any) -> str:
    """``name`` if it is a valid snapshot name (the version-name rules), else SnapshotNotFound."""
    if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
        raise FAULTS.invalid_name(name)
    return name


@dataclass(frozen=True)
class FeatureAliases:
    """Contents of ``features/aliases.json``: the active snapshot and the ones before it."""

    active: str | None
    previous: tuple[str, ...] = ()
    updated_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form: ``{"active", "previous", "updated_at"}``."""
        return {
            "active": self.active,
            "previous": list(self.previous),
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> FeatureAliases:
        """Parse the JSON form; raises ``SnapshotError`` when malformed."""
        if not isinstance(d, dict):
            raise SnapshotError(f"{WHERE} must hold a JSON object")
        active, previous = d.get("active"), d.get("previous") or []
        if active is not None:
            check_snapshot_name(active)
        if not isinstance(previous, list):
            raise SnapshotError(f"{WHERE}: 'previous' must be a list")
        return cls(active, tuple(check_snapshot_name(p) for p in previous), d.get("updated_at"))


def activate_snapshot(cur: FeatureAliases, name: str) -> FeatureAliases:
    """The transition: ``name`` becomes active; the old one goes onto ``previous``."""
    check_snapshot_name(name)
    return replace(cur, active=name, previous=push_previous(cur.previous, cur.active, name))


class SnapshotStore(ArtifactStore[FeatureAliases]):
    """Feature snapshots under ``<registry>/features`` (local, or a volume shared by replicas)."""

    def __init__(self, registry_root: Path | str) -> None:
        root = Path(registry_root) / FEATURES_DIR
        super().__init__(root, FAULTS, FeatureAliases.from_dict, FeatureAliases(None))

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r})"

    @property
    def encoded_root(self) -> Path:
        """Where tables encoded for a model schema are cached (see store/encoded.py)."""
        return self.root / ENCODED_DIR

    snapshots = ArtifactStore.names  # published snapshots, oldest first (caches start with a dot)

    def load(self, name: str, *, verify: bool = True) -> Snapshot:
        """Load (and by default checksum-verify) a published snapshot."""
        snapshot = load_snapshot(self.require(name), verify=verify)
        if snapshot.name != name:
            raise SnapshotError(f"{name}: its manifest names snapshot {snapshot.name!r}")
        return snapshot

    def manifest(self, name: str) -> dict[str, Any]:
        """A snapshot's manifest, read without verifying the tables."""
        path = self.path(name) / "manifest.json"
        try:
            return dict(json.loads(path.read_bytes()))
        except FileNotFoundError:
            raise FAULTS.missing(name) from None
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

        def stage(tmp: Path) -> None:
            write_snapshot(tmp, name, tables, source, progress)
            load_snapshot(tmp, verify=True)  # re-read from disk: catches a bad write

        self.publish_staged(name, stage)
        return self.load(name, verify=False)

    # -- aliases ------------------------------------------------------------------------------
    def active(self) -> str | None:
        """The active snapshot's name (None before the first activation)."""
        return self.read_aliases().active

    def read_aliases(self) -> FeatureAliases:
        """The current alias; ``FeatureAliases(None)`` before any snapshot was activated."""
        return self.current() or FeatureAliases(None)

    aliases_stamp = ArtifactStore.stamp  # a cheap change token for the alias file

    def activate(self, name: str) -> FeatureAliases:
        """Make ``name`` the active snapshot; the old one goes onto ``previous``."""

        def change(cur: FeatureAliases) -> FeatureAliases:
            self.require(name)
            return activate_snapshot(cur, name)

        new = self.update(change)
        assert new is not None
        return new
