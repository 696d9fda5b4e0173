"""The one artifact store: immutable published directories + an aliases file (stdlib only).

Model versions (``model.core.registry``) and feature snapshots (``model.core.store.embedded``)
are both kept this way, by this code::

    <root>/<name>/                 one published artifact, immutable once published
    <root>/.tmp-<uuid>/            a publish in progress (never listed: names start with a dot)
    <root>/aliases.json            which artifact serves in which role (the user's value type)
    <root>/history.jsonl           one line per aliases change (when the user keeps a history)
    <root>/.lock                   flock serialising aliases updates

The directory may be local or a volume shared by every replica (NFS, a ReadWriteMany PVC, a
compose volume). Safety rests on two primitives that hold there too:

* fsync + rename. An artifact is staged in a temp directory, fsynced (files and directory), then
  renamed into place in one step, so no reader ever sees a half-copied one (TF Serving #1086).
  Renaming a directory onto an existing non-empty one fails, so of several concurrent publishers
  of one name exactly one wins and the others get the user's "exists" error. ``aliases.json`` is
  replaced the same way (temp file + fsync + ``os.replace`` + fsync of the directory), so pollers
  read either the old or the new file, never a torn one.
* ``fcntl.flock`` on ``<root>/.lock``. Every aliases change is a read-modify-write under an
  exclusive lock, so concurrent changes from several processes never lose an update. On NFS the
  Linux client implements flock with byte-range locks (NLM / NFSv4), which are cluster-wide.

What changes the aliases is a pure function of the current value (``model.core.aliases``); the
store only reads, applies and writes it. Any ``OSError`` on the way (read-only volume,
permissions, full disk, EIO) becomes the user's "unavailable" error (HTTP 503), and no message
carries a server path: errors name the file by its place in the layout (``features/aliases.json``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from model.core.bundle import VERSION_RE
from model.core.errors import VidrankError, shown
from model.core.fileio import content_stamp, fsync_dir, json_bytes, replace_durable, utc_now_iso
from model.core.history import HISTORY_FILE, History

ALIASES_FILE = "aliases.json"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"


class AliasesValue(Protocol):
    """What an aliases file holds: a frozen dataclass with ``updated_at`` and a JSON form."""

    @property
    def updated_at(self) -> str | None: ...

    def to_dict(self) -> dict[str, Any]: ...


A = TypeVar("A", bound=AliasesValue)


@dataclass(frozen=True)
class Faults:
    """What one kind of artifact is called, and its domain errors (each built from a message)."""

    thing: str  # "version", "snapshot": how messages name one artifact
    noun: str  # "registry", "feature store": how messages name the store
    where: str  # the aliases file as messages name it: "aliases.json", "features/aliases.json"
    bad_name: Callable[[str], VidrankError]  # a name that is not a valid artifact name
    not_found: Callable[[str], VidrankError]
    exists: Callable[[str], VidrankError]
    invalid: Callable[[str], VidrankError]  # an aliases file that is not valid
    unavailable: Callable[[str], VidrankError]  # the store cannot be read or written

    def missing(self, name: str) -> VidrankError:
        """The not-found error of ``name``."""
        return self.not_found(f"{self.thing} {shown(name)!r} is not published")

    def invalid_name(self, name: Any) -> VidrankError:
        """The bad-name error of ``name`` (to a client: no such artifact)."""
        return self.bad_name(
            f"invalid {self.thing} name {shown(repr(name))}: must match {VERSION_RE.pattern}"
        )

    def taken(self, name: str) -> VidrankError:
        """The exists error of ``name``: published artifacts are immutable."""
        return self.exists(f"{self.thing} {name!r} is already published")


Line = Callable[[str, Any, Any], dict[str, Any]]  # (time, old aliases, new aliases) → history


class ArtifactStore(Generic[A]):
    """Published artifacts under ``root`` and the aliases that name them (see the module doc)."""

    def __init__(
        self,
        root: Path,
        faults: Faults,
        parse: Callable[[Any], A],
        empty: A,
        *,
        artifacts: Path | None = None,
        history: bool = False,
    ) -> None:
        self.root = root
        self.artifacts = root if artifacts is None else artifacts  # where published dirs live
        self.faults = faults
        self._parse = parse
        self._empty = empty
        self.audit = History(root / HISTORY_FILE) if history else None

    @property
    def aliases_path(self) -> Path:
        """``<root>/aliases.json``."""
        return self.root / ALIASES_FILE

    # -- artifacts ------------------------------------------------------------------------------
    def check_name(self, name: Any) -> str:
        """``name`` if it is a valid artifact name (``VERSION_RE``), else the bad-name error."""
        if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
            raise self.faults.invalid_name(name)
        return name

    def path(self, name: str) -> Path:
        """Directory of ``name`` (which may not exist); validating keeps ``../x`` out."""
        return self.artifacts / self.check_name(name)

    def has(self, name: Any) -> bool:
        """Whether ``name`` is published (False for names that are not valid at all)."""
        if not isinstance(name, str) or not VERSION_RE.fullmatch(name):
            return False
        return (self.artifacts / name).is_dir()

    def require(self, name: str) -> Path:
        """The directory of published ``name``; the not-found error otherwise."""
        path = self.path(name)
        if not path.is_dir():
            raise self.faults.missing(name)
        return path

    def names(self) -> list[str]:
        """Published artifacts, oldest first (publish time, then name).

        Temp directories of publishes in progress (or of crashed ones) and caches are never
        listed: their names start with a dot, which ``VERSION_RE`` rejects.
        """
        try:
            entries = list(os.scandir(self.artifacts))
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

    def publish_staged(self, name: str, stage: Callable[[Path], None]) -> None:
        """Publish ``name`` atomically: ``stage`` fills (and verifies) a new temp directory,
        which is then fsynced and renamed into place - the one step that makes it visible.

        The exists error also when a concurrent publisher of the same name wins the race; the
        temp directory is removed on any failure.
        """
        final = self.path(name)
        if final.exists():  # cheap early refusal; the rename below is the real guard
            raise self.faults.taken(name)
        try:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            tmp = self.artifacts / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
            tmp.mkdir()
        except OSError as e:
            raise self._unavailable("cannot create a publish directory", e) from e
        try:
            stage(tmp)
            self._commit(tmp, final, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _commit(self, tmp: Path, final: Path, name: str) -> None:
        """Rename the staged directory into place; this single step is the publish."""
        # The directory's mtime is the publish time that names() sorts by. Set it from the
        # fine-grained user-space clock: the kernel's file timestamps are coarse (a few ms), so
        # two quick publishes could otherwise tie and sort by name instead.
        now_ns = time.time_ns()
        os.utime(tmp, ns=(now_ns, now_ns))
        fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise self.faults.taken(name) from e
            raise
        fsync_dir(self.artifacts)

    def cleanup_temp(self, older_than_s: float = 3600.0) -> list[str]:
        """Remove temp directories left by crashed publishes; return their names.

        Only directories older than ``older_than_s`` are removed, so a publish still copying
        (possibly from another host sharing the volume) is left alone.
        """
        removed: list[str] = []
        cutoff = time.time() - older_than_s
        try:
            entries = list(os.scandir(self.artifacts))
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

    # -- aliases --------------------------------------------------------------------------------
    def read_bytes(self) -> bytes | None:
        """The aliases file's bytes, None when it does not exist; unavailable on other errors."""
        try:
            return self.aliases_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._unavailable(f"cannot read {self.faults.where}", e, "readable") from e

    def current(self) -> A | None:
        """The current aliases; None when the file does not exist. Needs no lock: the file is
        only ever replaced whole."""
        raw = self.read_bytes()
        if raw is None:
            return None
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.faults.invalid(f"{self.faults.where} is not valid JSON: {e}") from e
        return self._parse(data)

    def stamp(self) -> tuple[int, int] | None:
        """A cheap change token for the aliases file (``content_stamp``); None when absent."""
        return content_stamp(self.read_bytes())

    def update(self, change: Callable[[A], A | None], line: Line | None = None) -> A | None:
        """Read-modify-write the aliases under the lock, so no concurrent update is lost.

        ``change`` (a pure transition, plus any check that must hold under the lock) returns
        the new value, or None to write nothing. ``line`` makes the history line of the change,
        appended under the same lock so lines are in the order the changes happened.
        """
        with self._locked():
            cur = self.current()
            cur = self._empty if cur is None else cur
            changed = change(cur)
            if changed is None:
                return None
            now = utc_now_iso()
            new = replace(changed, updated_at=now)  # type: ignore[type-var]
            try:
                replace_durable(self.aliases_path, json_bytes(new.to_dict()))
                if self.audit is not None and line is not None:
                    self.audit.append(line(now, cur, new))
            except OSError as e:
                raise self._unavailable(f"cannot write {self.faults.where}", e) from e
            return new

    def check_writable(self) -> None:
        """Raise the unavailable error unless the aliases can be written (the lock taken).

        Lets a caller refuse before it spends seconds loading what it could not activate.
        """
        with self._locked():
            pass

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive flock on ``<root>/.lock`` (cross-process, and across NFS clients)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._unavailable(f"cannot take the {self.faults.noun} lock", e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _unavailable(self, what: str, e: OSError, able: str = "writable") -> VidrankError:
        """The error of a failed access, naming the cause but never the path."""
        reason = e.strerror or type(e).__name__
        return self.faults.unavailable(f"{self.faults.noun} is not {able}: {what} ({reason})")
