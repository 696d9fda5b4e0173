"""A snapshot encoded for one model schema, and requests assembled from it (numpy + stdlib).

Encoding a stored row is the same work on every request that names it, so it is done once per
(snapshot, schema): each stored column is encoded with the schema's own encoder
(``FeatureSchema.encode_feature`` - text columns once per distinct string) into the groups the
model reads (``item_cat``, ``item_multi`` ...), one row per stored id plus a last row of schema
defaults for ids the snapshot lacks. A request then costs one ``np.searchsorted`` and one gather
per group; the values the request itself sends (and the ids, which are features too) are encoded
as usual and written over the gathered rows, so a request value always wins.

The encoded groups are cached as ``.npy`` files (``<cache>/<snapshot>/<snapshot digest>-<schema
digest>/``), written once under an exclusive flock and renamed into place, and memory-mapped
read-only: the workers of a machine (or, on a shared registry volume, of a fleet) share one copy.
Indices are stored as int32 when the schema's tables allow it (half the pages) and widened to the
model's int64 per request, on the few hundred gathered rows only.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.core.features import FeatureError, FeatureSchema, id_keys
from model.core.fileio import fsync_dir, json_bytes, utc_now_iso
from model.core.store.snapshot import ENTITY_IDS, EntityTable, Snapshot

CHUNK_ROWS = 1 << 17  # rows encoded per call: bounds the encoder's temporary arrays
META_FILE = "meta.json"


def lacks(schema: FeatureSchema, snapshot_columns: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """User and item features ``schema`` reads that the snapshot does not hold (ids excluded)."""
    out = []
    for entity, id_column in ENTITY_IDS.items():
        held = set(snapshot_columns.get(entity, ())) | {id_column}
        out += [f"{entity}.{n}" for n in schema.names(entity) if n not in held]
    return tuple(out)


@dataclass(frozen=True)
class EncodedEntity:
    """An entity's stored rows encoded for a schema: ``rows + 1`` rows per group, defaults last."""

    table: EntityTable
    groups: Mapping[str, np.ndarray]

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The groups at ``rows``, as the model's dtypes (fresh arrays, safe to write into)."""
        out = {}
        for name, arr in self.groups.items():
            part = arr.take(rows, axis=0)  # a fresh copy already
            out[name] = (
                part.astype(np.int64) if part.dtype != np.int64 and part.dtype.kind == "i" else part
            )
        return out


@dataclass(frozen=True)
class EncodedSnapshot:
    """A snapshot prepared for one schema; ``cached`` says whether the groups are memory-mapped."""

    snapshot: Snapshot
    schema: FeatureSchema
    entities: Mapping[str, EncodedEntity]
    lacks: tuple[str, ...]
    cached: bool = False
    cache_error: str | None = None
    _names: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    def assemble(
        self, entity: str, ids: Sequence[Any], given: Mapping[str, Sequence[Any]], n: int
    ) -> tuple[dict[str, np.ndarray], int]:
        """``n`` rows of ``entity``'s model inputs and how many ``ids`` the snapshot lacks.

        ``given`` holds the request's columns (feature name -> ``n`` values, None = not sent;
        the id column included). Stored rows are gathered by id, then every value the request
        sent is encoded and written over them. Raises ``FeatureError`` naming the request row.
        """
        names = self._names.get(entity) or self._names.setdefault(
            entity, tuple(self.schema.names(entity))
        )
        sent = [k for k in names if k in given]
        full = [k for k in sent if None not in given[k]]
        if len(full) == len(names):  # the request sends every feature: nothing to look up
            return self.schema.encode_entity(entity, given, n), 0
        enc = self.entities[entity]
        rows, found = enc.table.lookup(id_keys(ids))
        out = enc.gather(rows)
        id_name = ENTITY_IDS[entity]
        if id_name in names:  # a stored row holds its id encoded: only misses need theirs
            missing = np.flatnonzero(~found)
            if len(missing):
                self._write(out, id_name, [ids[i] for i in missing.tolist()], missing)
        for name in full:
            if name != id_name:
                self._write(out, name, given[name], None)
        for name in sent:
            if name not in full:
                col = given[name]
                idx = [i for i, v in enumerate(col) if v is not None]
                if idx:
                    self._write(out, name, [col[i] for i in idx], np.asarray(idx))
        return out, n - int(np.count_nonzero(found))

    def _write(
        self, out: dict[str, np.ndarray], name: str, values: Sequence[Any], idx: np.ndarray | None
    ) -> None:
        """Encode ``values`` of feature ``name`` and write them at rows ``idx`` (None: all)."""
        try:
            parts = self.schema.encode_feature(name, values, len(values))
        except FeatureError as e:
            if idx is not None and e.row is not None:
                e.row = int(idx[e.row])  # the request's row, not the subset's
            raise
        targets, j = self.schema.slot(name)
        for target, part in zip(targets, parts, strict=True):
            if idx is None:
                out[target][:, j] = part
            else:
                out[target][idx, j] = part


# -- encoding a snapshot -----------------------------------------------------------------------


def encode_snapshot(
    snapshot: Snapshot, schema: FeatureSchema, cache_root: Path | None
) -> EncodedSnapshot:
    """``snapshot`` encoded for ``schema``, from the cache when it holds it (else encoded now).

    With ``cache_root`` None, or when the cache cannot be written (a read-only volume), the
    groups stay in this process's memory and ``cache_error`` says why.
    """
    missing = lacks(schema, {e: snapshot.columns(e) for e in ENTITY_IDS})
    if cache_root is None:
        groups = {e: _encode_table(schema, snapshot.table(e)) for e in ENTITY_IDS}
        return _encoded(snapshot, schema, groups, missing, cached=False)
    try:
        cached = _cached(cache_root / snapshot.name, snapshot, schema)
    except OSError as e:  # e.g. a read-only registry volume: this process keeps its own copy
        groups = {e_: _encode_table(schema, snapshot.table(e_)) for e_ in ENTITY_IDS}
        return _encoded(snapshot, schema, groups, missing, cached=False, error=str(e))
    return _encoded(snapshot, schema, cached, missing, cached=True)


def _encoded(
    snapshot: Snapshot,
    schema: FeatureSchema,
    groups: Mapping[str, Mapping[str, np.ndarray]],
    missing: tuple[str, ...],
    *,
    cached: bool,
    error: str | None = None,
) -> EncodedSnapshot:
    entities = {e: EncodedEntity(snapshot.table(e), groups[e]) for e in ENTITY_IDS}
    return EncodedSnapshot(snapshot, schema, entities, missing, cached, error)


def _storage_dtype(schema: FeatureSchema, entity: str, dtype: np.dtype) -> np.dtype:
    if dtype.kind == "i" and schema.layout(entity).table_size < 2**31:
        return np.dtype(np.int32)
    return dtype


def _encode_table(schema: FeatureSchema, table: EntityTable) -> dict[str, np.ndarray]:
    """The entity's groups for every stored row, plus the default row last."""
    entity, n = table.entity, table.rows
    default = schema.encode_entity(entity, {}, 1)
    groups = {
        g: np.empty((n + 1, *a.shape[1:]), dtype=_storage_dtype(schema, entity, a.dtype))
        for g, a in default.items()
    }
    for g, a in default.items():
        groups[g][:] = a[0]  # features the snapshot lacks keep their default on every row
    for name in schema.names(entity):
        col = table.columns.get(name)
        if col is None:
            continue
        targets, j = schema.slot(name)
        if col.codes is not None:  # text: encode each distinct string once, then gather
            parts = schema.encode_feature(name, col.values.tolist(), len(col.values))
            codes = np.asarray(col.codes)
            for start in range(0, n, CHUNK_ROWS):
                sel = codes[start : start + CHUNK_ROWS]
                for t, part in zip(targets, parts, strict=True):
                    groups[t][start : start + len(sel), j] = part[sel]
            continue
        for start in range(0, n, CHUNK_ROWS):
            values = np.asarray(col.values[start : start + CHUNK_ROWS])
            parts = schema.encode_feature(name, values, len(values))
            for t, part in zip(targets, parts, strict=True):
                groups[t][start : start + len(values), j] = part
    return groups


# -- the cache -----------------------------------------------------------------------------------


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _cached(
    parent: Path, snapshot: Snapshot, schema: FeatureSchema
) -> dict[str, dict[str, np.ndarray]]:
    """The groups from the cache, written first (once, under the lock) when it lacks them."""
    directory = parent / f"{snapshot.digest}-{schema.digest}"
    groups = _read_cache(directory, snapshot, schema)
    if groups is None:
        with _locked(parent):
            groups = _read_cache(directory, snapshot, schema)  # another worker was first
            if groups is None:
                _write_cache(directory, snapshot, schema)
                groups = _read_cache(directory, snapshot, schema)
    if groups is None:
        raise OSError(f"{directory} does not hold what was just written")
    return groups


def _meta(snapshot: Snapshot, schema: FeatureSchema) -> dict[str, Any]:
    return {"snapshot": snapshot.name, "snapshot_digest": snapshot.digest, "schema": schema.digest}


def _read_cache(
    directory: Path, snapshot: Snapshot, schema: FeatureSchema
) -> dict[str, dict[str, np.ndarray]] | None:
    """The cached groups, memory-mapped, or None when the cache does not hold them (intact)."""
    try:
        meta = json.loads((directory / META_FILE).read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    if {k: meta.get(k) for k in ("snapshot", "snapshot_digest", "schema")} != _meta(
        snapshot, schema
    ):
        return None
    out: dict[str, dict[str, np.ndarray]] = {}
    for entity in ENTITY_IDS:
        expected = schema.encode_entity(entity, {}, 1)
        rows = snapshot.table(entity).rows + 1
        out[entity] = {}
        for g, a in expected.items():
            try:
                arr = np.asarray(np.load(directory / f"{g}.npy", mmap_mode="r", allow_pickle=False))
            except (FileNotFoundError, ValueError):
                return None
            if arr.shape != (rows, *a.shape[1:]):
                return None
            out[entity][g] = arr
    return out


def _write_cache(directory: Path, snapshot: Snapshot, schema: FeatureSchema) -> None:
    """Encode and write the groups into a temp directory, then rename it to ``directory``."""
    tmp = directory.parent / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        for entity in ENTITY_IDS:
            for g, arr in _encode_table(schema, snapshot.table(entity)).items():
                with open(tmp / f"{g}.npy", "xb") as f:
                    np.save(f, arr, allow_pickle=False)
                    f.flush()
                    os.fsync(f.fileno())
        meta = {**_meta(snapshot, schema), "created_at": utc_now_iso()}
        with open(tmp / META_FILE, "xb") as f:
            f.write(json_bytes(meta))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if directory.exists():  # an incomplete leftover (no meta, or a wrong one)
            shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
