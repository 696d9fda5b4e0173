"""Publishing features: the store's rows are the values training joins, from the same files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from benchmarks.harness import REDIS_MISSING, RedisServer, find_redis_server
from model.cli import app
from model.core.features import id_keys
from model.core.store.embedded import SnapshotStore
from model.core.store.redis_store import RedisSnapshots, connect
from model.training.data import load_impressions
from model.training.feature_tables import feature_columns


def test_stored_rows_are_what_training_joins(sim_tables: Path) -> None:
    """KuaiRand's and the simulator's tables are static: an impression's user and video features
    are the stored row of its ids (upload age aside: per impression in training)."""
    frame = load_impressions(sim_tables)
    columns, source = feature_columns(sim_tables)
    assert source["as_of_source"] == "last log day"
    for entity, id_col in (("user", "user_id"), ("item", "video_id")):
        cols = columns[entity]
        order = np.argsort(cols[id_col])
        pos = order[np.searchsorted(cols[id_col], frame[id_col].to_numpy(), sorter=order)]
        for name, values in cols.items():
            if name == "upload_age_days":
                continue
            stored = pd.Series(values[pos]).reset_index(drop=True)
            pd.testing.assert_series_equal(stored, frame[name], check_names=False)
    # Upload age as of the last log day is at least the age at any impression of the video.
    age = columns["item"]["upload_age_days"]
    vid = frame["video_id"].to_numpy()
    assert (age[vid] >= frame["upload_age_days"].to_numpy()).all()


def test_csv_tables_and_an_explicit_as_of(sim_tables: Path, tmp_path: Path) -> None:
    for name in ("user_features_sim", "video_features_basic_sim"):
        pd.read_parquet(sim_tables / f"{name}.parquet").to_csv(
            tmp_path / f"{name}.csv", index=False
        )
    columns, source = feature_columns(tmp_path, as_of="2022-05-01")
    parquet, _ = feature_columns(sim_tables, as_of="2022-05-01")
    assert source["as_of"] == "2022-05-01" and source["files"]["item"].endswith(".csv")
    for entity in columns:
        for name in columns[entity]:
            np.testing.assert_array_equal(columns[entity][name], parquet[entity][name], name)
    with pytest.raises(ValueError, match="--as-of"):
        feature_columns(tmp_path, as_of="May 1st")


def test_cli_publish_list_show_activate(sim_tables: Path, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    run = CliRunner().invoke
    args = ["--data", str(sim_tables), "--registry", str(registry)]
    done = run(app, ["features", "publish", *args, "--snapshot", "s1"])
    assert done.exit_code == 0, done.output
    assert SnapshotStore(registry).active() == "s1"
    done = run(app, ["features", "publish", *args, "--snapshot", "s2", "--no-activate"])
    assert done.exit_code == 0 and SnapshotStore(registry).active() == "s1"
    done = run(app, ["features", "publish", *args, "--if-empty"])
    assert done.exit_code == 0 and "nothing to do" in done.output
    listing = run(app, ["features", "list", "--registry", str(registry)]).output.splitlines()
    assert [line.split()[0] for line in listing] == ["s1", "s2"]
    assert "active" in listing[0] and "active" not in listing[1] and "item=8000" in listing[1]
    shown = json.loads(run(app, ["features", "show", "s2", "--registry", str(registry)]).output)
    assert shown["entities"]["item"]["rows"] == 8000
    done = run(app, ["features", "activate", "s2", "--registry", str(registry)])
    assert done.exit_code == 0 and json.loads(done.output) == {"active": "s2", "previous": "s1"}
    done = run(app, ["features", "activate", "s9", "--registry", str(registry)])
    assert done.exit_code == 1 and "not published" in done.output


@pytest.mark.skipif(find_redis_server() is None, reason=REDIS_MISSING)
def test_cli_publishes_to_redis(
    sim_tables: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    server = redis_server
    done = CliRunner().invoke(
        app,
        ["features", "publish", "--data", str(sim_tables), "--redis", server.url,
         "--snapshot", "r1", "--registry", str(tmp_path / "none")],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    store = RedisSnapshots(connect(server.url, 5.0))
    assert store.active() == "r1" and store.snapshots() == ["r1"]
    assert store.manifest("r1")["entities"]["item"]["rows"] == 8000
    key = int(id_keys([17])[0])
    row = json.loads(store.client.hget("vidrank:features:r1:item", str(key)))
    columns = list(store.manifest("r1")["entities"]["item"]["columns"])
    assert (
        dict(zip(columns, row, strict=True))["tag"]
        == feature_columns(sim_tables)[0]["item"]["tag"][17]
    )


def test_cli_names_what_the_active_snapshot_lacks(
    registry_copy: Path, version: str, sim_tables: Path
) -> None:
    from model.core.store.snapshot import build_tables

    columns, source = feature_columns(sim_tables)
    del columns["item"]["tag"]
    store = SnapshotStore(registry_copy)
    store.publish(build_tables(columns), "s-notag", source)
    done = CliRunner().invoke(
        app, ["features", "activate", "s-notag", "--registry", str(registry_copy)]
    )
    assert done.exit_code == 0, done.output
    assert f"warning: {version} reads features the snapshot lacks: ['item.tag']" in done.output
    done = CliRunner().invoke(
        app, ["models", "activate", version, "--registry", str(registry_copy)]
    )
    assert done.exit_code == 0 and "['item.tag']" in done.output
