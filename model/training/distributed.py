"""Data-parallel training: torch DistributedDataParallel, gloo on CPU, over sharded Parquet.

Two ways in, one code path per rank:

``vidrank train --nproc N ...``
    This process is the launcher: it loads (or simulates) the data once, prepares it (below)
    in a temp directory and runs ``torchrun`` (``python -m torch.distributed.run``) with N ranks
    on 127.0.0.1 and a free MASTER_PORT; each rank runs
    ``python -m model.training.distributed SPEC``
    (options, version, data directory). torchrun stops every rank when one fails. The launcher
    returns once rank 0 has published.
``torchrun --nproc_per_node N -m model.training.train ...`` (the options of ``vidrank train``)
    ``model/training/train.py``'s ``__main__`` runs ``vidrank train``, whose ``run_train`` sees
    torchrun's environment and comes here. Rank 0 prepares the data in a temp directory and
    broadcasts its path (one machine), or, when ``--data DIR`` already holds prepared data
    (e.g. on a shared volume, for several nodes), every rank reads DIR as it is.

Prepared data (``prepare_data``) is the single-process trainer's own data step done once:
the chronological train/valid/test split and the feature schema fitted on the whole training
split, so every rank encodes with the same standardisation stats and rank 0 validates on the
same rows as ``fit``. Layout::

    meta.json                              schema, label means, row counts
    train/part-0000r-of-0000N.parquet      training split in N shards (data.write_shards)
    valid/part-00000-of-00001.parquet      validation split
    test/part-00000-of-00001.parquet       test split

Per rank: ``read_shard(train, rank, world)``, encode, wrap the model in DDP (same seeded
initial weights as ``fit``). The world size changes the speed, not the algorithm: every rank
draws the permutation of the whole training split that ``fit`` draws (same seed) and, at step k,
trains on its own rows of single-process mini-batch k - about ``batch_size / world`` of them, so
the global batch, and hence the learning rate, mean what they mean in one process. A DDP
communication hook (``weighted_allreduce``) weights each rank's gradient by its share of the
global batch, which makes the all-reduced gradient exactly the single-process one (DDP's plain
average would weight a rank's rows by how many happened to land on it). All ranks take the same
number of steps, as the all-reduce requires. Rank 0 validates after every epoch and broadcasts
the early-stopping decision; at the end it restores the best weights, evaluates on the test
split, exports, checks parity and publishes. One torch thread per rank.

Results match a single-process run with the same seed and data closely but not bit for bit: the
initial weights, the batches and the gradient formula are the same, but floating-point sums run
in another order (per-rank partial sums, then the all-reduce) and gate dropout draws its masks
per rank from other random streams; Adam amplifies such last-bit differences a little over
hundreds of steps.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.core.features import FeatureSchema, default_schema
from model.training.data import read_shard, split_by_time, write_shards
from model.training.evaluate import has_truth, ranking_eval
from model.training.mmoe import MMoEConfig, RankingModel, build_model, init_output_bias
from model.training.train import (
    Batch,
    EncodedSplit,
    TrainOptions,
    TrainResult,
    encode_split,
    evaluate_split,
    gate_diagnostics,
    load_frame,
    parse_loss_weights,
    predict,
    publish,
    summary_table,
    train_epoch,
)

META_FILE = "meta.json"
META_FORMAT = 1
SPLITS = ("train", "valid", "test")
ROW_COLUMN = "train_row"  # a training row's index in the whole (time-ordered) training split
THREADS_PER_RANK = 1
BACKEND = "gloo"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# -- prepared data -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedData:
    """A prepared data directory (see the module docstring) and its ``meta.json``."""

    root: Path
    schema: FeatureSchema
    label_means: dict[str, float]  # click, watch_s, like over the training split
    rows: dict[str, int]
    n_shards: int

    @classmethod
    def load(cls, root: Path) -> PreparedData:
        """Read ``root/meta.json``; raises ValueError when it is missing or of another format."""
        try:
            meta = json.loads((root / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{root} holds no prepared training data: {e}") from e
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{root / META_FILE}: unknown format {meta.get('format')!r}")
        return cls(
            root=root,
            schema=FeatureSchema.from_dict(meta["schema"]),
            label_means={k: float(v) for k, v in meta["label_means"].items()},
            rows={k: int(v) for k, v in meta["rows"].items()},
            n_shards=int(meta["n_shards"]),
        )

    def split_dir(self, split: str) -> Path:
        return self.root / split


def is_prepared(path: Path | None) -> bool:
    """Whether ``path`` is a prepared data directory (it holds ``meta.json``)."""
    return path is not None and (Path(path) / META_FILE).is_file()


def prepare_frame(frame: pd.DataFrame, out_dir: Path, n_shards: int) -> PreparedData:
    """Split ``frame`` by time, fit the schema on train and write shards + ``meta.json``."""
    train_df, valid_df, test_df = split_by_time(frame)
    if min(len(train_df), len(valid_df), len(test_df)) < 1:
        raise ValueError(f"{len(frame)} impressions are too few to split into train/valid/test")
    if len(train_df) < n_shards:
        raise ValueError(f"{len(train_df)} training rows cannot fill {n_shards} shards")
    names = default_schema().names()
    schema = default_schema().fit({n: train_df[n].to_numpy() for n in names})
    train_df = train_df.assign(**{ROW_COLUMN: np.arange(len(train_df), dtype=np.int64)})
    for split, df in zip(SPLITS, (train_df, valid_df, test_df), strict=True):
        write_shards(df, out_dir / split, n_shards if split == "train" else 1)
    meta = {
        "format": META_FORMAT,
        "n_shards": n_shards,
        "rows": {"train": len(train_df), "valid": len(valid_df), "test": len(test_df)},
        "label_means": {c: float(train_df[c].mean()) for c in ("click", "watch_s", "like")},
        "schema": schema.to_dict(),
    }
    tmp = out_dir / f".{META_FILE}.tmp"  # meta.json last, whole: it marks the data complete
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir / META_FILE)
    return PreparedData.load(out_dir)


def prepare_data(opts: TrainOptions, out_dir: Path, n_shards: int) -> PreparedData:
    """The prepared data for ``opts``: ``--data`` as is when prepared, else loaded and written."""
    if is_prepared(opts.data):
        assert opts.data is not None
        return PreparedData.load(Path(opts.data))
    frame = load_frame(opts)
    print(f"{len(frame):,} impressions; {n_shards} training shards in {out_dir}")
    return prepare_frame(frame, out_dir, n_shards)


# -- process group -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rank:
    """This process's place in the process group."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


@contextmanager
def process_group() -> Iterator[Rank]:
    """Join the gloo process group described by the environment (env://); leave it at exit."""
    dist.init_process_group(BACKEND)
    try:
        yield Rank(dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` as held by rank ``src``, on every rank (picklable values only)."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (MASTER_PORT for a local launch)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _loopback_interface() -> str | None:
    """Name of the loopback interface (gloo binds to it for a one-machine launch)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n == "lo" or n.startswith("lo0")), None)


# -- training on one rank ----------------------------------------------------------------------


def _all_mean(value: float, weight: float) -> float:
    """The ``weight``-weighted mean of ``value`` over all ranks."""
    t = torch.tensor([value * weight, weight], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


def _broadcast_flag(flag: bool) -> bool:
    t = torch.tensor([int(flag)], dtype=torch.int64)
    dist.broadcast(t, src=0)
    return bool(t.item())


@dataclass
class StepShare:
    """This rank's share of the current global batch (rows here / rows in the batch)."""

    value: float = 1.0


def weighted_allreduce(
    share: StepShare, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sum over ranks of (share x this rank's mean-loss gradient).

    That sum is the gradient of the mean loss over the whole global batch however its rows fell
    on the ranks - exactly the single-process gradient. DDP's default hook (the plain average of
    the ranks' gradients) equals it only when every rank holds the same number of rows.
    """
    buffer = bucket.buffer()
    buffer.mul_(share.value)
    future = dist.all_reduce(buffer, async_op=True).get_future()
    return future.then(lambda f: f.value()[0])


# DDP checks a hook's annotations as objects; ``from __future__ import annotations`` made them
# strings, so resolve them once.
weighted_allreduce.__annotations__ = typing.get_type_hints(weighted_allreduce)


def global_batch_rows(
    local_of: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, float]]:
    """(this rank's rows, its share) of each mini-batch of one permutation of the *global* split.

    Every rank draws the permutation ``fit`` draws (same seed and length), so step k covers the
    very rows of single-process step k; each rank keeps those of its shard (about
    ``batch_size / world``). ``local_of`` maps a global training row to its index in this rank's
    shard, -1 for another rank's row. The share is rows here / rows in the global batch.
    """
    perm = rng.permutation(len(local_of))
    for start in range(0, len(perm), batch_size):
        rows = perm[start : start + batch_size]
        mine = local_of[rows]
        mine = mine[mine >= 0]
        yield mine, len(mine) / len(rows)


def global_batches(
    split: EncodedSplit,
    local_of: np.ndarray,
    batch_size: int,
    rng: np.random.Generator,
    share: StepShare,
) -> Iterator[Batch]:
    """The tensors of ``global_batch_rows``, setting ``share`` for ``weighted_allreduce``."""
    for mine, fraction in global_batch_rows(local_of, batch_size, rng):
        share.value = fraction
        if len(mine) == 0:  # none of this batch is here: still join the all-reduce, weight 0
            mine = np.zeros(1, dtype=np.int64)
        idx = torch.from_numpy(mine)
        yield (
            {k: v[idx] for k, v in split.inputs.items()},
            {k: v[idx] for k, v in split.labels.items()},
        )


def _local_index(frame: pd.DataFrame, n_global: int) -> np.ndarray:
    """Global training row -> index in this rank's shard frame, -1 for rows of other ranks."""
    local_of = np.full(n_global, -1, dtype=np.int64)
    local_of[frame[ROW_COLUMN].to_numpy()] = np.arange(len(frame), dtype=np.int64)
    return local_of


def _config(opts: TrainOptions, data: PreparedData) -> MMoEConfig:
    """The model config ``fit`` would choose for this training split."""
    watch_mean = data.label_means["watch_s"]
    base = MMoEConfig.small() if opts.small else MMoEConfig()
    return replace(base, arch=opts.arch, watch_scale=watch_mean if watch_mean > 0 else 1.0)


def _build(opts: TrainOptions, data: PreparedData, config: MMoEConfig) -> RankingModel:
    """The initial model: seeded exactly as in ``fit``, so every rank starts from one init."""
    torch.manual_seed(opts.seed)
    model = build_model(config, data.schema)
    means = data.label_means
    init_output_bias(
        model,
        {"click": means["click"], "watch_time": means["watch_s"], "like": means["like"]},
    )
    return model


def _read_split(data: PreparedData, split: str, config: MMoEConfig, rank: Rank) -> EncodedSplit:
    """This rank's shard of the training split, or the whole of valid/test."""
    part = rank if split == "train" else Rank(0, 1)
    frame = read_shard(data.split_dir(split), part.rank, part.world)
    return encode_split(data.schema, frame, config.watch_scale)


def _seed_dropout(seed: int, rank: Rank) -> None:
    """Gate dropout: rank 0 continues ``fit``'s torch stream, every other rank its own one."""
    if not rank.is_main:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank.rank]).generate_state(1)[0]))


@dataclass
class _Progress:
    """Rank 0's view of the run: per-epoch validation metrics and the best weights so far."""

    history: list[dict[str, float]]
    best_loss: float
    best_state: dict[str, torch.Tensor]

    def record(self, model: RankingModel, metrics: dict[str, float]) -> bool:
        """Add an epoch's metrics; keep its weights if it improved (True) - patience 1."""
        self.history.append(metrics)
        if metrics["loss"] >= self.best_loss:
            return False
        self.best_loss, self.best_state = metrics["loss"], copy.deepcopy(model.state_dict())
        return True


def fit_rank(
    opts: TrainOptions, data: PreparedData, rank: Rank, verbose: bool = True
) -> TrainResult | None:
    """Train on this rank's shard with DDP; rank 0 returns the ``TrainResult``, others None."""
    if opts.epochs < 1 or opts.batch_size < 1 or not opts.lr > 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    torch.set_num_threads(THREADS_PER_RANK)
    config = _config(opts, data)
    weights = parse_loss_weights(opts.loss_weights, config.tasks)
    model = _build(opts, data, config)
    share = StepShare()
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(share, weighted_allreduce)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=opts.lr)
    rng = np.random.default_rng(opts.seed)  # as in ``fit``: the same permutation on every rank
    _seed_dropout(opts.seed, rank)
    train = _read_split(data, "train", config, rank)
    local_of = _local_index(train.frame, data.rows["train"])
    valid = _read_split(data, "valid", config, rank) if rank.is_main else None
    steps = math.ceil(data.rows["train"] / opts.batch_size)
    progress = _Progress([], math.inf, copy.deepcopy(model.state_dict()))
    started = time.perf_counter()
    for epoch in range(1, opts.epochs + 1):
        t0 = time.perf_counter()
        batches = global_batches(train, local_of, opts.batch_size, rng, share)
        local = train_epoch(ddp, batches, optimizer, weights, steps, f"epoch {epoch}")
        train_loss = _all_mean(local, len(train))
        improved = False
        if valid is not None:
            metrics = evaluate_split(predict(model, valid), valid, weights)
            m = {"epoch": epoch, "train_loss": train_loss, **metrics}
            improved = progress.record(model, m)
            if verbose:
                print(_epoch_line(epoch, rank.world, m, time.perf_counter() - t0))
        if not _broadcast_flag(improved):  # rank 0 decides early stopping, as ``fit`` does
            break
    if valid is None:
        return None
    model.load_state_dict(progress.best_state)
    test = _read_split(data, "test", config, rank)
    return _result(model, data, config, valid, test, weights, progress, rank, started)


def _epoch_line(epoch: int, world: int, m: dict[str, float], secs: float) -> str:
    return (
        f"epoch {epoch} ({world} ranks): train loss {m['train_loss']:.4f} | "
        f"valid loss {m['loss']:.4f} "
        f"click AUC {m['click_auc']:.4f} like AUC {m['like_auc']:.4f} "
        f"watch RMSE {m['watch_rmse']:.2f}s XAUC {m['watch_xauc']:.4f} | {secs:.1f}s"
    )


def _result(
    model: RankingModel,
    data: PreparedData,
    config: MMoEConfig,
    valid: EncodedSplit,
    test: EncodedSplit,
    weights: dict[str, float],
    progress: _Progress,
    rank: Rank,
    started: float,
) -> TrainResult:
    """Rank 0's ``TrainResult``: test metrics and gate diagnostics of the best weights."""
    train_time = time.perf_counter() - started
    gates = predict(model, valid, return_gates=True).get("gates")
    test_preds = predict(model, test)
    metrics = evaluate_split(test_preds, test, weights)
    if has_truth(test.frame):
        metrics.update(ranking_eval(test.frame, test_preds))
    metrics.update(
        train_time_s=round(train_time, 2),
        rows_train=float(data.rows["train"]),
        rows_valid=float(len(valid)),
        rows_test=float(len(test)),
        epochs=float(len(progress.history)),
        best_valid_loss=progress.best_loss,
        world_size=float(rank.world),
    )
    return TrainResult(
        model=model,
        schema=data.schema,
        config=config,
        test=test.frame,
        test_preds={t: test_preds[t] for t in config.tasks},
        metrics=metrics,
        gate_diagnostics=None if gates is None else gate_diagnostics(gates, config.tasks),
        history=progress.history,
    )


def train_and_publish(opts: TrainOptions, version: str, data: PreparedData, rank: Rank) -> None:
    """One rank's whole job: fit; rank 0 then exports, checks parity and publishes."""
    result = fit_rank(opts, data, rank)
    if result is None:
        return
    published = publish(result, opts, version)
    print(summary_table(result.metrics))
    print(f"published {published} to {opts.registry} ({rank.world} ranks)")


# -- entry points ------------------------------------------------------------------------------


def run_distributed(opts: TrainOptions, version: str) -> str:
    """``run_train`` for ``--nproc > 1`` or under torchrun; returns the published version."""
    if under_torchrun():
        return torchrun_worker(opts, version)
    return launch(opts, version)


def launch(opts: TrainOptions, version: str) -> str:
    """Prepare the data once, then run ``opts.nproc`` ranks with torchrun on 127.0.0.1."""
    world = opts.nproc
    if world < 2:
        raise ValueError("--nproc must be >= 2 for a distributed launch")
    with tempfile.TemporaryDirectory(prefix="vidrank-ddp-") as tmp:
        data = prepare_data(opts, Path(tmp) / "data", world)
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps(_spec(opts, version, data.root), indent=2))
        port = free_port()
        print(f"training on {world} ranks (torchrun, DDP/{BACKEND}, 127.0.0.1:{port})")
        _run(torchrun_command(world, port, spec), _launch_env())
    return version


def torchrun_command(world: int, port: int, spec: Path) -> list[str]:
    """One-machine torchrun of ``world`` ranks of this module's ``__main__`` (on ``spec``)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(world),
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "model.training.distributed", str(spec),
    ]  # fmt: skip


def _launch_env() -> dict[str, str]:
    """The ranks' environment: one thread each, gloo on the loopback interface."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS_PER_RANK))
    loopback = _loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback  # every rank is local: no DNS, no NIC needed
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    """Run torchrun to completion; stop it (and so its ranks) if we are interrupted."""
    proc = subprocess.Popen(cmd, env=env)
    try:
        code = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun forwards SIGTERM to its ranks
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    if code:
        raise RuntimeError(f"distributed training failed: torchrun exited with code {code}")


def _spec(opts: TrainOptions, version: str, root: Path) -> dict[str, Any]:
    """What the launcher hands its ranks: options, version and the prepared data."""
    options = {
        **asdict(opts),
        "registry": str(opts.registry),
        "data": None if opts.data is None else str(opts.data),
    }
    return {"options": options, "version": version, "prepared": str(root)}


def _from_spec(spec: dict[str, Any]) -> tuple[TrainOptions, str, Path]:
    d = spec["options"]
    opts = TrainOptions(
        **{
            **d,
            "registry": Path(d["registry"]),
            "data": None if d["data"] is None else Path(d["data"]),
        }
    )
    return opts, str(spec["version"]), Path(spec["prepared"])


def torchrun_worker(opts: TrainOptions, version: str, prepared: Path | None = None) -> str:
    """One rank under torchrun: rank 0 prepares the data (unless ``prepared``), all train.

    Returns rank 0's version name (only rank 0 publishes).
    """
    with process_group() as rank:
        if opts.nproc > 1 and opts.nproc != rank.world:
            raise ValueError(f"--nproc {opts.nproc} but torchrun started {rank.world} ranks")
        own_tmp = rank.is_main and prepared is None
        tmp = Path(tempfile.mkdtemp(prefix="vidrank-ddp-")) if own_tmp else None
        try:
            plan = _plan_on_main(opts, version, prepared or tmp, rank)
            root, version, error = broadcast_object(plan)
            if error:
                raise RuntimeError(f"rank 0 could not prepare the training data: {error}")
            train_and_publish(opts, version, PreparedData.load(Path(root)), rank)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return version


def _plan_on_main(
    opts: TrainOptions, version: str, target: Path | None, rank: Rank
) -> tuple[str | None, str, str | None]:
    """(data root, version, error) as rank 0 decides; the other ranks get it broadcast."""
    if not rank.is_main:
        return None, version, None
    assert target is not None
    if is_prepared(target):
        return str(target), version, None
    try:
        return str(prepare_data(opts, target, rank.world).root), version, None
    except Exception as e:  # every rank must learn of it, or the others would wait forever
        return None, version, f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> None:
    """``python -m model.training.distributed SPEC``: one rank of a ``launch`` (torchrun)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not under_torchrun():
        raise SystemExit("usage (under torchrun): python -m model.training.distributed SPEC.json")
    opts, version, prepared = _from_spec(json.loads(Path(args[0]).read_text()))
    torchrun_worker(opts, version, prepared)


if __name__ == "__main__":
    main()
