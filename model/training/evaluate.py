"""Offline evaluation: ranking quality against the simulator's truth.

``ranking_eval`` treats each user's held-out impressions as one candidate list and measures
NDCG@k of several orderings against the true expected utility of each impression. The utility is
the simulator's ``true_utility`` (one definition for the whole repo):

    U = w_click * true_p_click + w_watch * true_watch_s + w_like * true_p_like

with ``simulate.DEFAULT_UTILITY_WEIGHTS`` (click 1, watch 0.1 per second, like 20), under
which the three terms contribute about equally on average. Fusion is
``model.core.fusion.fuse_lists``, the exact code the service ranks with (pure numpy), applied per
user list (``rank_sum`` ranks within a list). model/training/analysis/compare.py sets MMoE and the
shared-bottom baseline side by side with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from model.core.fusion import FusionSpec, fuse_lists
from model.core.metrics import auc, ndcg_at_k, reliability_bins, xauc
from model.core.tasks import LABEL_COLUMNS, TASKS, TRUTH_COLUMNS
from model.simulator.world import DEFAULT_UTILITY_WEIGHTS, true_utility


def utility_fusion(weights: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The fusion that ranks by the expected utility: ``sum_k w_k * p_k`` with the utility's
    weights (``simulate.DEFAULT_UTILITY_WEIGHTS`` unless given), every prediction as it is."""
    w = dict(DEFAULT_UTILITY_WEIGHTS if weights is None else weights)
    return {"method": "weighted_sum", "weights": {t: float(w[t]) for t in TASKS}}


# The trainer's recommended fusion (manifest ``default_fusion``): the expected utility itself.
# The heads are calibrated estimates of the per-impression means (p_click, watch seconds, p_like
# over all impressions), so their weighted sum with the utility's weights estimates each
# candidate's expected utility, and ranking by it is what NDCG against that utility rewards.
# Measured against the YouTube-style product below (the default until this round) on the same
# models: README "Model quality", section 6.
DEFAULT_FUSION: dict[str, Any] = utility_fusion()
# The default until section 6, still reported beside it (``ndcg10_product``): a weighted
# product, watch seconds through log1p so that a long video does not drown the probabilities.
PRODUCT_FUSION: dict[str, Any] = {
    "method": "weighted_product",
    "weights": {"click": 1.0, "watch_time": {"weight": 0.6, "transform": "log1p"}, "like": 0.4},
}


def has_truth(df: pd.DataFrame) -> bool:
    """Whether ``df`` carries the simulator's truth columns."""
    return all(c in df.columns for c in TRUTH_COLUMNS.values())


def ranking_eval(
    df_test: pd.DataFrame,
    preds: Mapping[str, np.ndarray],
    fusion: Mapping[str, Any] | None = None,
    utility_weights: Mapping[str, float] | None = None,
    k: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """NDCG@k per user (each user's test impressions = one list; lists < 2 skipped), averaged.

    Orderings: ``fused`` (the model's predictions through ``fusion``), ``product`` (the same
    through ``PRODUCT_FUSION``, the default fusion until section 6), ``click_only`` (model
    p_click), ``fused_truth`` (the true per-task values through the same fusion: the ceiling of
    this fusion formula), ``oracle`` (the utility itself; 1 by construction, a sanity check) and
    ``random``. Relevance is ``true_utility(df_test, utility_weights)``; ``fusion`` defaults to
    the expected utility under the same weights (``DEFAULT_FUSION`` for the default weights).
    """
    if not has_truth(df_test):
        raise ValueError(f"ranking_eval needs the truth columns {list(TRUTH_COLUMNS.values())}")
    users = df_test["user_id"].to_numpy()
    _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    keep = counts[inverse.reshape(-1)] >= 2
    groups = users[keep]
    relevance = true_utility(df_test, utility_weights)[keep]
    spec = FusionSpec.from_dict(dict(utility_fusion(utility_weights) if fusion is None else fusion))
    truth = {t: df_test[c].to_numpy(dtype=np.float64) for t, c in TRUTH_COLUMNS.items()}
    model_preds = {t: np.asarray(p, dtype=np.float64) for t, p in preds.items()}
    rng = np.random.default_rng(seed)
    orderings = {
        "fused": fuse_lists(spec, model_preds, users)[keep],
        "product": fuse_lists(FusionSpec.from_dict(PRODUCT_FUSION), model_preds, users)[keep],
        "click_only": model_preds["click"][keep],
        "fused_truth": fuse_lists(spec, truth, users)[keep],
        "oracle": relevance,
        "random": rng.random(len(relevance)),
    }
    out = {f"ndcg{k}_{name}": ndcg_at_k(relevance, s, groups, k) for name, s in orderings.items()}
    out["ndcg_lists"] = float(len(np.unique(groups)))
    return out


def truth_ceiling(df_test: pd.DataFrame) -> dict[str, float]:
    """The held-out metrics of the simulator's truth itself: what a perfect model would score.

    ``click_auc_truth`` / ``like_auc_truth`` (AUC of the true probabilities against the sampled
    labels) and ``watch_xauc_truth`` (XAUC of the expected watch seconds): the labels are
    noisy draws, so even the truth stays well below 1.
    """
    if not has_truth(df_test):
        raise ValueError(f"truth_ceiling needs the truth columns {list(TRUTH_COLUMNS.values())}")
    truth = {t: df_test[c].to_numpy(dtype=np.float64) for t, c in TRUTH_COLUMNS.items()}
    labels = {t: df_test[c].to_numpy(dtype=np.float64) for t, c in LABEL_COLUMNS.items()}
    return {
        "click_auc_truth": auc(labels["click"], truth["click"]),
        "like_auc_truth": auc(labels["like"], truth["like"]),
        "watch_xauc_truth": xauc(labels["watch_time"], truth["watch_time"]),
    }


def calibration_summary(
    df_test: pd.DataFrame, preds: Mapping[str, np.ndarray], n_bins: int = 10
) -> dict[str, Any]:
    """Per task: reliability bins (equal mass) of the held-out predictions, ECE, overall means.

    Small enough for the manifest (``calibration``), where ``vidrank report`` draws the
    reliability diagrams from it without scoring the data again.
    """
    out: dict[str, Any] = {"n_bins": n_bins, "split": "test", "tasks": {}}
    for task, column in LABEL_COLUMNS.items():
        labels = df_test[column].to_numpy(dtype=np.float64)
        bins = reliability_bins(labels, preds[task], n_bins)
        count = np.asarray(bins["count"])
        gap = np.abs(np.asarray(bins["mean_pred"]) - np.asarray(bins["mean_label"]))
        out["tasks"][task] = {
            **bins,
            "ece": float((count * gap).sum() / count.sum()),
            "overall_pred": float(np.mean(preds[task])),
            "overall_label": float(labels.mean()),
        }
    return out
