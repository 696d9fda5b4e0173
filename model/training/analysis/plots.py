"""The PNG figures of ``vidrank report`` (matplotlib, object API: no pyplot, no display needed).

Every function takes plain data from a manifest or a tuning record, draws one figure and saves it
as a PNG at ``path``. ``Figure`` objects are used directly (not ``pyplot``), so nothing global is
touched and no GUI backend is ever selected; saving a PNG goes through the Agg renderer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
TASK_LABELS = {"click": "click", "watch_time": "watch time", "like": "like"}


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the history, skipping epochs that lack it."""
    points = [(float(h["epoch"]), float(h[key])) for h in history if h.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def training_curves(history: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: Path) -> None:
    """Per task: training and validation loss by epoch; last panel: the weighted total."""
    panels = [*tasks, "total"]
    fig = Figure(figsize=(3.2 * len(panels), 3.0))
    for i, task in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        train_key, valid_key = (
            ("train_loss", "loss") if task == "total" else (f"train_loss_{task}", f"loss_{task}")
        )
        for key, label, style in ((train_key, "train", "o-"), (valid_key, "validation", "s--")):
            x, y = _series(history, key)
            if x:
                ax.plot(x, y, style, label=label)
        ax.set_title(TASK_LABELS.get(task, task) + (" (weighted)" if task == "total" else ""))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, path)


def quality_bars(rows: Sequence[tuple[str, float | None, float | None]], path: Path) -> None:
    """Grouped bars: the model's value next to the truth ceiling for each metric."""
    fig = Figure(figsize=(1.6 * len(rows) + 2, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(rows))
    model = [np.nan if r[1] is None else r[1] for r in rows]
    ceiling = [np.nan if r[2] is None else r[2] for r in rows]
    ax.bar(x - 0.2, model, 0.4, label="this model")
    ax.bar(x + 0.2, ceiling, 0.4, label="truth (ceiling)", alpha=0.6)
    for xi, value in zip(x, model, strict=True):
        if np.isfinite(value):
            ax.text(xi - 0.2, value, f"{value:.3f}", ha="center", va="bottom", fontsize="small")
    ax.set_xticks(x, [r[0] for r in rows], fontsize="small")
    ax.set_ylim(0.0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def reliability(calibration: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """One reliability diagram per task: mean label against mean prediction per bin."""
    tasks = list(calibration)
    fig = Figure(figsize=(3.4 * len(tasks), 3.4))
    for i, task in enumerate(tasks):
        ax: Axes = fig.add_subplot(1, len(tasks), i + 1)
        bins = calibration[task]
        pred, label = np.asarray(bins["mean_pred"]), np.asarray(bins["mean_label"])
        hi = float(max(pred.max(), label.max(), 1e-9)) * 1.05
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8, ls=":", label="perfect")
        ax.plot(pred, label, "o-", label=f"model (ECE {bins['ece']:.4f})")
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
        unit = " (s)" if task == "watch_time" else ""
        ax.set_xlabel(f"mean prediction{unit}")
        ax.set_ylabel(f"mean label{unit}")
        ax.set_title(TASK_LABELS.get(task, task))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    _save(fig, path)


def gate_heatmap(weights: Mapping[str, Sequence[float]], path: Path) -> None:
    """Mean gate weight per task (rows) and expert (columns), annotated."""
    tasks = list(weights)
    grid = np.asarray([weights[t] for t in tasks], dtype=np.float64)
    fig = Figure(figsize=(1.0 + 0.7 * grid.shape[1], 0.8 + 0.6 * len(tasks)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=max(float(grid.max()), 1e-9))
    for (r, c), value in np.ndenumerate(grid):
        ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white", fontsize="small")
    ax.set_xticks(range(grid.shape[1]), [f"e{i}" for i in range(grid.shape[1])])
    ax.set_yticks(range(len(tasks)), [TASK_LABELS.get(t, t) for t in tasks])
    ax.set_xlabel("expert")
    fig.colorbar(image, ax=ax, fraction=0.05)
    _save(fig, path)


def fusion_bars(values: Mapping[str, Mapping[str, float]], ylabel: str, path: Path) -> None:
    """Grouped bars: each fusion (outer key) on each data part (inner key)."""
    names = list(values)
    parts = list(next(iter(values.values())))
    fig = Figure(figsize=(2.0 + 1.4 * len(names), 3.4))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(parts)
    x = np.arange(len(names))
    for j, part in enumerate(parts):
        heights = [values[n][part] for n in names]
        ax.bar(x + (j - (len(parts) - 1) / 2) * width, heights, width, label=part)
    finite = [v[p] for v in values.values() for p in parts if np.isfinite(v[p])]
    low = min(finite, default=0.0)
    ax.set_ylim(max(0.0, low - 0.1 * (1.0 - low) - 0.02), 1.0)
    ax.set_xticks(x, names)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def learning_curves(
    series: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    truth: str,
    title: str,
    path: Path,
) -> None:
    """One panel per metric (``series``: metric label -> arch -> (impressions, values)) against
    impressions on a log axis; the ``truth`` line dashed.
    """
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2, sharex=True).flat
    for ax, (label, lines) in zip(axes, series.items(), strict=False):
        for arch, (x, y) in lines.items():
            style = {"linestyle": "--", "color": "black"} if arch == truth else {"marker": "o"}
            ax.plot(x, y, label=arch, **style)
        ax.set_xscale("log")
        ax.set_title(label)
        ax.set_xlabel("impressions")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)
