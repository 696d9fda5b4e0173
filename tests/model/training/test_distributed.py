"""Distributed training (model/training/distributed.py): DDP over sharded Parquet, gloo on CPU.

Two real 2-rank runs against single-process ``fit`` on the same data and seed:

- ``vidrank train --nproc 2`` (``run_train``: the launcher prepares the data once and starts
  the ranks with torch's elastic launcher) with the MMoE: the bundle loads and scores, and its
  validation AUCs are within 0.01 of the single-process run's;
- ``torchrun --nproc_per_node 2 -m model.cli train`` (rank 0 simulates and prepares) with the
  dropout-free shared-bottom model: there the two runs agree to float rounding, which pins
  down that the ranks train on the very batches, with the very gradients, of ``fit``.

Plus fast checks of the data preparation and of how global batches are split across ranks.
About 40 s on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from model.core.features import default_schema
from model.core.registry import Registry
from model.core.runtime import make_session
from model.core.tasks import TASKS
from model.simulator.world import SimConfig, simulate, write_simulation
from model.training import distributed, prepared
from model.training.config import TrainConfig, TrainJob
from model.training.data import read_shard, split_by_time
from model.training.export import random_encoded, run_session
from model.training.fit import fit
from model.training.objective import selection_value
from model.training.sources import simulated_impressions
from model.training.train import run_train

# A small world (100 users, 150 videos) seen 100k times, with one shared driver behind click,
# completion and like (task_correlation 1.0), so that in 3 epochs the like head - 2-3% positives
# - learns enough for its AUC to be a stable figure to compare two training runs by.
SIM = SimConfig(
    n_impressions=100_000,
    n_users=100,
    n_videos=150,
    n_authors=50,
    n_music=50,
    seed=2,
    task_correlation=1.0,
)
# Early stopping on the loss: the two runs differ by their gate-dropout draws, and the loss
# picks the same epoch in both, where the mean AUC of epochs 2 and 3 differs by less than those
# draws move it (selection by AUC, the default, is tested in test_train.py).
TRAIN = TrainConfig(small=True, epochs=3, seed=0, batch_size=2048, lr=5e-3, select_by="loss")


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated logs in KuaiRand's schema (what ``--data`` reads)."""
    out = tmp_path_factory.mktemp("sim")
    write_simulation(simulate(SIM), out)
    return out


@pytest.fixture(scope="module")
def frame(sim_dir: Path) -> pd.DataFrame:
    from model.training.data import load_impressions

    return load_impressions(sim_dir)


def _best_valid(history: list[dict[str, float]]) -> dict[str, float]:
    """The validation metrics of the epoch whose weights were kept (by ``TRAIN.select_by``)."""
    weights = TRAIN.loss_weights
    return min(history, key=lambda h: selection_value(h, weights, TRAIN.select_by))


def _manifest(registry: Path, version: str) -> dict[str, Any]:
    return dict(Registry(registry).bundle(version).manifest)


# -- real 2-rank runs --------------------------------------------------------------------------


def test_nproc_2_matches_single_process(tmp_path: Path, sim_dir: Path, frame: pd.DataFrame) -> None:
    registry = tmp_path / "registry"
    job = TrainJob(registry=registry, data=sim_dir, nproc=2, version="v-ddp", train=TRAIN)
    sigint = signal.getsignal(signal.SIGINT)
    assert run_train(job) == "v-ddp"
    assert signal.getsignal(signal.SIGINT) is sigint  # the elastic agent's handler is gone again

    reg = Registry(registry)
    assert reg.read_aliases().production == "v-ddp"  # rank 0 published and activated it
    bundle = reg.bundle("v-ddp")  # verifies the checksum and the schema
    out = run_session(
        make_session(bundle.onnx_path), random_encoded(bundle.schema, 7, np.random.default_rng(0))
    )
    assert all(out[t].shape == (7,) and np.isfinite(out[t]).all() for t in TASKS)
    manifest = bundle.manifest
    assert manifest["metrics"]["world_size"] == 2.0
    assert set(manifest["gate_diagnostics"]["tasks"]) == set(TASKS)

    # One thread, as each rank uses (the results equal fit's default two threads here, and a
    # 2-thread fit slows down many times over when the machine is busy).
    single = fit(frame, TRAIN, threads=1, verbose=False)
    ddp_valid = _best_valid(manifest["training"]["history"])
    one_valid = _best_valid(single.history)
    print(
        "valid click/like AUC: "
        f"1 process {one_valid['click_auc']:.4f}/{one_valid['like_auc']:.4f}, "
        f"2 ranks {ddp_valid['click_auc']:.4f}/{ddp_valid['like_auc']:.4f}"
    )
    # Not bit-identical: the initial weights, the mini-batches (rows of the same permutation) and
    # the gradient (each rank's weighted by its share of the global batch) are those of `fit`,
    # but the ranks draw their gate-dropout masks from other random streams and sum floats in
    # another order. With the dropout-free shared-bottom model the runs agree to ~1e-4 (next
    # test); the MMoE's like AUC moves by about +-0.005 with the dropout draws alone at this
    # scale. Both runs are deterministic per seed (pinned torch, fixed threads).
    # Compared epoch by epoch: which epoch is kept is a discrete choice between epochs whose
    # selection values can differ by less than the two runs do (with click weighing 4 in it,
    # one run kept epoch 2 and the other epoch 3 while every epoch agreed within 0.01).
    ddp_history, one_history = manifest["training"]["history"], single.history
    assert min(len(ddp_history), len(one_history)) >= 2
    for ddp_epoch, one_epoch in zip(ddp_history, one_history, strict=False):  # common epochs
        for metric in ("click_auc", "like_auc"):
            assert abs(ddp_epoch[metric] - one_epoch[metric]) <= 0.01, (ddp_epoch["epoch"], metric)
    assert ddp_valid["click_auc"] > 0.6 and ddp_valid["like_auc"] > 0.6  # it did learn


def test_torchrun_module_entry_equals_single_process(tmp_path: Path) -> None:
    """`torchrun -m model.cli train` with `vidrank train`'s options; rank 0 simulates."""
    registry, n, epochs = tmp_path / "registry", 20_000, 2
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(distributed.free_port()),
        "-m", "model.cli", "train",
        "--registry", str(registry), "--simulate", str(n), "--arch", "shared_bottom",
        "--small", "--epochs", str(epochs), "--batch-size", "1024", "--version", "v-torchrun",
    ]  # fmt: skip
    env = dict(os.environ, **distributed.loopback_env())
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "published v-torchrun" in done.stdout
    manifest = _manifest(registry, "v-torchrun")
    assert manifest["metrics"]["world_size"] == 2.0
    assert manifest["training"]["data"] == f"simulated:{n}"

    config = TrainConfig(arch="shared_bottom", small=True, epochs=epochs, batch_size=1024)
    single = fit(simulated_impressions(n, 0), config, threads=1, verbose=False)
    ddp_valid = _best_valid(manifest["training"]["history"])
    one_valid = _best_valid(single.history)
    # No random dropout in this model: only the order of float sums differs from `fit`.
    for metric in ("click_auc", "like_auc", "loss"):
        assert ddp_valid[metric] == pytest.approx(one_valid[metric], abs=2e-3), metric


def two_node_command(node: int, port: int, prepared: Path, registry: Path) -> list[str]:
    """Node ``node``'s command of the README's multi-node recipe, both nodes on loopback."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "vidrank",
        "-m", "model.cli", "train", "--data", str(prepared), "--registry", str(registry),
        "--small", "--epochs", "1", "--batch-size", "1024", "--version", "v-2nodes",
    ]  # fmt: skip


def test_two_nodes_on_loopback_stream_their_own_shards(tmp_path: Path) -> None:
    """``vidrank prepare`` once, then two torchrun process groups (``--nnodes 2``, one rank each,
    c10d rendezvous on 127.0.0.1) train on it: one bundle, from both ranks' shards."""
    logs, prepared_dir, registry = tmp_path / "logs", tmp_path / "prepared", tmp_path / "registry"
    write_simulation(simulate(dataclasses.replace(SIM, n_impressions=20_000)), logs)
    vidrank = [sys.executable, "-m", "model.cli"]
    prep = [*vidrank, "prepare", "--data", str(logs), "--out", str(prepared_dir), "--shards", "2"]
    done = subprocess.run(prep, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train 16,000" in done.stdout and "(stream)" in done.stdout

    env = dict(os.environ, **distributed.loopback_env())
    port = distributed.free_port()
    nodes = [
        subprocess.Popen(
            two_node_command(node, port, prepared_dir, registry),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [node.communicate(timeout=280)[0] for node in nodes]
    for node, out in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, out[-3000:]
    both = "\n".join(outputs)
    # c10d numbers the ranks in the order the nodes join: each streamed one shard, 8,000 rows.
    assert "rank 0/2: streams 8,000 training rows (part-00000-of-00002.parquet)" in both
    assert "rank 1/2: streams 8,000 training rows (part-00001-of-00002.parquet)" in both
    assert both.count("published v-2nodes") == 1
    reg = Registry(registry)
    assert [p.name for p in reg.versions_root.iterdir()] == ["v-2nodes"]
    assert reg.read_aliases().production == "v-2nodes"
    metrics = reg.bundle("v-2nodes").manifest["metrics"]
    assert metrics["world_size"] == 2.0 and metrics["rows_train"] == 16_000
    assert metrics["click_auc"] > 0.6 and metrics["like_auc"] > 0.6  # it did learn


# -- data preparation and batches (no processes) -----------------------------------------------


def test_prepare_frame_shards_the_training_split(tmp_path: Path) -> None:
    frame = simulated_impressions(3_001, 5)
    data = prepared.prepare_frame(frame, tmp_path / "prep", 3)
    train_df, valid_df, test_df = split_by_time(frame)
    assert data.rows == {"train": len(train_df), "valid": len(valid_df), "test": len(test_df)}
    assert prepared.is_prepared(tmp_path / "prep") and not prepared.is_prepared(tmp_path)

    shards = [read_shard(data.split_dir("train"), r, 3) for r in range(3)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    rows = np.concatenate([s[prepared.ROW_COLUMN].to_numpy() for s in shards])
    assert sorted(rows) == list(range(len(train_df)))  # each training row on exactly one rank
    for shard in shards:  # ... carrying its own values
        back = train_df.iloc[shard[prepared.ROW_COLUMN].to_numpy()].reset_index(drop=True)
        pd.testing.assert_frame_equal(shard.drop(columns=prepared.ROW_COLUMN), back)
    valid = read_shard(data.split_dir("valid"), 0, 1)
    pd.testing.assert_frame_equal(valid, valid_df)

    names = default_schema().names()
    assert data.basis.schema == default_schema().fit({n: train_df[n].to_numpy() for n in names})
    assert data.basis.label_means["watch_s"] == pytest.approx(float(train_df["watch_s"].mean()))
    assert prepared.PreparedData.load(data.root) == data


def test_prepared_data_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no prepared training data"):
        prepared.PreparedData.load(tmp_path)
    (tmp_path / prepared.META_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="unknown format"):
        prepared.PreparedData.load(tmp_path)
    with pytest.raises(ValueError, match="cannot fill"):
        prepared.prepare_frame(simulated_impressions(2_000, 0), tmp_path / "p", 4_000)


@pytest.mark.parametrize(("n", "batch", "world"), [(1_000, 64, 2), (997, 100, 3), (10, 4, 4)])
def test_ranks_split_the_single_process_batches(n: int, batch: int, world: int) -> None:
    owner = np.arange(n) % world  # round-robin, as prepare_frame shards the training split
    local_of = [np.where(owner == r, np.cumsum(owner == r) - 1, -1) for r in range(world)]
    per_rank = [
        list(distributed.global_batch_rows(local_of[r], batch, np.random.default_rng(3)))
        for r in range(world)
    ]
    perm = np.random.default_rng(3).permutation(n)  # what `fit`'s make_batches draws
    single = [perm[s : s + batch] for s in range(0, n, batch)]
    assert all(len(steps) == len(single) for steps in per_rank)  # same step count on every rank
    for k, rows in enumerate(single):
        global_rows = [np.flatnonzero(owner == r)[per_rank[r][k][0]] for r in range(world)]
        assert sorted(np.concatenate(global_rows)) == sorted(rows)
        assert sum(per_rank[r][k][1] for r in range(world)) == pytest.approx(1.0)


def test_launch_needs_two_ranks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nproc"):
        distributed.launch(TrainJob(registry=tmp_path, simulate=100, nproc=1), "v")
