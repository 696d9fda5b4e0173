"""Durable file writes and the one JSON serialiser for files (standard library only).

Everything vidrank publishes for other processes to read — bundles, the registry's aliases,
feature snapshots, prepared training data — goes through these helpers, so a reader (or a crash)
sees either the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CHUNK = 1 << 20  # 1 MiB: streams large files without holding them in memory


def utc_now_iso() -> str:
    """The current UTC time as ISO 8601 with microseconds and a ``Z``."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_bytes(obj: Any) -> bytes:
    """Indented, UTF-8, strict (no NaN) JSON with a final newline: every JSON file we write."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def file_chunks(path: Path) -> Iterator[bytes]:
    """The bytes of ``path`` in ``CHUNK``-sized pieces."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in chunks so large graphs need no extra memory."""
    h = hashlib.sha256()
    for chunk in file_chunks(Path(path)):
        h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created/renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file that was written by someone else (e.g. an exporter)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(dest: Path, chunks: Iterable[bytes]) -> str:
    """Write ``chunks`` to ``dest`` via a fsynced temp file + rename; return the data's sha256.

    Readers (and a crash) see either the old file or the complete new one, never a torn one.
    """
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    h = hashlib.sha256()
    try:
        with open(tmp, "xb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest()


def replace_durable(dest: Path, data: bytes) -> None:
    """Atomically replace ``dest`` (temp file, fsync, rename), then fsync its directory."""
    write_atomic(dest, [data])
    fsync_dir(dest.parent)


def copy_durable(src: Path, dest: Path) -> None:
    """Stream-copy ``src`` to a new file ``dest`` and fsync it (``dest`` must not exist)."""
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        shutil.copyfileobj(fin, fout, CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def write_durable(dest: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``dest`` and fsync it (``dest`` must not exist)."""
    with open(dest, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def content_stamp(data: bytes | None) -> tuple[int, int] | None:
    """The one "did it change?" token of a small file: ``(size, 64-bit content hash)``.

    ``None`` for a missing file. A content hash rather than (mtime, size): two updates within one
    timestamp tick can have equal sizes, and NFS clients cache attributes for seconds, whereas
    open() + read revalidates (close-to-open consistency). The files are small (aliases, token
    lists, profiles), so reading one is about as cheap as a stat.
    """
    if data is None:
        return None
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return (len(data), int.from_bytes(digest, "big"))
