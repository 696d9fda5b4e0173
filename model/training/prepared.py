"""Training data prepared once for the DDP ranks: ``fit``'s split on disk, sharded per rank.

``prepare_frame`` is ``fit``'s ``split_frame`` done once: the chronological train/valid/test
split and the ``Basis`` (schema and label means) of the whole training split, so every rank
encodes with the same statistics and rank 0 validates on the rows ``fit`` does. Layout::

    meta.json                              schema, label means, row counts (written last)
    train/part-0000r-of-0000N.parquet      training split in N shards (data.write_shards)
    valid/part-00000-of-00001.parquet      validation split
    test/part-00000-of-00001.parquet       test split

Each training row carries ``ROW_COLUMN``, its index in the whole training split, so a rank can
find its rows of the single-process batches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from model.core.features import FeatureSchema
from model.training.config import TrainJob
from model.training.data import write_shards
from model.training.fit import SPLITS, Basis, split_frame
from model.training.sources import load_frame

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
        )

    def split_dir(self, split: str) -> Path:
        return self.root / split


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
    meta = {
        "format": META_FORMAT,
        "n_shards": n_shards,
        "rows": {split: len(frames[split]) for split in SPLITS},
        "label_means": basis.label_means,
        "schema": basis.schema.to_dict(),
    }
    tmp = out_dir / f".{META_FILE}.tmp"  # meta.json last, whole: it marks the data complete
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(out_dir / META_FILE)
    return PreparedData.load(out_dir)


def prepare_data(job: TrainJob, out_dir: Path, n_shards: int) -> PreparedData:
    """The prepared data for ``job``: ``--data`` as is when prepared, else loaded and written."""
    if is_prepared(job.data):
        assert job.data is not None
        return PreparedData.load(Path(job.data))
    frame = load_frame(job)
    print(f"{len(frame):,} impressions; {n_shards} training shards in {out_dir}")
    return prepare_frame(frame, out_dir, n_shards)
