"""Prediction distributions: the fixed bins, the manifest section and its checks on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.core.bundle import MANIFEST_FILE, BundleError, load_bundle
from model.core.distribution import (
    MANIFEST_KEY,
    PREDICTION_EDGES,
    PROBABILITY_EDGES,
    SECONDS_EDGES,
    Reference,
    bin_counts,
    reference_section,
)
from tests.model.core.test_bundle import make_bundle, read_manifest, write_manifest

EDGES = np.asarray(PREDICTION_EDGES)


def test_edges_cover_probabilities_then_seconds() -> None:
    assert list(PREDICTION_EDGES) == sorted(set(PREDICTION_EDGES))  # strictly increasing
    assert PROBABILITY_EDGES[-1] == 1.0 and PROBABILITY_EDGES[0] <= 0.001
    assert SECONDS_EDGES[0] > 1.0 and SECONDS_EDGES[-1] >= 600


def test_bin_counts_follow_prometheus_le_buckets() -> None:
    values = [0.0, 0.001, 0.0011, 0.5, 1.0, 1.5, 600.0, 601.0, float("nan")]
    counts = bin_counts(values, EDGES)
    assert counts.shape == (len(EDGES) + 1,) and counts.sum() == len(values)
    le = list(PREDICTION_EDGES)
    assert counts[0] == 2  # 0 and 0.001 are <= the first edge
    assert counts[1] == 1  # 0.0011 is in (0.001, 0.0025]
    assert counts[le.index(0.5)] == 1 and counts[le.index(1.0)] == 1
    assert counts[le.index(2.0)] == 1  # 1.5 in (1, 2]
    assert counts[le.index(600.0)] == 1
    assert counts[-1] == 2  # above the last edge, and NaN
    # The same as counting one by one with the le convention.
    rng = np.random.default_rng(0)
    many = np.r_[rng.uniform(0, 1, 500), rng.exponential(40, 500)]
    slow = np.zeros(len(EDGES) + 1, dtype=np.int64)
    for v in many:
        slow[next((i for i, e in enumerate(le) if v <= e), len(le))] += 1
    np.testing.assert_array_equal(bin_counts(many, EDGES), slow)


def test_reference_section_round_trip() -> None:
    preds = {"click": np.array([0.1, 0.2, 0.2]), "watch_time": np.array([3.0, 40.0, 700.0])}
    section = json.loads(json.dumps(reference_section(preds, "held-out")))
    ref = Reference.parse(section)
    assert ref.rows == 3 and ref.source == "held-out" and ref.same_edges(EDGES)
    np.testing.assert_array_equal(ref.counts["click"], bin_counts(preds["click"], EDGES))
    assert Reference.from_manifest({}) is None  # older bundles have no section


def _with_section(bundle_dir: Path, section: Any) -> None:
    manifest = read_manifest(bundle_dir)
    manifest[MANIFEST_KEY] = section
    write_manifest(bundle_dir, manifest)


def good_section() -> dict[str, Any]:
    return reference_section({"click": [0.1], "watch_time": [5.0], "like": [0.02]}, "test")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: s.update(edges=[1.0, 0.5]), "edges: must be strictly increasing"),
        (lambda s: s.update(edges=[]), "edges: must be a non-empty list"),
        (lambda s: s["counts"].update(click=[1, 2]), "counts.click: must be a list of"),
        (lambda s: s["counts"]["like"].__setitem__(0, -1), "counts.like: must hold non-negative"),
        (lambda s: s.update(counts={}), "counts: must map task names"),
        (lambda s: s["counts"].update(clicks=s["counts"]["click"]), "unknown task(s): clicks"),
        (lambda s: s.update(rows=True), "rows: must be a non-negative integer"),
    ],
)
def test_malformed_section_rejects_the_bundle(tmp_path: Path, mutate: Any, reason: str) -> None:
    bundle = make_bundle(tmp_path / "b")
    section = good_section()
    mutate(section)
    _with_section(bundle.path, section)
    with pytest.raises(BundleError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        load_bundle(bundle.path)


def test_bundle_reference_is_optional_and_parsed(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    assert MANIFEST_KEY not in json.loads((bundle.path / MANIFEST_FILE).read_text())
    assert load_bundle(bundle.path).reference is None
    _with_section(bundle.path, good_section())
    ref = load_bundle(bundle.path).reference
    assert ref is not None and set(ref.counts) == {"click", "watch_time", "like"}
    _with_section(bundle.path, "not an object")
    with pytest.raises(BundleError, match="prediction_distribution"):
        load_bundle(bundle.path)
