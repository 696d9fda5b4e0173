"""Training: data -> MMoE fit with early stopping -> metrics -> ONNX bundle -> registry.

``run_train(TrainOptions(...))`` is what ``vidrank train`` calls. The pieces are usable on their
own: ``fit(frame, ...)`` trains and evaluates on an impression frame and returns a
``TrainResult``; ``publish(result, ...)`` exports, checks parity and publishes it.

Data is encoded once with the feature schema (the same code the service runs) into tensors and
batched by indexing with a seeded permutation: no DataLoader, no per-row Python. The loss is
BCE(click) + Poisson NLL(watch_s / watch_scale, log input) + BCE(like), all over the impression
space (see model/training/mmoe.py for why Poisson). Training is deterministic per seed on a given
machine:
seeded torch and numpy generators and a fixed torch thread count.
"""

from __future__ import annotations

import copy
import importlib.metadata
import math
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pandas as pd
import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812 -- the conventional alias
from tqdm import tqdm

from model.core.bundle import Bundle, build_manifest, write_bundle
from model.core.features import FeatureSchema, default_schema
from model.core.metrics import auc, rmse, xauc
from model.core.registry import Registry, check_version_name
from model.training.data import load_impressions, split_by_time
from model.training.evaluate import DEFAULT_FUSION, has_truth, ranking_eval
from model.training.export import DEFAULT_OPSET, export_onnx, parity, predict_frame, quantize_int8
from model.training.mmoe import MMoEConfig, RankingModel, build_model, init_output_bias
from model.training.simulate import SimConfig, simulate, write_simulation

TRAIN_THREADS = 2  # fixed so that results are reproducible (and fit the 2-core target machine)
EVAL_BATCH = 16_384
# A published graph must match torch far tighter than this; looser means a broken export.
PARITY_MAX_ABS_PROB = 1e-4
PARITY_MAX_REL_WATCH = 1e-3
# --quantize: the decisive check is held-out AUC (click and like may each drop by at most
# INT8_MAX_AUC_DROP). The parity bounds only catch a broken quantisation: on parity()'s random,
# out-of-range requests int8 moves probabilities by up to ~1e-2 and watch time by ~5%.
INT8_MAX_ABS_PROB = 5e-2
INT8_MAX_REL_WATCH = 0.25
INT8_MAX_AUC_DROP = 0.002


@dataclass
class TrainOptions:
    """Options of ``vidrank train`` (field for field the CLI's flags)."""

    registry: Path
    data: Path | None = None
    simulate: int | None = None
    arch: str = "mmoe"
    version: str | None = None
    epochs: int = 3
    seed: int = 0
    batch_size: int = 2048
    lr: float = 2e-3
    small: bool = False
    loss_weights: str = "click=1,watch_time=1,like=1"
    activate: bool | None = None
    if_empty: bool = False
    nproc: int = 1
    quantize: bool = False


@dataclass
class EncodedSplit:
    """One split encoded once: schema inputs and labels as tensors, plus the source frame."""

    frame: pd.DataFrame
    inputs: dict[str, Tensor]
    labels: dict[str, Tensor]  # click, watch_time (watch_s / watch_scale), like; float32

    def __len__(self) -> int:
        return len(self.frame)


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


# -- data --------------------------------------------------------------------------------------


def simulated_impressions(n: int, seed: int, task_correlation: float = 0.5) -> pd.DataFrame:
    """``n`` simulated impressions as the trainer's frame.

    The simulation goes through a temporary Parquet directory and ``load_impressions`` so that
    simulated and real data take the very same loading path (about 0.2 s per 1M rows).
    """
    data = simulate(SimConfig(n_impressions=n, seed=seed, task_correlation=task_correlation))
    with tempfile.TemporaryDirectory(prefix="vidrank-sim-") as tmp:
        write_simulation(data, Path(tmp))
        return load_impressions(Path(tmp))


def load_frame(opts: TrainOptions) -> pd.DataFrame:
    """The impression frame named by ``--data`` or ``--simulate``."""
    if (opts.data is None) == (opts.simulate is None):
        raise ValueError("give exactly one of --data DIR or --simulate N")
    if opts.simulate is not None:
        if opts.simulate < 10:
            raise ValueError("--simulate needs at least 10 impressions")
        return simulated_impressions(opts.simulate, opts.seed)
    assert opts.data is not None
    return load_impressions(opts.data)


def encode_split(schema: FeatureSchema, frame: pd.DataFrame, watch_scale: float) -> EncodedSplit:
    """Encode a frame's feature columns with the schema and its labels into tensors."""
    columns = {name: frame[name].to_numpy() for name in schema.names() if name in frame.columns}
    encoded = schema.encode_rows(columns, len(frame))
    labels = {
        "click": frame["click"].to_numpy(dtype=np.float32),
        "watch_time": frame["watch_s"].to_numpy(dtype=np.float32) / np.float32(watch_scale),
        "like": frame["like"].to_numpy(dtype=np.float32),
    }
    return EncodedSplit(
        frame=frame,
        inputs={k: torch.from_numpy(v) for k, v in encoded.items()},
        labels={k: torch.from_numpy(v) for k, v in labels.items()},
    )


Batch = tuple[dict[str, Tensor], dict[str, Tensor]]


def make_batches(
    split: EncodedSplit,
    batch_size: int,
    rng: np.random.Generator,
    rank: int = 0,
    world: int = 1,
) -> Iterator[Batch]:
    """Mini-batches of this rank's share of one seeded permutation (DDP: one share per rank)."""
    perm = rng.permutation(len(split))[rank::world]
    for start in range(0, len(perm), batch_size):
        idx = torch.from_numpy(perm[start : start + batch_size])
        yield (
            {k: v[idx] for k, v in split.inputs.items()},
            {k: v[idx] for k, v in split.labels.items()},
        )


def parse_loss_weights(text: str, tasks: Iterable[str]) -> dict[str, float]:
    """``"click=1,watch_time=0.5"`` -> per-task weights; tasks not named keep weight 1."""
    tasks = tuple(tasks)
    weights = dict.fromkeys(tasks, 1.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise ValueError(f"loss weight {part!r}: expected task=weight with a task in {tasks}")
        w = float(value)
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"loss weight {part!r} must be a finite number >= 0")
        weights[name] = w
    return weights


# -- loss and steps ----------------------------------------------------------------------------


def task_losses(out: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Mean loss per task over the impression space (BCE for probabilities, Poisson for watch)."""
    return {
        "click": F.binary_cross_entropy_with_logits(out["click_logit"], labels["click"]),
        "watch_time": F.poisson_nll_loss(
            out["watch_time_logit"], labels["watch_time"], log_input=True, full=False
        ),
        "like": F.binary_cross_entropy_with_logits(out["like_logit"], labels["like"]),
    }


def weighted_sum(losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """sum_k w_k * loss_k."""
    return torch.stack([weights[t] * loss for t, loss in losses.items()]).sum()


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    loss_weights: Mapping[str, float],
    n_batches: int | None = None,
    desc: str = "train",
) -> float:
    """One pass over ``batches`` (this rank's shard); returns the mean weighted training loss.

    ``model`` is a ranking model or its DistributedDataParallel wrapper.
    """
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(batches, total=n_batches, desc=desc, disable=None, leave=False, unit="batch")
    for inputs, labels in bar:
        loss = weighted_sum(task_losses(model(inputs), labels), loss_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = len(labels["click"])
        total += loss.item() * n
        seen += n
        bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)
    return total / max(seen, 1)


def predict(
    model: RankingModel, split: EncodedSplit, return_gates: bool = False
) -> dict[str, np.ndarray]:
    """Eval-mode outputs over a split in chunks: tasks, ``<task>_logit`` (and ``gates``)."""
    model.eval()
    chunks: dict[str, list[np.ndarray]] = {}
    with torch.inference_mode():
        for start in range(0, len(split), EVAL_BATCH):
            part = {k: v[start : start + EVAL_BATCH] for k, v in split.inputs.items()}
            for k, v in model(part, return_gates=return_gates).items():
                chunks.setdefault(k, []).append(v.numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}


# -- evaluation --------------------------------------------------------------------------------


def evaluate_split(
    preds: Mapping[str, np.ndarray],
    split: EncodedSplit,
    loss_weights: Mapping[str, float],
) -> dict[str, float]:
    """Losses and metrics of predictions on a split (watch metrics in seconds)."""
    out = {k: torch.from_numpy(v) for k, v in preds.items() if k.endswith("_logit")}
    losses = task_losses(out, split.labels)
    frame = split.frame
    click, like = frame["click"].to_numpy(), frame["like"].to_numpy()
    watch = frame["watch_s"].to_numpy(dtype=np.float64)
    metrics = {f"loss_{t}": float(v) for t, v in losses.items()}
    metrics["loss"] = float(weighted_sum(losses, loss_weights))
    metrics["click_auc"] = auc(click, preds["click"])
    metrics["like_auc"] = auc(like, preds["like"])
    metrics["watch_rmse"] = rmse(watch, preds["watch_time"])
    metrics["watch_xauc"] = xauc(watch, preds["watch_time"])
    # mean prediction / mean label: ~1 when a head estimates the mean over impressions.
    for task, label in (("click", click), ("watch", watch), ("like", like)):
        key = "watch_time" if task == "watch" else task
        metrics[f"{task}_calibration"] = _ratio(preds[key].mean(), label.mean())
    return metrics


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def gate_diagnostics(gates: np.ndarray, tasks: Iterable[str]) -> dict[str, Any]:
    """Per task: mean gate weight per expert, mean gate entropy (nats), largest mean share.

    ``gates`` is N x T x E. A polarised gate (one expert takes everything) shows entropy near 0
    and ``max_mean_share`` near 1; a uniform one shows entropy near ``max_entropy`` = log E.
    """
    g = gates.astype(np.float64)
    entropy = -(g * np.log(np.clip(g, 1e-12, None))).sum(-1)  # N x T
    mean_w = g.mean(0)  # T x E
    per_task = {
        t: {
            "mean_weights": [round(float(w), 6) for w in mean_w[i]],
            "mean_entropy": float(entropy[:, i].mean()),
            "max_mean_share": float(mean_w[i].max()),
        }
        for i, t in enumerate(tasks)
    }
    return {"n_rows": int(g.shape[0]), "max_entropy": math.log(g.shape[-1]), "tasks": per_task}


# -- fitting -----------------------------------------------------------------------------------


def _seed_everything(seed: int, threads: int) -> np.random.Generator:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return np.random.default_rng(seed)


def _epoch_line(epoch: int, train_loss: float, m: Mapping[str, float], secs: float) -> str:
    return (
        f"epoch {epoch}: train loss {train_loss:.4f} | valid loss {m['loss']:.4f} "
        f"click AUC {m['click_auc']:.4f} like AUC {m['like_auc']:.4f} "
        f"watch RMSE {m['watch_rmse']:.2f}s XAUC {m['watch_xauc']:.4f} | {secs:.1f}s"
    )


def fit(
    frame: pd.DataFrame,
    *,
    arch: str = "mmoe",
    small: bool = False,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 2048,
    lr: float = 2e-3,
    loss_weights: str = "click=1,watch_time=1,like=1",
    threads: int = TRAIN_THREADS,
    verbose: bool = True,
) -> TrainResult:
    """Split by time, fit the schema on train, train with early stopping, evaluate on test."""
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError("epochs and batch_size must be >= 1 and lr > 0")
    rng = _seed_everything(seed, threads)
    train_df, valid_df, test_df = split_by_time(frame)
    if min(len(train_df), len(valid_df), len(test_df)) < 1:
        raise ValueError(f"{len(frame)} impressions are too few to split into train/valid/test")
    schema = default_schema().fit({n: train_df[n].to_numpy() for n in default_schema().names()})
    watch_mean = float(train_df["watch_s"].mean())
    base = MMoEConfig.small() if small else MMoEConfig()
    config = replace(base, arch=arch, watch_scale=watch_mean if watch_mean > 0 else 1.0)
    weights = parse_loss_weights(loss_weights, config.tasks)
    train, valid, test = (
        encode_split(schema, df, config.watch_scale) for df in (train_df, valid_df, test_df)
    )
    model = build_model(config, schema)
    init_output_bias(
        model,
        {
            "click": float(train_df["click"].mean()),
            "watch_time": watch_mean,
            "like": float(train_df["like"].mean()),
        },
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history, best_loss, best_state = [], math.inf, copy.deepcopy(model.state_dict())
    n_batches = math.ceil(len(train) / batch_size)
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        batches = make_batches(train, batch_size, rng)
        train_loss = train_epoch(model, batches, optimizer, weights, n_batches, f"epoch {epoch}")
        valid_metrics = evaluate_split(predict(model, valid), valid, weights)
        history.append({"epoch": epoch, "train_loss": train_loss, **valid_metrics})
        if verbose:
            print(_epoch_line(epoch, train_loss, valid_metrics, time.perf_counter() - t0))
        if valid_metrics["loss"] < best_loss:
            best_loss, best_state = valid_metrics["loss"], copy.deepcopy(model.state_dict())
        else:  # patience 1: the first epoch that does not improve ends training
            break
    train_time = time.perf_counter() - started
    model.load_state_dict(best_state)
    valid_out = predict(model, valid, return_gates=True)
    gates = valid_out.get("gates")
    test_preds = predict(model, test)
    metrics = evaluate_split(test_preds, test, weights)
    if has_truth(test_df):
        metrics.update(ranking_eval(test_df, test_preds))
    metrics.update(
        train_time_s=round(train_time, 2),
        rows_train=float(len(train)),
        rows_valid=float(len(valid)),
        rows_test=float(len(test)),
        epochs=float(len(history)),
        best_valid_loss=best_loss,
    )
    return TrainResult(
        model=model,
        schema=schema,
        config=config,
        test=test_df,
        test_preds={t: test_preds[t] for t in config.tasks},
        metrics=metrics,
        gate_diagnostics=None if gates is None else gate_diagnostics(gates, config.tasks),
        history=history,
    )


# -- export and publish ------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    """Versions recorded in the manifest."""
    try:
        vidrank = importlib.metadata.version("vidrank")
    except importlib.metadata.PackageNotFoundError:
        vidrank = "unknown"
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "vidrank": vidrank,
    }


def default_version() -> str:
    """``v`` + UTC timestamp, e.g. ``v20240501-120000``."""
    return "v" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")


def quantize_result(result: TrainResult, fp32_path: Path, seed: int = 0) -> dict[str, Any]:
    """Replace the fp32 graph at ``fp32_path`` by its int8 quantisation, if it is good enough.

    Checks the int8 graph against torch (loose tolerance) and scores the held-out split with
    both graphs, as requests; raises ``RuntimeError`` (and leaves the fp32 graph) when click or
    like AUC drops by more than ``INT8_MAX_AUC_DROP``. Returns the figures for the manifest.
    """
    int8_path = fp32_path.with_name("model.int8.onnx")
    quantize_int8(fp32_path, int8_path)
    checked = parity(result.model, result.schema, int8_path, seed=seed)
    if checked["max_abs_prob"] > INT8_MAX_ABS_PROB or checked["max_rel_watch"] > INT8_MAX_REL_WATCH:
        raise RuntimeError(f"the int8 graph disagrees with torch; not publishing: {checked}")
    fp32 = predict_frame(fp32_path, result.schema, result.test)
    int8 = predict_frame(int8_path, result.schema, result.test)
    report: dict[str, Any] = {"method": "int8-dynamic", "parity": checked}
    report["heldout_max_abs_prob"] = max(
        float(np.max(np.abs(fp32[t] - int8[t]), initial=0.0)) for t in ("click", "like")
    )
    for task in ("click", "like"):
        labels = result.test[task].to_numpy()
        before, after = auc(labels, fp32[task]), auc(labels, int8[task])
        report[f"{task}_auc_fp32"], report[f"{task}_auc_int8"] = before, after
        report[f"{task}_auc_drop"] = before - after
        if before - after > INT8_MAX_AUC_DROP:  # NaN (one class only) compares False: allowed
            raise RuntimeError(
                f"int8 quantisation costs {before - after:.4f} held-out {task} AUC "
                f"(> {INT8_MAX_AUC_DROP}); not publishing - train without --quantize"
            )
    report["fp32_bytes"] = fp32_path.stat().st_size
    report["int8_bytes"] = int8_path.stat().st_size
    int8_path.replace(fp32_path)
    print(
        f"int8: held-out click AUC {report['click_auc_fp32']:.4f} -> {report['click_auc_int8']:.4f}"
        f", like AUC {report['like_auc_fp32']:.4f} -> {report['like_auc_int8']:.4f}; "
        f"{report['fp32_bytes'] / 1e6:.1f} MB -> {report['int8_bytes'] / 1e6:.1f} MB"
    )
    return report


def write_result_bundle(
    result: TrainResult,
    dest: Path,
    version: str,
    seed: int = 0,
    training: Mapping[str, Any] | None = None,
    quantize: bool = False,
) -> Bundle:
    """Export, check parity and write the (verified) bundle into ``dest``.

    The manifest's ``parity`` holds the torch-vs-onnxruntime figures.

    With ``quantize`` the bundle holds the int8 graph (see :func:`quantize_result`) and its
    manifest a ``quantization`` section with the held-out AUC before and after.
    """
    dest.mkdir(parents=True, exist_ok=True)
    onnx_path = dest / "model.onnx"
    export_onnx(result.model, result.schema, onnx_path, opset=DEFAULT_OPSET)
    checked = parity(result.model, result.schema, onnx_path, seed=seed)
    if (
        checked["max_abs_prob"] > PARITY_MAX_ABS_PROB
        or checked["max_rel_watch"] > PARITY_MAX_REL_WATCH
    ):
        raise RuntimeError(f"ONNX export disagrees with torch; not publishing: {checked}")
    extra: dict[str, Any] = {"parity": checked}
    if quantize:
        extra["quantization"] = quantize_result(result, onnx_path, seed)
    manifest = build_manifest(
        version=version,
        schema=result.schema,
        onnx_path=onnx_path,
        tasks=result.config.tasks,
        mmoe_config=result.config.to_dict(),
        metrics=result.metrics,
        default_fusion=DEFAULT_FUSION,
        opset=DEFAULT_OPSET,
        versions=library_versions(),
        gate_diagnostics=result.gate_diagnostics,
        extra={**extra, "training": dict(training or {}, history=result.history)},
    )
    return write_bundle(dest, onnx_path, manifest)  # verifies checksum and schema once


def publish(result: TrainResult, opts: TrainOptions, version: str) -> str:
    """Bundle ``result`` in a temp dir, publish it atomically, activate it if asked or first."""
    registry = Registry(opts.registry)
    training = {
        "data": str(opts.data) if opts.data else f"simulated:{opts.simulate}",
        "seed": opts.seed,
        "epochs_max": opts.epochs,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "loss_weights": parse_loss_weights(opts.loss_weights, result.config.tasks),
    }
    with tempfile.TemporaryDirectory(prefix="vidrank-bundle-") as tmp:
        bundle = write_result_bundle(
            result, Path(tmp) / version, version, opts.seed, training, opts.quantize
        )
        published = registry.publish(bundle)
    checked = bundle.manifest["parity"]
    print(
        f"parity torch vs onnxruntime: max |dp| {checked['max_abs_prob']:.2e}, "
        f"max rel watch {checked['max_rel_watch']:.2e}"
    )
    if opts.activate or (opts.activate is None and registry.read_aliases().production is None):
        registry.activate(published)
        print(f"activated {published} as production")
    return published


def summary_table(metrics: Mapping[str, float]) -> str:
    """Two-column text table of the metrics."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':{width}s}  value", f"{'-' * width}  ----------"]
    for k, v in metrics.items():
        lines.append(f"{k:{width}s}  {v:.4f}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    return "\n".join(lines)


def run_train(opts: TrainOptions) -> str:
    """``vidrank train``: returns the published version (or the production one, with if_empty)."""
    registry = Registry(opts.registry)
    if opts.if_empty and (production := registry.read_aliases().production):
        print(f"registry {opts.registry} already serves {production}; nothing to do (--if-empty)")
        return production
    version = opts.version or default_version()
    check_version_name(version)  # InvalidVersionName is a ValueError
    if registry.has(version):  # fail before training, not after
        raise ValueError(f"version {version!r} is already published in {opts.registry}")
    from model.training import (
        distributed,  # DDP (model/training/distributed.py); it imports this module
    )

    if opts.nproc > 1 or distributed.under_torchrun():
        return distributed.run_distributed(opts, version)
    frame = load_frame(opts)
    print(f"{len(frame):,} impressions; training {opts.arch} (seed {opts.seed})")
    result = fit(
        frame,
        arch=opts.arch,
        small=opts.small,
        epochs=opts.epochs,
        seed=opts.seed,
        batch_size=opts.batch_size,
        lr=opts.lr,
        loss_weights=opts.loss_weights,
    )
    published = publish(result, opts, version)
    print(summary_table(result.metrics))
    print(f"published {published} to {opts.registry}")
    return published


if (
    __name__ == "__main__"
):  # torchrun --nproc_per_node N -m model.training.train <vidrank train options>
    import sys

    from model.cli import app

    app(["train", *sys.argv[1:]], prog_name="python -m model.training.train")
