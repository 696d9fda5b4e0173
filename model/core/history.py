"""The registry's audit trail: one JSON line per change of ``aliases.json`` (stdlib only).

``<registry>/history.jsonl`` gets a line for every activate, rollback, canary set/clear, shadow
set/clear and automatic canary rollback::

    {"time": "2026-11-25T10:00:00.123456Z", "action": "canary_set", "actor": "admin-api",
     "from": null, "to": "v7", "percent": 10.0, "reason": "try the new like head"}

``from``/``to`` are the versions in the role the action changes (production for activate and
rollback, the canary or the shadow for the others). The registry appends the line while it still
holds the lock it took to replace ``aliases.json``, right after the replace, so lines are in the
order the changes happened and concurrent writers (several processes, several hosts on a shared
volume) never interleave. A crash between the replace and the append loses that one line; it
never records a change that did not happen.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from model.core.fileio import fsync_file

HISTORY_FILE: Final = "history.jsonl"
ACTIONS: Final = (
    "activate",
    "rollback",
    "deactivate",
    "canary_set",
    "canary_clear",
    "shadow_set",
    "shadow_clear",
    "auto_rollback",
)
# Who changed the aliases: the admin API, the CLI, the service's canary guard, or Python code
# calling the registry directly (training's activation, tests, benchmarks).
ACTORS: Final = ("admin-api", "cli", "auto-rollback", "library")
MAX_REASON_CHARS: Final = 500
_TAIL_BLOCK = 16384


def history_line(
    time: str,
    action: str,
    actor: str,
    old: str | None,
    new: str | None,
    reason: str | None = None,
    percent: float | None = None,
) -> dict[str, Any]:
    """One history line as a dict (``percent`` only for canary/shadow changes)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown history action {action!r}; expected one of {ACTIONS}")
    if actor not in ACTORS:
        raise ValueError(f"unknown actor {actor!r}; expected one of {ACTORS}")
    line: dict[str, Any] = {"time": time, "action": action, "actor": actor, "from": old, "to": new}
    if percent is not None:
        line["percent"] = percent
    line["reason"] = reason[:MAX_REASON_CHARS] if reason else None
    return line


class History:
    """The append-only ``history.jsonl`` of one registry."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, line: dict[str, Any]) -> None:
        """Append one line durably. The caller holds the registry's lock."""
        data = (json.dumps(line, separators=(",", ":"), sort_keys=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        fsync_file(self.path)

    def read(self) -> list[dict[str, Any]]:
        """Every line, oldest first (a torn last line, from a crash mid-append, is skipped)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return list(_parse(raw.splitlines()))

    def tail(self, n: int) -> list[dict[str, Any]]:
        """The last ``n`` lines, oldest first, reading only the end of the file."""
        if n <= 0:
            return []
        try:
            with open(self.path, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                pos, data = end, b""
                while pos > 0 and data.count(b"\n") <= n:
                    step = min(_TAIL_BLOCK, pos)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
        except FileNotFoundError:
            return []
        lines = data.splitlines()
        if pos > 0:
            lines = lines[1:]  # the first line read may be cut
        return list(_parse(lines))[-n:]


def _parse(lines: list[bytes]) -> Iterator[dict[str, Any]]:
    for raw in lines:
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict):
            yield line
