"""The architectures side by side on the same simulated data and seed.

``python -m model.training.analysis.compare --impressions 300000 [--archs mmoe,shared_bottom]``
trains each architecture (default: all of ``ARCHS``) and prints their test metrics
(model/training/evaluate.py's ranking evaluation included) side by side.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from model.training.config import TrainConfig
from model.training.fit import fit
from model.training.mmoe import ARCHS
from model.training.sources import simulated_impressions

COMPARE_METRICS: tuple[str, ...] = (
    "click_auc",
    "like_auc",
    "click_ece",
    "like_ece",
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
    archs: Sequence[str] = ARCHS,
) -> dict[str, dict[str, Any]]:
    """Train each of ``archs`` on the same simulated data and seed; metrics by arch."""
    frame = simulated_impressions(impressions, seed, task_correlation=task_correlation)
    results: dict[str, dict[str, Any]] = {}
    for arch in archs:
        config = TrainConfig(arch=arch, small=small, epochs=epochs, seed=seed)
        results[arch] = fit(frame, config).metrics
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m model.training.analysis.compare --impressions 300000``."""
    parser = argparse.ArgumentParser(description="The architectures on simulated data.")
    parser.add_argument("--impressions", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--task-correlation", type=float, default=0.5)
    parser.add_argument("--small", action="store_true", help="use the tiny test config")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, from ARCHS")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if unknown := sorted(set(archs) - set(ARCHS)):
        parser.error(f"--archs: unknown {unknown}; choose from {ARCHS}")
    results = compare_archs(
        args.impressions, args.seed, args.epochs, args.task_correlation, args.small, archs
    )
    print(
        f"\n{args.impressions:,} simulated impressions, seed {args.seed}, "
        f"task correlation {args.task_correlation}, up to {args.epochs} epochs"
    )
    print(format_table(results, COMPARE_METRICS))


if __name__ == "__main__":
    main()
