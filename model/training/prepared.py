"""Training data prepared once for the DDP ranks: ``fit``'s split on disk, sharded per rank.

``prepare_frame`` is ``fit``'s ``split_frame`` done once: the chronological train/valid/test
split and the ``Basis`` (schema and label means) of the whole training split, so every rank
encodes with the same statistics and rank 0 validates on the rows ``fit`` does. Layout::

    meta.json                              schema, label means, row counts (written last)
    train/part-0000r-of-0000N.parquet      training split in N shards (data.write_shards)
    valid/part-00000-of-00001.parquet      validation split
    test/part-00000-of-00001.parquet       test split

Two layouts. Prepared from a frame in memory (``prepare_frame``; ``layout`` "frame"), each
training row carries ``ROW_COLUMN``, its index in the whole training split, so a rank can find its
rows of the single-process batches. Streamed from Parquet logs (``stream.write_splits``;
``layout`` "stream"), the shards are written chunk by chunk in row groups and every rank (or the
one process) streams its own shards (``stream.StreamedBatches``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from model.core.features import FeatureSchema
from model.training.batches import EncodedSplit
from model.training.config import TrainConfig, TrainJob
from model.training.data import list_shards, load_impressions, log_paths, write_shards
from model.training.fit import (
    EVAL_COLUMNS,
    SPLITS,
    TRAIN_THREADS,
    Basis,
    TrainResult,
    split_frame,
    train_and_finalise,
)
from model.training.sources import load_frame
from model.training.stream import StreamedBatches, streams, write_splits

HELD_OUT_CHUNK = 1 << 18  # held-out rows read and encoded at a time
META_FILE = "meta.json"
META_FORMAT = 1
ROW_COLUMN = "train_row"  # a training row's index in the whole (time-ordered) training split


@dataclass(frozen=True)
class PreparedData:
    """A prepared data directory (see the module docstring) and its ``meta.json``."""

    root: Path
    basis: Basis
    rows: dict[str, int]
    n_shards: int
    layout: str = "frame"  # "frame" (prepare_frame) or "stream" (stream.write_splits)

    @classmethod
    def load(cls, root: Path) -> PreparedData:
        """Read ``root/meta.json``; raises ValueError when it is missing or of another format."""
        try:
            meta = json.loads((root / META_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{root} holds no prepared training data: {e}") from e
        if meta.get("format") != META_FORMAT:
            raise ValueError(f"{root / META_FILE}: unknown format {meta.get('format')!r}")
        schema = FeatureSchema.from_dict(meta["schema"])
        means = {k: float(v) for k, v in meta["label_means"].items()}
        return cls(
            root=root,
            basis=Basis(schema, means),
            rows={k: int(v) for k, v in meta["rows"].items()},
            n_shards=int(meta["n_shards"]),
            layout=str(meta.get("layout", "frame")),
        )

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def shards(self, rank: int, world: int) -> list[Path]:
        """The training shards of ``rank`` of ``world``: shards rank, rank + world, ..."""
        if self.n_shards < world:
            raise ValueError(f"{self.n_shards} shard(s) cannot feed {world} ranks")
        return list_shards(self.split_dir("train"))[rank::world]

    def shard_rows(self, world: int) -> tuple[int, ...]:
        """Training rows per rank (shards are filled round-robin, so each holds n/N +- 1)."""
        n, k = self.rows["train"], self.n_shards
        per_shard = [n // k + (i < n % k) for i in range(k)]
        return tuple(sum(per_shard[r::world]) for r in range(world))

    def held_out(self, split: str, features: bool = False) -> EncodedSplit:
        """The valid or test split, encoded whole, in time order (``read_shard``'s rows).

        Read and encoded ``HELD_OUT_CHUNK`` rows at a time, and its frame keeps only what
        evaluation reads (``EVAL_COLUMNS``) unless ``features``: the raw feature columns would
        double what a held-out row costs (~150 bytes encoded), and at 30M impressions the 6M
        held-out rows are most of a run's memory.
        """
        (path,) = list_shards(self.split_dir(split))  # held-out splits are one shard
        frames: list[pd.DataFrame] = []
        parts: list[EncodedSplit] = []
        for batch in pq.ParquetFile(path).iter_batches(batch_size=HELD_OUT_CHUNK):
            frame = batch.to_pandas()
            parts.append(self.basis.encode(frame))
            keep = frame.columns if features else [c for c in EVAL_COLUMNS if c in frame.columns]
            frames.append(frame[keep])
        whole = EncodedSplit(
            pd.concat(frames, ignore_index=True), _joined(parts, "inputs"), _joined(parts, "labels")
        )
        time_ms = whole.frame["time_ms"].to_numpy()
        if len(time_ms) and (np.diff(time_ms) < 0).any():  # written in time order; else sort
            whole = _reordered(whole, np.argsort(time_ms, kind="stable"))
        return whole


def _joined(parts: list[EncodedSplit], name: str) -> dict[str, torch.Tensor]:
    """One tensor per key from the chunks' ``inputs`` or ``labels``; each key's chunks are let go
    once joined, so the chunks and the whole are never both held for more than one key."""
    out: dict[str, torch.Tensor] = {}
    keys = list(getattr(parts[0], name)) if parts else []
    for key in keys:
        out[key] = torch.cat([getattr(p, name).pop(key) for p in parts])
    return out


def _reordered(split: EncodedSplit, order: np.ndarray) -> EncodedSplit:
    index = torch.from_numpy(order)
    return EncodedSplit(
        split.frame.iloc[order].reset_index(drop=True),
        {k: v[index] for k, v in split.inputs.items()},
        {k: v[index] for k, v in split.labels.items()},
    )


def is_prepared(path: Path | None) -> bool:
    """Whether ``path`` is a prepared data directory (it holds ``meta.json``)."""
    return path is not None and (Path(path) / META_FILE).is_file()


def prepare_frame(frame: pd.DataFrame, out_dir: Path, n_shards: int) -> PreparedData:
    """``split_frame``, then write the shards and ``meta.json`` into ``out_dir``."""
    frames, basis = split_frame(frame)
    train = frames["train"]
    if len(train) < n_shards:
        raise ValueError(f"{len(train)} training rows cannot fill {n_shards} shards")
    frames["train"] = train.assign(**{ROW_COLUMN: np.arange(len(train), dtype=np.int64)})
    for split in SPLITS:
        write_shards(frames[split], out_dir / split, n_shards if split == "train" else 1)
    rows = {split: len(frames[split]) for split in SPLITS}
    return _write_meta(out_dir, basis, rows, n_shards, "frame")


def prepare_stream(data_dir: Path, out_dir: Path, n_shards: int) -> PreparedData:
    """``stream.write_splits`` (the log never in memory), then ``meta.json``."""
    basis, rows = write_splits(data_dir, out_dir, n_shards)
    return _write_meta(out_dir, basis, rows, n_shards, "stream")


def _write_meta(
    out_dir: Path, basis: Basis, rows: dict[str, int], n_shards: int, layout: str
) -> PreparedData:
    meta = {
        "format": META_FORMAT,
        "layout": layout,
        "n_shards": n_shards,
        "rows": rows,
        "label_means": basis.label_means,
        "schema": basis.schema.to_dict(),
    }
    tmp = out_dir / f".{META_FILE}.tmp"  # meta.json last, whole: it marks the data complete
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir / META_FILE)
    return PreparedData.load(out_dir)


def prepare_data(job: TrainJob, out_dir: Path, n_shards: int) -> PreparedData:
    """The prepared data for ``job``: ``--data`` as is when prepared, streamed from its Parquet
    logs when ``stream.streams`` says so, else loaded (or simulated) in memory and written."""
    if is_prepared(job.data):
        assert job.data is not None
        return PreparedData.load(Path(job.data))
    if streams(job.data, job.stream):
        assert job.data is not None
        print(f"streaming {job.data}; {n_shards} training shard(s) in {out_dir}")
        return prepare_stream(Path(job.data), out_dir, n_shards)
    frame = load_frame(job)
    print(f"{len(frame):,} impressions; {n_shards} training shards in {out_dir}")
    return prepare_frame(frame, out_dir, n_shards)


def prepare_logs(data_dir: Path, out_dir: Path, n_shards: int) -> PreparedData:
    """``vidrank prepare``: the logs of ``data_dir`` prepared once for ``n_shards`` ranks (e.g.
    on a volume every node mounts); Parquet logs are streamed, CSV logs loaded whole."""
    if n_shards < 1:
        raise ValueError(f"--shards must be >= 1, got {n_shards}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if all(path.suffix == ".parquet" for path in log_paths(data_dir)):
        return prepare_stream(data_dir, out_dir, n_shards)
    return prepare_frame(load_impressions(data_dir), out_dir, n_shards)


def fit_prepared(
    data: PreparedData,
    config: TrainConfig,
    *,
    threads: int = TRAIN_THREADS,
    verbose: bool = True,
    test_features: bool = False,
) -> TrainResult:
    """``fit`` in one process on prepared data, its training split streamed from the shards; the
    result's test frame holds the feature columns only with ``test_features`` (``--quantize``
    scores the test rows as requests)."""
    torch.set_num_threads(threads)
    rows = data.shard_rows(1)
    train = StreamedBatches(data.shards(0, 1), data.basis, config.batch_size, rows)
    held_out = (data.held_out("valid"), data.held_out("test", test_features))
    return train_and_finalise(config, data.basis, train, held_out, verbose)
