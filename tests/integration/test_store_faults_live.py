"""Faults of the artifact stores seen from outside, with real ``vidrank serve`` processes.

A feature-snapshot activation on an unwritable tree or against a Redis that is down or paused
answers 503 (as a model activation does), never 500; no snapshot error names a server path (HTTP
or CLI); and re-setting a canary or shadow whose bundle was corrupted on disk after it was loaded
is refused (409) by every worker alike, while an intact canary reaches its users on every worker.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import AUTH, HOST, Server, child_env, free_port, rank_body, serve_cmd
from benchmarks.harness import vidrank_cmd as cli
from model.core.bundle import MODEL_FILE
from model.core.store.embedded import SnapshotStore
from model.core.store.snapshot import EntityTable
from service.rollout.reconciler import canary_bucket
from tests.integration.conftest import LIVE_ENV, unwritable_copy

Start = Callable[..., Server]
Tables = dict[str, EntityTable]
EMBEDDED = {"VIDRANK_FEATURE_STORE": "embedded"}


def published(registry: Path, feature_tables: tuple[Tables, dict]) -> SnapshotStore:
    """``registry`` with snapshots s1 (active) and s2 published."""
    tables, source = feature_tables
    store = SnapshotStore(registry)
    store.publish(tables, "s1", source)
    store.publish(tables, "s2", source)
    store.activate("s1")
    return store


def run_cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *cli(*args)], capture_output=True, text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *hidden: Path) -> str:
    """The CLI failed with one ``error:`` line: no traceback, no server path."""
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "Traceback" not in out and done.stderr.startswith("error: "), out
    assert len(done.stderr.strip().splitlines()) == 1, out
    for path in hidden:
        assert str(path) not in out, out
    return done.stderr


def assert_error(r: httpx.Response, status: int, code: str, *hidden: Path) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text
    for path in hidden:
        assert str(path) not in r.text, r.text


def test_snapshot_activation_on_an_unwritable_tree_is_503_and_names_no_path(
    tmp_path: Path, live_registry: Path, feature_tables: tuple[Tables, dict]
) -> None:
    published(live_registry, feature_tables)
    with unwritable_copy(live_registry) as (registry, prefix):
        port = free_port()
        env = child_env({**LIVE_ENV, **EMBEDDED})
        server = Server("ro", [*prefix, *serve_cmd(registry, port)], port, tmp_path / "ro.log", env)
        try:
            with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
                r = http.post("/admin/features/s2/activate")
                assert_error(r, 503, "feature_store_unavailable", registry)
                assert "not writable" in r.json()["error"]["message"]
                assert http.get("/models").json()["feature_store"]["snapshot"] == "s1"
            assert "Traceback" not in server.logs()
        finally:
            server.stop()
        done = run_cli("features", "activate", "s2", "--registry", str(registry), prefix=prefix)
        assert "not writable" in assert_one_line_error(done, registry)
        for args in (("show", "nosuch"), ("activate", "nosuch")):
            done = run_cli("features", *args, "--registry", str(registry), prefix=prefix)
            assert "not published" in assert_one_line_error(done, registry)
        assert SnapshotStore(registry).active() == "s1"


def test_unknown_snapshot_404_and_garbage_aliases_409_without_a_path(
    start_server: Start, live_registry: Path, feature_tables: tuple[Tables, dict]
) -> None:
    store = published(live_registry, feature_tables)
    server = start_server(live_registry, env=EMBEDDED)
    r = httpx.post(f"{server.url}/admin/features/nosuch/activate", headers=AUTH, timeout=60)
    assert_error(r, 404, "snapshot_not_found", live_registry)
    store.aliases_path.write_text("{ not json")
    r = httpx.post(f"{server.url}/admin/features/s2/activate", headers=AUTH, timeout=60)
    assert_error(r, 409, "invalid_snapshot", live_registry)
    assert "features/aliases.json is not valid JSON" in r.json()["error"]["message"]
    done = run_cli("features", "activate", "s2", "--registry", str(live_registry))
    assert "features/aliases.json" in assert_one_line_error(done, live_registry)
    # A broken snapshot is listed as INVALID, its reason without a path.
    (store.path("s2") / "manifest.json").write_text("{")
    store.aliases_path.unlink()
    done = run_cli("features", "list", "--registry", str(live_registry))
    assert done.returncode == 0 and "INVALID" in done.stdout, done.stdout + done.stderr
    assert str(live_registry) not in done.stdout + done.stderr


@contextlib.contextmanager
def silent_redis() -> Iterator[str]:
    """A Redis URL whose server accepts connections and never answers (a paused Redis)."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(128)
        yield f"redis://{HOST}:{listener.getsockname()[1]}/0"


@pytest.mark.parametrize("state", ["down", "paused"])
def test_snapshot_activation_against_an_unavailable_redis_is_503(
    start_server: Start, live_registry: Path, state: str
) -> None:
    with contextlib.ExitStack() as stack:
        url = f"redis://{HOST}:{free_port()}/0"  # nothing listens there: down
        if state == "paused":
            url = stack.enter_context(silent_redis())
        env = {"VIDRANK_FEATURE_STORE": url, "VIDRANK_FEATURE_TIMEOUT_MS": "50"}
        server = start_server(live_registry, env=env)
        r = httpx.post(f"{server.url}/admin/features/s1/activate", headers=AUTH, timeout=60)
        assert_error(r, 503, "feature_store_unavailable")
        done = run_cli("features", "activate", "s1", "--redis", url)
        assert "feature store" in assert_one_line_error(done)
        server.stop()
        assert "Traceback" not in server.logs()


def canary_user(percent: float) -> int:
    """A user the canary's ``percent`` includes."""
    return next(u for u in range(1000) if canary_bucket(u) < percent)


def test_a_bundle_corrupted_after_loading_is_refused_by_every_worker(
    start_server: Start, live_registry: Path, version: str
) -> None:
    server = start_server(live_registry, workers=2)
    fresh = 16  # requests on fresh connections, which land on either worker
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as admin:
        body = {"version": "v2", "percent": 50}
        assert admin.put("/admin/canary", json=body).status_code == 200
        assert admin.put("/admin/shadow", json=body).status_code == 200
    user = canary_user(50)

    def served() -> set[str]:
        return {
            httpx.post(f"{server.url}/rank", json=rank_body(3, user_id=user), timeout=60).json()[
                "model_version"
            ]
            for _ in range(fresh)
        }

    def every_worker_has_the_canary() -> bool:
        models = [httpx.get(f"{server.url}/models", timeout=10).json() for _ in range(fresh)]
        return all(m["serving"]["canary"] and m["serving"]["shadow"] for m in models)

    deadline = time.monotonic() + 30
    while not every_worker_has_the_canary():
        assert time.monotonic() < deadline, "both workers to load the canary"
        time.sleep(0.2)
    assert served() == {"v2"}  # the canary's users get it from every worker

    onnx = live_registry / "versions" / "v2" / MODEL_FILE
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    again = {"version": "v2", "percent": 20}
    for path in ("/admin/canary", "/admin/shadow"):
        for _ in range(fresh):
            r = httpx.put(f"{server.url}{path}", json=again, headers=AUTH, timeout=60)
            assert_error(r, 409, "invalid_bundle", live_registry)
            assert "checksum" in r.json()["error"]["message"]
    aliases = httpx.get(f"{server.url}/models", timeout=10).json()["aliases"]
    assert aliases["canary"]["percent"] == 50 and aliases["production"] == version
    server.stop()
    refused = [r for r in server.log_records() if r.get("msg") == "model load failed"]
    assert len({r["pid"] for r in refused}) == 2  # each worker checked the file on its own
