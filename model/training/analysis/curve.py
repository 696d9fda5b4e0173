"""``vidrank curve``: what more data buys - held-out quality against the number of impressions.

One simulated world (a preset and a seed; users and videos fixed, so a larger log is more
impressions of the same world) is simulated at each size, and every architecture is trained on it
with the trainer's defaults (the full network, ``fit``'s split and early stopping). Each point is
scored on its own held-out test split - click and like AUC, watch XAUC, NDCG@10 of the fused
ranking against the true utility - beside what the simulator's truth scores on the same rows, so
the gap that is left reads as model (the truth is far) or data (a curve still rising).

Files in ``--out``: ``curve.json`` (the world; a rerun must match it), ``runs.jsonl`` (one line per
finished (size, arch) - a rerun skips them), ``curve.md`` and ``curve.png``. ``vidrank report
--curve DIR`` puts the table and the plot in a version's report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from model.simulator.world import PRESETS, preset_config
from model.training.analysis import plots
from model.training.analysis.experiment import (
    METRICS,
    TRUTH,
    run_record,
    truth_metrics,
    variant,
    widened,
)
from model.training.config import ARCHS, TrainConfig
from model.training.fit import fit
from model.training.sources import simulated_frame

CURVE_SIZES = (100_000, 300_000, 1_000_000, 3_000_000)
# the trainer's default architecture beside the two baselines it has to beat
CURVE_ARCHS = (TrainConfig().arch, "shared_bottom", "single_task")
CURVE_FILE, CURVE_PLOT = "curve.md", "curve.png"


@dataclass(frozen=True)
class Curve:
    """The world, the sizes and the architectures of one learning curve."""

    preset: str = "default"
    seed: int = 0
    sizes: tuple[int, ...] = CURVE_SIZES
    archs: tuple[str, ...] = CURVE_ARCHS
    small: bool = False  # the trainer's network; True only for tests

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if not self.sizes or min(self.sizes) < 1_000:
            raise ValueError("--sizes: give impression counts of at least 1000")
        for arch, _ in map(variant, self.archs):  # an unknown option raises here
            if arch not in ARCHS:
                raise ValueError(f"--archs: unknown {arch!r}; choose from {list(ARCHS)}")

    def world(self) -> dict[str, Any]:
        """What makes points comparable: a resumed curve must have the same."""
        return {"preset": self.preset, "seed": self.seed, "small": self.small}


def _open_runs(out: Path, curve: Curve) -> list[dict[str, Any]]:
    meta = out / "curve.json"
    if meta.exists() and json.loads(meta.read_text())["world"] != curve.world():
        raise ValueError(f"--out {out} holds a curve of another world; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps({"world": curve.world()}, indent=2) + "\n")
    path = out / "runs.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def _append(out: Path, runs: list[dict[str, Any]], run: dict[str, Any]) -> None:
    runs.append(run)
    with (out / "runs.jsonl").open("a") as f:
        f.write(json.dumps(run) + "\n")


def run_curve(curve: Curve, out: Path, verbose: bool = True) -> list[dict[str, Any]]:
    """Train every missing (size, arch) point, smallest size first; rewrite the table each time."""
    runs = _open_runs(out, curve)
    for size in sorted(curve.sizes):
        todo = [
            a for a in curve.archs if not any((r["size"], r["arch"]) == (size, a) for r in runs)
        ]
        if not todo:
            continue
        world = preset_config(curve.preset, n_impressions=size, seed=curve.seed)
        frame = simulated_frame(world)
        for name in todo:
            arch, options = variant(name)
            config = TrainConfig(arch=arch, **options, small=curve.small, seed=curve.seed)
            started = time.perf_counter()
            result = fit(frame, config, verbose=False)
            run = run_record(curve.preset, name, curve.seed, result, time.perf_counter() - started)
            _append(out, runs, {**run, "size": size})
            if not any((r["size"], r["arch"]) == (size, TRUTH) for r in runs):
                truth = truth_metrics(result)
                _append(out, runs, {"arch": TRUTH, "seed": curve.seed, "size": size, **truth})
            if verbose:
                print(f"{size:>10,} {name:14s} " + _metrics_text(run), flush=True)
            write_curve(runs, _stored(curve, runs), out)
    write_curve(runs, _stored(curve, runs), out)
    return runs


def _stored(curve: Curve, runs: Sequence[dict[str, Any]]) -> Curve:
    """``curve`` widened to every point stored in its directory: a run that adds sizes or archs
    adds rows to the table and lines to the plot, it does not replace the ones already there."""
    sizes = sorted({*curve.sizes, *(int(r["size"]) for r in runs)})
    return replace(curve, sizes=tuple(sizes), archs=widened(curve.archs, runs, "arch"))


def _metrics_text(run: dict[str, Any]) -> str:
    return " ".join(f"{k}={run[k]:.4f}" for k in METRICS if k in run) + f" ({run['wall_s']}s)"


def curve_frame(runs: Sequence[dict[str, Any]], curve: Curve) -> pd.DataFrame:
    """The points of this curve's sizes and archs (and the truth), by size then arch."""
    frame = pd.DataFrame(list(runs))
    if frame.empty:
        return frame
    archs = [*curve.archs, TRUTH]
    frame = frame[frame["arch"].isin(archs) & frame["size"].isin(curve.sizes)]
    order = frame["arch"].map({a: i for i, a in enumerate(archs)})
    return frame.assign(_a=order).sort_values(["size", "_a"]).drop(columns="_a")


def write_curve(runs: Sequence[dict[str, Any]], curve: Curve, out: Path) -> None:
    """curve.md and curve.png from the points so far."""
    frame = curve_frame(runs, curve)
    if frame.empty:
        return
    (out / CURVE_FILE).write_text(curve_markdown(frame, curve))
    plot_curve(frame, curve, out / CURVE_PLOT)


def curve_markdown(frame: pd.DataFrame, curve: Curve) -> str:
    """The curve as a Markdown table: one row per (impressions, arch)."""
    cols = [c for c in METRICS if c in frame]
    lines = [
        f"# Learning curve: the `{curve.preset}` world, seed {curve.seed}",
        "",
        "Held-out test split (last 10% by time) at each number of simulated impressions; "
        "`truth` = the simulator's expectations on the same rows.",
        "",
        "| impressions | arch | " + " | ".join(METRICS[c] for c in cols) + " |",
        "|" + "---|" * (len(cols) + 2),
    ]
    for _, row in frame.iterrows():
        cells = [f"{row[c]:.4f}" if math.isfinite(row[c]) else "—" for c in cols]
        lines.append(f"| {int(row['size']):,} | {row['arch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(frame: pd.DataFrame, curve: Curve, path: Path) -> None:
    """Each metric against impressions (log scale), one line per arch, the truth dashed."""
    series = {
        label: {
            str(arch): (rows["size"].tolist(), rows[metric].tolist())
            for arch, rows in frame.groupby("arch", sort=False)
        }
        for metric, label in METRICS.items()
        if metric in frame
    }
    title = f"What more data buys: the {curve.preset} world, seed {curve.seed}"
    plots.learning_curves(series, TRUTH, title, path)
