"""vidrank report: every section and valid PNGs, the comparison with production, no-truth data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from model.cli import app
from model.core.registry import Registry
from model.training.analysis.report import REPORT_FILE, fusion_text, report_dir, write_report

SECTIONS = (
    "# Model report:",
    "## Against production",
    "## Training curves",
    "## Quality on the test split",
    "## Calibration (test split)",
    "## Gate usage",
    "## Learning curve",
    "## Fusion",
)


def pngs_of(report: str) -> list[str]:
    """The image files a report links (Markdown ``![...](file.png)``)."""
    return [
        line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")
    ]


def assert_valid_pngs(directory: Path, names: list[str]) -> None:
    for name in names:
        path = directory / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = imread(path)  # decodes the whole image: raises on a truncated or corrupt file
        assert pixels.shape[0] > 100 and pixels.shape[1] > 200
        assert pixels.std() > 0  # something was drawn


def test_report_has_every_section_and_valid_images(registry_copy: Path, version: str) -> None:
    done = CliRunner().invoke(app, ["report", version, "--registry", str(registry_copy)])
    assert done.exit_code == 0, done.output
    directory = report_dir(Registry(registry_copy), version)
    assert done.output.strip() == str(directory / REPORT_FILE)
    report = (directory / REPORT_FILE).read_text()
    positions = [report.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)  # all there, in order
    names = pngs_of(report)
    assert names == ["curves.png", "quality.png", "calibration.png", "gates.png"]
    assert_valid_pngs(directory, names)
    assert "No other production version" in report  # the tiny model is production itself
    assert "No tuned profile yet" in report
    assert "| click AUC |" in report and "truth (ceiling)" in report
    # the rule that kept the epoch (the default: the mean AUC; recorded in the manifest)
    assert "kept the epoch with the highest loss-weighted mean of click AUC" in report
    # Written again, it replaces the old report whole and leaves no temp or old directory.
    write_report(Registry(registry_copy), version)
    assert sorted(p.name for p in directory.parent.iterdir()) == [version]


def publish_variant(registry: Path, version: str, name: str, change: dict[str, float]) -> None:
    """Publish a copy of ``version`` as ``name`` whose manifest metrics differ by ``change``."""
    reg = Registry(registry)
    src = reg.version_dir(version)
    staged = registry.parent / f"staged-{name}"
    shutil.copytree(src, staged)
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["metrics"].update({k: manifest["metrics"][k] + delta for k, delta in change.items()})
    (staged / "manifest.json").write_text(json.dumps(manifest))
    reg.publish(staged, version=name)


def test_a_newcomer_sees_whether_a_version_beats_production(
    registry_copy: Path, version: str
) -> None:
    publish_variant(
        registry_copy, version, "v-next", {"click_auc": 0.01, "like_auc": 0.02, "loss": 0.1}
    )
    report = (write_report(Registry(registry_copy), "v-next") / REPORT_FILE).read_text()
    assert f"**v-next vs production {version}: better on 2, worse on 1 of 6" in report
    assert "| click AUC |" in report and "+0.0100 | **better** |" in report
    assert "+0.1000 | worse |" in report  # a higher loss is worse
    # Once v-next is production, its report compares it with the previous production.
    Registry(registry_copy).activate("v-next")
    report = (write_report(Registry(registry_copy), "v-next") / REPORT_FILE).read_text()
    assert f"vs previous production {version}" in report


def test_report_of_a_bundle_without_truth_metrics(registry_copy: Path, version: str) -> None:
    # Real logs have no truth: the trainer then records neither the ranking evaluation against
    # the utility nor the truth ceilings. The report says so instead of drawing them.
    path = Registry(registry_copy).version_dir(version) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["metrics"] = {
        k: v
        for k, v in manifest["metrics"].items()
        if not k.startswith("ndcg") and not k.endswith("_truth")
    }
    assert "click_auc" in manifest["metrics"] and "ndcg10_fused" not in manifest["metrics"]
    del manifest["calibration"]
    manifest["gate_diagnostics"] = None
    path.write_text(json.dumps(manifest))
    directory = write_report(Registry(registry_copy), version)
    report = (directory / REPORT_FILE).read_text()
    assert all(heading in report for heading in SECTIONS)
    assert "no ground truth" in report and "No truth-based ranking metrics" in report
    assert "No calibration bins" in report and "no gates" in report
    assert pngs_of(report) == ["curves.png"]
    assert_valid_pngs(directory, ["curves.png"])
    assert not (directory / "quality.png").exists()


@pytest.mark.parametrize(
    ("select_by", "text"),
    [("auc", "its own best ranking metric"), ("loss", "its own best validation loss")],
)
def test_report_names_the_taskwise_rule_of_separately_stopped_models(
    registry_copy: Path, version: str, select_by: str, text: str
) -> None:
    # single_task --select-each: each task's network kept at its own epoch (manifest training)
    path = Registry(registry_copy).version_dir(version) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["training"].update(select_each=True, select_by=select_by)
    path.write_text(json.dumps(manifest))
    report = (write_report(Registry(registry_copy), version) / REPORT_FILE).read_text()
    assert f"kept each task's network at the epoch of {text}" in report
    assert "kept the epoch with the" not in report


def test_unknown_version_is_a_one_line_error(tmp_path: Path) -> None:
    done = CliRunner().invoke(app, ["report", "v-none", "--registry", str(tmp_path)])
    assert done.exit_code == 1 and "v-none" in done.output


@pytest.mark.parametrize(
    ("spec", "text"),
    [
        (
            {
                "method": "weighted_product",
                "weights": {"click": 1.0, "watch_time": {"weight": 0.6, "transform": "log1p"}},
            },
            "weighted_product: click 1, watch_time log1p 0.6",
        ),
        (
            {"method": "rank_sum", "weights": {"like": 2.0}, "beta": 5.0},
            "rank_sum: like 2, beta 5",
        ),
        (
            {
                "method": "weighted_sum",
                "weights": {"watch_time": {"weight": 1, "transform": "scale", "scale": 60.0}},
            },
            "weighted_sum: watch_time scale/60 1",
        ),
    ],
)
def test_fusion_text(spec: dict[str, object], text: str) -> None:
    assert fusion_text(spec) == text


def test_an_attached_learning_curve_stays_in_every_report(
    registry_copy: Path, version: str, tmp_path: Path
) -> None:
    from model.training.analysis.curve import Curve, write_curve

    runs = [
        {"arch": a, "size": n, "click_auc": v, "like_auc": v, "watch_xauc": v, "ndcg10_fused": v}
        for n, base in ((3000, 0.6), (9000, 0.65))
        for a, v in (("shared_bottom", base), ("truth", 0.8))
    ]
    curve_dir = tmp_path / "curve"
    curve_dir.mkdir()
    write_curve(runs, Curve(sizes=(3000, 9000), archs=("shared_bottom",)), curve_dir)
    args = ["report", version, "--registry", str(registry_copy)]
    done = CliRunner().invoke(app, [*args, "--curve", str(curve_dir)])
    assert done.exit_code == 0, done.output
    write_report(Registry(registry_copy), version)  # a later report keeps the curve
    directory = report_dir(Registry(registry_copy), version)
    report = (directory / REPORT_FILE).read_text()
    assert "## Learning curve" in report and "| 9,000 | shared_bottom | 0.6500 |" in report
    assert "curve.png" in pngs_of(report)
    assert_valid_pngs(directory, ["curve.png"])
    assert "normalised (entropy / max)" in report  # gate specialisation, readable at a glance
    refused = CliRunner().invoke(app, [*args, "--curve", str(tmp_path / "empty")])
    assert refused.exit_code == 1 and "--curve" in refused.output
    assert "Traceback" not in refused.output
