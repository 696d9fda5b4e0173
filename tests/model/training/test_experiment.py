"""`vidrank experiment`: a tiny real sweep through the CLI (files, parsable table, valid PNG,
resume), and the aggregation (paired gains, gate collapse) on hand-made runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from model.cli import app
from model.core.metrics import auc
from model.training.analysis.experiment import (
    BASELINE,
    BOOTSTRAP,
    METRICS,
    TRUTH,
    Sweep,
    aggregate,
    bootstrap_metrics,
    gains_section,
    gate_lines,
    noise_section,
    split_noise,
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
    assert not [c for c in csv.columns if c.startswith("boot_")]  # replicates: runs.jsonl only
    for run in [r for r in runs if r["arch"] != TRUTH]:  # the truth has no replicates
        assert len(run["boot_like_auc"]) == BOOTSTRAP and 0 <= min(run["boot_click_auc"]) <= 1

    tables = markdown_tables((swept / "summary.md").read_text())
    results, gains, gates, over_default, grads, noise = tables
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

    # The test-split noise of mmoe's gains over the shared bottom: one row, three sds >= 0.
    summary = (swept / "summary.md").read_text()
    assert "## Test-split noise of the gains over shared_bottom" in summary
    assert [row[:2] for row in noise[1:]] == [["conflicting", "mmoe"]] and noise[1][-1] == "1"
    assert all(float(c) >= 0 for c in noise[1][2:-1])

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


def test_bootstrap_replicates_are_paired_within_a_world() -> None:
    """Every arch of a world is scored on the same resamples of users, so a gain's replicates are
    paired: two equal models have noise 0, and the noise is the sd of the replicates' gains."""
    rng = np.random.default_rng(3)
    users = np.repeat(np.arange(60), 12)
    test = pd.DataFrame(
        {
            "user_id": users,
            "click": rng.random(len(users)) < 0.4,
            "like": rng.random(len(users)) < 0.1,
            "watch_s": rng.exponential(10.0, len(users)),
        }
    )
    signal = test[["click", "like", "watch_s"]].to_numpy(dtype=float)
    a = {
        h: signal[:, i] + rng.normal(0, 1, len(users))
        for i, h in enumerate(("click", "like", "watch_time"))
    }
    b = {h: v + rng.normal(0, 1, len(users)) for h, v in a.items()}
    boot_a, again, boot_b = (bootstrap_metrics(test, p, seed=7) for p in (a, a, b))
    assert boot_a == again and boot_a != bootstrap_metrics(test, a, seed=8)
    assert all(len(v) == BOOTSTRAP for v in boot_a.values())
    full = auc(test["click"], a["click"])
    spread = np.std(boot_a["boot_click_auc"])
    assert spread > 0 and abs(np.mean(boot_a["boot_click_auc"]) - full) < 3 * spread

    def run(arch: str, seed: int, boot: dict[str, list[float]]) -> dict[str, object]:
        return {"preset": "conflicting", "arch": arch, "seed": seed, **boot}

    frame = pd.DataFrame(
        [run(BASELINE, 0, boot_a), run("mmoe", 0, boot_b), run("omoe", 0, boot_a)]
        + [run(BASELINE, 1, boot_b), run("mmoe", 1, boot_a), run("omoe", 1, boot_b)]
    )
    noise = split_noise(frame)
    sd = np.std(np.subtract(boot_b["boot_like_auc"], boot_a["boot_like_auc"]), ddof=1)
    assert noise.loc[("conflicting", "mmoe"), "like_auc"] == pytest.approx(sd)  # RMS of equal sds
    assert noise.loc[("conflicting", "omoe"), "watch_xauc"] == 0.0
    assert sd > 0 and int(noise.loc[("conflicting", "mmoe"), "seeds"]) == 2
    text = noise_section(noise, BASELINE)
    assert f"| conflicting | mmoe | {noise.loc[('conflicting', 'mmoe'), 'click_auc']:.4f} |" in text
    # Runs stored before replicates were recorded: no section rather than a table of blanks.
    assert noise_section(split_noise(hand_runs()), BASELINE) == ""
