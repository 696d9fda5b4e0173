"""Where tuned fusion profiles go: the profile file (TOML) and the registry's tuning records.

``write_profile`` adds or replaces one ``[profiles.<name>]`` table and its ``[tuning.<name>]``
record in the file the service hot-reloads (``VIDRANK_FUSION_PROFILES``). It edits the file with
tomlkit, so the other profiles, the ``default`` and every comment stay as they were; the new text
must parse with ``model.core.fusion.parse_profiles`` (what the service runs) before it replaces
the file atomically (temp file, fsync, rename), under an exclusive lock beside the file so that
two writers do not lose each other's profiles.

``save_record`` keeps the same record as JSON with the version,
``<registry>/tuning/<version>/<profile>.json``, where ``vidrank report`` finds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import InlineTable, Table

from model.core.fileio import json_bytes, replace_durable
from model.core.fusion import FusionSpec, parse_profiles
from model.core.registry import Registry, check_version_name

TUNING_DIR = "tuning"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``.<name>.lock`` beside ``path`` (released on close)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _inline(values: Mapping[str, Any]) -> InlineTable:
    table = tomlkit.inline_table()
    for key, value in values.items():
        table[key] = _inline(value) if isinstance(value, Mapping) else value
    return table


def profile_table(spec: FusionSpec) -> Table:
    """``[profiles.<name>]``: method, weights (inline, as in the README) and the used knobs."""
    d = spec.to_dict()
    table = tomlkit.table()
    table["method"] = d["method"]
    table["weights"] = _inline(d["weights"])
    if spec.method == "weighted_product":
        table["epsilon"] = d["epsilon"]
    if spec.method == "rank_sum":
        table["beta"] = d["beta"]
    table.add(tomlkit.nl())
    return table


def _drop_none(value: Any) -> Any:
    """TOML has no null: leave out None values (recursively)."""
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value if v is not None]
    return value


def _record_table(record: Mapping[str, Any]) -> Table:
    """``[tuning.<name>]``: the record, nested tables as sub-tables, followed by a blank line."""
    table = tomlkit.table()
    table.update(_drop_none(dict(record)))
    table.add(tomlkit.nl())
    return table


def _super_table(doc: tomlkit.TOMLDocument, key: str) -> Table:
    if key not in doc:
        doc[key] = tomlkit.table(is_super_table=True)
    table = doc[key]
    if not isinstance(table, Table):
        raise ValueError(f"{key} in the profile file is not a table")
    return table


def write_profile(
    path: Path, name: str, spec: FusionSpec, record: Mapping[str, Any] | None = None
) -> None:
    """Add or replace profile ``name`` (and its tuning record) in ``path``; keep the rest.

    Raises ``ValueError`` (naming the file) when the existing file is not valid TOML, and
    ``FusionError`` when the result would not load in the service; the file is then unchanged.
    """
    with _locked(path):
        try:
            text = path.read_text(encoding="utf-8") if path.exists() else ""
            doc = tomlkit.parse(text)
        except tomlkit.exceptions.ParseError as e:
            raise ValueError(f"{path}: not valid TOML ({e}); not changed") from None
        _super_table(doc, "profiles")[name] = profile_table(spec)
        tuning = _super_table(doc, "tuning")
        if record is not None:
            tuning[name] = _record_table(record)
        elif name in tuning:
            del tuning[name]  # a stale record would describe another profile
        if not tuning:
            del doc["tuning"]
        new_text = tomlkit.dumps(doc)
        parse_profiles(tomllib.loads(new_text))  # never write what the service would reject
        replace_durable(path, new_text.encode("utf-8"))


def tuning_dir(registry: Registry, version: str) -> Path:
    """``<registry>/tuning/<version>``: the tuning records of a version."""
    return registry.root / TUNING_DIR / check_version_name(version)


def save_record(registry: Registry, version: str, name: str, record: Mapping[str, Any]) -> Path:
    """Write ``record`` as ``tuning/<version>/<name>.json`` atomically; returns the path."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--profile {name!r}: not usable as a file name")
    directory = tuning_dir(registry, version)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    replace_durable(path, json_bytes(dict(record)))
    return path


def load_records(registry: Registry, version: str) -> dict[str, dict[str, Any]]:
    """The tuning records of ``version`` by profile name (newest last); none -> {}."""
    directory = tuning_dir(registry, version)
    if not directory.is_dir():
        return {}
    paths = sorted(directory.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name))
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in paths}
