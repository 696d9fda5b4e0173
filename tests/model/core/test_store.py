"""Feature-store core: snapshots, the embedded store, encoded tables and request assembly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.core.features import FeatureError, default_schema, id_keys
from model.core.store.embedded import SnapshotExists, SnapshotNotFound, SnapshotStore
from model.core.store.encoded import encode_snapshot, lacks
from model.core.store.snapshot import SnapshotError, build_tables, load_snapshot, write_snapshot

SCHEMA = default_schema().fit(
    {
        "follow_user_num": np.array([0, 10, 100, 1000]),
        "fans_user_num": np.array([0, 1, 2, 3]),
        "register_days": np.array([1, 30, 365, 900]),
        "duration_s": np.array([5.0, 15.0, 60.0, 300.0]),
        "upload_age_days": np.array([0, 1, 10, 100]),
    }
)
TAGS = ["1", "2,3", "4,5,6", "", "7,8,9,10,11"]


def columns(n_users: int = 50, n_videos: int = 300, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Random user and item tables in the shape model.training.feature_tables produces."""
    rng = np.random.default_rng(seed)
    users = {
        "user_id": rng.permutation(10_000)[:n_users].astype(np.int64),
        "user_active_degree": rng.choice(["high_active", "UNKNOWN"], n_users).astype(object),
        "is_video_author": rng.integers(0, 2, n_users),
        "follow_user_num": rng.integers(0, 500, n_users).astype(np.float32),
        "fans_user_num": rng.integers(0, 500, n_users).astype(np.float32),
        "register_days": rng.integers(1, 900, n_users).astype(np.float32),
    }
    items = {
        "video_id": rng.permutation(100_000)[:n_videos].astype(np.int64),
        "author_id": rng.integers(0, 400, n_videos),
        "video_type": rng.choice(["NORMAL", "AD"], n_videos).astype(object),
        "music_id": rng.integers(0, 300, n_videos),
        "tag": rng.choice(TAGS, n_videos).astype(object),
        "duration_s": rng.uniform(3, 300, n_videos).astype(np.float32),
        "upload_age_days": rng.integers(0, 400, n_videos).astype(np.float32),
    }
    return {"user": users, "item": items}


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    st = SnapshotStore(tmp_path / "registry")
    st.publish(build_tables(columns()), "s1", {"test": True})
    return st


def test_id_keys_treat_every_spelling_of_an_id_alike() -> None:
    keys = id_keys([42, "42", " 42", "abc", -1])
    assert keys.dtype == np.uint64
    assert keys[0] == keys[1] == keys[2] == 42
    assert keys[3] == id_keys(["abc"])[0] != 42
    assert keys[4] == np.uint64(2**64 - 1)
    assert (id_keys(np.array([7, 8])) == np.array([7, 8], np.uint64)).all()
    with pytest.raises(FeatureError, match="string or integer"):
        id_keys([1, 2.5])


def test_snapshot_round_trip_and_vectorised_lookup(tmp_path: Path) -> None:
    cols = columns()
    write_snapshot(tmp_path / "s", "s", build_tables(cols), {"from": "test"})
    snap = load_snapshot(tmp_path / "s")
    items = snap.table("item")
    assert items.rows == 300 and isinstance(items.keys.base, np.memmap)  # mapped, not read
    assert set(snap.columns("item")) == set(cols["item"]) - {"video_id"}
    ids = cols["item"]["video_id"]
    query = [int(ids[5]), str(ids[0]), 10**9, int(ids[299])]  # a string spelling; an unknown id
    rows, found = items.lookup(id_keys(query))
    assert found.tolist() == [True, True, False, True]
    assert rows[2] == items.rows  # the default row, one past the stored rows
    got = items.columns["tag"].take(rows[found])
    assert got.tolist() == [cols["item"]["tag"][i] for i in (5, 0, 299)]
    assert items.columns["duration_s"].kind == "float"
    assert items.columns["tag"].kind == "str" and items.columns["tag"].codes is not None


def test_string_ids_are_keyed_like_the_encoder_keys_them(tmp_path: Path) -> None:
    cols = columns(n_users=3, n_videos=3)
    cols["user"]["user_id"] = np.array(["alice", "bob", "7"], dtype=object)
    tables = build_tables(cols)
    rows, found = tables["user"].lookup(id_keys(["bob", 7, "carol"]))
    assert found.tolist() == [True, True, False]
    assert tables["user"].columns["user_id"].take(rows[:2]).tolist() == ["bob", "7"]


@pytest.mark.parametrize(
    ("entity", "column", "values", "message"),
    [
        ("item", "video_id", [1, 1, 2], "duplicate id 1"),
        ("item", "duration_s", [1.0, float("nan"), 2.0], "item.duration_s: non-finite value"),
        ("user", "user_active_degree", ["a", None, "b"], "expected text, got None"),
        ("item", "bad-name", [1, 2, 3], "letters, digits and underscores"),
    ],
)
def test_bad_tables_are_refused_naming_the_column(
    entity: str, column: str, values: list[Any], message: str
) -> None:
    cols = columns(n_users=3, n_videos=3)
    cols[entity][column] = np.array(values, dtype=object if None in values else None)
    with pytest.raises(SnapshotError, match=message):
        build_tables(cols)
    cols = columns(n_users=3, n_videos=3)
    del cols["user"]["user_id"]
    with pytest.raises(SnapshotError, match="no user_id column"):
        build_tables(cols)


def test_a_corrupt_or_tampered_snapshot_is_refused(store: SnapshotStore) -> None:
    path = store.path("s1")
    target = path / "item.duration_s.npy"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="item.duration_s.npy fails its sha256 check"):
        store.load("s1")
    store.load("s1", verify=False)  # structure alone is intact
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["entities"]["item"]["files"]["../../escape.npy"] = "0" * 64
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match="outside the layout"):
        store.load("s1")
    (path / "manifest.json").write_text("{ nope")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        store.load("s1")


def test_embedded_store_publishes_atomically_and_aliases(store: SnapshotStore) -> None:
    assert store.snapshots() == ["s1"] and store.active() is None
    stamp = store.aliases_stamp()
    store.activate("s1")
    assert store.active() == "s1" and store.aliases_stamp() != stamp
    store.publish(build_tables(columns(seed=1)), "s2", {})
    (store.root / ".tmp-crashed").mkdir()  # a crashed publish is never listed
    assert store.snapshots() == ["s1", "s2"]
    aliases = store.activate("s2")
    assert aliases.active == "s2" and aliases.previous == ("s1",)
    with pytest.raises(SnapshotExists):
        store.publish(build_tables(columns()), "s2", {})
    with pytest.raises(SnapshotNotFound):
        store.activate("s9")
    with pytest.raises(SnapshotNotFound, match="invalid snapshot name"):
        store.load("../versions")


def merged(
    stored: dict[str, Any], ids: list[Any], given: dict[str, list[Any]]
) -> dict[str, list[Any]]:
    """What a request carrying every stored value would send: stored (or None) under given."""
    index = {int(v): i for i, v in enumerate(stored["video_id"])}
    out: dict[str, list[Any]] = {}
    for name in SCHEMA.names("item"):
        col = [stored[name][index[int(v)]] if int(v) in index else None for v in ids]
        col = [c.item() if isinstance(c, np.generic) else c for c in col]
        sent = given.get(name)
        out[name] = (
            col
            if sent is None
            else [s if s is not None else c for s, c in zip(sent, col, strict=True)]
        )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assembled_rows_equal_encoding_the_stored_values_sent(seed: int, tmp_path: Path) -> None:
    cols = columns(seed=seed)
    snap = SnapshotStore(tmp_path).publish(build_tables(cols), "s", {})
    enc = encode_snapshot(snap, SCHEMA, tmp_path / "cache")
    rng = np.random.default_rng(seed)
    known = rng.choice(cols["item"]["video_id"], 40, replace=False).tolist()
    ids: list[Any] = known[:30] + [10**7 + i for i in range(5)] + [str(v) for v in known[30:]]
    n = len(ids)
    given = {
        "video_id": ids,
        "duration_s": [None if i % 3 else 99.5 for i in range(n)],  # a partial override
        "tag": ["42,43"] * n,  # a full override
    }
    got, misses = enc.assemble("item", ids, given, n)
    want = SCHEMA.encode_entity("item", merged(cols["item"], ids, given), n)
    assert misses == 5
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_a_request_sending_every_feature_needs_no_lookup(tmp_path: Path) -> None:
    snap = SnapshotStore(tmp_path).publish(build_tables(columns()), "s", {})
    enc = encode_snapshot(snap, SCHEMA, None)
    given = {name: [1, 2] for name in SCHEMA.names("item")}
    given["tag"] = ["1", "2"]
    got, misses = enc.assemble("item", [1, 2], given, 2)
    assert misses == 0  # unknown ids, but nothing was looked up: the request sent it all
    want = SCHEMA.encode_entity("item", given, 2)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_bad_request_value_names_the_request_row(tmp_path: Path) -> None:
    cols = columns()
    snap = SnapshotStore(tmp_path).publish(build_tables(cols), "s", {})
    enc = encode_snapshot(snap, SCHEMA, None)
    ids = cols["item"]["video_id"][:5].tolist()
    given = {"video_id": ids, "duration_s": [None, None, None, "long", None]}
    with pytest.raises(FeatureError) as err:
        enc.assemble("item", ids, given, 5)
    assert (err.value.entity, err.value.feature, err.value.row) == ("item", "duration_s", 3)


def test_encoded_tables_are_cached_once_and_memory_mapped(tmp_path: Path) -> None:
    snap = SnapshotStore(tmp_path).publish(build_tables(columns()), "s", {})
    cache = tmp_path / "cache"
    first = encode_snapshot(snap, SCHEMA, cache)
    dirs = [p for p in (cache / "s").iterdir() if not p.name.startswith(".")]
    assert first.cached and len(dirs) == 1
    mtime = (dirs[0] / "item_cat.npy").stat().st_mtime_ns
    second = encode_snapshot(snap, SCHEMA, cache)
    assert isinstance(second.entities["item"].groups["item_cat"].base, np.memmap)
    assert (dirs[0] / "item_cat.npy").stat().st_mtime_ns == mtime  # read, not written again
    assert second.entities["item"].groups["item_cat"].dtype == np.int32  # half the pages
    other = default_schema()  # another schema (unfitted numerics): a cache entry of its own
    encode_snapshot(snap, other, cache)
    assert len([p for p in (cache / "s").iterdir() if not p.name.startswith(".")]) == 2


def test_an_unwritable_cache_falls_back_to_memory(tmp_path: Path) -> None:
    snap = SnapshotStore(tmp_path).publish(build_tables(columns()), "s", {})
    cache = tmp_path / "not-a-directory"
    cache.write_text("")  # mkdir under it fails, as on a read-only volume
    enc = encode_snapshot(snap, SCHEMA, cache)
    assert not enc.cached and enc.cache_error


def test_lacks_names_the_features_a_snapshot_does_not_hold() -> None:
    assert lacks(SCHEMA, {"user": ["fans_user_num"], "item": ["tag", "duration_s"]}) == (
        "user.user_active_degree",
        "user.is_video_author",
        "user.follow_user_num",
        "user.register_days",
        "item.author_id",
        "item.video_type",
        "item.music_id",
        "item.upload_age_days",
    )
