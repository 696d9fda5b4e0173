"""POST /rank on the tiny model: ranking correctness, formats, fusion, request ids, metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import rank_body, to_columnar
from model.core.fusion import FusionSpec, fuse, rank_order
from model.core.registry import Registry
from tests.service.service_helpers import PROFILES, sample


def spec_of(fusion: dict[str, Any]) -> FusionSpec:
    """The FusionSpec a response reports (profile name aside)."""
    return FusionSpec.from_dict({k: v for k, v in fusion.items() if k != "profile"})


def predictions(items: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {
        t: np.array([it["predictions"][t] for it in items], dtype=np.float64)
        for t in ("click", "watch_time", "like")
    }


def assert_ranked(resp: dict[str, Any], body: dict[str, Any]) -> None:
    """The order equals the fused scores recomputed (in input order) from the predictions."""
    by_id = {it["video_id"]: it for it in resp["items"]}
    ids = [c["video_id"] for c in body["candidates"]]
    items = [by_id[v] for v in ids]  # input order: rank_sum and ties depend on it
    scores = fuse(spec_of(resp["fusion"]), predictions(items))
    np.testing.assert_array_equal(scores, [it["score"] for it in items])
    expected = [ids[i] for i in rank_order(scores)]
    assert [it["video_id"] for it in resp["items"]] == expected


@pytest.mark.parametrize("fusion", [None, "clicky", "watchers", "ranks"])
def test_rank_order_matches_recomputed_fusion(client: TestClient, fusion: str | None) -> None:
    body = rank_body(300, fusion=fusion)
    r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["fusion"]["profile"] == (fusion or "clicky")
    assert len(resp["items"]) == 300
    assert {it["video_id"] for it in resp["items"]} == {c["video_id"] for c in body["candidates"]}
    assert_ranked(resp, body)


def test_default_fusion_is_the_bundles(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    client = make_client()  # no profile file: the bundle's default fusion applies
    body = rank_body(50)
    resp = client.post("/rank", json=body).json()
    default = Registry(registry_dir).bundle(version).default_fusion
    assert spec_of(resp["fusion"]) == FusionSpec.from_dict(default)
    assert resp["model_version"] == version
    assert_ranked(resp, body)


def test_explicit_fusion_weights(client: TestClient) -> None:
    watch = {"weight": 0.1, "transform": "scale", "scale": 60.0}
    fusion = {"method": "weighted_sum", "weights": {"like": 2.0, "watch_time": watch}}
    body = rank_body(100, fusion=fusion)
    resp = client.post("/rank", json=body).json()
    assert resp["fusion"]["method"] == "weighted_sum"
    assert resp["fusion"]["weights"]["like"] == 2.0
    assert "profile" not in resp["fusion"]
    assert_ranked(resp, body)
    p = predictions(resp["items"])
    expected = 2.0 * p["like"] + 0.1 * p["watch_time"] / 60.0
    np.testing.assert_allclose([it["score"] for it in resp["items"]], expected, rtol=1e-12)


def test_fusion_profile_object_form(client: TestClient) -> None:
    resp = client.post("/rank", json=rank_body(20, fusion={"profile": "ranks"})).json()
    assert resp["fusion"] == {
        "method": "rank_sum",
        "weights": {"click": 1.0, "watch_time": 1.0, "like": 0.5},
        "beta": 2.0,
        "profile": "ranks",
    }


def test_top_k(client: TestClient) -> None:
    body = rank_body(200)
    full = client.post("/rank", json=body).json()["items"]
    top = client.post("/rank", json={**body, "top_k": 7}).json()["items"]
    assert top == full[:7]
    more = client.post("/rank", json={**body, "top_k": 10_000}).json()["items"]
    assert more == full


def test_ties_keep_input_order(client: TestClient, tiny_bundle: tuple[Path, str]) -> None:
    """Two ids hashed into the same bucket, identical features: equal scores, input order."""
    schema = Registry(tiny_bundle[0]).bundle(tiny_bundle[1]).schema
    ids = np.arange(1, 200_000, dtype=np.int64)
    j = schema.layout("item").cat.index("video_id")
    buckets = schema.encode_entity("item", {"video_id": ids}, len(ids))["item_cat"][:, j]
    _, first = np.unique(buckets, return_index=True)
    dup = np.setdiff1d(np.arange(len(ids)), first)[0]
    a, b = int(ids[np.flatnonzero(buckets == buckets[dup])[0]]), int(ids[dup])
    assert a != b
    feats = {"author_id": 7, "duration_s": 30.0, "tag": "1,2"}
    for pair in ([a, b], [b, a]):
        body = rank_body(0)
        body["candidates"] = [{"video_id": v, "features": feats} for v in pair]
        items = client.post("/rank", json=body).json()["items"]
        assert items[0]["score"] == items[1]["score"]
        assert [it["video_id"] for it in items] == pair


def test_columnar_candidates_give_identical_results(client: TestClient) -> None:
    body = rank_body(250, seed=3)
    # Rows that omit features, or send null, must match columns holding null.
    body["candidates"][5]["features"].pop("duration_s")
    body["candidates"][6]["features"]["tag"] = None
    body["candidates"][7].pop("features")
    rows = client.post("/rank", json={**body, "request_id": "same"})
    cols = client.post("/rank", json={**to_columnar(body), "request_id": "same"})
    assert rows.status_code == cols.status_code == 200
    assert rows.content == cols.content


def test_video_id_type_is_echoed(client: TestClient) -> None:
    body = rank_body(0)
    body["candidates"] = [{"video_id": "abc"}, {"video_id": 12}, {"video_id": "0012x"}]
    items = client.post("/rank", json=body).json()["items"]
    assert sorted(map(repr, (it["video_id"] for it in items))) == ["'0012x'", "'abc'", "12"]


def test_missing_features_take_defaults(client: TestClient, tiny_bundle: tuple[Path, str]) -> None:
    """A bare candidate is scored exactly as one carrying every default explicitly."""
    schema = Registry(tiny_bundle[0]).bundle(tiny_bundle[1]).schema
    defaults = {
        f.name: f.default
        for f in schema.features
        if f.entity == "item" and f.name != "video_id" and f.default is not None
    }
    bare = {"user": {"user_id": 1}, "candidates": [{"video_id": 5}]}
    explicit = {"user": {"user_id": 1}, "candidates": [{"video_id": 5, "features": defaults}]}
    a = client.post("/rank", json=bare).json()["items"]
    b = client.post("/rank", json=explicit).json()["items"]
    assert a == b


def test_empty_candidates(client: TestClient, version: str) -> None:
    r = client.post("/rank", json={"user": {"user_id": 1}, "candidates": []})
    assert r.status_code == 200
    assert r.json()["items"] == []
    assert r.json()["model_version"] == version


def test_request_id_echoed_or_generated(client: TestClient) -> None:
    r = client.post("/rank", json=rank_body(3, request_id="req-123"))
    assert r.json()["request_id"] == "req-123"
    assert r.headers["x-request-id"] == "req-123"
    ids = {client.post("/rank", json=rank_body(3)).json()["request_id"] for _ in range(3)}
    assert len(ids) == 3
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    r = client.post("/rank", json=rank_body(3), headers={"X-Request-ID": "from-header"})
    assert r.json()["request_id"] == "from-header"


def test_unknown_features_ignored_and_counted(client: TestClient) -> None:
    body = rank_body(20)
    before = sample("vidrank_unknown_features_total", {"feature": "colour"})
    body_unknown = rank_body(20)
    for c in body_unknown["candidates"]:
        c["features"]["colour"] = "red"
    body_unknown["user"]["features"]["shoe_size"] = 44
    a = client.post("/rank", json=body).json()["items"]
    b = client.post("/rank", json=body_unknown).json()["items"]
    assert a == b
    assert sample("vidrank_unknown_features_total", {"feature": "colour"}) == before + 1
    assert sample("vidrank_unknown_features_total", {"feature": "shoe_size"}) >= 1


def test_matches_the_trainers_offline_predictions(client: TestClient, trained_model: Any) -> None:
    """No training/serving skew: logged impressions score as the trainer scored them offline."""
    test, preds = trained_model.test, trained_model.test_preds
    schema = trained_model.schema
    rows = np.random.default_rng(0).choice(len(test), size=25, replace=False)
    for i in rows:
        rec = {k: (v.item() if hasattr(v, "item") else v) for k, v in test.iloc[i].items()}
        body = {
            "user": {
                "user_id": rec["user_id"],
                "features": {n: rec[n] for n in schema.names("user") if n != "user_id"},
            },
            "context": {n: rec[n] for n in schema.names("context")},
            "candidates": [
                {
                    "video_id": rec["video_id"],
                    "features": {n: rec[n] for n in schema.names("item") if n != "video_id"},
                }
            ],
        }
        item = client.post("/rank", json=body).json()["items"][0]
        for task in ("click", "watch_time", "like"):
            assert item["predictions"][task] == pytest.approx(float(preds[task][i]), rel=1e-4)


def test_rank_metrics(client: TestClient, version: str) -> None:
    labels = {"route": "/rank", "method": "POST", "status": "200"}
    before = sample("vidrank_http_requests_total", labels)
    by_version = sample("vidrank_rank_requests_total", {"model_version": version})
    cands = sample("vidrank_rank_candidates_sum")
    client.post("/rank", json=rank_body(40))
    client.post("/rank", json={"user": {"user_id": 1}, "candidates": [{"video_id": 1}] * 2})
    assert sample("vidrank_http_requests_total", labels) == before + 1
    assert sample("vidrank_rank_requests_total", {"model_version": version}) == by_version + 1
    assert sample("vidrank_rank_candidates_sum") == cands + 40
    text = client.get("/metrics").text
    for name in (
        "vidrank_http_request_duration_seconds_bucket",
        "vidrank_inference_seconds_bucket",
        "vidrank_rank_candidates_bucket",
        "vidrank_model_info{",
        "vidrank_model_swaps_total",
        "vidrank_model_swap_failures_total",
        "vidrank_unknown_features_total",
        "vidrank_fusion_profile_reload_failures_total",
        'status="422"',
    ):
        assert name in text, name


def test_profile_reload_failure_counted(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    import os

    profiles = tmp_path / "profiles.toml"
    profiles.write_text(PROFILES)
    client = make_client(fusion_profiles=profiles)
    before = sample("vidrank_fusion_profile_reload_failures_total")
    profiles.write_text("this is = = not toml")
    os.utime(profiles, ns=(1, 1))  # a new signature even within one mtime tick
    store = client.app.state.ranker.profiles  # type: ignore[attr-defined]
    store.reload()
    r = client.post("/rank", json=rank_body(5, fusion="watchers"))
    assert r.status_code == 200  # the last good profiles stay in use
    assert sample("vidrank_fusion_profile_reload_failures_total") == before + 1


def test_openapi_documents_rank(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/rank"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RankRequest"
    )
    assert "RankResponse" in op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert {"RankRequest", "Candidate", "ColumnarCandidates", "ErrorResponse"} <= set(
        spec["components"]["schemas"]
    )
    assert client.get("/docs").status_code == 200
