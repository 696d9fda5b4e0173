"""Smoke test of the benchmark harness: a tiny model, tiny N, very short runs.

It checks that ``python -m benchmarks.run`` produces the JSON, the markdown table and the plot
with the expected keys - never how fast anything is (no timed assertions). wrk is used when it is
installed; otherwise the harness falls back to its Python client and must say so.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("floor", "graphs", "vidrank", "textbook", "shadow", "features", "lifecycle", "overload")
TARGET_IDS = {
    "p50_vs_floor",
    "p99_vs_p50",
    "throughput_vs_limit",
    "throughput_vs_textbook",
    "fused_vs_naive_fp32",
    "fused_naive_parity",
    "fused_int8_vs_naive",
    "int8_auc_drop",
    "shadow_p50",
    "shadow_throughput",
    "rss_one_worker",
    "start_to_ready",
    "swap_extra",
    "goodput_c64",
    "goodput_overload",
    "goodput_c64_wrk",
    "goodput_overload_wrk",
    "overload_answered_p99",
    "overload_timeouts",
    "overload_shed_p99",
    "overload_c8_no_shed",
    "fs_embedded_vs_floor",
    "fs_redis_p50",
    "fs_redis_rps",
    "fs_million_load",
    "fs_million_rss",
}

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Run the harness once; returns (results dir, parsed JSON)."""
    out = tmp_path_factory.mktemp("results")
    work = tmp_path_factory.mktemp("work")
    cmd = [
        sys.executable, "-m", "benchmarks.run", "--quick", "--small",
        "--ns", "16", "--per-n", "3", "--impressions", "5000", "--epochs", "1",
        "--http-seconds", "1", "--floor-seconds", "0.1", "--starts", "1",
        "--overload-seconds", "1", "--overload-connections", "64",
        "--store-videos", "20000",
        "--out", str(out), "--work-dir", str(work),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return out, json.loads(files[0].read_text())


def test_json_has_every_part(bench_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_run
    for key in ("machine", "settings", "model", "targets", *PARTS):
        assert key in results, key
    machine = results["machine"]
    assert {"cpu_model", "cores", "avx2", "packages"} <= machine.keys()
    assert results["settings"]["ns"] == [16]
    for threads in ("threads1", "threads2"):
        assert set(results["floor"][threads]) == {"16"}
        assert results["floor"][threads]["16"]["p50"] > 0
    stages = results["stages"]["16"]  # one /rank stage by stage (features in the request)
    for stage in ("parse", "encode", "run", "fuse", "serialise"):
        assert stages[stage] > 0, stage
    assert stages["fetch"] == 0
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"), 0.01)
    # The ids paths stage by stage: Redis's round trip is fetch, the embedded store has none.
    by_path = results["features"]["rows"]["stages"]
    assert by_path["embedded"]["fetch"] == 0 and by_path["embedded"]["encode"] > 0
    assert by_path["redis"]["fetch"] > 0 and by_path["redis"]["encode"] > 0


def test_http_results(bench_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_run
    for name in ("vidrank", "textbook"):
        part = results[name]
        for key in ("latency_c1", "throughput_c8"):
            run = part[key]["16"]
            assert run["requests"] > 0
            assert {"p50", "p99"} <= run["latency_ms"].keys()
            assert run["errors"].get("status", 0) == 0, run["errors"]
        assert part["start_to_ready_s"] > 0
    # the int8 bundle is served unless quantisation cost too much held-out AUC (then a note says so)
    notes = results["settings"]["notes"]
    assert "vidrank_int8" in results or any(n.startswith("int8 not measured") for n in notes)
    life = results["lifecycle"]
    assert life["rss_one_worker_bytes"] > 0
    assert life["model_footprint"]["footprint_bytes"] > 0
    assert len(life["swap"]["swaps"]) >= 2


def test_shadow_results(bench_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_run
    part = results["shadow"]
    assert part["n"] == 16 and set(part["runs"]) == {"none", "shadow"}
    summary = part["summary"]
    for mode in ("none", "shadow"):
        assert summary[mode]["rps_c8"] > 0 and summary[mode]["errors"] == 0
    assert summary["none"]["compared_share_c1"] == 0  # no shadow: nothing compared
    assert summary["shadow"]["compared_share_c1"] > 0
    assert summary["shadow"]["shadow_ms_per_compared"] > 0
    assert 0 < summary["rps_ratio_bound"] <= 1


def test_overload_rows(bench_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = bench_run
    o = results["overload"]
    assert (o["workers"], o["connections"]) == (2, 64)
    runs = [o["shedding"]["c8"], o["shedding"]["overload"], o["no_shedding"]["overload"]]
    for run in runs:
        assert run["answered"] > 0 and run["answered_ms"]["p50"] > 0
        assert run["answered"] == run["statuses"]["200"]
        assert run["connects"] >= 1 and run["connect_ms"]["p50"] >= 0
    if shutil.which("wrk"):  # the same loads with wrk, responses counted by status
        assert set(o["wrk"]) == {"c8", "overload"}
        for row in o["wrk"].values():
            assert row["answered"] > 0 and row["answered_rps"] > 0
            assert row["all_ms"]["p50"] > 0
    assert "## Overload" in (out / "latest.md").read_text()


def test_load_generator_is_recorded(bench_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_run
    settings = results["settings"]
    if shutil.which("wrk"):
        assert settings["load_generator"] == "wrk"
        assert results["vidrank"]["latency_c1"]["16"]["client"] == "wrk"
    else:
        assert settings["load_generator"] == "python-fallback"
        assert any("Python keep-alive" in note for note in settings["notes"])


def test_graphs_and_quantisation(bench_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = bench_run
    graphs = results["graphs"]
    expected = {f"{v}_{p}" for v in ("fused", "trained", "naive") for p in ("fp32", "int8")}
    assert set(graphs["latency"]) == expected
    assert graphs["parity"]["naive_fp32"]["max_abs_prob"] < 1e-4
    assert graphs["census"]["fused_int8"]["int8_matmuls"] > 0
    assert set(graphs["heldout"]["delta"]["fused_int8"]) == {"click", "like"}


def test_targets_markdown_and_plot(bench_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = bench_run
    assert {t["id"] for t in results["targets"]} == TARGET_IDS
    for target in results["targets"]:
        assert {"target", "measured", "met", "unit"} <= target.keys()
    text = (out / "latest.md").read_text()
    headings = (
        "## Targets", "## Latency at concurrency 1", "## Throughput", "## Shadow scoring",
        "## Model graphs", "## Where a /rank goes",
    )  # fmt: skip
    for heading in headings:
        assert heading in text
    png = (out / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG")
