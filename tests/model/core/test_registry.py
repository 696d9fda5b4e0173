"""Registry: atomic publish, concurrent publishers, aliases (activate / rollback / canary)."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from model.core.bundle import MANIFEST_FILE, MODEL_FILE, BundleError
from model.core.registry import (
    MAX_PREVIOUS,
    VERSION_RE,
    Aliases,
    AliasesMissing,
    Canary,
    InvalidCanary,
    InvalidVersionName,
    NothingToRollBack,
    Registry,
    RegistryError,
    RegistryUnavailable,
    VersionExists,
    VersionNotFound,
)
from tests.model.core.test_bundle import make_bundle

SPAWN = mp.get_context("spawn")  # like a fleet of fresh processes: nothing inherited but args
PROC_TIMEOUT_S = 60


def make_src(dest: Path, version: str = "v1", payload: bytes | None = None) -> Path:
    """A bundle directory with random bytes for model.onnx (the registry never parses it)."""
    return make_bundle(dest, version, payload).path


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "registry")


def publish_many(reg: Registry, tmp_path: Path, names: Sequence[str]) -> None:
    for name in names:
        reg.publish(make_src(tmp_path / f"src-{name}", name))


def temp_dirs(reg: Registry) -> list[str]:
    if not reg.versions_root.exists():
        return []
    return [p.name for p in reg.versions_root.iterdir() if p.name.startswith(".tmp-")]


# -- multiprocessing workers (module level so that spawned children can import them) ------------


def _publish_worker(root: str, src: str, version: str | None, barrier: Any, out: Any) -> None:
    reg = Registry(root)
    barrier.wait(timeout=PROC_TIMEOUT_S)
    try:
        out.put(("ok", reg.publish(Path(src), version)))
    except VersionExists:
        out.put(("exists", version))
    except Exception as e:  # reported to the parent, which fails the test
        out.put(("error", repr(e)))


def _activate_worker(root: str, versions: list[str], barrier: Any, out: Any) -> None:
    reg = Registry(root)
    barrier.wait(timeout=PROC_TIMEOUT_S)
    try:
        for v in versions:
            reg.activate(v)
        out.put(("ok", versions))
    except Exception as e:
        out.put(("error", repr(e)))


def _crashing_publisher(root: str, src: str) -> None:
    """Die (as if SIGKILLed) at the last step of a publish, right before the rename."""

    def crash(*args: Any, **kwargs: Any) -> None:
        os._exit(3)

    os.rename = crash
    Registry(root).publish(Path(src))


def run_processes(target: Callable[..., None], argsets: list[tuple[Any, ...]]) -> list[Any]:
    """Start one spawned process per argset, released together by a barrier; collect results."""
    barrier = SPAWN.Barrier(len(argsets))
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(*a, barrier, out)) for a in argsets]
    for p in procs:
        p.start()
    results = [out.get(timeout=PROC_TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(timeout=PROC_TIMEOUT_S)
        assert p.exitcode == 0
    return results


# -- versions / publish ------------------------------------------------------------------------


def test_empty_registry(reg: Registry) -> None:
    assert reg.versions() == []
    assert not reg.has("v1")
    assert reg.read_aliases() == Aliases(None)
    assert reg.aliases_stamp() is None
    with pytest.raises(VersionNotFound):
        reg.bundle("v1")


def test_publish_versions_bundle_roundtrip(reg: Registry, tmp_path: Path) -> None:
    payload = os.urandom(4096)
    src = make_src(tmp_path / "src", "v1", payload)
    assert reg.publish(src) == "v1"
    assert reg.versions() == ["v1"]
    assert reg.has("v1")
    b = reg.bundle("v1")
    assert b.path == reg.version_dir("v1")
    assert b.version == "v1"
    assert b.onnx_path.read_bytes() == payload
    assert b.manifest == json.loads((src / MANIFEST_FILE).read_text())
    assert sorted(p.name for p in b.path.iterdir()) == [MANIFEST_FILE, MODEL_FILE]
    assert temp_dirs(reg) == []


def test_versions_sorted_by_publish_time(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["zeta", "alpha", "m.2", "m.10"])
    assert reg.versions() == ["zeta", "alpha", "m.2", "m.10"]


def test_versions_ignores_junk(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1"])
    (reg.versions_root / ".tmp-deadbeef").mkdir()
    (reg.versions_root / "bad name!").mkdir()
    (reg.versions_root / "README").write_text("not a version")
    assert reg.versions() == ["v1"]


def test_publish_under_another_name_rewrites_manifest(reg: Registry, tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", "candidate")
    assert reg.publish(src, "2024-06-01") == "2024-06-01"
    b = reg.bundle("2024-06-01")  # verifies the checksum: sha256 covers model.onnx only
    assert b.version == "2024-06-01"
    assert json.loads((src / MANIFEST_FILE).read_text())["version"] == "candidate"  # untouched


def test_refuses_overwrite(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1"])
    original = reg.bundle("v1").sha256
    with pytest.raises(VersionExists):
        reg.publish(make_src(tmp_path / "other", "v1"))
    assert reg.bundle("v1").sha256 == original
    assert temp_dirs(reg) == []


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-x", "_x", "a/b", "../x", "a b", "v1\n", "x" * 65, "é"]
)
def test_invalid_version_names(reg: Registry, tmp_path: Path, name: str) -> None:
    assert not VERSION_RE.fullmatch(name)
    src = make_src(tmp_path / "src")
    with pytest.raises(InvalidVersionName):
        reg.publish(src, name)
    with pytest.raises(InvalidVersionName):
        reg.version_dir(name)
    with pytest.raises(InvalidVersionName):
        reg.bundle(name)
    with pytest.raises(InvalidVersionName):
        reg.activate(name)
    assert not reg.has(name)
    assert reg.versions() == []


def test_valid_edge_names(reg: Registry, tmp_path: Path) -> None:
    names = ["a", "A" * 64, "2024-05-01T12.00_v1", "0"]
    publish_many(reg, tmp_path, names)
    assert reg.versions() == names


def test_invalid_source_is_not_published(reg: Registry, tmp_path: Path) -> None:
    src = make_src(tmp_path / "src")
    (src / MODEL_FILE).write_bytes(b"corrupted")
    with pytest.raises(BundleError, match="checksum mismatch"):
        reg.publish(src)
    with pytest.raises(BundleError, match="not found"):
        reg.publish(tmp_path / "missing")
    assert reg.versions() == [] and temp_dirs(reg) == []


def test_corrupted_published_version_fails_to_load(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1"])
    model = reg.version_dir("v1") / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[0] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch"):
        reg.bundle("v1")


def test_directory_name_must_match_manifest(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1"])
    os.rename(reg.version_dir("v1"), reg.versions_root / "v2")  # an operator's manual rename
    with pytest.raises(BundleError, match="names version 'v1'"):
        reg.bundle("v2")


# -- atomic publish ----------------------------------------------------------------------------


def test_failed_rename_leaves_nothing(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_src(tmp_path / "src")

    def broken_rename(a: Any, b: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="I/O error"):
        reg.publish(src)
    monkeypatch.undo()
    assert reg.versions() == [] and not reg.has("v1") and temp_dirs(reg) == []
    assert reg.publish(src) == "v1"  # a retry succeeds


def test_failed_fsync_leaves_nothing(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_src(tmp_path / "src", payload=os.urandom(3 << 20))
    calls = {"n": 0}
    real_fsync = os.fsync

    def flaky_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # fail while staging (the manifest, after model.onnx)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    with pytest.raises(OSError, match="No space"):
        reg.publish(src)
    assert reg.versions() == [] and temp_dirs(reg) == []


def test_crash_mid_publish_is_invisible(reg: Registry, tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", payload=os.urandom(1 << 20))
    p = SPAWN.Process(target=_crashing_publisher, args=(str(reg.root), str(src)))
    p.start()
    p.join(timeout=PROC_TIMEOUT_S)
    assert p.exitcode == 3
    # The crashed publisher's fully staged copy is on disk but not visible as a version.
    assert len(temp_dirs(reg)) == 1
    assert reg.versions() == [] and not reg.has("v1")
    with pytest.raises(VersionNotFound):
        reg.bundle("v1")
    assert reg.publish(src) == "v1"
    # Stale temp dirs are garbage-collected, but only once they are old enough.
    assert reg.cleanup_temp(older_than_s=3600) == []
    assert len(reg.cleanup_temp(older_than_s=0)) == 1
    assert temp_dirs(reg) == [] and reg.versions() == ["v1"]


def test_publish_race_lost_at_rename(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A competitor that publishes between our existence check and our rename wins cleanly."""
    ours = make_src(tmp_path / "ours")
    theirs = make_src(tmp_path / "theirs")
    real_stage = Registry._stage
    raced: list[bool] = []

    def stage_then_lose(self: Registry, source: Any, tmp: Path, name: str) -> None:
        real_stage(self, source, tmp, name)
        if not raced:  # only for our publish, not for the competitor's own staging
            raced.append(True)
            Registry(self.root).publish(theirs)  # the competitor's rename lands first

    monkeypatch.setattr(Registry, "_stage", stage_then_lose)
    with pytest.raises(VersionExists):
        reg.publish(ours)
    monkeypatch.undo()
    assert reg.bundle("v1").sha256 == json.loads((theirs / MANIFEST_FILE).read_text())["sha256"]
    assert temp_dirs(reg) == []


def test_concurrent_publishers_same_version(reg: Registry, tmp_path: Path) -> None:
    srcs = [make_src(tmp_path / f"src{i}", "v1") for i in range(8)]
    results = run_processes(_publish_worker, [(str(reg.root), str(s), None) for s in srcs])
    statuses = sorted(status for status, _ in results)
    assert statuses == ["exists"] * 7 + ["ok"], results
    assert reg.versions() == ["v1"]
    winner = reg.bundle("v1")  # loads and verifies
    assert winner.sha256 in {json.loads((s / MANIFEST_FILE).read_text())["sha256"] for s in srcs}
    assert temp_dirs(reg) == []


def test_concurrent_publishers_different_versions(reg: Registry, tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", "base")
    names = [f"v{i}" for i in range(6)]
    results = run_processes(_publish_worker, [(str(reg.root), str(src), n) for n in names])
    assert sorted(results) == sorted(("ok", n) for n in names)
    assert sorted(reg.versions()) == names
    assert all(reg.bundle(n).version == n for n in names)
    assert temp_dirs(reg) == []


# -- aliases -----------------------------------------------------------------------------------


def test_activate_and_rollback(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1", "v2", "v3"])
    with pytest.raises(NothingToRollBack):
        reg.rollback()
    assert reg.activate("v1") == reg.read_aliases()
    assert reg.read_aliases().production == "v1" and reg.read_aliases().previous == ()
    reg.activate("v2")
    a = reg.activate("v3")
    assert (a.production, a.previous) == ("v3", ("v1", "v2"))
    a = reg.activate("v3")  # re-activating production pushes nothing
    assert a.previous == ("v1", "v2")
    with pytest.raises(VersionNotFound):
        reg.activate("v9")
    assert reg.read_aliases().production == "v3"  # a failed activation changes nothing
    a = reg.rollback()
    assert (a.production, a.previous) == ("v2", ("v1",))
    a = reg.rollback()
    assert (a.production, a.previous) == ("v1", ())
    with pytest.raises(RegistryError, match="nothing to roll back"):
        reg.rollback()
    assert reg.read_aliases().production == "v1"


def test_previous_is_bounded(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["a", "b", "c"])
    for i in range(MAX_PREVIOUS + 10):
        reg.activate("abc"[i % 3])
    a = reg.read_aliases()
    assert len(a.previous) == MAX_PREVIOUS
    assert a.previous[-1] == "abc"[(MAX_PREVIOUS + 8) % 3]


def test_canary(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1", "v2", "v3"])
    with pytest.raises(RegistryError, match="no production"):
        reg.set_canary("v2", 10)
    reg.activate("v1")
    with pytest.raises(VersionNotFound):
        reg.set_canary("v9", 10)
    with pytest.raises(RegistryError, match="already production"):
        reg.set_canary("v1", 10)
    for bad in (0, -5, 100.5, float("nan"), float("inf"), True, "10"):
        with pytest.raises(InvalidCanary):
            reg.set_canary("v2", bad)  # type: ignore[arg-type]
    a = reg.set_canary("v2", 10)
    assert a.canary == Canary("v2", 10.0) and a.production == "v1"
    assert reg.set_canary("v2", 100).canary == Canary("v2", 100.0)
    # Activating another version keeps the canary; promoting the canary clears it.
    assert reg.activate("v3").canary == Canary("v2", 100.0)
    a = reg.activate("v2")
    assert a.canary is None and (a.production, a.previous) == ("v2", ("v1", "v3"))
    reg.set_canary("v1", 5)
    assert reg.clear_canary().canary is None
    assert reg.clear_canary().canary is None  # idempotent
    # Rolling back onto the canary's version clears the canary too.
    reg.set_canary("v3", 50)
    a = reg.rollback()
    assert a.production == "v3" and a.canary is None


def test_aliases_file_format_and_stamp(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1", "v2"])
    reg.activate("v1")
    stamp1 = reg.aliases_stamp()
    assert stamp1 is not None and stamp1 == reg.aliases_stamp()  # stable while unchanged
    reg.activate("v2")
    reg.set_canary("v1", 12.5)
    stamp2 = reg.aliases_stamp()
    assert stamp2 != stamp1
    data = json.loads(reg.aliases_path.read_text())
    assert set(data) == {"production", "previous", "canary", "shadow", "updated_at"}
    assert data["production"] == "v2" and data["previous"] == ["v1"]
    assert data["canary"] == {"version": "v1", "percent": 12.5}
    assert data["updated_at"].endswith("Z")
    # Only aliases.json, its history and the lock live at the root: no temp files are left behind.
    assert sorted(p.name for p in reg.root.iterdir()) == [
        ".lock", "aliases.json", "history.jsonl", "versions"
    ]  # fmt: skip


def test_aliases_dict_roundtrip() -> None:
    a = Aliases("v2", ("v0", "v1"), Canary("v3", 25), "2024-01-01T00:00:00Z")
    assert Aliases.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert Aliases.from_dict({"production": None}) == Aliases(None)
    assert Aliases("v1", ["v0"]).previous == ("v0",)  # type: ignore[arg-type]
    assert Canary.from_dict({"version": "v3", "percent": 25}) == Canary("v3", 25.0)


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"production": 3},
        {"production": "../x"},
        {"production": "v1", "previous": "v0"},
        {"production": "v1", "previous": [1]},
        {"production": "v1", "canary": {"version": "v2"}},
        {"production": "v1", "canary": {"version": "v2", "percent": 0}},
        {"production": "v1", "updated_at": 5},
        {"production": "v1", "shadow": {"version": "v2", "percent": 101}},
        {"production": "v1", "canary": {"version": 7, "percent": 5}},
    ],
)
def test_invalid_aliases_rejected(reg: Registry, data: Any) -> None:
    with pytest.raises(RegistryError):
        Aliases.from_dict(data)
    reg.root.mkdir(parents=True)
    reg.aliases_path.write_text(json.dumps(data))
    with pytest.raises(RegistryError) as raised:
        reg.read_aliases()
    # A broken file, as one that is not JSON: never "version not found" or "invalid request".
    assert type(raised.value) is RegistryError and raised.value.code == "registry_conflict"


def test_corrupt_aliases_file(reg: Registry) -> None:
    reg.root.mkdir(parents=True)
    reg.aliases_path.write_text('{"production": "v1"')
    with pytest.raises(RegistryError, match="not valid JSON"):
        reg.read_aliases()


def test_failed_aliases_write_keeps_old_file(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish_many(reg, tmp_path, ["v1", "v2"])
    reg.activate("v1")
    before = reg.aliases_path.read_bytes()

    def broken_replace(a: Any, b: Any) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(RegistryUnavailable, match="cannot write aliases.json"):
        reg.activate("v2")
    monkeypatch.undo()
    assert reg.aliases_path.read_bytes() == before
    assert sorted(p.name for p in reg.root.iterdir()) == [
        ".lock", "aliases.json", "history.jsonl", "versions"
    ]  # fmt: skip
    # The failed change is not in the history: only the first activation is.
    assert [(h["action"], h["to"]) for h in reg.history.read()] == [("activate", "v1")]


def test_concurrent_activations_lose_no_update(reg: Registry, tmp_path: Path) -> None:
    workers, per_worker = 4, 4
    names = [f"w{w}-{i}" for w in range(workers) for i in range(per_worker)]
    src = make_src(tmp_path / "src", "base")
    for n in names:
        reg.publish(src, n)
    argsets = [
        (str(reg.root), names[w * per_worker : (w + 1) * per_worker]) for w in range(workers)
    ]
    barrier = SPAWN.Barrier(workers)
    out = SPAWN.Queue()
    procs = [SPAWN.Process(target=_activate_worker, args=(*a, barrier, out)) for a in argsets]
    for p in procs:
        p.start()
    # Meanwhile, poll like a replica would: every read must see a whole, valid file.
    reads = 0
    deadline = time.monotonic() + PROC_TIMEOUT_S
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        reg.read_aliases()
        reads += 1
    results = [out.get(timeout=PROC_TIMEOUT_S) for _ in procs]
    for p in procs:
        p.join(timeout=PROC_TIMEOUT_S)
    assert all(status == "ok" for status, _ in results), results
    a = reg.read_aliases()
    # Every activation pushed the production before it, so nothing was lost: production plus
    # the stack is exactly the set of activated versions, each once.
    assert a.production is not None
    assert len(a.previous) == len(names) - 1 < MAX_PREVIOUS
    history = [*a.previous, a.production]
    assert sorted(history) == sorted(names)
    # Each worker's own activations appear in its order.
    for _, mine in argsets:
        assert [v for v in history if v in mine] == mine
    assert reads > 0


# -- faults: missing aliases, unwritable registry (issue 10) -------------------------------------


def test_missing_aliases_are_told_apart_from_no_production(reg: Registry, tmp_path: Path) -> None:
    assert reg.read_aliases() == Aliases(None)  # a new registry: nothing to serve
    with pytest.raises(AliasesMissing, match="the registry directory is missing"):
        reg.read_aliases(missing_ok=False)
    publish_many(reg, tmp_path, ["v1"])
    with pytest.raises(AliasesMissing, match="aliases.json is missing"):
        reg.read_aliases(missing_ok=False)
    reg.activate("v1")
    assert reg.read_aliases(missing_ok=False).production == "v1"
    # The messages never carry the registry's absolute path.
    reg.aliases_path.unlink()
    with pytest.raises(AliasesMissing) as e:
        reg.read_aliases(missing_ok=False)
    assert str(reg.root) not in str(e.value)


def test_aliases_without_production_key_are_invalid(reg: Registry) -> None:
    # `{}` used to read as "no production" and emptied every replica; it is a broken file.
    with pytest.raises(RegistryError, match="production"):
        Aliases.from_dict({})
    reg.root.mkdir(parents=True)
    reg.aliases_path.write_text("{}")
    with pytest.raises(RegistryError):
        reg.read_aliases()


def test_deactivate_is_explicit_and_rollback_restores(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1", "v2"])
    reg.activate("v1")
    reg.activate("v2")
    reg.set_canary("v1", 10)
    off = reg.deactivate()
    assert (off.production, off.previous, off.canary) == (None, ("v1", "v2"), None)
    assert reg.read_aliases(missing_ok=False).production is None
    assert reg.rollback().production == "v2"


def test_rollback_refuses_when_the_target_changed(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1", "v2", "v3"])
    for v in ("v1", "v2", "v3"):
        reg.activate(v)
    before = reg.aliases_path.read_bytes()
    with pytest.raises(RegistryError, match="changed from v1 to v2"):
        reg.rollback(expected="v1")
    assert reg.aliases_path.read_bytes() == before
    assert reg.rollback(expected="v2").production == "v2"


def test_unwritable_lock_is_registry_unavailable(reg: Registry, tmp_path: Path) -> None:
    publish_many(reg, tmp_path, ["v1", "v2"])
    reg.activate("v1")
    before = reg.aliases_path.read_bytes()
    (reg.root / ".lock").unlink()
    (reg.root / ".lock").mkdir()  # the lock cannot be opened for writing, even by root
    for call in (reg.check_writable, lambda: reg.activate("v2"), reg.rollback, reg.deactivate):
        with pytest.raises(RegistryUnavailable, match="registry is not writable") as e:
            call()
        assert str(reg.root) not in str(e.value)
    assert reg.aliases_path.read_bytes() == before
