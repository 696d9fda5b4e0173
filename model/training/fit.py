"""``fit``: one training run as four public steps, which the DDP path composes the same way.

1. ``prepare``  - chronological train/valid/test split, feature schema and label means fitted on
   the training split (``split_frame``), every split encoded once into tensors;
2. ``build``    - the model config (``model_config``), the seeded initial model, output biases at
   the training base rates;
3. ``EpochLoop.run`` (model/training/loop.py) - epochs with early stopping, one progress line per
   epoch, the best weights restored;
4. ``finalise`` - each head's calibration fitted on the validation split
   (model/training/calibrate.py), then test metrics (and, when the data carry the simulator's
   truth, the ranking evaluation and the truth's own AUC/XAUC, the ceiling) plus the gate
   diagnostics into a ``TrainResult``.

Steps 2-4 are ``train_and_finalise``, which streamed data (model/training/stream.py, through
``prepared.fit_prepared``) runs with its own step 1 and ``BatchSource``.

Training is deterministic per seed on a given machine: seeded torch and numpy generators and a
fixed torch thread count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch

from model.core.errors import VidrankError
from model.core.features import FeatureSchema, default_schema
from model.core.tasks import LABEL_COLUMNS, PROBABILITY_TASKS, TRUTH_COLUMNS
from model.training.batches import EncodedSplit, Shuffled, encode_split, predict
from model.training.calibrate import Calibration, calibrate_heads
from model.training.config import TrainConfig
from model.training.data import split_by_time
from model.training.evaluate import has_truth, ranking_eval, truth_ceiling
from model.training.loop import BatchSource, EpochLoop, Epochs, use_sparse_tables
from model.training.mmoe import MMoEConfig, RankingModel, build_model, init_output_bias
from model.training.objective import evaluate_split

TRAIN_THREADS = 2  # fixed so that results are reproducible (and fit the 2-core target machine)
SPLITS = ("train", "valid", "test")
TASKS_01 = sorted(PROBABILITY_TASKS)  # the tasks whose labels are 0 or 1
# What ``finalise`` and publishing read of a held-out frame (labels, lists, the truth), besides the
# encoded features; prepared data keeps only these (``PreparedData.held_out``).
EVAL_COLUMNS = ("user_id", "time_ms", *LABEL_COLUMNS.values(), *TRUTH_COLUMNS.values())


@dataclass(frozen=True)
class Basis:
    """What the training split fixes for a run: the fitted schema and the label means.

    Every DDP rank gets the same ``Basis`` (from the prepared data), so all encode and build
    alike.
    """

    schema: FeatureSchema
    label_means: dict[str, float]  # over the training split, by label column (LABEL_COLUMNS)

    @property
    def watch_scale(self) -> float:
        """The watch head's unit (seconds): the mean training watch time, or 1 if it is 0."""
        mean = self.label_means[LABEL_COLUMNS["watch_time"]]
        return mean if mean > 0 else 1.0

    def encode(self, frame: pd.DataFrame) -> EncodedSplit:
        return encode_split(self.schema, frame, self.watch_scale)


@dataclass
class Prepared:
    """Step 1's output: the basis and the three splits, encoded."""

    basis: Basis
    train: EncodedSplit
    valid: EncodedSplit
    test: EncodedSplit

    @property
    def rows(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


@dataclass
class TrainResult:
    """A fitted model with everything needed to evaluate, export and publish it."""

    model: RankingModel
    schema: FeatureSchema
    config: MMoEConfig
    test: pd.DataFrame
    test_preds: dict[str, np.ndarray]
    metrics: dict[str, float]
    gate_diagnostics: dict[str, Any] | None
    history: list[dict[str, float]] = field(default_factory=list)
    calibration: Calibration = field(default_factory=dict)  # per head: scale, shift


class TooLittleData(VidrankError, ValueError):
    """The impressions cannot train and evaluate a model; the message says what is needed."""

    code = "too_little_data"


def check_splits(frames: Mapping[str, pd.DataFrame]) -> None:
    """Before any training: every split holds rows, and both outcomes of every probability task
    (a base rate of 0 or 1, a calibration fit or an AUC on one class is meaningless)."""
    check_outcomes({split: outcomes(df) for split, df in frames.items()})


def outcomes(frame: pd.DataFrame) -> tuple[int, dict[str, set[int]]]:
    """(rows, probability task -> the labels it takes) of a split."""
    return len(frame), {t: set(frame[LABEL_COLUMNS[t]].unique().tolist()) for t in TASKS_01}


def check_outcomes(splits: Mapping[str, tuple[int, Mapping[str, set[int]]]]) -> None:
    """``check_splits`` from each split's (rows, probability task -> labels seen)."""
    n = sum(rows for rows, _ in splits.values())
    need = "train on more impressions (e.g. --simulate 20000)"
    if min(rows for rows, _ in splits.values()) < 1:
        raise TooLittleData(f"{n} impressions are too few to split into train/valid/test; {need}")
    for split, (rows, seen) in splits.items():
        for task in TASKS_01:
            if lacking := {0, 1} - set(seen[task]):
                raise TooLittleData(
                    f"{n} impressions are too few: the {split} split ({rows} rows) has no "
                    f"{task}={lacking.pop()} impression, and each split needs both outcomes of "
                    f"{task}; {need}"
                )


def split_frame(frame: pd.DataFrame) -> tuple[dict[str, pd.DataFrame], Basis]:
    """Split by time (checked: ``check_splits``); fit the schema and take the label means on the
    training split."""
    frames = dict(zip(SPLITS, split_by_time(frame), strict=True))
    check_splits(frames)
    train = frames["train"]
    schema = default_schema().fit({n: train[n].to_numpy() for n in default_schema().names()})
    means = {col: float(train[col].mean()) for col in LABEL_COLUMNS.values()}
    return frames, Basis(schema, means)


def prepare(frame: pd.DataFrame) -> Prepared:
    """Step 1: split, fit the schema on train, encode every split once."""
    frames, basis = split_frame(frame)
    return Prepared(basis, *(basis.encode(frames[s]) for s in SPLITS))


def model_config(config: TrainConfig, basis: Basis) -> MMoEConfig:
    """The network's config: ``config.arch`` and interaction layer (tiny with ``small``), the watch
    head in basis units.
    """
    return network_config(config, basis.watch_scale)


def network_config(config: TrainConfig, watch_scale: float) -> MMoEConfig:
    """``model_config`` with the watch head's scale given (no data needed, e.g. to cost a net)."""
    base = MMoEConfig.small() if config.small else MMoEConfig()
    return replace(
        base,
        n_experts=config.experts or base.n_experts,
        arch=config.arch,
        interactions=config.interactions,
        interaction_dim=config.interaction_dim,
        gate_temperature=float(config.gate_temperature or 1.0),
        gate_dropout=config.gate_dropout,
        entire_space=bool(config.entire_space),
        ple_levels=config.ple_levels,
        watch_scale=watch_scale,
    )


def build(config: TrainConfig, basis: Basis) -> RankingModel:
    """Step 2: the initial model, seeded (every rank starts from the same weights)."""
    torch.manual_seed(config.seed)
    model = build_model(model_config(config, basis), basis.schema)
    # Each head starts at its training base rate rather than spending its first steps on it.
    init_output_bias(model, {t: basis.label_means[c] for t, c in LABEL_COLUMNS.items()})
    if config.sparse is not False:  # None: row-wise in one process (DDP ranks resolve it first)
        use_sparse_tables(model)
    return model


def finalise(
    model: RankingModel,
    basis: Basis,
    epochs: Epochs,
    splits: tuple[EncodedSplit, EncodedSplit],
    rows: Mapping[str, int],
    config: TrainConfig,
    world: int = 1,
) -> TrainResult:
    """Step 4: with ``splits`` = (valid, test), fit the (restored) model's calibration on valid,
    then its test metrics, ranking evaluation and gate diagnostics.
    """
    valid, test = splits
    calibration = calibrate_heads(model, valid)
    test_preds = predict(model, test)
    metrics = evaluate_split(test_preds, test, config.loss_weights)
    if has_truth(test.frame):
        metrics.update(ranking_eval(test.frame, test_preds))
        metrics.update(truth_ceiling(test.frame))
    metrics.update(
        train_time_s=round(epochs.train_time_s, 2),
        rows_train=float(rows["train"]),
        rows_valid=float(rows["valid"]),
        rows_test=float(rows["test"]),
        epochs=float(len(epochs.history)),
        best_valid_loss=epochs.best_loss,
    )
    if world > 1:
        metrics["world_size"] = float(world)
    tasks = model.config.tasks
    return TrainResult(
        model=model,
        schema=basis.schema,
        config=model.config,
        test=test.frame,
        test_preds={t: test_preds[t] for t in tasks},
        metrics=metrics,
        gate_diagnostics=epochs.gate_diagnostics,
        history=epochs.history,
        calibration=calibration,
    )


def fit(
    frame: pd.DataFrame,
    config: TrainConfig,
    *,
    threads: int = TRAIN_THREADS,
    verbose: bool = True,
) -> TrainResult:
    """Split by time, fit the schema on train, train with early stopping, evaluate on test."""
    torch.set_num_threads(threads)
    data = prepare(frame)
    train = Shuffled(data.train, config.batch_size)
    return train_and_finalise(config, data.basis, train, (data.valid, data.test), verbose)


def train_and_finalise(
    config: TrainConfig,
    basis: Basis,
    train: BatchSource,
    held_out: tuple[EncodedSplit, EncodedSplit],
    verbose: bool = True,
) -> TrainResult:
    """Steps 2-4 in one process: build, the epochs over ``train``, finalise on (valid, test)."""
    model = build(config, basis)
    epochs = EpochLoop(model, config, verbose=verbose).run(train, held_out[0])
    valid, test = held_out
    rows = {"train": train.rows, "valid": len(valid), "test": len(test)}
    return finalise(model, basis, epochs, held_out, rows, config)
