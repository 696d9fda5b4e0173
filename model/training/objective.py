"""The training objective and the figures a run reports: losses, metrics, gate diagnostics.

The loss is BCE(click) + Poisson NLL(watch_s / watch_scale, log input) + BCE(like), each a mean
over the impression space and weighted per task (see model/training/mmoe.py for why Poisson).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


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
