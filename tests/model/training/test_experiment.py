"""`vidrank experiment`: a tiny real sweep through the CLI (files, parsable table, valid PNG,
resume), and the aggregation (paired gains, gate collapse) on hand-made runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from typer.testing import CliRunner

from model.cli import app
from model.training.analysis.experiment import (
    BASELINE,
    METRICS,
    TRUTH,
    Sweep,
    aggregate,
    gains_section,
    gate_lines,
    summary_markdown,
    variant,
)

TINY = [
    "experiment", "--presets", "conflicting", "--archs", f"mmoe,{BASELINE}", "--seeds", "0",
    "--impressions", "3000", "--users", "150", "--videos", "200", "--epochs", "1", "--small",
]  # fmt: skip
CELL = re.compile(r"^[+-]?\d+\.\d{4} ± \d+\.\d{4}( \*)?$|^[+-]?\d+\.\d{4}$|^—$")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` as rows of cells (the separator row dropped)."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experiment")
    done = CliRunner().invoke(app, [*TINY, "--out", str(out)])
    assert done.exit_code == 0, done.output
    return out


def test_tiny_sweep_writes_runs_table_and_plot(swept: Path) -> None:
    runs = [json.loads(line) for line in (swept / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["arch"] for r in runs) == sorted(["mmoe", BASELINE, TRUTH])
    assert all(r["preset"] == "conflicting" and r["seed"] == 0 for r in runs)
    for run in runs:
        for metric in ("click_auc", "like_auc", "watch_xauc"):
            assert 0.0 <= run[metric] <= 1.0, (run["arch"], metric)
    mmoe = next(r for r in runs if r["arch"] == "mmoe")
    assert 0.0 < mmoe["gate_like_max_share"] <= 1.0 and 0.0 <= mmoe["gate_like_entropy"] <= 1.0
    csv = pd.read_csv(swept / "runs.csv")
    assert len(csv) == 3 and set(METRICS) <= set(csv.columns)

    tables = markdown_tables((swept / "summary.md").read_text())
    results, gains, gates, over_default, grads = tables
    header = results[0]
    assert header[:2] == ["preset", "arch"] and header[2:6] == list(METRICS.values())
    assert [row[1] for row in results[1:]] == ["mmoe", BASELINE, TRUTH]
    for table in (results, gains):
        for row in table[1:]:
            assert len(row) == len(table[0])
            assert all(CELL.match(c) for c in row[2:-1]), row
    mmoe_ndcg = float(results[1][5].split(" ")[0])
    base_ndcg = float(results[2][5].split(" ")[0])
    gain = float(gains[1][5].split(" ")[0])
    assert gains[1][:2] == ["conflicting", "mmoe"]
    assert gain == pytest.approx(mmoe_ndcg - base_ndcg, abs=2e-4)  # rounding of both cells
    # ... and the same pair the other way round, against the trainer's default (mmoe)
    assert "## Gain over mmoe" in (swept / "summary.md").read_text()
    assert [row[:2] for row in over_default[1:]] == [["conflicting", BASELINE]]
    assert float(over_default[1][5].split(" ")[0]) == pytest.approx(-gain, abs=1e-4)
    assert gates[1][:2] == ["conflicting", "mmoe"]
    # Task gradients per shared group, for both architectures: "norm ratio / min cos" cells.
    assert [row[:2] for row in grads[1:]] == [["conflicting", "mmoe"], ["conflicting", BASELINE]]
    assert grads[0][2].startswith("embeddings") and all(
        re.match(r"^\d+\.\d / [+-]\d\.\d\d$|^—$", c) for row in grads[1:] for c in row[2:]
    )

    png = swept / "relatedness.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 400
    assert pixels.std() > 0.01  # something is drawn


def test_rerun_resumes_and_a_rescaled_sweep_is_refused(swept: Path) -> None:
    before = (swept / "runs.jsonl").read_bytes()
    again = CliRunner().invoke(app, [*TINY, "--out", str(swept)])
    assert again.exit_code == 0, again.output
    assert "seed 0" not in again.output  # nothing was trained again
    assert (swept / "runs.jsonl").read_bytes() == before
    other = [*TINY, "--out", str(swept), "--impressions", "4000"]
    refused = CliRunner().invoke(app, other)
    assert refused.exit_code == 2 and "--out" in refused.output
    assert (swept / "runs.jsonl").read_bytes() == before


def test_a_run_with_other_archs_adds_to_the_reports(swept: Path) -> None:
    """A later invocation with another arch into the same directory: the reports keep the runs
    already there (runs.csv, the summary's tables) and add the new one."""
    more = [a if a != f"mmoe,{BASELINE}" else "omoe" for a in TINY]
    done = CliRunner().invoke(app, [*more, "--out", str(swept)])
    assert done.exit_code == 0, done.output
    assert sorted(pd.read_csv(swept / "runs.csv")["arch"]) == sorted(
        ["mmoe", BASELINE, "omoe", TRUTH]
    )
    results = markdown_tables((swept / "summary.md").read_text())[0]
    assert [row[1] for row in results[1:]] == ["omoe", "mmoe", BASELINE, TRUTH]


def test_bad_options_name_the_flag(tmp_path: Path) -> None:
    for extra, flag in (
        (["--presets", "nope"], "--presets"),
        (["--archs", "moe"], "--archs"),
        (["--seeds", "a"], "--seeds"),
    ):
        done = CliRunner().invoke(app, [*TINY, "--out", str(tmp_path / "x"), *extra])
        assert done.exit_code == 2 and flag in done.output, done.output
    assert not (tmp_path / "x").exists()


def hand_runs() -> pd.DataFrame:
    rows = []
    for seed, (base, mmoe) in enumerate(((0.60, 0.65), (0.70, 0.74))):
        for arch, value in ((BASELINE, base), ("mmoe", mmoe), (TRUTH, 0.9)):
            row = {"preset": "unrelated", "arch": arch, "seed": seed}
            row.update(dict.fromkeys(METRICS, value))
            if arch == "mmoe":
                row.update({"gate_click_max_share": 0.95, "gate_click_entropy": 0.05})
                row.update({"gate_like_max_share": 0.30, "gate_like_entropy": 0.95})
            rows.append(row)
    return pd.DataFrame(rows)


def test_gains_are_paired_by_seed_and_collapse_is_flagged() -> None:
    frame = hand_runs()
    stats, gains = aggregate(frame)
    gain = gains.loc[("unrelated", "mmoe"), ("ndcg10_fused", "mean")]
    sd = gains.loc[("unrelated", "mmoe"), ("ndcg10_fused", "std")]
    assert gain == pytest.approx(0.045)
    assert sd == pytest.approx(math.sqrt(((0.05 - 0.045) ** 2 + (0.04 - 0.045) ** 2) / 1))
    assert stats.loc[("unrelated", BASELINE), ("click_auc", "mean")] == pytest.approx(0.65)
    lines = gate_lines(frame)
    assert "| unrelated | mmoe | 0.95 / 0.05 | 0.30 / 0.95 |" in lines
    assert lines[-1].startswith("Collapsed gates") and ": 2 of 4 task gates" in lines[-1]
    sweep = Sweep(presets=("unrelated",), archs=("mmoe", BASELINE), seeds=(0, 1))
    text = summary_markdown(frame, stats, gains, sweep)
    assert "| unrelated | mmoe | +0.0450 ± 0.0071 * |" in text


def test_gains_over_single_task_and_balance_variants() -> None:
    frame = hand_runs()
    single = frame[frame["arch"] == BASELINE].assign(arch="single_task")
    single[list(METRICS)] = single[list(METRICS)] + 0.02
    frame = pd.concat([frame, single], ignore_index=True)
    _, gains = aggregate(frame, "single_task")
    assert gains.loc[("unrelated", "mmoe"), ("click_auc", "mean")] == pytest.approx(0.025)
    assert ("unrelated", BASELINE) in gains.index and ("unrelated", TRUTH) not in gains.index
    assert "Gain over single_task" in gains_section(gains, "single_task")
    assert gains_section(gains.iloc[:0], "single_task") == ""
    assert variant("stem:gradnorm") == ("stem", {"loss_balance": "gradnorm"})
    assert variant("mmoe") == ("mmoe", {})
    assert variant("mmoe:es:uncertainty") == (
        "mmoe",
        {"entire_space": True, "loss_balance": "uncertainty"},
    )
    assert variant("stem:wide") == ("stem", {"interaction_dim": 64})
    Sweep(archs=("stem:gradnorm", "mmoe"))  # a variant is a valid arch of a sweep
    with pytest.raises(ValueError, match="--archs"):
        Sweep(archs=("mmoe:magic",))
