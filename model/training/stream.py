"""Training logs larger than memory: Parquet logs split, fitted and shuffled in bounded chunks.

``write_splits`` turns a ``--data`` directory of Parquet logs into the prepared layout of
model/training/prepared.py without ever holding the log, in two passes:

1. *time pass* - only the time columns. ``split_by_time`` sorts the log stably by time_ms, which
   is sorting by the key (time_ms, position in the log); the keys at the split's row counts
   (``split_ends``) are its boundaries, so every row lands in the split it lands in today.
   Memory: 8 bytes per impression, for this pass only (240 MB at 30M).
2. *split pass* - chunks of ``READ_ROWS`` log rows joined with the user and video tables (which
   are per entity and stay in memory) and derived by ``load_impressions``' own code
   (``impression_frame``). Training rows update the schema's moments and the label means and go
   round-robin into N Parquet shards, in row groups of ``ROW_GROUP_ROWS``; validation and test
   rows are kept, then time-ordered and written (the held-out 20 % is scored whole anyway).

``StreamedBatches`` is then the epoch loop's ``BatchSource``: every epoch it reads the shards'
row groups in a fresh random order, shuffles ``WINDOW_ROWS`` rows at a time (with the rows left
over from the window before) and encodes each window with the schema, so the peak memory is that
of a window, not of the log.

``--stream auto`` (the default) streams Parquet logs of ``STREAM_MIN_ROWS`` impressions or more;
``on`` always (Parquet only), ``off`` never (the whole log in memory, as for CSV logs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from model.core.features import FeatureSchema, default_schema
from model.core.tasks import LABEL_COLUMNS, PROBABILITY_TASKS
from model.training.batches import Batch, StepShare
from model.training.data import (
    LOG_COLUMNS,
    EntityTables,
    check_log,
    impression_frame,
    impression_times,
    log_paths,
    split_ends,
    write_shards,
)
from model.training.fit import SPLITS, Basis, check_outcomes, outcomes

STREAM_MIN_ROWS = 2_000_000  # --stream auto: logs this long are streamed (~2 GB in memory)
READ_ROWS = 65_536  # log rows per chunk of the split pass
ROW_GROUP_ROWS = 32_768  # rows per row group of a training shard: the unit of the epoch shuffle
WINDOW_ROWS = 1 << 19  # rows shuffled together in an epoch (about 300 MB with their encoding)
TIME_COLUMNS = ("time_ms", "date", "hourmin")
LOG_ROW = "log_row"  # a row's position in the log (log_paths' order): ties in time break by it


# -- which runs stream, and reading the log ------------------------------------------------------


def streams(data: Path | None, mode: str = "auto") -> bool:
    """Whether logs in ``data`` are streamed under ``--stream mode`` (module docstring)."""
    if data is None or mode == "off":
        return False
    paths = log_paths(Path(data))
    parquet = all(p.suffix == ".parquet" for p in paths)
    if mode == "on" and not parquet:
        names = [p.name for p in paths if p.suffix != ".parquet"]
        raise ValueError(f"--stream on reads Parquet logs; {names} are not Parquet")
    return parquet and (mode == "on" or log_rows(paths) >= STREAM_MIN_ROWS)


def log_rows(paths: Iterable[Path]) -> int:
    """Rows of Parquet log files, from their footers (nothing else is read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def parquet_logs(data_dir: Path) -> list[Path]:
    """The log files of ``data_dir`` (``log_paths``), checked to be Parquet with the needed
    columns; raises ValueError naming the file otherwise."""
    if not Path(data_dir).is_dir():
        raise ValueError(f"data directory {data_dir} does not exist")
    paths = log_paths(Path(data_dir))
    for path in paths:
        if path.suffix != ".parquet":
            raise ValueError(f"{path.name}: streaming reads Parquet logs only")
        check_log(pd.DataFrame(columns=pq.read_schema(path).names), path)
    return paths


def read_log(paths: Sequence[Path], columns: Iterable[str]) -> Iterator[tuple[int, pd.DataFrame]]:
    """(log row of the chunk's first row, chunk) of at most ``READ_ROWS`` rows, in log order."""
    wanted, start = set(columns), 0
    for path in paths:
        file = pq.ParquetFile(path)
        names = [c for c in file.schema_arrow.names if c in wanted]
        for batch in file.iter_batches(batch_size=READ_ROWS, columns=names):
            yield start, batch.to_pandas()
            start += batch.num_rows


# -- the chronological split without sorting the log --------------------------------------------


def _key_at(time_ms: np.ndarray, k: int) -> tuple[int, int]:
    """The k-th smallest (time_ms, log row) key (0-based); past the end when k = len."""
    if k >= len(time_ms):
        return int(np.iinfo(np.int64).max), len(time_ms)
    t = np.partition(time_ms, k)[k]
    earlier = int(np.count_nonzero(time_ms < t))
    return int(t), int(np.flatnonzero(time_ms == t)[k - earlier])


def _before(time_ms: np.ndarray, log_row: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    t, row = key
    return (time_ms < t) | ((time_ms == t) & (log_row < row))


@dataclass(frozen=True)
class SplitBounds:
    """Where ``split_by_time`` puts its boundaries, as (time_ms, log row) keys."""

    valid_from: tuple[int, int]  # the key of the first validation row
    test_from: tuple[int, int]  # the key of the first test row

    @classmethod
    def of(cls, time_ms: np.ndarray) -> SplitBounds:
        """The bounds of a log whose rows have these times, in log order."""
        train_end, valid_end = split_ends(len(time_ms))
        return cls(_key_at(time_ms, train_end), _key_at(time_ms, valid_end))

    def assign(self, time_ms: np.ndarray, log_row: np.ndarray) -> np.ndarray:
        """Each row's split: 0 train, 1 valid, 2 test (an index into ``SPLITS``)."""
        before_valid = _before(time_ms, log_row, self.valid_from)
        before_test = _before(time_ms, log_row, self.test_from)
        return (2 - before_valid.astype(np.int8) - before_test.astype(np.int8)).astype(np.int8)


def log_bounds(paths: Sequence[Path]) -> SplitBounds:
    """Pass 1: the split's bounds from the log's time columns alone."""
    times = [impression_times(chunk) for _, chunk in read_log(paths, TIME_COLUMNS)]
    return SplitBounds.of(np.concatenate(times) if times else np.zeros(0, np.int64))


# -- what the training split fixes, accumulated chunk by chunk ----------------------------------


@dataclass
class Moments:
    """Running count, mean and sum of squared deviations of the schema's numeric features (after
    their transform) and the label sums over the training rows; merged per chunk (Chan et al.)
    so that no chunk's values need to be kept."""

    schema: FeatureSchema = field(default_factory=default_schema)
    n: int = 0
    mean: dict[str, float] = field(default_factory=dict)
    m2: dict[str, float] = field(default_factory=dict)
    label_sums: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, set[int]] = field(default_factory=dict)  # probability task -> labels seen

    def add(self, frame: pd.DataFrame) -> None:
        k = len(frame)
        if k == 0:
            return
        total = self.n + k
        for f in self.schema.features:
            if f.kind != "numeric" or f.name not in frame.columns:
                continue
            x = self.schema.numeric_values(f.name, frame[f.name].to_numpy())
            m, q = float(x.mean()), float(np.square(x - x.mean()).sum())
            delta = m - self.mean.get(f.name, 0.0)
            self.mean[f.name] = self.mean.get(f.name, 0.0) + delta * k / total
            self.m2[f.name] = self.m2.get(f.name, 0.0) + q + delta * delta * self.n * k / total
        for col in LABEL_COLUMNS.values():
            self.label_sums[col] = self.label_sums.get(col, 0.0) + float(frame[col].sum())
        for task in PROBABILITY_TASKS:
            seen = frame[LABEL_COLUMNS[task]].unique().tolist()
            self.outcomes.setdefault(task, set()).update(int(v) for v in seen)
        self.n = total

    def basis(self) -> Basis:
        """The fitted schema and the label means (as ``split_frame`` takes them)."""
        stds = {name: math.sqrt(self.m2[name] / self.n) for name in self.mean}
        schema = self.schema.with_moments({k: (v, stds[k]) for k, v in self.mean.items()})
        return Basis(schema, {k: v / self.n for k, v in self.label_sums.items()})


# -- writing the splits -----------------------------------------------------------------------


class ShardWriter:
    """Rows round-robin into ``n`` Parquet shards (``data.write_shards``' names), written in row
    groups of ``ROW_GROUP_ROWS``; each file appears under its name only when closed whole."""

    def __init__(self, out_dir: Path, n: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths = [out_dir / f"part-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
        self.pending: list[list[pd.DataFrame]] = [[] for _ in range(n)]
        self.writers: list[pq.ParquetWriter | None] = [None] * n
        self.schema: pa.Schema | None = None
        self.rows = 0

    def add(self, frame: pd.DataFrame) -> None:
        shard = (self.rows + np.arange(len(frame))) % len(self.paths)
        self.rows += len(frame)
        for i, pending in enumerate(self.pending):
            pending.append(frame[shard == i])
            if sum(len(p) for p in pending) >= ROW_GROUP_ROWS:
                self._flush(i)

    def _flush(self, i: int) -> None:
        frame = pd.concat(self.pending[i], ignore_index=True)
        self.pending[i] = []
        table = pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False)
        self.schema = table.schema
        if self.writers[i] is None:
            self.writers[i] = pq.ParquetWriter(self._tmp(i), table.schema)
        writer = self.writers[i]
        assert writer is not None
        writer.write_table(table, row_group_size=ROW_GROUP_ROWS)

    def _tmp(self, i: int) -> Path:
        return self.paths[i].with_name(f".{self.paths[i].name}.tmp")

    def close(self) -> list[Path]:
        """Write what is pending, close every shard and give it its name."""
        for i in range(len(self.paths)):
            if self.pending[i] or self.writers[i] is None:
                self._flush(i)
            writer = self.writers[i]
            assert writer is not None
            writer.close()
            self._tmp(i).replace(self.paths[i])
        return self.paths


@dataclass
class HeldOut:
    """The validation and test rows met so far, with their log rows (for the time order)."""

    parts: dict[int, list[pd.DataFrame]] = field(default_factory=lambda: {1: [], 2: []})

    def add(self, frame: pd.DataFrame, split: np.ndarray, log_row: np.ndarray) -> None:
        for s, parts in self.parts.items():
            mine = split == s
            if mine.any():
                parts.append(frame[mine].assign(**{LOG_ROW: log_row[mine]}))

    def pop(self, s: int, like: pd.DataFrame) -> pd.DataFrame:
        """Split ``s``'s rows in ``split_by_time``'s order (time, then log row); its parts are
        let go, so a split costs twice its size at most while it is sorted."""
        parts = self.parts.pop(s)
        if not parts:
            return like.iloc[:0].reset_index(drop=True)
        frame = pd.concat(parts, ignore_index=True)
        del parts
        order = np.lexsort((frame[LOG_ROW].to_numpy(), frame["time_ms"].to_numpy()))
        return frame.iloc[order].drop(columns=LOG_ROW).reset_index(drop=True)


def write_splits(data_dir: Path, out_dir: Path, n_shards: int) -> tuple[Basis, dict[str, int]]:
    """Passes 1 and 2 (module docstring): ``out_dir``/train in ``n_shards`` shards, valid and
    test in one each; returns the ``Basis`` and the rows per split. ``check_outcomes`` runs
    before the training shards are closed (``TooLittleData`` for a log that cannot train; the
    directory then lacks the meta.json that marks it complete)."""
    paths = parquet_logs(data_dir)
    tables = EntityTables.read(Path(data_dir))
    bounds = log_bounds(paths)
    moments, held = Moments(), HeldOut()
    writer = ShardWriter(out_dir / "train", n_shards)
    like = pd.DataFrame()
    for start, log in read_log(paths, LOG_COLUMNS):
        frame = impression_frame(log, tables)
        log_row = start + np.arange(len(frame), dtype=np.int64)
        split = bounds.assign(frame["time_ms"].to_numpy(), log_row)
        train = frame[split == 0]
        moments.add(train)
        writer.add(train)
        held.add(frame, split, log_row)
        like = frame.iloc[:0]
    seen = {"train": (moments.n, moments.outcomes)}
    for s, name in enumerate(SPLITS[1:], start=1):  # one held-out split in memory at a time
        held_frame = held.pop(s, like)
        seen[name] = outcomes(held_frame)
        write_shards(held_frame, out_dir / name, 1)
        del held_frame
    check_outcomes(seen)
    if moments.n < n_shards:
        raise ValueError(f"{moments.n} training rows cannot fill {n_shards} shards")
    writer.close()
    return moments.basis(), {name: seen[name][0] for name in SPLITS}


# -- the epochs -------------------------------------------------------------------------------


@dataclass
class StreamedBatches:
    """The epoch loop's ``BatchSource`` over training shards on disk (module docstring).

    ``peer_rows`` holds every rank's training rows (one entry in one process): all ranks run the
    steps of the longest, a rank past its rows joins with a weightless row, and ``share`` (under
    DDP) is set per step to this rank's rows over the step's rows on all ranks.
    """

    files: list[Path]
    basis: Basis
    batch_size: int  # this rank's rows per step
    peer_rows: tuple[int, ...]
    rank: int = 0
    share: StepShare | None = None
    window: int = WINDOW_ROWS

    @property
    def rows(self) -> int:
        return self.peer_rows[self.rank]

    @property
    def steps(self) -> int:
        return max(-(-rows // self.batch_size) for rows in self.peer_rows)

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        step, split = 0, None
        for window in self.windows(rng):
            split = self.basis.encode(window)
            for start in range(0, len(split), self.batch_size):
                self._set_share(step)
                step += 1
                yield split.rows(np.arange(start, min(start + self.batch_size, len(split))))
        while step < self.steps:  # another rank still has rows: join its all-reduce, weight 0
            assert split is not None  # every rank holds rows (ShardWriter fills every shard)
            self._set_share(step)
            step += 1
            yield split.rows(np.zeros(1, dtype=np.int64))

    def _set_share(self, step: int) -> None:
        if self.share is None:
            return
        done = step * self.batch_size
        sizes = [min(self.batch_size, max(rows - done, 0)) for rows in self.peer_rows]
        self.share.value = sizes[self.rank] / sum(sizes)

    def windows(self, rng: np.random.Generator) -> Iterator[pd.DataFrame]:
        """Shuffled frames of whole batches (the last one may end in a partial batch): the
        shards' row groups in a random order, ``window`` rows at a time, each window permuted
        together with the rows the previous one left over."""
        files = [pq.ParquetFile(path) for path in self.files]
        units = [(f, g) for f, file in enumerate(files) for g in range(file.num_row_groups)]
        carry: list[pd.DataFrame] = []
        rows = 0
        for unit in rng.permutation(len(units)):
            f, g = units[unit]
            carry.append(files[f].read_row_group(g).to_pandas())
            rows += len(carry[-1])
            if rows >= self.window:
                frame = _permuted(carry, rng)
                cut = len(frame) // self.batch_size * self.batch_size
                yield frame.iloc[:cut]
                carry, rows = [frame.iloc[cut:]], len(frame) - cut
        if rows:
            yield _permuted(carry, rng)


def _permuted(frames: list[pd.DataFrame], rng: np.random.Generator) -> pd.DataFrame:
    frame = pd.concat(frames, ignore_index=True)
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
