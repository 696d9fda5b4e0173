"""From a ``TrainResult`` to a published bundle: export, parity, (int8), manifest, registry.

``publish(result, job, version)`` writes the bundle in a temporary directory, publishes it to
the registry atomically and activates it when asked (or when the registry has no production
model). ``write_result_bundle`` is the part without a registry (benchmarks use it).
"""

from __future__ import annotations

import importlib.metadata
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from model.core.bundle import Bundle, build_manifest, write_bundle
from model.core.distribution import reference_section
from model.core.metrics import auc
from model.core.registry import Registry
from model.training.config import TrainJob
from model.training.evaluate import DEFAULT_FUSION, calibration_summary
from model.training.export import DEFAULT_OPSET, FrameRequests, export_onnx, parity, quantize_int8
from model.training.fit import TrainResult

# A published graph must match torch far tighter than this; looser means a broken export.
PARITY_MAX_ABS_PROB = 1e-4
PARITY_MAX_REL_WATCH = 1e-3
# --quantize: the decisive check is held-out AUC (click and like may each drop by at most
# INT8_MAX_AUC_DROP). The parity bounds only catch a broken quantisation: on parity()'s random,
# out-of-range requests int8 moves probabilities by up to ~1e-2 and watch time by ~5%.
INT8_MAX_ABS_PROB = 5e-2
INT8_MAX_REL_WATCH = 0.25
INT8_MAX_AUC_DROP = 0.002


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


def quantize_result(
    result: TrainResult, fp32_path: Path, seed: int = 0
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Replace the fp32 graph at ``fp32_path`` by its int8 quantisation, if it is good enough.

    Checks the int8 graph against torch (loose tolerance) and scores the held-out split with
    both graphs, as requests (encoded once); raises ``RuntimeError`` (and leaves the fp32 graph)
    when click or like AUC drops by more than ``INT8_MAX_AUC_DROP``. Returns the figures for
    the manifest and the int8 graph's held-out predictions.
    """
    int8_path = fp32_path.with_name("model.int8.onnx")
    quantize_int8(fp32_path, int8_path)
    checked = parity(result.model, result.schema, int8_path, seed=seed)
    if checked["max_abs_prob"] > INT8_MAX_ABS_PROB or checked["max_rel_watch"] > INT8_MAX_REL_WATCH:
        raise RuntimeError(f"the int8 graph disagrees with torch; not publishing: {checked}")
    requests = FrameRequests.of(result.schema, result.test)
    fp32, int8 = requests.predict(fp32_path), requests.predict(int8_path)
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
    return report, int8


def write_result_bundle(
    result: TrainResult,
    dest: Path,
    version: str,
    seed: int = 0,
    training: Mapping[str, Any] | None = None,
    quantize: bool = False,
) -> Bundle:
    """Export, check parity and write the (verified) bundle into ``dest``.

    The manifest's ``parity`` holds the torch-vs-onnxruntime figures, ``calibration`` the
    held-out reliability bins per task (model/training/evaluate.py ``calibration_summary``),
    ``head_calibration`` each head's fitted affine map (model/training/calibrate.py; already part
    of the exported graph) and
    ``prediction_distribution`` the histogram of the published graph's held-out predictions,
    which the service compares served predictions against (population stability index).

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
    # Reliability bins of the held-out predictions: the report's calibration diagrams.
    extra: dict[str, Any] = {
        "parity": checked,
        "calibration": calibration_summary(result.test, result.test_preds),
        "head_calibration": result.calibration,  # the fitted affine maps, part of the graph
    }
    heldout = result.test_preds  # torch's, equal to the fp32 graph's within the parity bounds
    if quantize:
        extra["quantization"], heldout = quantize_result(result, onnx_path, seed)
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
        prediction_distribution=reference_section(
            heldout, f"held-out test split, {len(result.test)} impressions"
        ),
        extra={**extra, "training": dict(training or {}, history=result.history)},
    )
    return write_bundle(dest, onnx_path, manifest)  # verifies checksum and schema once


def training_record(job: TrainJob) -> dict[str, Any]:
    """The manifest's ``training`` section (``history`` is added from the result)."""
    config = job.train
    return {
        "data": job.data_description,
        "seed": config.seed,
        "epochs_max": config.epochs,
        "select_by": config.select_by,
        "select_each": config.select_each,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "loss_weights": dict(config.loss_weights),
    }


def publish(result: TrainResult, job: TrainJob, version: str) -> str:
    """Bundle ``result`` in a temp dir, publish it atomically, activate it if asked or first."""
    registry = Registry(job.registry)
    with tempfile.TemporaryDirectory(prefix="vidrank-bundle-") as tmp:
        bundle = write_result_bundle(
            result, Path(tmp) / version, version, job.train.seed, training_record(job), job.quantize
        )
        published = registry.publish(bundle)
    checked = bundle.manifest["parity"]
    print(
        f"parity torch vs onnxruntime: max |dp| {checked['max_abs_prob']:.2e}, "
        f"max rel watch {checked['max_rel_watch']:.2e}"
    )
    if job.activate or (job.activate is None and registry.read_aliases().production is None):
        # publish() is what `vidrank train` runs: the history names the CLI as the actor.
        registry.activate(published, actor="cli", reason="activated by vidrank train")
        print(f"activated {published} as production")
    return published


def summary_table(metrics: Mapping[str, float]) -> str:
    """Two-column text table of the metrics."""
    width = max(len(k) for k in metrics)
    lines = [f"{'metric':{width}s}  value", f"{'-' * width}  ----------"]
    for k, v in metrics.items():
        lines.append(f"{k:{width}s}  {v:.4f}" if isinstance(v, float) else f"{k:{width}s}  {v}")
    return "\n".join(lines)


def announce(result: TrainResult, published: str, job: TrainJob, world: int = 1) -> None:
    """Print the metrics table and where the version went: the end of fitting and publishing.

    The version's report is analysis, written one layer up by ``run_train``
    (model/training/train.py), so the fit path never imports the analysis room.
    """
    print(summary_table(result.metrics))
    ranks = f" ({world} ranks)" if world > 1 else ""
    print(f"published {published} to {job.registry}{ranks}")
