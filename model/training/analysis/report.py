"""``vidrank report V``: one Markdown page with PNG plots about a published version.

Written to ``<registry>/reports/<V>/`` (``report.md`` + PNGs), next to - not inside - the version,
which is immutable once published: the report is built in a temp directory and renamed into
place, so a reader sees the old report or the new one, and re-running it (``vidrank
tune-fusion`` does, to add its results) replaces it whole. ``vidrank train`` writes it last.

Everything comes from files: the version's manifest (training history, test metrics, truth
ceilings, calibration bins, gate diagnostics, default fusion), the current production version's
manifest (the comparison at the top) and the version's tuning records
(``<registry>/tuning/<V>/*.json``, model/training/analysis/profiles.py). Nothing is scored
again, so a report takes a second or two.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from model.core.fileio import fsync_dir
from model.core.registry import Registry, check_version_name
from model.training.analysis import plots
from model.training.analysis.profiles import load_records

REPORTS_DIR: Final = "reports"
REPORT_FILE: Final = "report.md"
# (metric key, label, +1 when higher is better / -1 when lower is): the verdict's metrics.
HEADLINE: Final = (
    ("click_auc", "click AUC", 1),
    ("like_auc", "like AUC", 1),
    ("watch_xauc", "watch XAUC", 1),
    ("ndcg10_fused", "NDCG@10, default fusion vs true utility", 1),
    ("watch_rmse", "watch RMSE (s)", -1),
    ("loss", "test loss (weighted)", -1),
)
SAME: Final = 5e-4  # differences smaller than this are reported as a tie


@dataclass
class Context:
    """What a report is made of (read once from the registry)."""

    version: str
    manifest: dict[str, Any]
    baseline: tuple[str, str, dict[str, Any]] | None  # (role, version, manifest)
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)
    curve: Path | None = None  # <registry>/curves/<version> when a curve is attached

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.manifest.get("metrics") or {})

    @property
    def tasks(self) -> list[str]:
        return [str(t["name"]) for t in self.manifest.get("tasks", [])]


def report_dir(registry: Registry, version: str) -> Path:
    """``<registry>/reports/<version>``."""
    return registry.root / REPORTS_DIR / check_version_name(version)


def _baseline(registry: Registry, version: str) -> tuple[str, str, dict[str, Any]] | None:
    """Production (or, when ``version`` is production, the previous production), if any."""
    aliases = registry.read_aliases()
    if aliases.production is not None and aliases.production != version:
        role, other = "production", aliases.production
    elif aliases.production == version and aliases.previous:
        role, other = "previous production", aliases.previous[-1]
    else:
        return None
    try:
        return role, other, registry.bundle(other, verify=False).manifest
    except Exception:  # a broken baseline must not stop the report; it says so instead
        return role, other, {}


def load_context(registry: Registry, version: str) -> Context:
    """The version's manifest, its baseline and its tuning records."""
    manifest = registry.bundle(version, verify=False).manifest
    attached = registry.root / CURVES_DIR / version
    curve = attached if (attached / "curve.md").is_file() else None
    baseline = _baseline(registry, version)
    return Context(version, manifest, baseline, load_records(registry, version), curve)


# -- formatting ----------------------------------------------------------------------------------


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "—"
    return f"{value:.{digits}f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (cells as given; numbers formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fusion_text(spec: Mapping[str, Any]) -> str:
    """``weighted_product: click 1, watch_time log1p 0.6, like 0.4`` (compact, for tables)."""
    terms = []
    for task, value in spec.get("weights", {}).items():
        if isinstance(value, Mapping):
            transform = value.get("transform", "identity")
            scale = f"/{value['scale']:g}" if transform == "scale" else ""
            how = "" if transform == "identity" else f" {transform}{scale}"
            terms.append(f"{task}{how} {value['weight']:.3g}")
        else:
            terms.append(f"{task} {value:.3g}")
    knob = f", beta {spec.get('beta', 1.0):.3g}" if spec.get("method") == "rank_sum" else ""
    return f"{spec.get('method')}: {', '.join(terms)}{knob}"


# -- sections -------------------------------------------------------------------------------------
Section = Callable[[Context, Path], str]  # writes its PNGs into the directory, returns Markdown


def _rows_text(metrics: Mapping[str, Any]) -> str:
    keys = ("rows_train", "rows_valid", "rows_test")
    return " / ".join(
        f"{int(metrics[k]):,}" if isinstance(metrics.get(k), int | float) else "—" for k in keys
    )


def header(ctx: Context, out: Path) -> str:
    """Title and what the version is: architecture, data, training options, default fusion."""
    m, metrics = ctx.manifest, ctx.metrics
    training = m.get("training", {})
    arch = str(m.get("mmoe_config", {}).get("arch", "—"))
    gates = (m.get("gate_diagnostics") or {}).get("tasks")
    if gates:
        arch += f" ({len(next(iter(gates.values()))['mean_weights'])} experts)"
    options = f"{training.get('seed')}, {training.get('batch_size')}, {training.get('lr')}"
    rows = [
        ("created", m.get("created_at", "—")),
        ("architecture", arch),
        ("data", training.get("data", "—")),
        ("rows train / valid / test", _rows_text(metrics)),
        ("epochs run / max", f"{_num(metrics.get('epochs'), 0)} / {training.get('epochs_max')}"),
        ("seed, batch size, lr", options),
        ("default fusion", fusion_text(m.get("default_fusion", {}))),
    ]
    return f"# Model report: {ctx.version}\n\n" + md_table(("", ""), rows)


def _verdict_row(key: str, label: str, sign: int, this: Any, base: Any) -> tuple[list[str], int]:
    """One comparison row and its score: +1 better, -1 worse, 0 tie or not comparable."""
    if not all(isinstance(v, int | float) for v in (this, base)):
        return [label, _num(this), _num(base), "—", "not comparable"], 0
    delta = float(this) - float(base)
    score = 0 if abs(delta) < SAME else (1 if delta * sign > 0 else -1)
    word = {1: "**better**", -1: "worse", 0: "same"}[score]
    return [label, _num(this), _num(base), f"{delta:+.4f}", word], score


def verdict(ctx: Context, out: Path) -> str:
    """The comparison with production: the first thing a newcomer should read."""
    title = "## Against production\n\n"
    if ctx.baseline is None:
        return title + "No other production version in this registry to compare with."
    role, other, manifest = ctx.baseline
    if not manifest:
        return title + f"The {role} version {other} could not be read; no comparison."
    base = dict(manifest.get("metrics") or {})
    rows, scores = [], []
    for key, label, sign in HEADLINE:
        row, score = _verdict_row(key, label, sign, ctx.metrics.get(key), base.get(key))
        rows.append(row)
        scores.append(score)
    better, worse = scores.count(1), scores.count(-1)
    summary = f"**{ctx.version} vs {role} {other}: better on {better}, worse on {worse}"
    summary += f" of {len(HEADLINE)} headline metrics.**"
    data, base_data = (x.get("training", {}).get("data") for x in (ctx.manifest, manifest))
    if data != base_data:
        summary += (
            f"\n\nNote: the two were evaluated on different data ({data} vs {base_data}); "
            "the comparison is indicative only."
        )
    header_row = ("metric", ctx.version, f"{other} ({role})", "change", "")
    return title + summary + "\n\n" + md_table(header_row, rows)


def curves(ctx: Context, out: Path) -> str:
    """Training and validation loss per task by epoch, and the validation metrics."""
    title = "## Training curves\n\n"
    history = ctx.manifest.get("training", {}).get("history") or []
    if not history:
        return title + "No training history in this manifest."
    plots.training_curves(history, ctx.tasks, out / "curves.png")
    keys = ("train_loss", "loss", "click_auc", "like_auc", "watch_xauc")
    rows = [[int(h["epoch"]), *(_num(h.get(k)) for k in keys)] for h in history]
    best = ctx.metrics.get("best_valid_loss")
    training = ctx.manifest.get("training", {})
    if training.get("select_each"):
        metric = "ranking metric" if training.get("select_by") == "auc" else "validation loss"
        note = (
            f"Early stopping kept each task's network at the epoch of its own best {metric}"
            f" (single-task models stopped separately; the weighted validation loss of the"
            f" networks kept: {_num(best)})."
        )
    elif training.get("select_by") == "auc":
        note = (
            "Early stopping kept the epoch with the highest loss-weighted mean of click AUC,"
            f" watch XAUC and like AUC (its validation loss: {_num(best)})."
        )
    else:
        note = f"Early stopping kept the epoch with the lowest validation loss ({_num(best)})."
    table = md_table(
        ("epoch", "train loss", "valid loss", "click AUC", "like AUC", "watch XAUC"), rows
    )
    return title + "![training curves](curves.png)\n\n" + table + "\n\n" + note


QUALITY_ROWS: Final = (  # (label, model metric, truth ceiling metric, chance level metric)
    ("click AUC", "click_auc", "click_auc_truth", None),
    ("like AUC", "like_auc", "like_auc_truth", None),
    ("watch XAUC", "watch_xauc", "watch_xauc_truth", None),
    ("NDCG@10 fused", "ndcg10_fused", "ndcg10_fused_truth", "ndcg10_random"),
)


def quality(ctx: Context, out: Path) -> str:
    """Held-out metrics next to the truth's own (the ceiling), when the data has truth."""
    title = "## Quality on the test split\n\n"
    m = ctx.metrics
    has_truth = any(isinstance(m.get(c), int | float) for _, _, c, _ in QUALITY_ROWS)
    if not has_truth:
        rows = [[label, _num(m.get(key))] for label, key, _, _ in QUALITY_ROWS[:3]]
        rows.append(["watch RMSE (s)", _num(m.get("watch_rmse"))])
        return title + (
            "The data has no ground truth (real logs): no ceiling to compare with.\n\n"
            + md_table(("metric", ctx.version), rows)
        )
    plots.quality_bars(
        [(label, m.get(key), m.get(ceiling)) for label, key, ceiling, _ in QUALITY_ROWS],
        out / "quality.png",
    )
    rows = [
        [
            label,
            _num(m.get(key)),
            _num(m.get(ceiling)),
            _share(m.get(key), m.get(ceiling), m.get(chance) if chance else 0.5),
        ]
        for label, key, ceiling, chance in QUALITY_ROWS
    ]
    text = (
        "The ceiling is what the simulator's truth itself scores on the same rows (labels are "
        "noisy draws, so it stays below 1); NDCG@10 is per user against the true expected "
        f"utility. Click-only ranking: NDCG@10 {_num(m.get('ndcg10_click_only'))}; random: "
        f"{_num(m.get('ndcg10_random'))}."
    )
    table = md_table(("metric", ctx.version, "truth (ceiling)", "of the way from chance"), rows)
    return title + "![quality vs truth](quality.png)\n\n" + table + "\n\n" + text


def _share(model: Any, ceiling: Any, chance: Any) -> str:
    """How much of the way from chance (0.5 for AUCs, random order for NDCG) to the ceiling."""
    values = (model, ceiling, chance)
    if not all(isinstance(v, int | float) for v in values) or ceiling <= chance:
        return "—"
    return f"{(model - chance) / (ceiling - chance):.0%}"


def calibration(ctx: Context, out: Path) -> str:
    """Reliability diagrams from the manifest's held-out bins, ECE and mean ratios."""
    title = "## Calibration (test split)\n\n"
    summary = ctx.manifest.get("calibration")
    if not isinstance(summary, Mapping) or not summary.get("tasks"):
        return title + "No calibration bins in this manifest (published before they were kept)."
    tasks = summary["tasks"]
    plots.reliability(tasks, out / "calibration.png")
    rows = [
        [
            task,
            _num(t.get("overall_pred")),
            _num(t.get("overall_label")),
            _num(t["overall_pred"] / t["overall_label"], 3) if t.get("overall_label") else "—",
            _num(t.get("ece"), 5),
        ]
        for task, t in tasks.items()
    ]
    note = (
        f"{summary.get('n_bins')} equal-mass bins of the predictions; ECE = mean |prediction - "
        "label| gap over the bins, weighted by size (watch time in seconds)."
    )
    header_row = ("task", "mean prediction", "mean label", "ratio", "ECE")
    return (
        title
        + "![reliability diagrams](calibration.png)\n\n"
        + md_table(header_row, rows)
        + "\n\n"
        + note
    )


def gates(ctx: Context, out: Path) -> str:
    """Mean gate weight per task x expert (validation split, best epoch)."""
    title = "## Gate usage\n\n"
    diag = ctx.manifest.get("gate_diagnostics")
    if not isinstance(diag, Mapping) or not diag.get("tasks"):
        return title + "This architecture has no gates (or the manifest records none)."
    per_task = diag["tasks"]
    plots.gate_heatmap({t: d["mean_weights"] for t, d in per_task.items()}, out / "gates.png")
    top = float(diag.get("max_entropy") or 0.0)
    rows = [
        [t, _num(d.get("mean_entropy"), 3), _num(diag.get("max_entropy"), 3),
         _num(float(d.get("mean_entropy", 0.0)) / top if top else None, 2),
         _num(d.get("max_mean_share"), 3)]
        for t, d in per_task.items()
    ]  # fmt: skip
    note = (
        "Entropy near 0 means a gate sends (almost) everything to one expert; near the maximum "
        "(log of the number of experts) it mixes them evenly. Tasks whose rows look alike use "
        "the experts alike: the gates then buy nothing over a shared bottom. A gate that "
        "specialises where tasks differ shows a normalised entropy well below 1."
    )
    header_row = (
        "task", "mean gate entropy", "max entropy", "normalised (entropy / max)",
        "largest mean share",
    )  # fmt: skip
    return title + "![gate usage](gates.png)\n\n" + md_table(header_row, rows) + "\n\n" + note


def fusion(ctx: Context, out: Path) -> str:
    """Default fusion vs click-only on the test split; tuned profiles vs both where tuned."""
    title = "## Fusion\n\n"
    m = ctx.metrics
    if isinstance(m.get("ndcg10_fused"), int | float):
        product = (
            f"the weighted product (the default until README section 6) "
            f"{_num(m['ndcg10_product'])}, "
            if "ndcg10_product" in m
            else ""
        )
        text = title + (
            f"On the whole test split, NDCG@10 against the true utility: default fusion "
            f"{_num(m['ndcg10_fused'])}, click-only {_num(m.get('ndcg10_click_only'))}, "
            f"{product}the default formula on the true values "
            f"{_num(m.get('ndcg10_fused_truth'))}.\n\n"
        )
    else:
        text = title + "No truth-based ranking metrics (real logs).\n\n"
    if not ctx.tuning:
        return text + (
            f"No tuned profile yet: `vidrank tune-fusion {ctx.version} --registry ...` searches "
            "one and adds it here."
        )
    for name, record in ctx.tuning.items():
        text += _tuned_section(name, record, out) + "\n\n"
    return text.rstrip()


def _tuned_section(name: str, record: Mapping[str, Any], out: Path) -> str:
    results = record.get("results", {})
    png = f"fusion-{name}.png"
    objective = record.get("objective", {})
    against = "true utility" if objective.get("kind") == "truth" else "logged engagement"
    plots.fusion_bars(results, f"NDCG@{objective.get('k')} vs {against}", out / png)
    profiles = record.get("profiles", {})
    rows = [
        [f, _num(v.get("search")), _num(v.get("report")), fusion_text(profiles.get(f, {}))]
        for f, v in results.items()
    ]
    data = record.get("data", {})
    lines = [
        f"### Tuned profile `{name}`",
        "",
        f"Objective: {objective.get('description')}. Data: {data.get('source')}, "
        f"{data.get('split')}: search {data.get('search_users')} users / "
        f"{data.get('search_impressions')} impressions, report {data.get('report_users')} users "
        f"/ {data.get('report_impressions')} impressions. {record.get('trials')} trials, "
        f"{record.get('sampler')}.",
        "",
        f"![fusion comparison]({png})",
        "",
        md_table(("fusion", "search part", "report part (unseen users)", "spec"), rows),
    ]
    return "\n".join(lines)


CURVES_DIR: Final = "curves"  # <registry>/curves/<version>/: a learning curve attached to it


def attach_curve(registry: Registry, version: str, curve_dir: Path) -> Path:
    """Keep ``vidrank curve``'s table and plot with ``version`` (for every later report)."""
    from model.training.analysis.curve import CURVE_FILE, CURVE_PLOT

    missing = [n for n in (CURVE_FILE, CURVE_PLOT) if not (curve_dir / n).is_file()]
    if missing:
        raise ValueError(f"--curve: {missing} not found in the directory given")
    target = registry.root / CURVES_DIR / check_version_name(version)
    target.mkdir(parents=True, exist_ok=True)
    for name in (CURVE_FILE, CURVE_PLOT):
        shutil.copyfile(curve_dir / name, target / name)
    return target


def learning_curve(ctx: Context, out: Path) -> str:
    """The learning curve attached with ``vidrank report V --curve DIR``, if any."""
    from model.training.analysis.curve import CURVE_FILE, CURVE_PLOT

    title = "## Learning curve\n\n"
    if ctx.curve is None:
        return title + "None attached (`vidrank curve`, then `vidrank report V --curve DIR`)."
    shutil.copyfile(ctx.curve / CURVE_PLOT, out / CURVE_PLOT)
    table = (ctx.curve / CURVE_FILE).read_text(encoding="utf-8").split("\n", 1)[1].strip()
    return title + f"![learning curve]({CURVE_PLOT})\n\n" + table


SECTIONS: Final[tuple[Section, ...]] = (
    header,
    verdict,
    curves,
    quality,
    calibration,
    gates,
    learning_curve,
    fusion,
)


def write_report(registry: Registry, version: str) -> Path:
    """Build the report of ``version`` and put it in place atomically; returns its directory."""
    ctx = load_context(registry, version)
    final = report_dir(registry, version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{version}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        parts = [section(ctx, tmp) for section in SECTIONS]
        (tmp / REPORT_FILE).write_text("\n\n".join(parts) + "\n", encoding="utf-8")
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an older ``final`` is moved aside first, then deleted.

    A directory cannot replace a non-empty one in a single rename: between the two renames a
    reader finds no report (never a half-written one).
    """
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex}")
    had_old = final.exists()
    if had_old:
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if had_old:
        shutil.rmtree(old, ignore_errors=True)
