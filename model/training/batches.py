"""Encoded splits and mini-batches: a frame is encoded once into tensors, then batched by index.

No DataLoader and no per-row Python: ``encode_split`` runs the feature schema (the code the
service runs) over whole columns, and a batch is the tensors indexed by a slice of a seeded
permutation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from model.core.features import FeatureSchema
from model.core.tasks import LABEL_COLUMNS
from model.training.mmoe import RankingModel

if TYPE_CHECKING:  # objective.py imports this module
    from model.training.objective import GateStats

EVAL_BATCH = 16_384

Batch = tuple[dict[str, Tensor], dict[str, Tensor]]  # (encoded inputs, labels) of some rows


@dataclass
class EncodedSplit:
    """One split encoded once: schema inputs and labels as tensors, plus the source frame."""

    frame: pd.DataFrame
    inputs: dict[str, Tensor]
    labels: dict[str, Tensor]  # click, watch_time (watch_s / watch_scale), like; float32

    def __len__(self) -> int:
        return len(self.frame)

    def rows(self, idx: np.ndarray) -> Batch:
        """The inputs and labels of rows ``idx``."""
        index = torch.from_numpy(idx)
        return (
            {k: v[index] for k, v in self.inputs.items()},
            {k: v[index] for k, v in self.labels.items()},
        )


def encode_split(schema: FeatureSchema, frame: pd.DataFrame, watch_scale: float) -> EncodedSplit:
    """Encode a frame's feature columns with the schema and its labels into tensors."""
    columns = {name: frame[name].to_numpy() for name in schema.names() if name in frame.columns}
    encoded = schema.encode_rows(columns, len(frame))
    labels = {task: frame[col].to_numpy(dtype=np.float32) for task, col in LABEL_COLUMNS.items()}
    labels["watch_time"] = labels["watch_time"] / np.float32(watch_scale)
    return EncodedSplit(
        frame=frame,
        inputs={k: torch.from_numpy(v) for k, v in encoded.items()},
        labels={k: torch.from_numpy(v) for k, v in labels.items()},
    )


def make_batches(split: EncodedSplit, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
    """Mini-batches of one seeded permutation of the split (one epoch)."""
    perm = rng.permutation(len(split))
    for start in range(0, len(perm), batch_size):
        yield split.rows(perm[start : start + batch_size])


@dataclass
class StepShare:
    """This rank's share of the current global batch (rows here / rows in the batch), which a
    DDP ``BatchSource`` sets per step for the gradient hook (model/training/distributed.py)."""

    value: float = 1.0


@dataclass
class Shuffled:
    """A split's batches for the epoch loop: a fresh permutation every epoch."""

    split: EncodedSplit
    batch_size: int

    @property
    def rows(self) -> int:
        return len(self.split)

    @property
    def steps(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        return make_batches(self.split, self.batch_size, rng)


def predict(
    model: RankingModel, split: EncodedSplit, gates: GateStats | None = None
) -> dict[str, np.ndarray]:
    """Eval-mode outputs over a split in chunks: tasks and ``<task>_logit``; with ``gates``, the
    gate weights of each chunk are added to it (and not returned)."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(split), EVAL_BATCH):
            part = {k: v[start : start + EVAL_BATCH] for k, v in split.inputs.items()}
            out = model(part, return_gates=gates is not None)
            if gates is not None and "gates" in out:
                gates.add(out.pop("gates").numpy())
            for k, v in out.items():
                chunks.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}
