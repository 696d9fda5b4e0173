"""`vidrank curve`: a tiny learning curve through the CLI (table, plot, truth, resume)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import matplotlib.image
from typer.testing import CliRunner

from model.cli import app
from model.cli import curve as curve_command
from model.training.analysis.curve import CURVE_ARCHS, CURVE_FILE, CURVE_PLOT, Curve
from model.training.config import TrainConfig

TINY = [
    "curve", "--preset", "default", "--seed", "3", "--sizes", "3000,6000",
    "--archs", "shared_bottom", "--small",
]  # fmt: skip


def test_tiny_curve_writes_points_with_the_truth_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "curve"
    done = CliRunner().invoke(app, [*TINY, "--out", str(out)])
    assert done.exit_code == 0, done.output
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["size"], r["arch"]) for r in runs) == [
        (3000, "shared_bottom"), (3000, "truth"), (6000, "shared_bottom"), (6000, "truth"),
    ]  # fmt: skip
    for run in runs:
        assert 0.0 <= run["click_auc"] <= 1.0 and 0.0 <= run["like_auc"] <= 1.0
    truth = {r["size"]: r for r in runs if r["arch"] == "truth"}
    model = {r["size"]: r for r in runs if r["arch"] != "truth"}
    assert all(truth[s]["click_auc"] > model[s]["click_auc"] for s in truth)  # the ceiling
    table = (out / CURVE_FILE).read_text()
    assert "| 3,000 | shared_bottom |" in table and "| 6,000 | truth |" in table
    pixels = matplotlib.image.imread(out / CURVE_PLOT)
    assert pixels.shape[0] > 300 and pixels.std() > 0.01

    again = CliRunner().invoke(app, [*TINY, "--out", str(out)])
    assert again.exit_code == 0 and "shared_bottom" not in again.output  # nothing retrained
    fewer = CliRunner().invoke(app, [*TINY[:5], "--sizes", "6000", *TINY[7:], "--out", str(out)])
    assert fewer.exit_code == 0, fewer.output
    assert "| 3,000 | shared_bottom |" in (out / CURVE_FILE).read_text()  # stored points stay
    other = CliRunner().invoke(app, [*TINY, "--out", str(out), "--seed", "4"])
    assert other.exit_code == 1 and "another world" in other.output


def test_bad_curve_options_name_the_flag(tmp_path: Path) -> None:
    for extra, flag in ((["--sizes", "10"], "--sizes"), (["--archs", "moe"], "--archs")):
        done = CliRunner().invoke(app, [*TINY, "--out", str(tmp_path / "x"), *extra])
        assert done.exit_code == 2 and flag in done.output, done.output
    assert not (tmp_path / "x").exists()


def test_the_default_curve_is_the_default_architecture_and_its_baselines() -> None:
    # the CLI spells the default out (it imports the trainer lazily); both must name the same
    archs = inspect.signature(curve_command).parameters["archs"].default
    assert archs == ",".join(CURVE_ARCHS) and Curve().archs == CURVE_ARCHS
    assert CURVE_ARCHS[0] == TrainConfig().arch
