"""The training objective and the figures a run reports: losses and metrics.

The loss is BCE(click) + Poisson NLL(watch_s / watch_scale, log input) + BCE(like), each a mean
over the impression space and weighted per task (see model/training/mmoe.py for why Poisson).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812 -- the conventional alias

from model.core.metrics import auc, ece, rmse, xauc
from model.training.batches import EncodedSplit


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
    # expected calibration error over 10 equal-mass bins of the prediction
    metrics["click_ece"] = ece(click, preds["click"])
    metrics["like_ece"] = ece(like, preds["like"])
    return metrics


# The ranking metric of each task on a split (evaluate_split's keys).
RANKING_METRICS: dict[str, str] = {
    "click": "click_auc",
    "watch_time": "watch_xauc",
    "like": "like_auc",
}


def selection_value(
    metrics: Mapping[str, float], loss_weights: Mapping[str, float], select_by: str
) -> float:
    """What early stopping minimises for an epoch's validation ``metrics``: the weighted loss
    (``"loss"``), or minus the loss-weighted mean of the tasks' ranking metrics (``"auc"``)."""
    if select_by == "loss":
        return float(metrics["loss"])
    if select_by != "auc":
        raise ValueError(f"unknown selection {select_by!r}")
    total = sum(loss_weights[t] for t in RANKING_METRICS)
    return -sum(loss_weights[t] * metrics[m] for t, m in RANKING_METRICS.items()) / total


def task_selection_value(metrics: Mapping[str, float], task: str, select_by: str) -> float:
    """``selection_value`` of one task alone: its validation loss, or minus its ranking metric
    (how a model trained for that task only would be stopped)."""
    if select_by == "loss":
        return float(metrics[f"loss_{task}"])
    if select_by != "auc":
        raise ValueError(f"unknown selection {select_by!r}")
    return -float(metrics[RANKING_METRICS[task]])


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")
