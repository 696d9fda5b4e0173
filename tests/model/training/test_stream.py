"""Streaming training data (model/training/stream.py) against the in-memory path.

A small simulated log, cut into three Parquet files (two standard logs and a random-exposure
one) with its times rounded to the hour so that many rows tie at the split boundaries: the
streamed splits must hold the very rows of ``split_by_time(load_impressions(dir))`` (valid and
test frame for frame, train as a multiset), an epoch must see every training row once, and a
streamed training run must reach the held-out metrics of ``fit`` on the same data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from model.simulator.world import SimConfig, simulate, write_simulation
from model.training import prepared as prepared_module
from model.training.batches import StepShare
from model.training.config import TrainConfig, TrainJob
from model.training.data import list_shards, load_impressions, read_shard, split_by_time
from model.training.fit import EVAL_COLUMNS, TooLittleData, fit, split_frame
from model.training.prepared import PreparedData, fit_prepared, prepare_stream
from model.training.stream import SplitBounds, StreamedBatches, streams

# test_distributed.py's small world (100 users, 150 videos, one driver), which learns in 2 epochs
WORLD = {"n_users": 100, "n_videos": 150, "n_authors": 50, "n_music": 50, "task_correlation": 1.0}
SIM = SimConfig(n_impressions=30_000, seed=2, **WORLD)  # type: ignore[arg-type]
KEY = ["time_ms", "user_id", "video_id", "click", "like", "watch_s", "hour", "tab"]


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated log in three Parquet files, times rounded to the hour (ties everywhere)."""
    out = tmp_path_factory.mktemp("log")
    write_simulation(simulate(SIM), out)
    whole = out / "log_standard_sim.parquet"
    log = pd.read_parquet(whole)
    whole.unlink()
    log["time_ms"] = log["time_ms"] // 3_600_000 * 3_600_000
    # File order is not time order: the random log's rows are the earliest ones.
    log.iloc[12_000:20_000].to_parquet(out / "log_standard_a.parquet", row_group_size=3_000)
    log.iloc[20_000:].to_parquet(out / "log_standard_b.parquet", row_group_size=3_000)
    log.iloc[:12_000].to_parquet(out / "log_random_a.parquet", row_group_size=3_000)
    return out


@pytest.fixture(scope="module")
def prepared(log_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return prepare_stream(log_dir, tmp_path_factory.mktemp("prepared"), 2)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(KEY, kind="stable").reset_index(drop=True)


def test_streamed_splits_hold_the_in_memory_rows(log_dir: Path, prepared: PreparedData) -> None:
    frame = load_impressions(log_dir)
    train, valid, test = split_by_time(frame)
    assert (frame["time_ms"].value_counts() > 1).all()  # every boundary falls inside a tie
    assert prepared.rows == {"train": len(train), "valid": len(valid), "test": len(test)}
    pd.testing.assert_frame_equal(read_shard(prepared.split_dir("valid"), 0, 1), valid)
    pd.testing.assert_frame_equal(read_shard(prepared.split_dir("test"), 0, 1), test)
    shards = [read_shard(prepared.split_dir("train"), r, 2) for r in range(2)]
    assert [len(s) for s in shards] == list(prepared.shard_rows(2))
    pd.testing.assert_frame_equal(_sorted(pd.concat(shards)), _sorted(train))


def test_streamed_basis_is_the_in_memory_one(log_dir: Path, prepared: PreparedData) -> None:
    _, basis = split_frame(load_impressions(log_dir))
    streamed = prepared.basis
    for f in basis.schema.features:
        g = streamed.schema.by_name(f.name)
        assert (g.mean, g.std) == pytest.approx((f.mean, f.std), rel=1e-9), f.name
    # float32 labels: pandas sums them in float32 precision, the streaming pass in float64
    assert streamed.label_means == pytest.approx(basis.label_means, rel=1e-6)


def test_held_out_splits_keep_their_encoding_and_only_what_evaluation_reads(
    prepared: PreparedData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read and encoded in chunks, a held-out split is the whole split's encoding in time order;
    the feature columns go once encoded (they would double a held-out row's memory), and with
    ``features`` (``--quantize`` scores the test rows as requests) they stay."""
    monkeypatch.setattr(prepared_module, "HELD_OUT_CHUNK", 700)  # ~3k rows: five chunks
    whole = prepared.basis.encode(read_shard(prepared.split_dir("test"), 0, 1))
    lean, full = prepared.held_out("test"), prepared.held_out("test", features=True)
    pd.testing.assert_frame_equal(full.frame, whole.frame)
    assert list(lean.frame.columns) == [c for c in EVAL_COLUMNS if c in whole.frame.columns]
    assert {"user_id", "click", "watch_s", "like", "true_p_click"} <= set(lean.frame.columns)
    assert {"tag", "video_type", "duration_s"} <= set(full.frame.columns) - set(lean.frame.columns)
    pd.testing.assert_frame_equal(lean.frame, whole.frame[list(lean.frame.columns)])
    for split in (lean, full):
        for key, tensor in [*whole.inputs.items(), *whole.labels.items()]:
            assert torch.equal({**split.inputs, **split.labels}[key], tensor)


def test_a_held_out_file_out_of_time_order_is_read_in_time_order(
    prepared: PreparedData, tmp_path: Path
) -> None:
    shutil.copytree(prepared.root, tmp_path / "p")
    path = list_shards(tmp_path / "p" / "valid")[0]
    rows = pd.read_parquet(path)
    rows.iloc[::-1].to_parquet(path, row_group_size=500)
    read = PreparedData.load(tmp_path / "p").held_out("valid", features=True)
    assert read.frame["time_ms"].is_monotonic_increasing
    expected = prepared.held_out("valid", features=True)
    pd.testing.assert_frame_equal(
        read.frame.sort_values(KEY, kind="stable").reset_index(drop=True),
        expected.frame.sort_values(KEY, kind="stable").reset_index(drop=True),
    )
    for key, tensor in expected.inputs.items():  # every row kept its own encoding
        order_read = np.lexsort([read.frame[c].to_numpy() for c in reversed(KEY)])
        order_expected = np.lexsort([expected.frame[c].to_numpy() for c in reversed(KEY)])
        assert torch.equal(read.inputs[key][order_read], tensor[order_expected])


def test_bounds_break_ties_by_log_position() -> None:
    times = np.array([5, 1, 5, 1, 5, 9, 5, 1, 5, 5])  # stable order: rows 1 3 7 0 2 4 6 8 9 5
    bounds = SplitBounds.of(times)  # 8 train, 1 valid, 1 test
    split = bounds.assign(times, np.arange(10))
    assert split.tolist() == [0, 0, 0, 0, 0, 2, 0, 0, 0, 1]


def test_an_epoch_streams_every_training_row_once(prepared: PreparedData) -> None:
    train = pd.concat([read_shard(prepared.split_dir("train"), r, 2) for r in range(2)])
    batches = StreamedBatches(
        prepared.shards(0, 1), prepared.basis, 512, prepared.shard_rows(1), window=4_000
    )
    rng = np.random.default_rng(0)
    orders = []
    for _ in range(2):
        windows = list(batches.windows(rng))
        assert all(len(w) % 512 == 0 for w in windows[:-1])  # batches never straddle windows
        seen = pd.concat(windows)
        pd.testing.assert_frame_equal(_sorted(seen), _sorted(train))
        orders.append(seen["time_ms"].to_numpy())
    assert not np.array_equal(*orders)  # a fresh order every epoch
    sizes = [len(labels["click"]) for _, labels in batches.epoch(rng)]
    assert len(sizes) == batches.steps and sum(sizes) == len(train)
    assert set(sizes[:-1]) == {512}


def test_ranks_weigh_their_steps_by_rows(prepared: PreparedData) -> None:
    """Rank 1 of 2 holds fewer rows than rank 0's: it joins rank 0's last step with weight 0."""
    share = StepShare()
    files = prepared.shards(1, 2)
    rows = (9, 5)  # pretend: a rank 0 with 9 rows, this rank with 5
    batches = StreamedBatches(files, prepared.basis, 4, rows, rank=1, share=share)
    shares = []
    for _step in zip(range(batches.steps), batches.epoch(np.random.default_rng(0)), strict=False):
        shares.append(share.value)
    assert batches.steps == 3
    assert shares == pytest.approx([4 / 8, 1 / 5, 0.0])


def test_streaming_is_chosen_and_checked(log_dir: Path, tmp_path: Path) -> None:
    assert not streams(log_dir)  # auto: a small log stays in memory
    assert streams(log_dir, "on") and not streams(log_dir, "off")
    with pytest.raises(ValueError, match="--stream must be one of"):
        TrainJob(registry=tmp_path, data=log_dir, stream="yes")
    with pytest.raises(ValueError, match="--stream on reads --data"):
        TrainJob(registry=tmp_path, simulate=20_000, stream="on")
    csv = tmp_path / "csv"
    csv.mkdir()
    pd.read_parquet(log_dir / "log_random_a.parquet").to_csv(csv / "log_standard.csv")
    with pytest.raises(ValueError, match="log_standard.csv"):
        streams(csv, "on")


def test_a_log_too_small_to_split_says_so(log_dir: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    for table in ("user_features_sim", "video_features_basic_sim"):
        (small / f"{table}.parquet").write_bytes((log_dir / f"{table}.parquet").read_bytes())
    pd.read_parquet(log_dir / "log_random_a.parquet").iloc[:30].to_parquet(
        small / "log_standard.parquet"
    )
    with pytest.raises(TooLittleData, match="too few"):
        prepare_stream(small, tmp_path / "out", 1)


def test_streamed_training_matches_in_memory(log_dir: Path, tmp_path: Path) -> None:
    """``fit`` on the frame and ``fit_prepared`` on the streamed data: same rows, same quality.

    One thread each, as the DDP ranks use (two threads crawl when the machine is busy)."""
    config = TrainConfig(small=True, epochs=2, seed=0, batch_size=1024, lr=5e-3)
    data = prepare_stream(log_dir, tmp_path / "prepared", 1)
    streamed = fit_prepared(data, config, threads=1, verbose=False).metrics
    memory = fit(load_impressions(log_dir), config, threads=1, verbose=False).metrics
    print({k: (round(streamed[k], 4), round(memory[k], 4)) for k in ("click_auc", "like_auc")})
    for split in ("train", "valid", "test"):
        assert streamed[f"rows_{split}"] == memory[f"rows_{split}"]
    # Same rows, another shuffle: AUCs on 3,000 test rows move by about +-0.01 with the order.
    for metric in ("click_auc", "like_auc"):
        assert abs(streamed[metric] - memory[metric]) <= 0.03, metric
    assert streamed["click_auc"] > 0.6 and streamed["like_auc"] > 0.6  # it did learn


def test_cli_trains_streamed(log_dir: Path, tmp_path: Path) -> None:
    """``vidrank train --data DIR --stream on``: streamed, published, the rows of every split."""
    from typer.testing import CliRunner

    from model.cli import app
    from model.core.registry import Registry

    registry = tmp_path / "registry"
    args = ["train", "--data", str(log_dir), "--stream", "on", "--registry", str(registry)]
    done = CliRunner().invoke(app, [*args, "--small", "--epochs", "1", "--version", "v-s"])
    assert done.exit_code == 0, done.output
    assert "30,000 impressions, streamed" in done.output
    metrics = Registry(registry).bundle("v-s").manifest["metrics"]
    assert (metrics["rows_train"], metrics["rows_valid"], metrics["rows_test"]) == (24e3, 3e3, 3e3)
    bad = CliRunner().invoke(app, ["train", "--simulate", "20000", "--stream", "on"])
    assert bad.exit_code == 2 and "--stream on reads --data" in bad.output
