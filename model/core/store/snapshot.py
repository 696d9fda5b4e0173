"""Feature snapshots: the stored user and item rows a feature store serves (numpy + stdlib).

A snapshot holds, per entity (``user`` keyed by ``user_id``, ``item`` keyed by ``video_id``), one
row of raw feature values per id, as a request would send them: every model version encodes them
with its own schema. It is the unit a store publishes, activates and serves as a whole, so a
request never mixes two of them.

Rows are ordered by the encoder's 64-bit key of their id (:func:`model.core.features.id_keys`),
so a lookup of N ids is one ``np.searchsorted`` and ``42`` finds the row of ``"42"``. Text columns
are dictionary-encoded (int32 codes into their distinct strings): compact, and a model encodes
each distinct string once.

On disk (the embedded store's ``<registry>/features/<snapshot>/``)::

    manifest.json                 format, name, created_at, source, per entity: id column,
                                  rows, {column: int|float|str}, {file: sha256}
    user.key.npy                  uint64 [rows]   sorted id keys
    user.<column>.npy             int64 | float64 [rows], in key order
    user.<column>.codes.npy       int32 [rows]    a text column: index into ...
    user.<column>.values.npy      <U [distinct]   ... its distinct strings
    item.*                        the same for videos

Loading verifies every file's sha256 and shape, then memory-maps the arrays read-only, so the
worker processes of one machine share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from model.core.errors import VidrankError
from model.core.features import FeatureError, id_keys
from model.core.fileio import fsync_dir, json_bytes, sha256_file, utc_now_iso, write_durable

__all__ = [
    "ENTITY_IDS",
    "MANIFEST_FILE",
    "Column",
    "EntityTable",
    "Snapshot",
    "SnapshotError",
    "build_tables",
    "load_snapshot",
    "write_snapshot",
]

SNAPSHOT_FORMAT = 1
MANIFEST_FILE = "manifest.json"
ENTITY_IDS: dict[str, str] = {"user": "user_id", "item": "video_id"}
KINDS = ("int", "float", "str")
_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_FILE_RE = re.compile(r"^(user|item)\.(key|[A-Za-z0-9_]{1,64}(\.codes|\.values)?)\.npy$")

Progress = Callable[[str], None]  # called with a short description after each step


class SnapshotError(VidrankError):
    """A snapshot that cannot be published or served: the message says which part and why."""

    code = "invalid_snapshot"


class SnapshotNotFound(SnapshotError):
    """No snapshot of that name is published (or the name is not a valid one)."""

    code = "snapshot_not_found"


class StoreUnavailable(SnapshotError):
    """The store could not answer or be written: ``reason`` (a metric label) is down, timeout,
    garbage, expired or unwritable. A fault of the store, not of a snapshot: nothing changed."""

    code = "feature_store_unavailable"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Column:
    """One stored column: ``values`` per row, or for text the distinct strings plus ``codes``."""

    name: str
    kind: str  # int | float | str
    values: np.ndarray
    codes: np.ndarray | None = None  # text: int32 [rows] into values

    def __len__(self) -> int:
        return len(self.codes if self.codes is not None else self.values)

    def take(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """The values at ``rows`` (all rows if None); text comes back as a unicode array."""
        sel = slice(None) if rows is None else rows
        if self.codes is None:
            return np.asarray(self.values[sel])
        return np.asarray(self.values[np.asarray(self.codes[sel])])

    def files(self, entity: str) -> dict[str, np.ndarray]:
        """{file name: array} as stored on disk."""
        if self.codes is None:
            return {f"{entity}.{self.name}.npy": self.values}
        return {
            f"{entity}.{self.name}.codes.npy": self.codes,
            f"{entity}.{self.name}.values.npy": self.values,
        }


@dataclass(frozen=True)
class EntityTable:
    """One entity's rows: sorted id keys and the columns in key order (the id column included)."""

    entity: str
    id_column: str
    keys: np.ndarray  # uint64 [rows], strictly increasing
    columns: Mapping[str, Column]

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """The stored features other than the id, in stored order."""
        return tuple(c for c in self.columns if c != self.id_column)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row [n], found [n]) for encoder keys; a missing key's row is ``rows`` (one past)."""
        if self.rows == 0:
            return np.full(len(keys), 0, dtype=np.int64), np.zeros(len(keys), dtype=bool)
        pos = np.searchsorted(self.keys, keys)
        clipped = np.minimum(pos, self.rows - 1)
        found = np.asarray(self.keys[clipped]) == keys
        return np.where(found, clipped, self.rows), found


@dataclass(frozen=True)
class Snapshot:
    """A loaded (or freshly built) snapshot: its manifest and both entity tables."""

    name: str
    manifest: Mapping[str, Any]
    tables: Mapping[str, EntityTable]
    path: Path | None = None

    def table(self, entity: str) -> EntityTable:
        return self.tables[entity]

    @property
    def created_at(self) -> str:
        return str(self.manifest.get("created_at", ""))

    @cached_property
    def digest(self) -> str:
        """Hash of the manifest (which holds every file's sha256): identifies the content."""
        return hashlib.sha256(json_bytes(dict(self.manifest))).hexdigest()[:16]

    def columns(self, entity: str) -> tuple[str, ...]:
        return self.tables[entity].feature_columns


# -- building tables from columns ---------------------------------------------------------------


def build_tables(columns: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, EntityTable]:
    """Validated, key-ordered tables from ``{entity: {column: values}}`` (user and item).

    Each entity must hold its id column (``user_id`` / ``video_id``) with unique ids. Integer
    columns become int64, floats float64 (finite only), text columns (object or unicode arrays of
    str) dictionary-encoded. Missing values are refused: fill them as training does first.
    """
    if set(columns) != set(ENTITY_IDS):
        raise SnapshotError(
            f"a snapshot holds the entities {sorted(ENTITY_IDS)}, got {sorted(columns)}"
        )
    return {e: _build_table(e, columns[e]) for e in ENTITY_IDS}


def _build_table(entity: str, cols: Mapping[str, np.ndarray]) -> EntityTable:
    id_column = ENTITY_IDS[entity]
    if id_column not in cols:
        raise SnapshotError(f"the {entity} table has no {id_column} column")
    lengths = {name: len(v) for name, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise SnapshotError(f"{entity} columns differ in length: {lengths}")
    try:
        keys = id_keys(
            np.asarray(cols[id_column]) if _is_int(cols[id_column]) else list(cols[id_column])
        )
    except FeatureError as e:
        raise SnapshotError(f"{entity}.{id_column}: {e.message}") from None
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    dupes = np.flatnonzero(keys[1:] == keys[:-1])
    if len(dupes):
        dup = np.asarray(cols[id_column])[order[dupes[0]]]
        dup = dup.item() if isinstance(dup, np.generic) else dup
        raise SnapshotError(f"{entity}.{id_column}: duplicate id {dup!r} ({len(dupes)} duplicates)")
    built = {
        name: _column(entity, name, np.asarray(values)[order]) for name, values in cols.items()
    }
    return EntityTable(entity, id_column, keys, built)


def _is_int(values: Any) -> bool:
    return isinstance(values, np.ndarray) and values.dtype.kind in "iub"


def _column(entity: str, name: str, values: np.ndarray) -> Column:
    where = f"{entity}.{name}"
    if not _NAME_RE.fullmatch(name):
        raise SnapshotError(f"{where}: column names are letters, digits and underscores")
    kind = values.dtype.kind
    if kind in "iub":
        return Column(name, "int", values.astype(np.int64))
    if kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            raise SnapshotError(f"{where}: non-finite value at row {int(np.argmax(bad))}")
        return Column(name, "float", values.astype(np.float64))
    if kind in "OUS":
        if kind == "O" and not all(type(v) is str for v in values):
            row = next(i for i, v in enumerate(values) if type(v) is not str)
            raise SnapshotError(f"{where}: expected text, got {values[row]!r} at row {row}")
        distinct, codes = np.unique(values.astype(str), return_inverse=True)
        return Column(name, "str", distinct, codes.reshape(-1).astype(np.int32))
    raise SnapshotError(f"{where}: unsupported dtype {values.dtype}")


# -- writing ------------------------------------------------------------------------------------


def write_snapshot(
    directory: Path,
    name: str,
    tables: Mapping[str, EntityTable],
    source: Mapping[str, Any],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write ``tables`` into the new, empty ``directory`` (fsynced); return the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    entities: dict[str, Any] = {}
    for entity, table in tables.items():
        arrays = {f"{entity}.key.npy": table.keys}
        for col in table.columns.values():
            arrays.update(col.files(entity))
        files = {}
        for file, arr in arrays.items():
            _save(directory / file, arr)
            files[file] = sha256_file(directory / file)
            if progress is not None:
                progress(file)
        entities[entity] = {
            "id": table.id_column,
            "rows": table.rows,
            "columns": {c.name: c.kind for c in table.columns.values()},
            "files": files,
        }
    manifest = {
        "format": SNAPSHOT_FORMAT,
        "snapshot": name,
        "created_at": utc_now_iso(),
        "source": dict(source),
        "entities": entities,
    }
    write_durable(directory / MANIFEST_FILE, json_bytes(manifest))
    fsync_dir(directory)
    return manifest


def _save(path: Path, arr: np.ndarray) -> None:
    with open(path, "xb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


# -- loading ------------------------------------------------------------------------------------


def load_snapshot(directory: Path, *, verify: bool = True) -> Snapshot:
    """Read the manifest, verify each file's sha256 (``verify``) and memory-map the tables.

    Raises ``SnapshotError`` naming the file or field that is wrong.
    """
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise SnapshotError(f"{directory.name}: no {MANIFEST_FILE}") from None
    except ValueError as e:
        raise SnapshotError(f"{directory.name}: {MANIFEST_FILE} is not valid JSON: {e}") from None
    name = _check_manifest(manifest, directory.name)
    tables = {e: _load_table(directory, e, manifest["entities"][e], verify) for e in ENTITY_IDS}
    return Snapshot(name, manifest, tables, directory)


def _check_manifest(manifest: Any, where: str) -> str:
    if not isinstance(manifest, dict) or manifest.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{where}: not a format-{SNAPSHOT_FORMAT} snapshot manifest")
    entities = manifest.get("entities")
    if not isinstance(entities, dict) or set(entities) != set(ENTITY_IDS):
        raise SnapshotError(f"{where}: manifest must describe the entities {sorted(ENTITY_IDS)}")
    for entity, spec in entities.items():
        if not isinstance(spec, dict) or spec.get("id") != ENTITY_IDS[entity]:
            raise SnapshotError(f"{where}: {entity} must be keyed by {ENTITY_IDS[entity]}")
        cols, files, rows = spec.get("columns"), spec.get("files"), spec.get("rows")
        if not isinstance(cols, dict) or not all(
            isinstance(c, str) and _NAME_RE.fullmatch(c) and k in KINDS for c, k in cols.items()
        ):
            raise SnapshotError(f"{where}: {entity}.columns must map column names to {KINDS}")
        if not isinstance(files, dict) or not all(
            isinstance(f, str) and _FILE_RE.fullmatch(f) and f.startswith(entity + ".")
            for f in files
        ):
            raise SnapshotError(f"{where}: {entity}.files names a file outside the layout")
        if type(rows) is not int or rows < 0:
            raise SnapshotError(f"{where}: {entity}.rows must be a non-negative integer")
    name = manifest.get("snapshot")
    if not isinstance(name, str):
        raise SnapshotError(f"{where}: manifest lacks the snapshot name")
    return name


def _load_table(directory: Path, entity: str, spec: Mapping[str, Any], verify: bool) -> EntityTable:
    files: Mapping[str, str] = spec["files"]
    rows: int = spec["rows"]

    def array(file: str, dtype_kind: str, length: int | None) -> np.ndarray:
        if file not in files:
            raise SnapshotError(f"{directory.name}: manifest lists no {file}")
        path = directory / file
        if not path.is_file():
            raise SnapshotError(f"{directory.name}: {file} is missing")
        if verify and sha256_file(path) != files[file]:
            raise SnapshotError(f"{directory.name}: {file} fails its sha256 check")
        try:
            # A plain ndarray view of the read-only mapping: no copy, and no np.memmap
            # __getitem__ overhead on every lookup and gather.
            arr = np.asarray(np.load(path, mmap_mode="r", allow_pickle=False))
        except (ValueError, OSError) as e:
            raise SnapshotError(f"{directory.name}: {file} is not a numpy array: {e}") from None
        if (
            arr.ndim != 1
            or arr.dtype.kind != dtype_kind
            or (length is not None and len(arr) != length)
        ):
            raise SnapshotError(
                f"{directory.name}: {file} has dtype {arr.dtype}, shape {arr.shape}"
            )
        return arr

    keys = array(f"{entity}.key.npy", "u", rows)
    if rows > 1 and not bool(np.all(keys[1:] > keys[:-1])):
        raise SnapshotError(f"{directory.name}: {entity}.key.npy is not strictly increasing")
    columns = {}
    for name, kind in spec["columns"].items():
        if kind == "str":
            values = array(f"{entity}.{name}.values.npy", "U", None)
            codes = array(f"{entity}.{name}.codes.npy", "i", rows)
            if rows and (int(codes.min()) < 0 or int(codes.max()) >= len(values)):
                raise SnapshotError(f"{directory.name}: {entity}.{name} codes out of range")
            columns[name] = Column(name, kind, values, codes)
        else:
            columns[name] = Column(
                name, kind, array(f"{entity}.{name}.npy", "i" if kind == "int" else "f", rows)
            )
    if spec["id"] not in columns:
        raise SnapshotError(f"{directory.name}: {entity} has no {spec['id']} column")
    return EntityTable(entity, spec["id"], keys, columns)
