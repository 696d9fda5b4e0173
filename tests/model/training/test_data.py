"""Loader: a hand-written KuaiRand CSV fixture checked value by value, simulator Parquet, splits
and shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.simulator.world import SimConfig, SimData, simulate, write_simulation
from model.training.data import (
    FEATURE_COLUMNS,
    load_impressions,
    read_shard,
    split_by_time,
    write_shards,
)

# KuaiRand-Pure's real column names; rows out of time order; some values missing as in the data.
LOG_CSV = """\
user_id,video_id,date,hourmin,time_ms,is_click,is_like,is_follow,is_comment,is_forward,is_hate,\
long_view,play_time_ms,duration_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_rand,tab
0,10,20220408,1400,1649397600123,1,1,0,0,0,0,0,12000,15000,0,0,0,0,1
1,11,20220409,2317,1649517420456,1,0,0,1,0,0,1,45000,30500,0,12,0,0,4
2,12,20220410,5,1649520300789,0,0,0,0,0,0,0,1500,20000,0,0,0,0,0
3,13,20220408,930,1649381400000,1,0,0,0,0,0,0,5000,8000,3,0,1,0,2
0,11,20220407,1845,1649328300001,0,0,0,0,0,0,0,0,30500,0,0,0,0,14
"""
USERS_CSV = """\
user_id,user_active_degree,is_lowactive_period,is_live_streamer,is_video_author,follow_user_num,\
follow_user_num_range,fans_user_num,fans_user_num_range,friend_user_num,friend_user_num_range,\
register_days,register_days_range,onehot_feat0,onehot_feat1,onehot_feat2,onehot_feat3,\
onehot_feat4,onehot_feat5,onehot_feat6,onehot_feat7,onehot_feat8,onehot_feat9,onehot_feat10,\
onehot_feat11,onehot_feat12,onehot_feat13,onehot_feat14,onehot_feat15,onehot_feat16,onehot_feat17
0,high_active,0,0,1,12,"(10,50]",3,"[1,10)",1,"[1,5)",107,61-90,0,1,17,638,2,0,1,6,184,6,3,0,0,0,0,0,0,0
1,UNKNOWN,0,0,0,0,0,0,0,0,0,20,15-30,1,2,5,10,0,0,1,2,3,4,5,0,0,0,,0,0,0
2,full_active,0,1,0,250,"(150,250]",1200,"[1k,5k)",40,"[30,60)",800,730+,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
"""
VIDEOS_CSV = """\
video_id,author_id,video_type,upload_dt,upload_type,visible_status,video_duration,server_width,\
server_height,music_id,music_type,tag
10,100,NORMAL,2022-04-01,ShortImport,public,15000.0,720,1280,500,9.0,"12,65"
11,101,AD,2022-04-08,ShortImport,public,30500.0,720,1280,0,,8
12,100,NORMAL,2022-03-20,ShortImport,public,,720,1280,501,9.0,
"""
# Expected rows after loading, in time order (user 3 and video 13 have no feature rows).
EXPECTED = pd.DataFrame(
    {
        "user_id": [0, 3, 0, 1, 2],
        "user_active_degree": ["high_active", "UNKNOWN", "high_active", "UNKNOWN", "full_active"],
        "is_video_author": [1, 0, 1, 0, 0],
        "follow_user_num": [12.0, 0.0, 12.0, 0.0, 250.0],
        "fans_user_num": [3.0, 0.0, 3.0, 0.0, 1200.0],
        "register_days": [107.0, 0.0, 107.0, 20.0, 800.0],
        "hour": [18, 9, 14, 23, 0],
        "day_of_week": [3, 4, 4, 5, 6],  # 2022-04-07 was a Thursday
        "tab": [14, 2, 1, 4, 0],
        "video_id": [11, 13, 10, 11, 12],
        "author_id": [101, -1, 100, 101, 100],
        "video_type": ["AD", "NORMAL", "NORMAL", "AD", "NORMAL"],
        "music_id": [0, -1, 500, 0, 501],
        "tag": ["8", "", "12,65", "8", ""],
        "duration_s": [30.5, 8.0, 15.0, 30.5, 20.0],
        "upload_age_days": [0.0, 0.0, 7.0, 1.0, 21.0],  # shown before upload -> clipped to 0
        "click": [0, 1, 1, 1, 0],
        "watch_s": [0.0, 5.0, 12.0, 30.5, 0.0],  # replay clipped to the duration; 0 w/o click
        "like": [0, 0, 1, 0, 0],
        "time_ms": [1649328300001, 1649381400000, 1649397600123, 1649517420456, 1649520300789],
    }
)


@pytest.fixture
def kuairand_dir(tmp_path: Path) -> Path:
    (tmp_path / "log_standard_4_08_to_4_21_pure.csv").write_text(LOG_CSV)
    (tmp_path / "user_features_pure.csv").write_text(USERS_CSV)
    (tmp_path / "video_features_basic_pure.csv").write_text(VIDEOS_CSV)
    (tmp_path / "video_features_statistic_pure.csv").write_text("video_id,date,show_cnt\n10,1,2\n")
    return tmp_path


def check_frame(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(frame.columns) == list(expected.columns)
    for col in expected.columns:
        got, want = frame[col].tolist(), expected[col].tolist()
        if isinstance(want[0], float):
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=col)
        else:
            assert got == want, col


def test_kuairand_csv_fixture_loads_value_by_value(kuairand_dir: Path) -> None:
    frame = load_impressions(kuairand_dir)
    assert tuple(frame.columns[: len(FEATURE_COLUMNS)]) == FEATURE_COLUMNS
    check_frame(frame, EXPECTED)
    assert frame["click"].dtype == np.int8 and frame["like"].dtype == np.int8
    assert frame["watch_s"].dtype == np.float32 and frame["time_ms"].dtype == np.int64


def test_watch_cap_can_be_lifted(kuairand_dir: Path) -> None:
    frame = load_impressions(kuairand_dir, max_watch_ratio=None)
    assert frame["watch_s"].tolist() == [0.0, 5.0, 12.0, 45.0, 0.0]


def test_time_derived_from_date_and_hourmin_or_time_ms(kuairand_dir: Path) -> None:
    path = kuairand_dir / "log_standard_4_08_to_4_21_pure.csv"
    log = pd.read_csv(path)
    derived = ["hour", "day_of_week", "upload_age_days"]
    log.drop(columns=["time_ms"]).to_csv(path, index=False)
    frame = load_impressions(kuairand_dir)
    # date + hourmin are Beijing time at minute precision.
    assert frame["time_ms"].tolist() == [t - t % 60_000 for t in EXPECTED["time_ms"]]
    check_frame(frame[derived], EXPECTED[derived])
    log.drop(columns=["hourmin", "date"]).to_csv(path, index=False)
    check_frame(load_impressions(kuairand_dir)[derived], EXPECTED[derived])


def test_random_logs_and_max_rows(kuairand_dir: Path) -> None:
    row = "2,10,20220501,1200,1651377600000,1,0,0,0,0,0,0,1,1,0,0,0,1,0"
    extra = f"{LOG_CSV.splitlines()[0]}\n{row}\n"
    (kuairand_dir / "log_random_4_22_to_5_08_pure.csv").write_text(extra)
    frame = load_impressions(kuairand_dir)
    assert len(frame) == 6 and frame["time_ms"].iloc[-1] == 1651377600000
    # max_rows reads standard logs first, in file order, then sorts by time.
    assert load_impressions(kuairand_dir, max_rows=2)["user_id"].tolist() == [0, 1]


def test_parquet_twin_of_a_csv_is_read_once(kuairand_dir: Path) -> None:
    log = pd.read_csv(kuairand_dir / "log_standard_4_08_to_4_21_pure.csv")
    log.to_parquet(kuairand_dir / "log_standard_4_08_to_4_21_pure.parquet", index=False)
    assert len(load_impressions(kuairand_dir)) == 5


def test_optional_columns_fall_back_to_defaults(kuairand_dir: Path) -> None:
    (kuairand_dir / "user_features_pure.csv").write_text("user_id\n0\n1\n")
    (kuairand_dir / "video_features_basic_pure.csv").write_text("video_id,author_id\n10,7\n")
    frame = load_impressions(kuairand_dir)
    assert set(frame["user_active_degree"]) == {"UNKNOWN"}
    assert frame["author_id"].tolist() == [-1, -1, 7, -1, -1]
    assert set(frame["video_type"]) == {"NORMAL"} and set(frame["tag"]) == {""}
    assert frame["upload_age_days"].tolist() == [0.0] * 5
    assert frame["duration_s"].tolist() == EXPECTED["duration_s"].tolist()  # from the log


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("user_features_pure.csv", "user_features"),
        ("video_features_basic_pure.csv", "video_features_basic"),
        ("log_standard_4_08_to_4_21_pure.csv", "log_standard"),
    ],
)
def test_missing_file_is_named(kuairand_dir: Path, remove: str, message: str) -> None:
    (kuairand_dir / remove).unlink()
    with pytest.raises(ValueError, match=message):
        load_impressions(kuairand_dir)


def test_missing_required_column_is_named(kuairand_dir: Path) -> None:
    path = kuairand_dir / "log_standard_4_08_to_4_21_pure.csv"
    pd.read_csv(path).drop(columns=["is_click"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match="is_click"):
        load_impressions(kuairand_dir)
    (kuairand_dir / "video_features_basic_pure.csv").write_text("author_id\n1\n")
    pd.DataFrame({"user_id": [0], "video_id": [1], "is_click": [1], "date": [20220408]}).to_csv(
        path, index=False
    )
    with pytest.raises(ValueError, match="video_id"):
        load_impressions(kuairand_dir)


def test_duplicate_feature_rows_are_rejected(kuairand_dir: Path) -> None:
    with (kuairand_dir / "user_features_pure.csv").open("a") as f:
        f.write(USERS_CSV.splitlines()[-1] + "\n")
    with pytest.raises(ValueError, match="duplicate user_id"):
        load_impressions(kuairand_dir)


@pytest.fixture(scope="module")
def sim() -> SimData:
    return simulate(SimConfig(n_users=80, n_videos=150, n_authors=40, n_impressions=3_000, seed=5))


def test_simulator_parquet_loads_value_by_value(sim: SimData, tmp_path: Path) -> None:
    write_simulation(sim, tmp_path)
    frame = load_impressions(tmp_path)
    log = sim.log  # already in time order, so rows line up
    users = sim.users.set_index("user_id").loc[log["user_id"]].reset_index()
    videos = sim.videos.set_index("video_id").loc[log["video_id"]].reset_index()
    shown = pd.to_datetime(log["date"].astype(str), format="%Y%m%d")
    expected = pd.DataFrame(
        {
            "user_id": log["user_id"],
            "user_active_degree": users["user_active_degree"],
            "is_video_author": users["is_video_author"],
            "follow_user_num": users["follow_user_num"].astype(float),
            "fans_user_num": users["fans_user_num"].astype(float),
            "register_days": users["register_days"].astype(float),
            "hour": log["hourmin"] // 100,
            "day_of_week": shown.dt.day_of_week,
            "tab": log["tab"],
            "video_id": log["video_id"],
            "author_id": videos["author_id"],
            "video_type": videos["video_type"],
            "music_id": videos["music_id"],
            "tag": videos["tag"],
            "duration_s": log["duration_ms"] / 1000.0,
            "upload_age_days": (shown - pd.to_datetime(videos["upload_dt"])).dt.days.astype(float),
            "click": log["is_click"],
            "watch_s": log["play_time_ms"] / 1000.0,
            "like": log["is_like"],
            "time_ms": log["time_ms"],
            "true_p_click": log["true_p_click"],
            "true_watch_s": log["true_watch_s"],
            "true_p_like": log["true_p_like"],
        }
    )
    check_frame(frame, expected)
    head = load_impressions(tmp_path, max_rows=100)
    check_frame(head, expected.iloc[:100])


def test_split_by_time_is_chronological(sim: SimData, tmp_path: Path) -> None:
    write_simulation(sim, tmp_path)
    frame = load_impressions(tmp_path).sample(frac=1.0, random_state=0)  # shuffled input
    train, valid, test = split_by_time(frame, valid_fraction=0.2, test_fraction=0.1)
    assert (len(train), len(valid), len(test)) == (2_100, 600, 300)
    assert train["time_ms"].max() <= valid["time_ms"].min()
    assert valid["time_ms"].max() <= test["time_ms"].min()
    with pytest.raises(ValueError, match="fractions"):
        split_by_time(frame, valid_fraction=0.6, test_fraction=0.4)


def test_shards_partition_the_rows(sim: SimData, tmp_path: Path) -> None:
    write_simulation(sim, tmp_path / "sim")
    frame = load_impressions(tmp_path / "sim")
    shard_dir = tmp_path / "shards"
    write_shards(frame.iloc[:10], shard_dir, 3)  # stale shards, replaced below
    paths = write_shards(frame, shard_dir, 5)
    assert [p.name for p in paths] == [f"part-{i:05d}-of-00005.parquet" for i in range(5)]
    assert sorted(p.name for p in shard_dir.iterdir()) == [p.name for p in paths]
    parts = [read_shard(shard_dir, rank, 2) for rank in range(2)]
    assert [len(p) for p in parts] == [1_800, 1_200]  # shards 0,2,4 and 1,3
    for part in parts:
        assert part["time_ms"].is_monotonic_increasing
    merged = pd.concat(parts).sort_values(["time_ms", "user_id", "video_id"], kind="stable")
    expected = frame.sort_values(["time_ms", "user_id", "video_id"], kind="stable")
    pd.testing.assert_frame_equal(merged.reset_index(drop=True), expected.reset_index(drop=True))
    with pytest.raises(ValueError, match="cannot feed"):
        read_shard(shard_dir, 0, 6)
    with pytest.raises(ValueError, match="invalid rank"):
        read_shard(shard_dir, 2, 2)
    (shard_dir / "part-00003-of-00005.parquet").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        read_shard(shard_dir, 0, 1)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_impressions(tmp_path / "nope")
