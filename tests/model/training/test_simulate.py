"""Simulator: determinism, KuaiRand schema, label/truth consistency, the clickbait property and the
task-structure knobs (presets, conflicting tasks, per-task fields, nonlinear responses)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from model.core.metrics import ndcg_at_k
from model.simulator.world import (
    DIFFERENT_FIELDS,
    PRESETS,
    TASK_FIELDS,
    SimConfig,
    SimData,
    _make_structure,
    _parse_tags,
    _respond,
    preset_config,
    run_simulate,
    simulate,
    true_utility,
    write_simulation,
)
from tests.model.training.sim_reference import CASES, REFERENCE_FILE, SMALL_WORLD, world_reference
from tests.reference import assert_matches_reference, read_reference

SMALL = SimConfig(n_users=300, n_videos=600, n_authors=120, n_impressions=30_000, seed=0)

KUAIRAND_LOG = [
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
    "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
    "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
]  # fmt: skip
KUAIRAND_USERS = [
    "user_id", "user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author",
    "follow_user_num", "follow_user_num_range", "fans_user_num", "fans_user_num_range",
    "friend_user_num", "friend_user_num_range", "register_days", "register_days_range",
    *[f"onehot_feat{i}" for i in range(18)],
]  # fmt: skip
KUAIRAND_VIDEOS = [
    "video_id", "author_id", "video_type", "upload_dt", "upload_type", "visible_status",
    "video_duration", "server_width", "server_height", "music_id", "music_type", "tag",
]  # fmt: skip
TRUTH = ["true_p_click", "true_watch_s", "true_p_like"]


@pytest.fixture(scope="module")
def sim() -> SimData:
    return simulate(SMALL)


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1.0 - p))


def test_same_seed_same_frames_and_other_seed_differs(sim: SimData) -> None:
    again = simulate(SMALL)
    for name in ("log", "users", "videos", "video_truth"):
        pd.testing.assert_frame_equal(getattr(sim, name), getattr(again, name))
    other = simulate(dataclasses.replace(SMALL, seed=1))
    assert not other.log.equals(sim.log)
    assert not other.videos.equals(sim.videos)


def test_frames_use_kuairand_columns(sim: SimData) -> None:
    assert list(sim.log.columns) == KUAIRAND_LOG + TRUTH
    assert list(sim.users.columns) == KUAIRAND_USERS
    assert list(sim.videos.columns) == KUAIRAND_VIDEOS
    assert len(sim.log) == SMALL.n_impressions
    assert set(sim.users["user_active_degree"]) <= {
        "high_active", "full_active", "middle_active", "UNKNOWN",
    }  # fmt: skip
    assert set(sim.videos["video_type"]) == {"NORMAL", "AD"}
    assert sim.log["tab"].between(0, 14).all()
    tags = sim.videos["tag"].str.split(",")
    assert tags.map(len).between(1, 3).all()
    assert tags.map(lambda ts: all(0 <= int(t) < SMALL.n_tags for t in ts)).all()
    assert sim.videos["upload_dt"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()


def test_parquet_output_round_trips(sim: SimData, tmp_path: Path) -> None:
    paths = write_simulation(sim, tmp_path)
    assert {p.name for p in paths.values()} == {
        "log_standard_sim.parquet",
        "user_features_sim.parquet",
        "video_features_basic_sim.parquet",
        "video_truth_sim.parquet",
    }
    log = pd.read_parquet(tmp_path / "log_standard_sim.parquet")
    assert list(log.columns) == KUAIRAND_LOG + TRUTH
    pd.testing.assert_frame_equal(log, sim.log, check_dtype=False)
    users = pd.read_parquet(tmp_path / "user_features_sim.parquet")
    assert list(users.columns) == KUAIRAND_USERS
    videos = pd.read_parquet(tmp_path / "video_features_basic_sim.parquet")
    assert list(videos.columns) == KUAIRAND_VIDEOS


def test_labels_are_consistent_with_each_other(sim: SimData) -> None:
    log = sim.log
    clicked = log["is_click"] == 1
    assert (log["play_time_ms"] <= log["duration_ms"]).all()
    assert (log.loc[~clicked, "play_time_ms"] == 0).all()
    for col in ("is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view"):
        assert (log.loc[~clicked, col] == 0).all(), col
    assert (log["is_rand"] == 0).all()
    durations = sim.videos.set_index("video_id")["video_duration"]
    assert (log["duration_ms"].to_numpy() == durations.loc[log["video_id"]].to_numpy()).all()
    assert log["time_ms"].is_monotonic_increasing


def test_time_columns_agree(sim: SimData) -> None:
    log = sim.log
    local = pd.to_datetime(log["time_ms"] + 8 * 3600 * 1000, unit="ms")  # Beijing time
    assert (local.dt.strftime("%Y%m%d").astype(int) == log["date"]).all()
    assert (local.dt.hour * 100 + local.dt.minute == log["hourmin"]).all()
    upload = pd.to_datetime(sim.videos.set_index("video_id").loc[log["video_id"], "upload_dt"])
    assert (local.dt.normalize().to_numpy() >= upload.to_numpy()).all()  # no shows before upload


def test_truth_is_bounded_and_matches_sampled_labels(sim: SimData) -> None:
    log = sim.log
    duration_s = log["duration_ms"] / 1000.0
    assert log["true_p_click"].between(0, 1).all()
    assert (log["true_p_like"] <= log["true_p_click"]).all()
    assert (log["true_watch_s"] <= log["true_p_click"] * duration_s + 1e-9).all()
    # Labels are drawn from the truth, so their means agree up to sampling noise.
    assert log["is_click"].mean() == pytest.approx(log["true_p_click"].mean(), abs=0.01)
    assert log["is_like"].mean() == pytest.approx(log["true_p_like"].mean(), abs=0.004)
    watch = log["play_time_ms"].mean() / 1000.0
    assert watch == pytest.approx(log["true_watch_s"].mean(), rel=0.05)


def per_impression_rates(log: pd.DataFrame) -> pd.DataFrame:
    p_click = log["true_p_click"]
    return pd.DataFrame(
        {
            "p_click": p_click,
            "completion": log["true_watch_s"] / p_click / (log["duration_ms"] / 1000.0),
            "like_given_click": log["true_p_like"] / p_click,
        }
    )


def test_clickbait_gets_clicks_but_no_watching_or_likes(sim: SimData) -> None:
    is_cb = sim.video_truth.set_index("video_id").loc[sim.log["video_id"], "is_clickbait"]
    means = per_impression_rates(sim.log).groupby(is_cb.to_numpy()).mean()
    assert means.loc[1, "p_click"] > means.loc[0, "p_click"] + 0.1
    assert means.loc[1, "completion"] < means.loc[0, "completion"] / 2
    assert means.loc[1, "like_given_click"] < means.loc[0, "like_given_click"] / 4


def test_click_only_ranking_loses_to_fused_ranking(sim: SimData) -> None:
    log = sim.log
    groups = log["user_id"].to_numpy()  # each user's impressions form one candidate list
    utility = true_utility(log)
    click_only = ndcg_at_k(utility, log["true_p_click"], groups, k=10)
    # A different fusion than the utility itself, in the weighted-product form.
    p_click, watch, p_like = (log[c] for c in ("true_p_click", "true_watch_s", "true_p_like"))
    fused = p_click**0.5 * (watch + 0.1) * (p_like + 1e-3) ** 0.3
    fused_ndcg = ndcg_at_k(utility, fused, groups, k=10)
    assert click_only < 0.85
    assert fused_ndcg > 0.9
    assert fused_ndcg - click_only > 0.15
    # The same holds against the sampled outcomes, not only against the truth.
    realized = log["is_click"] + 0.1 * log["play_time_ms"] / 1000.0 + 20.0 * log["is_like"]
    assert ndcg_at_k(realized, fused, groups) > ndcg_at_k(realized, log["true_p_click"], groups)


def driver_correlations(rho: float) -> tuple[float, float]:
    cfg = dataclasses.replace(
        SMALL, n_impressions=10_000, task_correlation=rho, clickbait_fraction=0.0, ad_fraction=0.0
    )
    rates = per_impression_rates(simulate(cfg).log)
    click = logit(rates["p_click"].to_numpy())
    like = logit(rates["like_given_click"].to_numpy())
    completion = logit(rates["completion"].to_numpy())
    return float(np.corrcoef(click, like)[0, 1]), float(np.corrcoef(click, completion)[0, 1])


def test_task_correlation_knob_controls_shared_driver() -> None:
    low, mid, high = (driver_correlations(rho) for rho in (0.0, 0.5, 1.0))
    assert low[0] < mid[0] < high[0]
    assert low[1] < mid[1] < high[1]
    assert abs(low[0]) < 0.15 and high[0] > 0.8


def test_negative_task_correlation_makes_click_conflict_with_completion_and_like() -> None:
    conflicting, unrelated = driver_correlations(-0.8), driver_correlations(0.0)
    assert conflicting[0] < -0.5 and conflicting[1] < -0.3  # click vs like, click vs completion
    assert conflicting[0] < unrelated[0] - 0.4 and conflicting[1] < unrelated[1] - 0.3


def test_task_fields_give_each_task_its_field_vectors() -> None:
    """Each task's own item vector is a function of the field it names and of nothing else."""
    cfg = SimConfig(**SMALL_WORLD, task_fields=("tag", "author", "duration"))
    videos = simulate(cfg).videos
    rng = np.random.default_rng(0)
    fake_video_vectors = rng.normal(size=(4, cfg.n_videos, cfg.latent_dim))
    items = _make_structure(cfg, rng, videos, fake_video_vectors).items
    assert items.shape == (3, cfg.n_videos, cfg.latent_dim)
    for task, column in enumerate(("tag", "author_id", "video_duration")):
        key = videos[column].astype(str).to_numpy()
        if column == "tag":  # a set of tags: order does not matter
            key = np.asarray([",".join(sorted(k.split(","))) for k in key])
        # Same field value -> same vector; the number of distinct vectors = of distinct values.
        distinct = np.unique(items[task].round(12), axis=0)
        assert len(distinct) == len(np.unique(key)), column
        first = pd.Series(np.arange(len(key))).groupby(key).transform("first").to_numpy()
        np.testing.assert_array_equal(items[task], items[task][first])
    # Unit variance of the user . item dot product, as for the video vectors (user sd dim^-1/4).
    for task in range(3):
        var = (items[task] ** 2).sum(axis=1).mean() * cfg.latent_dim**-0.5
        assert 0.6 < var < 1.4, task
    same = SimConfig(**SMALL_WORLD)
    video = _make_structure(same, rng, videos, fake_video_vectors).items
    np.testing.assert_array_equal(video, fake_video_vectors[1:])
    assert set(TASK_FIELDS) == {"video", "tag", "author", "music", "duration"}


def test_parse_tags_inverts_the_tag_strings(sim: SimData) -> None:
    tags, mask = _parse_tags(sim.videos["tag"].to_numpy())
    rebuilt = [",".join(str(t) for t in row[m]) for row, m in zip(tags, mask, strict=True)]
    assert rebuilt == list(sim.videos["tag"])


def test_nonlinear_response_is_task_specific_and_non_monotone() -> None:
    cfg = SimConfig(**SMALL_WORLD, nonlinearity=1.0)
    rng = np.random.default_rng(1)
    videos = simulate(cfg).videos
    structure = _make_structure(cfg, rng, videos, rng.normal(size=(4, cfg.n_videos, 8)))
    z = np.tile(np.linspace(-2.5, 2.5, 501), (3, 1))  # the same affinity for every task
    out = _respond(z, structure)
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])
    assert (np.diff(out, axis=1) < 0).any()  # a sin wiggle, not a monotone link
    np.testing.assert_allclose(out - z, np.sin(
        structure.alpha[:, :, None] * z[:, None, :] + structure.beta[:, :, None]
    ).sum(axis=1))  # fmt: skip
    linear = dataclasses.replace(structure, amplitude=0.0)
    assert _respond(z, linear) is z


def test_truth_depends_on_observable_features(sim: SimData) -> None:
    log = sim.log
    rates = per_impression_rates(log)
    videos = sim.videos.set_index("video_id").loc[log["video_id"]]
    is_ad = (videos["video_type"] == "AD").to_numpy()
    assert rates["like_given_click"][is_ad].mean() < rates["like_given_click"][~is_ad].mean() / 2
    long = (log["duration_ms"] > 60_000).to_numpy()
    short = (log["duration_ms"] < 15_000).to_numpy()
    assert rates["completion"][long].mean() < rates["completion"][short].mean()
    hour = (log["hourmin"] // 100).to_numpy()
    evening, morning = np.isin(hour, [19, 20, 21]), np.isin(hour, [7, 8, 9])
    assert rates["p_click"][evening].mean() > rates["p_click"][morning].mean()
    shown = pd.to_datetime(log["date"].astype(str), format="%Y%m%d").to_numpy()
    uploaded = pd.to_datetime(videos["upload_dt"]).to_numpy()
    fresh = (shown - uploaded) <= np.timedelta64(1, "D")
    assert rates["p_click"][fresh].mean() > rates["p_click"][~fresh].mean()


def test_true_utility_weights() -> None:
    log = pd.DataFrame({"true_p_click": [0.5], "true_watch_s": [10.0], "true_p_like": [0.1]})
    assert true_utility(log, {"click": 1.0, "watch_time": 0.1, "like": 10.0})[0] == 2.5
    assert true_utility(log, {"watch_time": 1.0})[0] == 10.0
    with pytest.raises(ValueError, match="unknown"):
        true_utility(log, {"clicks": 1.0})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="task_correlation"):
        SimConfig(task_correlation=1.5)
    with pytest.raises(ValueError, match="task_correlation"):
        SimConfig(task_correlation=-1.01)
    with pytest.raises(ValueError, match="n_users"):
        SimConfig(n_users=0)
    with pytest.raises(ValueError, match="task_fields"):
        SimConfig(task_fields=("tag", "genre", "author"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="task_fields"):
        SimConfig(task_fields=("tag", "author"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonlinearity"):
        SimConfig(nonlinearity=-0.1)
    with pytest.raises(ValueError, match="unknown simulator preset 'nope'"):
        preset_config("nope")


def test_default_preset_is_the_world_before_presets_on_any_cpu() -> None:
    """Ids, exposures and labels identical to the stored world; float columns within tolerance.

    The stored values are main's simulator before presets (tests/model/training/sim_reference.py):
    they hold on any CPU, where a digest of the float columns' bytes held only on the machine
    that wrote it (numpy's sin/exp/log round differently on AVX-512, AVX2 and baseline kernels).
    """
    stored = read_reference(REFERENCE_FILE)["cases"]
    assert list(stored) == list(CASES)
    for name, cfg in CASES.items():
        assert_matches_reference(world_reference(simulate(cfg)), stored[name])
    assert preset_config("default", seed=4) == SimConfig(seed=4)


def test_reference_check_catches_a_changed_label_and_a_moved_float(sim: SimData) -> None:
    """The check is not vacuous: one flipped label, or a float moved by 1e-6, fails it."""
    stored = world_reference(sim)
    flipped = dataclasses.replace(sim, log=sim.log.copy())
    flipped.log.loc[123, "is_like"] = 1 - flipped.log.loc[123, "is_like"]
    with pytest.raises(AssertionError, match="log.is_like"):
        assert_matches_reference(world_reference(flipped), stored)
    moved = dataclasses.replace(sim, log=sim.log.copy())
    moved.log["true_p_click"] *= 1 + 1e-6
    with pytest.raises(AssertionError, match="log.true_p_click"):
        assert_matches_reference(world_reference(moved), stored)
    last_bit = dataclasses.replace(sim, log=sim.log.copy())  # what another SIMD path does
    last_bit.log["true_p_click"] = np.nextafter(last_bit.log["true_p_click"], 1.0)
    assert_matches_reference(world_reference(last_bit), stored)


def test_structure_knobs_change_the_truth_not_the_world_or_exposure() -> None:
    """task_fields and nonlinearity change what drives the labels, not who sees what and when."""
    base = simulate(preset_config("default", **SMALL_WORLD))
    for knobs in ({"task_fields": DIFFERENT_FIELDS}, {"nonlinearity": 1.0}):
        other = simulate(preset_config("default", **SMALL_WORLD, **knobs))
        pd.testing.assert_frame_equal(other.users, base.users)
        pd.testing.assert_frame_equal(other.videos, base.videos)
        for col in ("user_id", "video_id", "time_ms", "tab"):
            assert (other.log[col].to_numpy() == base.log[col].to_numpy()).all(), (knobs, col)
        for col in TRUTH:
            assert not np.allclose(other.log[col], base.log[col]), (knobs, col)


def test_every_preset_simulates_its_knobs() -> None:
    for name, knobs in PRESETS.items():
        cfg = preset_config(name, **SMALL_WORLD)
        assert all(getattr(cfg, k) == v for k, v in knobs.items()), name
        log = simulate(cfg).log
        assert 0.2 < log["is_click"].mean() < 0.45 and 0.005 < log["is_like"].mean() < 0.05, name


def test_run_simulate_writes_files_and_prints_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run_simulate(tmp_path / "sim", impressions=2_000, seed=3, n_users=50, n_videos=80)
    assert (out / "log_standard_sim.parquet").is_file()
    assert len(pd.read_parquet(out / "log_standard_sim.parquet")) == 2_000
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "CTR" in lines[0] and "like rate" in lines[0]


def test_cli_simulate_writes_a_preset_and_rejects_an_unknown_one(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from model.cli import app

    args = ["simulate", "--impressions", "3000", "--seed", "2"]
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c"), "--preset", "conflicting"])
    assert done.exit_code == 0, done.output
    assert "conflicting world" in done.output
    log = pd.read_parquet(tmp_path / "c" / "log_standard_sim.parquet")
    expected = simulate(preset_config("conflicting", n_impressions=3000, seed=2)).log
    np.testing.assert_array_equal(log["true_p_like"], expected["true_p_like"])
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--preset", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output
    assert not (tmp_path / "x").exists()


def test_train_job_preset_flows_to_the_simulated_frame(tmp_path: Path) -> None:
    from model.training.config import TrainJob
    from model.training.sources import load_frame

    frame = load_frame(TrainJob(registry=tmp_path, simulate=2_000, preset="conflicting"))
    expected = simulate(preset_config("conflicting", n_impressions=2_000, seed=0)).log
    np.testing.assert_allclose(frame["true_p_like"], expected["true_p_like"], rtol=1e-6)  # float32
    default = load_frame(TrainJob(registry=tmp_path, simulate=2_000))
    assert not np.allclose(default["true_p_like"], frame["true_p_like"])


def test_a_long_log_is_written_in_parts_of_the_same_world(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from model.training.data import load_impressions
    from model.training.prepared import prepare_stream

    out = run_simulate(
        tmp_path / "sim", impressions=5_000, seed=3, n_users=50, n_videos=80, part_rows=2_000
    )
    parts = sorted(p.name for p in out.glob("log_standard_sim*.parquet"))
    assert parts == [f"log_standard_sim-0000{i}-of-00003.parquet" for i in range(3)]
    logs = [pd.read_parquet(out / name) for name in parts]
    assert [len(log) for log in logs] == [2_000, 2_000, 1_000]
    assert all(log["time_ms"].is_monotonic_increasing for log in logs)
    assert "in 3 parts" in capsys.readouterr().out
    # The world is simulate()'s for the same config; only the impressions are drawn per part.
    whole = simulate(SimConfig(n_impressions=5_000, seed=3, n_users=50, n_videos=80))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "user_features_sim.parquet"), whole.users)
    videos = pd.read_parquet(out / "video_features_basic_sim.parquet")
    pd.testing.assert_frame_equal(videos, whole.videos)
    assert not logs[0]["time_ms"].equals(logs[1]["time_ms"])  # each part its own draws
    # Deterministic, and a rewrite replaces the earlier log (whole or in parts) instead of
    # adding to it.
    run_simulate(out, impressions=5_000, seed=3, n_users=50, n_videos=80, part_rows=2_000)
    pd.testing.assert_frame_equal(pd.read_parquet(out / parts[1]), logs[1])
    assert len(load_impressions(out)) == 5_000
    assert sum(prepare_stream(out, tmp_path / "streamed", 2).rows.values()) == 5_000
    run_simulate(out, impressions=5_000, seed=3, n_users=50, n_videos=80)
    assert [p.name for p in out.glob("log_standard_sim*")] == ["log_standard_sim.parquet"]
