"""``vidrank experiment``: does a multi-gate model beat a shared bottom, and when?

The sweep of the MMoE paper's synthetic study (Ma et al., KDD 2018, Fig. 4) on our simulator:
simulator presets (task relatedness, from conflicting to identical tasks; model/simulator/
world.py's ``PRESETS``) x architectures (``config.ARCHS``: whatever ``--arch`` offers) x seeds.
Seed s simulates world s and trains with seed s, and every architecture of a (preset, seed) trains
on the same frame, so gains over shared-bottom are paired differences.

Each run goes through the trainer's own ``fit`` (chronological 80/10/10 split, early stopping on
the validation loss, best weights restored) and is scored on the held-out test split: click and
like AUC, watch XAUC and NDCG@10 of the fused ranking against the simulator's true utility. What
the truth itself scores on the same rows is recorded as the pseudo-architecture ``truth``.

Files in ``--out``: ``experiment.json`` (the sweep's scale; a rerun must match it), ``runs.jsonl``
(one line per finished run - a rerun skips those, so an interrupted sweep resumes), ``runs.csv``,
``summary.md`` (mean +- sd over seeds, paired gains over shared-bottom, gate diagnostics, then
paired gains over single-task models and over the trainer's default architecture where the sweep
has them, then how much of each gain is the test split's noise: ``split_noise``, from
``BOOTSTRAP`` resamples of the test split's users scored with every run and kept in
``runs.jsonl`` as ``boot_<metric>``) and
``relatedness.png`` (metric vs relatedness, one line per architecture, error bars = sd).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from model.core.metrics import auc, xauc
from model.simulator.world import PRESETS, preset_config
from model.training.analysis.transfer import gradient_report
from model.training.balance import BALANCES
from model.training.batches import encode_split, make_batches
from model.training.config import (
    ARCHS,
    CLICK_FIRST,
    SHARED_LR,
    TrainConfig,
    default_loss_weights,
)
from model.training.fit import TrainResult, fit
from model.training.sources import simulated_frame

SWEEP_PRESETS = ("conflicting", "unrelated", "related", "identical")  # by increasing relatedness
BASELINE = "shared_bottom"
SINGLE_TASK = "single_task"  # the other baseline: one model per task
DEFAULT_ARCH = TrainConfig().arch  # what `vidrank train` ships: every other arch is paired with it
GRADIENT_BATCHES = 4  # test-split batches of 2048 the gradient diagnostics average over
# Test-split replicates per run: its users resampled with replacement, the same draws for every
# architecture of a world (seeded by the world's seed), so paired gains can be bootstrapped.
BOOTSTRAP = 50
# metric -> (label column, prediction head, scorer) of the bootstrapped ranking metrics
BOOTSTRAPPED = {
    "click_auc": ("click", "click", auc),
    "like_auc": ("like", "like", auc),
    "watch_xauc": ("watch_s", "watch_time", xauc),
}
TRUTH = "truth"
METRICS = {  # column -> label in tables and plots
    "click_auc": "click AUC",
    "like_auc": "like AUC",
    "watch_xauc": "watch XAUC",
    "ndcg10_fused": "NDCG@10 fused",
}
COLLAPSE_SHARE = 0.9  # a gate whose mean weight on one expert exceeds this has collapsed


@dataclass(frozen=True)
class Sweep:
    """What to sweep and at which scale (the world is scaled down with the impressions)."""

    presets: tuple[str, ...] = SWEEP_PRESETS
    archs: tuple[str, ...] = (*ARCHS, "mmoe:paper")  # every arch, and MMoE as published
    seeds: tuple[int, ...] = (0, 1, 2)
    # Defaults: what one sweep of 24 runs (2 archs) costs in about an hour on 2 busy shared cores
    # (measured): ~100 impressions per user so that user x field affinities are learnable, more
    # and larger steps than the trainer's defaults (which are tuned for 1M impressions), and the
    # small network (per-step cost, not network size, dominates at this scale).
    impressions: int = 60_000
    epochs: int = 3
    batch_size: int = 1024
    lr: float = 1e-2
    n_users: int = 600
    n_videos: int = 1_500
    small: bool = True  # MMoEConfig.small(); False = the trainer's default network

    def __post_init__(self) -> None:
        for name, given, known in (
            ("--presets", self.presets, PRESETS),
            ("--archs", [variant(a)[0] for a in self.archs], ARCHS),  # bad options raise here
        ):
            unknown = [g for g in given if g not in known]
            if unknown or not given:
                raise ValueError(f"{name}: unknown or empty {unknown}; choose from {list(known)}")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.epochs < 1 or self.impressions < 1_000 or self.batch_size < 1:
            raise ValueError("--epochs and --batch-size must be >= 1, --impressions >= 1000")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.n_users < 1 or self.n_videos < 1:
            raise ValueError("--users and --videos must be >= 1")

    def world(self, preset: str, seed: int) -> dict[str, Any]:
        """SimConfig overrides: authors and music scale with the videos as in the default world."""
        return {
            "n_impressions": self.impressions,
            "seed": seed,
            "n_users": self.n_users,
            "n_videos": self.n_videos,
            "n_authors": max(1, self.n_videos * 3 // 16),
            "n_music": max(1, self.n_videos // 4),
        }

    def scale(self) -> dict[str, Any]:
        """What makes runs comparable: a resumed sweep must have the same."""
        return {k: v for k, v in asdict(self).items() if k not in ("presets", "archs", "seeds")}


EVEN = default_loss_weights()  # every task weight 1
# What ``ARCH:OPTION`` changes in the architecture's own training config.
OPTIONS: dict[str, dict[str, Any]] = {
    **{balance: {"loss_balance": balance} for balance in BALANCES},
    "es": {"entire_space": True},
    "indep": {"entire_space": False},
    # Interaction tables twice as wide: room for every task's driver in the shared dots.
    "wide": {"interaction_dim": 2 * TrainConfig().interaction_dim},
    "levels2": {"ple_levels": 2},  # PLE with two extraction levels (ple:levels2)
    "sharp": {"gate_temperature": 0.1},  # gates at the recipe's temperature
    "soft": {"gate_temperature": 1.0},  # gates at the paper's temperature
    "nodrop": {"gate_dropout": 0.0},  # no expert dropout in the gates (default 0.1)
    "drop25": {"gate_dropout": 0.25},  # expert dropout 0.25 in the gates
    "e4": {"experts": 4},  # OMoE / MMoE with 4 experts (default 8)
    "e16": {"experts": 16},  # OMoE / MMoE with 16 experts
    # MMoE as published (Ma et al., KDD 2018): fixed loss weights, gates at temperature 1
    "paper": {
        "loss_balance": "fixed",
        "gate_temperature": 1.0,
        "shared_lr": 1.0,
        "loss_weights": EVEN,
    },
    "even": {"loss_weights": EVEN},  # every task weight 1 (the mixtures' recipe: click 4)
    # click 2: the mixtures' recipe from README section 5 to section 11 (their runs' label)
    "click2": {"loss_weights": {**EVEN, "click": 2.0}},
    "click4": {"loss_weights": CLICK_FIRST},  # click 4, as the mixtures (for the baselines)
    "click3": {"loss_weights": {**EVEN, "click": 3.0}},  # click 3 and 8: README section 11
    "click8": {"loss_weights": {**EVEN, "click": 8.0}},
    # like 2 / 3 beside the recipe's click 4 (README section 11: like does not gain, click pays)
    "like2": {"loss_weights": {**CLICK_FIRST, "like": 2.0}},
    "like3": {"loss_weights": {**CLICK_FIRST, "like": 3.0}},
    # the product fusion's weights as loss weights (click 1, watch time 0.6, like 0.4; the
    # default fusion until README section 6, evaluate.PRODUCT_FUSION)
    "fusionw": {"loss_weights": {"click": 1.0, "watch_time": 0.6, "like": 0.4}},
    "onelr": {"shared_lr": 1.0},  # shared parameters at the run's learning rate
    "sharedlr": {"shared_lr": SHARED_LR},  # shared parameters at sqrt(T) x (the recipe's)
    "intlr3": {"interaction_lr": 3.0},  # the interaction tables at 3x their rate
    "intlr1": {"interaction_lr": 1.0},  # the interaction tables at their rate
    "intlr2": {"interaction_lr": 2.0},  # the interaction tables at 2x their rate
    "selauc": {"select_by": "auc"},  # early stopping keeps the epoch of the best mean AUC
    "selloss": {"select_by": "loss"},  # early stopping keeps the epoch of the lowest loss
    # single_task: each task's network keeps the epoch of its own best value (separate models)
    "own": {"select_each": True},
}


def variant(name: str) -> tuple[str, dict[str, Any]]:
    """``"ARCH[:OPTION]..."`` -> (arch, its ``TrainConfig`` overrides).

    An option is a loss balance (``stem:fixed``), ``es`` (entire-space heads), ``indep``
    (independent heads), ``wide`` (interaction tables of twice the default width),
    ``levels2`` (PLE with two extraction levels), ``sharp`` / ``soft`` (gates at temperature
    0.1 / 1), ``nodrop`` / ``drop25`` (expert dropout 0 / 0.25 in the gates, default 0.1),
    ``e4`` / ``e16`` (OMoE's and MMoE's 4 / 16 experts, default 8),
    ``onelr`` / ``sharedlr`` (shared parameters at 1 / sqrt(3) x the rate), ``intlr1`` /
    ``intlr2`` / ``intlr3`` (the interaction tables at 1 / 2 / 3 x their rate), ``selauc`` /
    ``selloss`` (early stopping on the loss-weighted mean AUC / on the loss), ``own``
    (``single_task`` with each task's network stopped on its own value), ``even`` (every
    task's loss weight 1; the mixtures' recipe weighs click 4), ``click2`` (click 2, the
    recipe's weight before README section 11), ``click4`` (click 4, e.g. for a baseline),
    ``click3`` / ``click8`` (click 3 / 8), ``like2`` / ``like3`` (like 2 / 3 beside click 4),
    ``fusionw`` (the product fusion's weights as loss weights) or ``paper`` (fixed weights 1,
    temperature 1, one rate: ``mmoe:paper`` is MMoE as Ma et al. published it); what is not
    named stays the architecture's default (config.ARCH_DEFAULTS).
    """
    arch, *options = name.split(":")
    overrides: dict[str, Any] = {}
    for option in options:
        if option not in OPTIONS:
            raise ValueError(f"--archs {name!r}: unknown option {option!r}; use {list(OPTIONS)}")
        overrides.update(OPTIONS[option])
    return arch, overrides


def check_resumable(out: Path, sweep: Sweep) -> None:
    """Refuse an output directory that holds a sweep at another scale (its runs would mix)."""
    meta = out / "experiment.json"
    if meta.exists() and json.loads(meta.read_text())["scale"] != sweep.scale():
        raise ValueError(
            f"--out {out} holds a sweep at another scale ({meta}); use another --out to start anew"
        )


@dataclass
class RunStore:
    """``runs.jsonl`` in the output directory: finished runs, appended one line at a time."""

    out: Path
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def open(cls, out: Path, sweep: Sweep) -> RunStore:
        check_resumable(out, sweep)
        out.mkdir(parents=True, exist_ok=True)
        meta = out / "experiment.json"
        meta.write_text(json.dumps({"scale": sweep.scale()}, indent=2) + "\n")
        path = out / "runs.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return cls(out, [json.loads(line) for line in lines if line.strip()])

    def done(self, preset: str, arch: str, seed: int) -> bool:
        return any((r["preset"], r["arch"], r["seed"]) == (preset, arch, seed) for r in self.runs)

    def add(self, run: dict[str, Any]) -> None:
        self.runs.append(run)
        with (self.out / "runs.jsonl").open("a") as f:
            f.write(json.dumps(run) + "\n")


def gate_summary(diagnostics: dict[str, Any] | None) -> dict[str, float]:
    """Per task: largest mean expert share and gate entropy / log(E) (0 = one-hot, 1 = uniform)."""
    if not diagnostics:
        return {}
    out: dict[str, float] = {}
    max_entropy = float(diagnostics["max_entropy"]) or 1.0
    for task, d in diagnostics["tasks"].items():
        out[f"gate_{task}_max_share"] = float(d["max_mean_share"])
        out[f"gate_{task}_entropy"] = float(d["mean_entropy"]) / max_entropy
    return out


def truth_metrics(result: TrainResult) -> dict[str, float]:
    """What the simulator's expectations score on the held-out rows (the ceiling); NDCG@10 is
    the truth through the same fusion (``ndcg10_fused_truth``)."""
    test = result.test
    return {
        "click_auc": auc(test["click"].to_numpy(), test["true_p_click"].to_numpy()),
        "like_auc": auc(test["like"].to_numpy(), test["true_p_like"].to_numpy()),
        "watch_xauc": xauc(test["watch_s"].to_numpy(), test["true_watch_s"].to_numpy()),
        "ndcg10_fused": float(result.metrics.get("ndcg10_fused_truth", float("nan"))),
    }


def run_record(
    preset: str, arch: str, seed: int, result: TrainResult, seconds: float
) -> dict[str, Any]:
    """One finished run as a flat JSON record."""
    m = result.metrics
    keep = (
        *METRICS,
        "ndcg10_product",
        "ndcg10_fused_truth",
        "ndcg10_click_only",
        "epochs",
        "train_time_s",
    )
    record: dict[str, Any] = {"preset": preset, "arch": arch, "seed": seed}
    record.update({k: float(m[k]) for k in keep if k in m})
    record["wall_s"] = round(seconds, 1)
    record.update(gate_summary(result.gate_diagnostics))
    record.update(gradient_summary(result))
    record.update(bootstrap_metrics(result.test, result.test_preds, seed))
    return record


def bootstrap_metrics(
    test: pd.DataFrame, preds: dict[str, np.ndarray], seed: int, replicates: int = BOOTSTRAP
) -> dict[str, list[float]]:
    """``boot_<metric>``: the ranking metrics on ``replicates`` resamples of the test split.

    Each replicate draws the split's users with replacement and keeps all rows of each draw (a
    user's impressions are not independent). The draws depend on ``seed`` and the split only,
    so every architecture of a world is scored on the same replicates and the replicates of a
    paired gain are paired too: their sd is how much the gain moves with the test split alone.
    """
    _, user = np.unique(test["user_id"].to_numpy(), return_inverse=True)
    user = user.reshape(-1)
    n_users = int(user.max()) + 1 if len(user) else 0
    rng = np.random.default_rng(seed)
    rows = np.arange(len(test))
    labels = {m: test[col].to_numpy(dtype=np.float64) for m, (col, _, _) in BOOTSTRAPPED.items()}
    out: dict[str, list[float]] = {f"boot_{m}": [] for m in BOOTSTRAPPED}
    for _ in range(replicates if n_users else 0):
        copies = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)
        pick = np.repeat(rows, copies[user])
        for metric, (_, head, score) in BOOTSTRAPPED.items():
            value = score(labels[metric][pick], preds[head][pick])
            out[f"boot_{metric}"].append(round(float(value), 5))
    return out


def gradient_summary(result: TrainResult) -> dict[str, float]:
    """Per shared parameter group of the trained model: each task's gradient norm, the largest
    over the smallest, every pair's cosine and the lowest (on a few test-split batches).
    """
    test = encode_split(result.schema, result.test, result.config.watch_scale)
    batches = make_batches(test, 2048, np.random.default_rng(0))
    report = gradient_report(result.model, itertools.islice(batches, GRADIENT_BATCHES))
    out: dict[str, float] = {}
    for group, g in report["groups"].items():
        key = group.replace(" ", "_")
        norms = [v for v in g["norm"].values() if v > 0]
        for task, v in g["norm"].items():
            out[f"grad_{key}_norm_{task}"] = v
        for pair, v in g["cosine"].items():
            out[f"grad_{key}_cos_{pair}"] = v
        if len(norms) > 1 and g["cosine"]:
            out[f"grad_{key}_ratio"] = max(norms) / min(norms)
            out[f"grad_{key}_min_cos"] = min(g["cosine"].values())
    return out


def run_sweep(sweep: Sweep, out: Path, verbose: bool = True) -> RunStore:
    """Train every missing (preset, arch, seed) run; rewrite the reports after each one."""
    store = RunStore.open(out, sweep)
    # Seeds outermost: a sweep cut short still covers every preset with its first seeds.
    for seed in sweep.seeds:
        for preset in sweep.presets:
            todo = [a for a in sweep.archs if not store.done(preset, a, seed)]
            if not todo:
                continue
            frame = simulated_frame(preset_config(preset, **sweep.world(preset, seed)))
            for arch in todo:
                started = time.perf_counter()
                base, options = variant(arch)
                config = TrainConfig(
                    arch=base,
                    **options,
                    small=sweep.small,
                    epochs=sweep.epochs,
                    seed=seed,
                    batch_size=sweep.batch_size,
                    lr=sweep.lr,
                )
                result = fit(frame, config, verbose=False)
                record = run_record(preset, arch, seed, result, time.perf_counter() - started)
                store.add(record)
                if not store.done(preset, TRUTH, seed):
                    truth = truth_metrics(result)
                    store.add({"preset": preset, "arch": TRUTH, "seed": seed, **truth})
                if verbose:
                    print(progress_line(record), flush=True)
                write_reports(store.runs, stored(sweep, store.runs), out)
    write_reports(store.runs, stored(sweep, store.runs), out)
    return store


def stored(sweep: Sweep, runs: Sequence[dict[str, Any]]) -> Sweep:
    """``sweep`` widened to every run stored in its directory (all at its scale): a run that
    adds archs, presets or seeds adds rows to the reports, it does not replace those there."""
    seeds = tuple(sorted({*sweep.seeds, *(int(r["seed"]) for r in runs)}))
    presets, archs = widened(sweep.presets, runs, "preset"), widened(sweep.archs, runs, "arch")
    return replace(sweep, presets=presets, archs=archs, seeds=seeds)


def widened(own: Sequence[Any], runs: Sequence[dict[str, Any]], key: str) -> tuple[Any, ...]:
    """``own`` followed by the other values of ``key`` in ``runs`` (the truth left out), in the
    order they were first stored."""
    return (*own, *dict.fromkeys(r[key] for r in runs if r[key] not in (*own, TRUTH)))


def progress_line(run: dict[str, Any]) -> str:
    metrics = " ".join(f"{k}={run[k]:.4f}" for k in METRICS if k in run)
    return f"{run['preset']:12s} {run['arch']:14s} seed {run['seed']}: {metrics} ({run['wall_s']}s)"


# -- reports ---------------------------------------------------------------------------------


def write_reports(runs: Sequence[dict[str, Any]], sweep: Sweep, out: Path) -> None:
    """runs.csv, summary.md and relatedness.png from the runs of ``sweep`` (``stored``: every
    run in the directory)."""
    frame = sweep_frame(runs, sweep)
    if frame.empty:
        return
    frame.drop(columns=[c for c in frame if c.startswith("boot_")]).to_csv(
        out / "runs.csv", index=False
    )
    stats, gains = aggregate(frame)
    text = summary_markdown(frame, stats, gains, sweep)
    for baseline in (SINGLE_TASK, DEFAULT_ARCH):  # the per-task models, and the trainer's default
        if (frame["arch"] == baseline).any():
            text += gains_section(aggregate(frame, baseline)[1], baseline)
    text += gradient_section(frame)
    for baseline in (BASELINE, SINGLE_TASK):
        text += noise_section(split_noise(frame, baseline), baseline)
    (out / "summary.md").write_text(text)
    plot_relatedness(stats, sweep, out / "relatedness.png")


def sweep_frame(runs: Iterable[dict[str, Any]], sweep: Sweep) -> pd.DataFrame:
    """The runs of the sweep's presets, archs (and truth) and seeds, in sweep order."""
    frame = pd.DataFrame(list(runs))
    if frame.empty:
        return frame
    archs = (*sweep.archs, TRUTH)
    frame = frame[
        frame["preset"].isin(sweep.presets)
        & frame["arch"].isin(archs)
        & frame["seed"].isin(sweep.seeds)
    ]
    order = {"preset": list(sweep.presets), "arch": list(archs)}
    keys = [frame[c].map({v: i for i, v in enumerate(o)}) for c, o in order.items()]
    return (
        frame.assign(_p=keys[0], _a=keys[1])
        .sort_values(["_p", "_a", "seed"])
        .drop(columns=["_p", "_a"])
        .reset_index(drop=True)
    )


def paired_runs(frame: pd.DataFrame, baseline: str, cols: Sequence[str]) -> pd.DataFrame:
    """Every other model's run beside ``baseline``'s run of the same (preset, seed): ``cols``
    as they are and as ``<col>_base``. Empty when either side has no run."""
    base = frame.loc[frame["arch"] == baseline, ["preset", "seed", *cols]]
    models = frame[~frame["arch"].isin([baseline, TRUTH])]
    if base.empty or models.empty:
        return pd.DataFrame()
    return models.merge(base, on=["preset", "seed"], suffixes=("", "_base"))


def aggregate(frame: pd.DataFrame, baseline: str = BASELINE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean, sd and count over seeds per (preset, arch); paired gains over ``baseline``."""
    cols = [c for c in METRICS if c in frame]
    stats = frame.groupby(["preset", "arch"], sort=False)[cols].agg(["mean", "std", "count"])
    paired = paired_runs(frame, baseline, cols)
    if paired.empty:
        return stats, pd.DataFrame()
    for c in cols:
        paired[c] = paired[c] - paired[f"{c}_base"]
    gains = paired.groupby(["preset", "arch"], sort=False)[cols].agg(["mean", "std", "count"])
    return stats, gains


def split_noise(frame: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per (preset, arch) and bootstrapped metric: the sd of the paired gain over ``baseline``
    across the test split's replicates (``bootstrap_metrics``), root mean square over seeds.

    Empty when no run has replicates (runs stored before they were recorded have none).
    """
    cols = [f"boot_{m}" for m in BOOTSTRAPPED if f"boot_{m}" in frame]
    paired = paired_runs(frame, baseline, cols) if cols else pd.DataFrame()
    rows = []
    for _, run in paired.iterrows():
        row = {"preset": run["preset"], "arch": run["arch"]}
        for c in cols:
            a, b = run[c], run[f"{c}_base"]
            ok = isinstance(a, list) and isinstance(b, list) and len(a) == len(b) > 1
            row[c[len("boot_") :]] = np.std(np.subtract(a, b), ddof=1) if ok else np.nan
        rows.append(row)
    if not rows:
        return pd.DataFrame()
    noise = pd.DataFrame(rows)
    metrics = [c for c in noise if c not in ("preset", "arch")]
    squared = noise.assign(**{m: noise[m] ** 2 for m in metrics})
    grouped = squared.groupby(["preset", "arch"], sort=False)[metrics]
    return np.sqrt(grouped.mean()).assign(seeds=grouped.count().iloc[:, 0]).dropna(how="all")


def noise_section(noise: pd.DataFrame, baseline: str) -> str:
    """``split_noise`` as a Markdown section ("" without replicates)."""
    if noise.empty:
        return ""
    metrics = [m for m in BOOTSTRAPPED if m in noise]
    lines = [
        "",
        f"## Test-split noise of the gains over {baseline}",
        "",
        f"The sd of each paired gain over {BOOTSTRAP} resamples of the test split's users (the "
        "same resamples for every architecture of a world), root mean square over seeds. A gain "
        "whose sd over seeds is about this large is bound by the test split's size: more seeds "
        "narrow its mean, a larger world narrows both. A larger sd over seeds is the worlds'.",
        "",
        "| preset | arch | " + " | ".join(METRICS[m] for m in metrics) + " | seeds |",
        "|" + "---|" * (len(metrics) + 3),
    ]
    for (preset, arch), row in noise.iterrows():
        cells = ["—" if not math.isfinite(row[m]) else f"{row[m]:.4f}" for m in metrics]
        lines.append(f"| {preset} | {arch} | " + " | ".join(cells) + f" | {int(row['seeds'])} |")
    return "\n".join(lines) + "\n"


def _cell(mean: float, sd: float, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "—"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    if not math.isfinite(sd):
        return text
    marker = " *" if signed and abs(mean) > sd else ""
    return f"{text} ± {sd:.4f}{marker}"


def _table(stats: pd.DataFrame, signed: bool) -> list[str]:
    cols = [c for c in METRICS if c in stats.columns.get_level_values(0)]
    head = "| preset | arch | " + " | ".join(METRICS[c] for c in cols) + " | seeds |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for (preset, arch), row in stats.iterrows():
        cells = [_cell(row[(c, "mean")], row[(c, "std")], signed) for c in cols]
        n = int(row[(cols[0], "count")])
        lines.append(f"| {preset} | {arch} | " + " | ".join(cells) + f" | {n} |")
    return lines


def gate_lines(frame: pd.DataFrame) -> list[str]:
    """Per (preset, arch) with gates: the largest expert share and normalised entropy per task."""
    share_cols = [c for c in frame.columns if c.startswith("gate_") and c.endswith("_max_share")]
    gated = frame.dropna(subset=share_cols, how="all") if share_cols else frame.iloc[:0]
    if gated.empty:
        return ["No architecture in this sweep has gates."]
    tasks = [c[len("gate_") : -len("_max_share")] for c in share_cols]
    lines = [
        "| preset | arch | " + " | ".join(f"{t}: max share / entropy" for t in tasks) + " |",
        "|" + "---|" * (len(tasks) + 2),
    ]
    for (preset, arch), rows in gated.groupby(["preset", "arch"], sort=False):
        cells = [
            f"{rows[f'gate_{t}_max_share'].mean():.2f} / {rows[f'gate_{t}_entropy'].mean():.2f}"
            for t in tasks
        ]
        lines.append(f"| {preset} | {arch} | " + " | ".join(cells) + " |")
    collapsed = int((gated[share_cols] > COLLAPSE_SHARE).to_numpy().sum())
    lines.append("")
    lines.append(
        f"Collapsed gates (one expert's mean share > {COLLAPSE_SHARE}): {collapsed} of "
        f"{int(gated[share_cols].notna().to_numpy().sum())} task gates."
    )
    return lines


def summary_markdown(
    frame: pd.DataFrame, stats: pd.DataFrame, gains: pd.DataFrame, sweep: Sweep
) -> str:
    """The sweep's tables as Markdown."""
    rho = {p: PRESETS[p].get("task_correlation", 0.5) for p in sweep.presets}
    lines = [
        "# Multi-gate vs shared-bottom across task relatedness",
        "",
        f"{sweep.impressions:,} simulated impressions per world ({sweep.n_users:,} users, "
        f"{sweep.n_videos:,} videos), up to {sweep.epochs} epochs of batch {sweep.batch_size} "
        f"at lr {sweep.lr:g}{' (small network)' if sweep.small else ''}, "
        f"seeds {list(sweep.seeds)}; "
        "held-out test split (last 10% by time). Presets (task correlation): "
        + ", ".join(f"{p} ({rho[p]})" for p in sweep.presets)
        + ". Mean ± sd over seeds; `truth` = the simulator's expectations on the same rows.",
        "",
        *_table(stats, signed=False),
    ]
    lines.append(gains_section(gains, BASELINE).rstrip("\n"))
    lines += ["", "## Gate diagnostics (test split, mean over seeds)", "", *gate_lines(frame)]
    return "\n".join(lines) + "\n"


def gains_section(gains: pd.DataFrame, baseline: str) -> str:
    """The paired-gain table over ``baseline`` as a Markdown section ("" without gains)."""
    if gains.empty:
        return ""
    lines = [
        "",
        f"## Gain over {baseline} (paired by seed; * = |mean| > sd of the gain)",
        "",
        *_table(gains, signed=True),
    ]
    return "\n".join(lines) + "\n"


def gradient_section(frame: pd.DataFrame) -> str:
    """Per (preset, arch): each shared group's task-gradient norm ratio and lowest cosine."""
    ratio_cols = [c for c in frame.columns if c.startswith("grad_") and c.endswith("_ratio")]
    if not ratio_cols:
        return ""
    groups = [c[len("grad_") : -len("_ratio")] for c in ratio_cols]
    lines = [
        "",
        "## Task gradients on shared parameters (test split, mean over seeds)",
        "",
        "Largest / smallest task gradient norm, and the lowest cosine between two tasks'"
        " gradients, per parameter group (model/training/analysis/transfer.py).",
        "",
        "| preset | arch | " + " | ".join(f"{g}: norm ratio / min cos" for g in groups) + " |",
        "|" + "---|" * (len(groups) + 2),
    ]
    for (preset, arch), rows in frame.groupby(["preset", "arch"], sort=False):
        cells = [
            f"{rows[f'grad_{g}_ratio'].mean():.1f} / {rows[f'grad_{g}_min_cos'].mean():+.2f}"
            if rows[f"grad_{g}_ratio"].notna().any()
            else "—"
            for g in groups
        ]
        if any(c != "—" for c in cells):
            lines.append(f"| {preset} | {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_relatedness(stats: pd.DataFrame, sweep: Sweep, path: Path) -> None:
    """Fig. 4-style plot: each metric vs task relatedness, one line per arch, sd error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(sweep.presets))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (metric, label) in zip(axes.flat, METRICS.items(), strict=True):
        for arch in sweep.archs:
            rows = [(preset, arch) in stats.index for preset in sweep.presets]
            if metric not in stats.columns.get_level_values(0) or not any(rows):
                continue
            sub = stats.reindex([(p, arch) for p in sweep.presets])[metric]
            ax.errorbar(x, sub["mean"], yerr=sub["std"].fillna(0.0), marker="o", capsize=3,
                        label=arch)  # fmt: skip
        ax.set_title(label)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xticks(x, [_tick(p) for p in sweep.presets])
        ax.set_xlabel("task relatedness")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{sweep.impressions:,} impressions, {len(sweep.seeds)} seeds (error bars: sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tick(preset: str) -> str:
    return f"{preset}\nρ={PRESETS[preset].get('task_correlation', 0.5)}"
