"""Offline evaluation: ranking quality against the simulator's truth; MMoE vs shared-bottom.

``ranking_eval`` treats each user's held-out impressions as one candidate list and measures
NDCG@k of several orderings against the true expected utility of each impression. The utility is
the simulator's ``true_utility`` (one definition for the whole repo):

    U = w_click * true_p_click + w_watch * true_watch_s + w_like * true_p_like

with ``simulate.DEFAULT_UTILITY_WEIGHTS`` (click 1, watch 0.1 per second, like 20), under
which the three terms contribute about equally on average. Fusion is ``model.core.fusion.fuse``, the
exact code the service ranks with (pure numpy).

``python -m model.training.evaluate --impressions 300000`` trains both architectures on the same
simulated
data and seed and prints their metrics side by side.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from model.core.fusion import FusionSpec, fuse
from model.core.metrics import ndcg_at_k
from model.core.tasks import TRUTH_COLUMNS
from model.training.simulate import true_utility

# The trainer's recommended fusion (manifest ``default_fusion``): YouTube-style weighted product,
# watch seconds through log1p so that a long video does not drown the probabilities.
DEFAULT_FUSION: dict[str, Any] = {
    "method": "weighted_product",
    "weights": {"click": 1.0, "watch_time": {"weight": 0.6, "transform": "log1p"}, "like": 0.4},
}


def has_truth(df: pd.DataFrame) -> bool:
    """Whether ``df`` carries the simulator's truth columns."""
    return all(c in df.columns for c in TRUTH_COLUMNS.values())


def ranking_eval(
    df_test: pd.DataFrame,
    preds: Mapping[str, np.ndarray],
    fusion: Mapping[str, Any] = DEFAULT_FUSION,
    utility_weights: Mapping[str, float] | None = None,
    k: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """NDCG@k per user (each user's test impressions = one list; lists < 2 skipped), averaged.

    Orderings: ``fused`` (the model's predictions through ``fusion``), ``click_only`` (model
    p_click), ``fused_truth`` (the true per-task values through the same fusion: the ceiling of
    this fusion formula), ``oracle`` (the utility itself; 1 by construction, a sanity check) and
    ``random``. Relevance is ``true_utility(df_test, utility_weights)``.
    """
    if not has_truth(df_test):
        raise ValueError(f"ranking_eval needs the truth columns {list(TRUTH_COLUMNS.values())}")
    users = df_test["user_id"].to_numpy()
    _, inverse, counts = np.unique(users, return_inverse=True, return_counts=True)
    keep = counts[inverse.reshape(-1)] >= 2
    groups = users[keep]
    relevance = true_utility(df_test, utility_weights)[keep]
    spec = FusionSpec.from_dict(dict(fusion))
    truth = {t: df_test[c].to_numpy(dtype=np.float64) for t, c in TRUTH_COLUMNS.items()}
    model_preds = {t: np.asarray(p, dtype=np.float64) for t, p in preds.items()}
    rng = np.random.default_rng(seed)
    orderings = {
        "fused": fuse(spec, model_preds)[keep],
        "click_only": model_preds["click"][keep],
        "fused_truth": fuse(spec, truth)[keep],
        "oracle": relevance,
        "random": rng.random(len(relevance)),
    }
    out = {f"ndcg{k}_{name}": ndcg_at_k(relevance, s, groups, k) for name, s in orderings.items()}
    out["ndcg_lists"] = float(len(np.unique(groups)))
    return out


# -- MMoE vs shared-bottom ---------------------------------------------------------------------

COMPARE_METRICS: tuple[str, ...] = (
    "click_auc",
    "like_auc",
    "watch_rmse",
    "watch_xauc",
    "watch_calibration",
    "ndcg10_fused",
    "ndcg10_click_only",
    "ndcg10_fused_truth",
    "ndcg10_random",
    "epochs",
    "train_time_s",
)


def format_table(columns: Mapping[str, Mapping[str, Any]], rows: Sequence[str]) -> str:
    """A plain-text table: one row per metric, one column per run."""
    names = list(columns)
    lines = [f"{'metric':22s}" + "".join(f"{n:>16s}" for n in names)]
    for row in rows:
        cells = []
        for n in names:
            v = columns[n].get(row)
            cells.append(f"{v:16.4f}" if isinstance(v, float) else f"{v!s:>16s}")
        lines.append(f"{row:22s}" + "".join(cells))
    return "\n".join(lines)


def compare_archs(
    impressions: int = 300_000,
    seed: int = 0,
    epochs: int = 3,
    task_correlation: float = 0.5,
    small: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train MMoE and shared-bottom on the same simulated data and seed; metrics by arch."""
    from model.training.train import fit, simulated_impressions  # torch only when comparing

    frame = simulated_impressions(impressions, seed, task_correlation=task_correlation)
    results: dict[str, dict[str, Any]] = {}
    for arch in ("mmoe", "shared_bottom"):
        result = fit(frame, arch=arch, small=small, epochs=epochs, seed=seed)
        results[arch] = result.metrics
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m model.training.evaluate --impressions 300000``."""
    parser = argparse.ArgumentParser(description="MMoE vs shared-bottom on simulated data.")
    parser.add_argument("--impressions", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--task-correlation", type=float, default=0.5)
    parser.add_argument("--small", action="store_true", help="use the tiny test config")
    args = parser.parse_args(argv)
    results = compare_archs(
        args.impressions, args.seed, args.epochs, args.task_correlation, args.small
    )
    print(
        f"\n{args.impressions:,} simulated impressions, seed {args.seed}, "
        f"task correlation {args.task_correlation}, up to {args.epochs} epochs"
    )
    print(format_table(results, COMPARE_METRICS))


if __name__ == "__main__":
    main()
