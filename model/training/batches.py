"""Encoded splits and mini-batches: a frame is encoded once into tensors, then batched by index.

No DataLoader and no per-row Python: ``encode_split`` runs the feature schema (the code the
service runs) over whole columns, and a batch is the tensors indexed by a slice of a seeded
permutation. ``predict`` scores a split in chunks; ``GateStats`` sums the gates' diagnostics
chunk by chunk as it does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from model.core.features import FeatureSchema
from model.core.tasks import LABEL_COLUMNS
from model.training.mmoe import RankingModel

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


@dataclass
class GateStats:
    """Gate diagnostics accumulated chunk by chunk, so a split's N x T x E gate weights are never
    held whole (at 3M validation rows they would be 0.3 GB, and their entropy in float64 ~2 GB).

    Per task: mean gate weight per expert, mean gate entropy (nats), largest mean share. A
    polarised gate (one expert takes everything) shows entropy near 0 and ``max_mean_share`` near
    1; a uniform one shows entropy near ``max_entropy`` = log E.
    """

    rows: int = 0
    weight_sum: np.ndarray | None = None  # T x E
    entropy_sum: np.ndarray | None = None  # T

    def add(self, gates: np.ndarray) -> None:
        """Add the gate weights (N x T x E) of some rows."""
        g = gates.astype(np.float64)
        entropy = -(g * np.log(np.clip(g, 1e-12, None))).sum(-1).sum(0)  # T
        weights = g.sum(0)  # T x E
        if self.weight_sum is None or self.entropy_sum is None:
            self.weight_sum, self.entropy_sum = weights, entropy
        else:
            self.weight_sum += weights
            self.entropy_sum += entropy
        self.rows += len(g)

    def diagnostics(self, tasks: Iterable[str]) -> dict[str, Any]:
        """The manifest's ``gate_diagnostics`` of the rows added so far."""
        if self.weight_sum is None or self.entropy_sum is None or not self.rows:
            raise ValueError("no gate weights were added")
        mean_w, mean_entropy = self.weight_sum / self.rows, self.entropy_sum / self.rows
        per_task = {
            t: {
                "mean_weights": [round(float(w), 6) for w in mean_w[i]],
                "mean_entropy": float(mean_entropy[i]),
                "max_mean_share": float(mean_w[i].max()),
            }
            for i, t in enumerate(tasks)
        }
        return {"n_rows": self.rows, "max_entropy": math.log(mean_w.shape[-1]), "tasks": per_task}
