"""Data-parallel training: torch DistributedDataParallel, gloo on CPU, over sharded Parquet.

Every rank runs ``fit``'s steps (model/training/fit.py): ``build`` (the same seeded initial
weights), ``EpochLoop.run`` with this rank's ``GlobalBatches`` and the ``Rank`` collective
(all-reduce of the training loss, rank 0's early-stopping decision broadcast), and on rank 0
``finalise`` and ``publish``. Two ways in, one ``run_rank`` per process:

``vidrank train --nproc N ...`` (``launch``)
    This process loads (or simulates) the data once, prepares it in a temp directory
    and starts N ranks on this machine with torch.distributed's elastic launcher
    (``elastic_launch``: static rendezvous on 127.0.0.1 at a free port, no restarts; a failing
    rank stops the others and the launcher raises). It returns rank 0's published version.
``torchrun --nproc_per_node N -m model.cli train ...`` (``run_under_torchrun``)
    ``vidrank train`` under torchrun (or another env:// launcher). Rank 0 prepares the data in
    a temp directory and broadcasts its path (one machine), or, when ``--data DIR`` already
    holds prepared data (e.g. on a shared volume, for several nodes), every rank reads it.

The data every rank reads is prepared once (model/training/prepared.py): the split and the
``Basis`` of the whole training split, the training split as one Parquet shard per rank.

The world size changes the speed, not the algorithm: every rank draws the permutation of the
whole training split that ``fit`` draws (same seed) and, at step k, trains on its own rows of
single-process mini-batch k - about ``batch_size / world`` of them - so the global batch, and
hence the learning rate, mean what they mean in one process. A DDP communication hook
(``weighted_allreduce``) weights each rank's gradient by its share of the global batch, which
makes the all-reduced gradient exactly the single-process one. One torch thread per rank.

Results match a single-process run with the same seed and data closely but not bit for bit:
floating-point sums run in another order (per-rank partial sums, then the all-reduce) and gate
dropout draws its masks per rank from other random streams.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel

from model.training.batches import Batch, EncodedSplit, StepShare
from model.training.config import TrainConfig, TrainJob
from model.training.data import read_shard
from model.training.fit import TrainResult, build, finalise
from model.training.loop import BatchSource, EpochLoop
from model.training.prepared import ROW_COLUMN, PreparedData, is_prepared, prepare_data
from model.training.publish import announce, publish
from model.training.stream import StreamedBatches

THREADS_PER_RANK = 1
BACKEND = "gloo"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCHER_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")  # the elastic agent's defaults


# -- process group -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rank:
    """This process's place in the process group; the epoch loop's ``Collective`` under DDP."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: float, weight: float) -> float:
        """The ``weight``-weighted mean of ``value`` over all ranks."""
        t = torch.tensor([value * weight, weight], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0] / t[1]) if t[1] > 0 else float("nan")

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        t = torch.tensor([int(flag)], dtype=torch.int64)
        dist.broadcast(t, src=0)
        return bool(t.item())


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
    """A TCP port free right now on ``host`` (the rendezvous port of a local launch)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def loopback_env() -> dict[str, str]:
    """Environment for ranks that all run on this machine: one thread, gloo on loopback."""
    env = {"OMP_NUM_THREADS": str(THREADS_PER_RANK)}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    loopback = next((n for n in names if n == "lo" or n.startswith("lo0")), None)
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback  # every rank is local: no DNS, no NIC needed
    return env


# -- one rank's batches and gradients ----------------------------------------------------------


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


@dataclass
class GlobalBatches:
    """This rank's ``BatchSource``: its rows of ``fit``'s batches, setting ``share`` per step."""

    split: EncodedSplit  # this rank's shard of the training split
    local_of: np.ndarray  # global training row -> index in ``split``, -1 elsewhere
    batch_size: int
    share: StepShare

    @property
    def rows(self) -> int:
        return len(self.split)

    @property
    def steps(self) -> int:
        return -(-len(self.local_of) // self.batch_size)

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        for mine, fraction in global_batch_rows(self.local_of, self.batch_size, rng):
            self.share.value = fraction
            if len(mine) == 0:  # none of this batch is here: still join the all-reduce, weight 0
                mine = np.zeros(1, dtype=np.int64)
            yield self.split.rows(mine)


def _local_index(frame: pd.DataFrame, n_global: int) -> np.ndarray:
    """Global training row -> index in this rank's shard frame, -1 for rows of other ranks."""
    local_of = np.full(n_global, -1, dtype=np.int64)
    local_of[frame[ROW_COLUMN].to_numpy()] = np.arange(len(frame), dtype=np.int64)
    return local_of


def _read_train(data: PreparedData, rank: Rank) -> EncodedSplit:
    """This rank's shard of the training split (data prepared from a frame)."""
    return data.basis.encode(read_shard(data.split_dir("train"), rank.rank, rank.world))


def _rank_batches(
    config: TrainConfig, data: PreparedData, rank: Rank, share: StepShare
) -> BatchSource:
    """This rank's batches: its rows of ``fit``'s batches (data prepared from a frame), or its
    shards streamed with ``batch_size / world`` rows per step (streamed data)."""
    if data.layout == "stream":
        rows, local = data.shard_rows(rank.world), -(-config.batch_size // rank.world)
        files = data.shards(rank.rank, rank.world)
        names = ", ".join(f.name for f in files)
        print(f"rank {rank.rank}/{rank.world}: streams {rows[rank.rank]:,} training rows ({names})")
        return StreamedBatches(files, data.basis, local, rows, rank.rank, share)
    train = _read_train(data, rank)
    local_of = _local_index(train.frame, data.rows["train"])
    return GlobalBatches(train, local_of, config.batch_size, share)


def _seed_dropout(seed: int, rank: Rank) -> None:
    """Gate dropout: rank 0 continues ``fit``'s torch stream, every other rank its own one."""
    if not rank.is_main:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank.rank]).generate_state(1)[0]))


# -- one rank's run ----------------------------------------------------------------------------


def fit_rank(
    config: TrainConfig,
    data: PreparedData,
    rank: Rank,
    verbose: bool = True,
    test_features: bool = False,
) -> TrainResult | None:
    """``fit``'s steps on this rank's shard with DDP; rank 0 returns the result, others None
    (its test frame with the feature columns only with ``test_features``, as ``fit_prepared``)."""
    torch.set_num_threads(THREADS_PER_RANK)
    if config.sparse is None:  # DDP all-reduces dense gradient buckets
        config = replace(config, sparse=False)
    model = build(config, data.basis)
    share = StepShare()
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(share, weighted_allreduce)
    _seed_dropout(config.seed, rank)
    batches = _rank_batches(config, data, rank, share)
    valid = data.held_out("valid") if rank.is_main else None
    loop = EpochLoop(model, config, collective=rank, module=ddp, verbose=verbose)
    epochs = loop.run(batches, valid)
    if not rank.is_main:
        return None
    assert valid is not None  # rank 0 reads it
    test = data.held_out("test", test_features)
    splits = (valid, test)
    return finalise(model, data.basis, epochs, splits, data.rows, config, world=rank.world)


def run_rank(job: TrainJob, version: str, prepared: Path | None) -> str:
    """One rank's whole job: rank 0 prepares the data (unless ``prepared``), all ranks fit,
    rank 0 publishes. Returns rank 0's version name on every rank.
    """
    with process_group() as rank:
        if job.nproc > 1 and job.nproc != rank.world:
            raise ValueError(f"--nproc {job.nproc} but the launcher started {rank.world} ranks")
        own_tmp = rank.is_main and prepared is None
        tmp = Path(tempfile.mkdtemp(prefix="vidrank-ddp-")) if own_tmp else None
        try:
            plan = _plan_on_main(job, version, prepared or tmp, rank)
            root, version, error = broadcast_object(plan)
            if error:
                raise RuntimeError(f"rank 0 could not prepare the training data: {error}")
            data = PreparedData.load(Path(root))
            result = fit_rank(job.train, data, rank, test_features=job.quantize)
            if result is not None:
                announce(result, publish(result, job, version), job, rank.world)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return version


def _plan_on_main(
    job: TrainJob, version: str, target: Path | None, rank: Rank
) -> tuple[str | None, str, str | None]:
    """(data root, version, error) as rank 0 decides; the other ranks get it broadcast.

    Under torchrun every rank named its own default version (a timestamp): rank 0's wins.
    """
    if not rank.is_main:
        return None, version, None
    assert target is not None
    if is_prepared(target):
        return str(target), version, None
    try:
        return str(prepare_data(job, target, rank.world).root), version, None
    except Exception as e:  # every rank must learn of it, or the others would wait forever
        return None, version, f"{type(e).__name__}: {e}"


# -- entry points ------------------------------------------------------------------------------


def run_distributed(job: TrainJob, version: str) -> str:
    """``run_train`` for ``--nproc > 1`` or under torchrun; returns the published version."""
    if job.train.sparse:  # TrainJob catches --nproc N; torchrun's ranks get here
        raise ValueError("--sparse trains in one process; use --dense under torchrun")
    if under_torchrun():
        return run_under_torchrun(job, version)
    return launch(job, version)


def run_under_torchrun(job: TrainJob, version: str) -> str:
    """This process is one rank started by torchrun; returns rank 0's version."""
    return run_rank(job, version, job.data if is_prepared(job.data) else None)


def launch(job: TrainJob, version: str) -> str:
    """Prepare the data once, then run ``job.nproc`` ranks on this machine (elastic launch)."""
    world = job.nproc
    if world < 2:
        raise ValueError("--nproc must be >= 2 for a distributed launch")
    with tempfile.TemporaryDirectory(prefix="vidrank-ddp-") as tmp:
        data = prepare_data(job, Path(tmp) / "data", world)
        port = free_port()
        print(f"training on {world} ranks (elastic launch, DDP/{BACKEND}, 127.0.0.1:{port})")
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=world,
            run_id=f"vidrank-train-{version}",
            rdzv_backend="static",  # one node, rank 0: no etcd, no c10d store to agree on
            rdzv_endpoint=f"127.0.0.1:{port}",
            rdzv_configs={"rank": 0},
            max_restarts=0,  # a failed rank fails the run; it is not retried
            local_addr="127.0.0.1",
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(tmp) / "logs")),
        )
        with _handlers_restored():
            outputs = elastic_launch(config, launched_rank)(job, version, str(data.root))
    return str(outputs[0])


def launched_rank(job: TrainJob, version: str, prepared: str) -> str:
    """The entry point of each rank of ``launch`` (a fresh, spawned process)."""
    for name, value in loopback_env().items():
        os.environ.setdefault(name, value)
    return run_rank(job, version, Path(prepared))


@contextmanager
def _handlers_restored() -> Iterator[None]:
    """Put back the signal handlers the elastic agent replaces (it never restores them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [getattr(signal, name) for name in LAUNCHER_SIGNALS if hasattr(signal, name)]
    saved = {sig: signal.getsignal(sig) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
