"""Ranking by ids with the embedded feature store (snapshots in the registry), in-process."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import AUTH
from model.core.store.embedded import SnapshotStore
from model.core.store.snapshot import EntityTable, build_tables
from tests.service.service_helpers import sample
from tests.store_helpers import full_body, ids_body, items_of, stored_rows

Tables = dict[str, EntityTable]
VIDEOS = [3, 17, 250, 1999, 4000, 7999, 12, 640, 5120, 77]  # all in the simulated world


@pytest.fixture
def store_registry(registry_dir: Path, feature_tables: tuple[Tables, dict]) -> Path:
    """The tiny registry with snapshot s1 of the simulated world, active."""
    tables, source = feature_tables
    store = SnapshotStore(registry_dir)
    store.publish(tables, "s1", source)
    store.activate("s1")
    return registry_dir


def without(tables: Tables, entity: str, column: str) -> Tables:
    """The same tables lacking one column."""
    cols: dict[str, dict[str, Any]] = {
        e: {c: t.columns[c].take() for c in t.columns if (e, c) != (entity, column)}
        for e, t in tables.items()
    }
    return build_tables({e: {c: v.astype(object) if v.dtype.kind == "U" else v
                             for c, v in cs.items()} for e, cs in cols.items()})  # fmt: skip


def test_ranking_by_ids_equals_sending_the_stored_features(
    make_client: Callable[..., TestClient], store_registry: Path, feature_tables: tuple
) -> None:
    tables = feature_tables[0]
    client = make_client(store_registry)
    by_ids = client.post("/rank", json=ids_body(42, VIDEOS))
    assert by_ids.status_code == 200, by_ids.text
    body = by_ids.json()
    assert body["feature_snapshot"] == "s1" and "degraded" not in body
    full = client.post("/rank", json=full_body(tables, 42, VIDEOS)).json()
    assert items_of(body) == items_of(full)  # exactly: same floats, same order
    # Columnar ids, and ids spelled as strings, find the same rows.
    columnar = {**ids_body("42", [str(v) for v in VIDEOS]), "candidates": {"video_id": VIDEOS}}
    assert items_of(client.post("/rank", json=columnar).json()) == items_of(full)
    # Without the store the same ids-only request is scored with defaults: it differs.
    off = make_client(store_registry, feature_store="off")
    assert items_of(off.post("/rank", json=ids_body(42, VIDEOS)).json()) != items_of(full)


def test_request_features_override_stored_ones(
    make_client: Callable[..., TestClient], store_registry: Path, feature_tables: tuple
) -> None:
    tables = feature_tables[0]
    client = make_client(store_registry)
    body = ids_body(42, VIDEOS)
    body["user"]["features"] = {"register_days": 3000}
    body["candidates"][2]["features"] = {"duration_s": 600.0, "tag": "1,2"}
    body["candidates"][5]["features"] = {"video_type": "AD", "duration_s": None}  # None: stored
    full = full_body(tables, 42, VIDEOS)
    full["user"]["features"]["register_days"] = 3000
    full["candidates"][2]["features"].update(duration_s=600.0, tag="1,2")
    full["candidates"][5]["features"]["video_type"] = "AD"
    got = client.post("/rank", json=body).json()
    assert items_of(got) == items_of(client.post("/rank", json=full).json())
    assert items_of(got) != items_of(client.post("/rank", json=ids_body(42, VIDEOS)).json())


def test_unknown_ids_take_schema_defaults_and_are_counted(
    make_client: Callable[..., TestClient], store_registry: Path
) -> None:
    client = make_client(store_registry)
    off = make_client(store_registry, feature_store="off")
    unknown = [10_000_001, "no-such-video", 10_000_003]
    before = {e: sample("vidrank_feature_misses_total", {"entity": e}) for e in ("user", "item")}
    body = ids_body("no-such-user", [*unknown, VIDEOS[0]])
    got = client.post("/rank", json=body).json()
    assert sample("vidrank_feature_misses_total", {"entity": "item"}) == before["item"] + 3
    assert sample("vidrank_feature_misses_total", {"entity": "user"}) == before["user"] + 1
    defaults = {it["video_id"]: it for it in off.post("/rank", json=body).json()["items"]}
    for it in got["items"]:
        same = it["predictions"] == defaults[it["video_id"]]["predictions"]
        assert same == (it["video_id"] in unknown), it


def test_snapshot_activation_checks_lacks_and_reports_them(
    make_client: Callable[..., TestClient],
    store_registry: Path,
    feature_tables: tuple,
    version: str,
) -> None:
    tables, source = feature_tables
    store = SnapshotStore(store_registry)
    store.publish(without(tables, "item", "tag"), "s-notag", source)
    client = make_client(store_registry)
    r = client.post("/admin/features/s-notag/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["feature_store"]["lacks"] == {version: ["item.tag"]}
    models = client.get("/models").json()["feature_store"]
    assert models["snapshot"] == "s-notag" and models["lacks"] == {version: ["item.tag"]}
    assert store.active() == "s-notag"
    assert client.post("/rank", json=ids_body(1, VIDEOS)).json()["feature_snapshot"] == "s-notag"


def test_required_store_refuses_a_lacking_snapshot_and_keeps_the_old(
    make_client: Callable[..., TestClient],
    store_registry: Path,
    feature_tables: tuple,
    version: str,
) -> None:
    tables, source = feature_tables
    SnapshotStore(store_registry).publish(without(tables, "user", "fans_user_num"), "s-bad", source)
    client = make_client(store_registry, feature_store_required=True)
    r = client.post("/admin/features/s-bad/activate", headers=AUTH)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "feature_store_conflict"
    assert err["details"]["lacks"] == {version: ["user.fans_user_num"]}
    assert SnapshotStore(store_registry).active() == "s1"
    assert client.post("/rank", json=ids_body(1, VIDEOS)).json()["feature_snapshot"] == "s1"
    assert client.get("/readyz").status_code == 200


def test_required_store_refuses_a_model_reading_what_the_store_lacks(
    make_client: Callable[..., TestClient], store_registry: Path, version: str
) -> None:
    """v2: the same graph, but its schema calls the music feature music_genre, which s1 lacks."""
    renamed_copy(store_registry, version, "v2", "music_id", "music_genre")
    client = make_client(store_registry, feature_store_required=True)
    r = client.post("/admin/models/v2/activate", headers=AUTH)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["details"]["lacks"] == {"v2": ["item.music_genre"]}
    assert client.get("/models").json()["serving"]["production"] == version
    # Not required: the same activation succeeds and names what the store lacks.
    relaxed = make_client(store_registry)
    r = relaxed.post("/admin/models/v2/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["feature_store"]["lacks"] == {"v2": ["item.music_genre"]}


def renamed_copy(registry: Path, source: str, name: str, old: str, new: str) -> None:
    """Publish ``source`` again as ``name`` with feature ``old`` renamed ``new`` in its schema
    (the graph's inputs do not change: they are per entity and kind, not per name)."""
    import json

    from model.core.bundle import MANIFEST_FILE
    from tests.service.service_helpers import publish_as

    publish_as(registry, source, name)
    path = registry / "versions" / name / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for f in manifest["feature_schema"]["features"]:
        if f["name"] == old:
            f["name"] = new
    path.write_text(json.dumps(manifest))


def test_a_corrupt_snapshot_is_refused_and_the_old_one_keeps_serving(
    make_client: Callable[..., TestClient], store_registry: Path, feature_tables: tuple
) -> None:
    tables, source = feature_tables
    store = SnapshotStore(store_registry)
    store.publish(tables, "s2", source)
    path = store.path("s2") / "item.music_id.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    client = make_client(store_registry)
    failures = sample("vidrank_feature_snapshot_failures_total", {"trigger": "admin"})
    r = client.post("/admin/features/s2/activate", headers=AUTH)
    assert r.status_code == 409 and "sha256" in r.json()["error"]["message"]
    assert sample("vidrank_feature_snapshot_failures_total", {"trigger": "admin"}) == failures + 1
    store.activate("s2")  # written behind the service's back: the poller must refuse it too
    reconciler = client.app.state.reconciler  # type: ignore[attr-defined]
    assert reconciler.poll_once() is False
    assert client.post("/rank", json=ids_body(1, VIDEOS)).json()["feature_snapshot"] == "s1"
    assert client.post("/admin/features/nope/activate", headers=AUTH).status_code == 404


def test_no_snapshot_yet_means_no_store_until_one_is_published(
    make_client: Callable[..., TestClient], registry_dir: Path, feature_tables: tuple
) -> None:
    client = make_client(registry_dir)
    r = client.post("/rank", json=ids_body(1, VIDEOS)).json()
    assert "feature_snapshot" not in r and "degraded" not in r
    assert client.get("/models").json()["feature_store"]["snapshot"] is None
    required = make_client(registry_dir, feature_store_required=True)
    assert required.get("/readyz").status_code == 503
    assert required.post("/rank", json=ids_body(1, VIDEOS)).status_code == 503
    store = SnapshotStore(registry_dir)
    store.publish(feature_tables[0], "s1", feature_tables[1])
    store.activate("s1")
    for c in (client, required):
        assert c.app.state.reconciler.poll_once() is True  # type: ignore[attr-defined]
    assert required.get("/readyz").status_code == 200
    assert required.post("/rank", json=ids_body(1, VIDEOS)).json()["feature_snapshot"] == "s1"


def test_a_snapshot_that_fails_to_load_at_start_degrades_answers(
    make_client: Callable[..., TestClient], store_registry: Path
) -> None:
    shutil.rmtree(SnapshotStore(store_registry).path("s1"))
    client = make_client(store_registry)
    errors = sample("vidrank_feature_store_errors_total", {"reason": "unavailable"})
    r = client.post("/rank", json=ids_body(1, VIDEOS))
    assert r.status_code == 200 and r.json()["degraded"] == ["feature_store"]
    assert sample("vidrank_feature_store_errors_total", {"reason": "unavailable"}) == errors + 1
    assert client.get("/models").json()["feature_store"]["status"] == "degraded: unavailable"


def test_stored_values_reach_the_model_for_the_user_too(
    make_client: Callable[..., TestClient], store_registry: Path, feature_tables: tuple
) -> None:
    """Two users with different stored features rank the same videos differently."""
    tables = feature_tables[0]
    a, b = stored_rows(tables["user"], [1, 2])
    assert a != b
    client = make_client(store_registry)
    ra = client.post("/rank", json=ids_body(1, VIDEOS)).json()
    body = ids_body(1, VIDEOS)
    body["user"]["features"] = b  # user 1 with user 2's stored features
    rb = client.post("/rank", json=body).json()
    assert items_of(ra) != items_of(rb)
