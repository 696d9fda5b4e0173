"""The API contract: code, README and OpenAPI agree (issue 10), and client input stays bounded.

Each test here pins one decision of the contract: JSON must be declared (415), gzip bodies are
decoded within the body limit, fused scores are never null, the README's and the OpenAPI's
example requests work on a plain ``vidrank serve``, every status an operation answers is in its
OpenAPI entry, errors never carry the registry's path, and unknown feature names cost a bounded
amount of work per request.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import AUTH, ROOT, rank_body
from model.core.registry import ALIASES_FILE
from service import metrics
from tests.service.service_helpers import corrupt_copy, publish_as, sample
from tests.service.test_api_errors import assert_error

JSON_HEADERS = {"content-type": "application/json"}
GZIP_HEADERS = {**JSON_HEADERS, "content-encoding": "gzip"}


# -- Content-Type and Content-Encoding ----------------------------------------------------------
def test_gzip_body_ranks_like_the_plain_one(client: TestClient) -> None:
    body = orjson.dumps(rank_body(200, request_id="gz"))
    plain = client.post("/rank", content=body, headers=JSON_HEADERS)
    packed = client.post("/rank", content=gzip.compress(body), headers=GZIP_HEADERS)
    assert plain.status_code == packed.status_code == 200, packed.text
    assert packed.json() == plain.json()
    r = client.post("/rank", content=body, headers={**JSON_HEADERS, "content-encoding": "identity"})
    assert r.json() == plain.json()


def test_gzip_bomb_is_413_without_inflating_it(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_candidates=1)  # body limit: 1 MiB + 8 KiB
    limit = client.app.state.settings.max_body_bytes()  # type: ignore[attr-defined]
    prefix = b'{"user": {"user_id": 1}, "candidates": [], "request_id": "'
    bomb = gzip.compress(prefix + b"x" * (200 * limit) + b'"}')  # ~200x the limit inflated
    assert len(bomb) < limit
    assert_error(client.post("/rank", content=bomb, headers=GZIP_HEADERS), 413)
    fits = gzip.compress(orjson.dumps(rank_body(1)))
    assert client.post("/rank", content=fits, headers=GZIP_HEADERS).status_code == 200


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (orjson.dumps(rank_body(2)), "plain JSON declared as gzip"),
        (gzip.compress(orjson.dumps(rank_body(2)))[:-12], "truncated"),
        (gzip.compress(orjson.dumps(rank_body(2))) + b"junk", "trailing data"),
        (zlib.compress(orjson.dumps(rank_body(2))), "zlib, not gzip"),
    ],
)
def test_bad_gzip_is_400(client: TestClient, raw: bytes, what: str) -> None:
    r = client.post("/rank", content=raw, headers=GZIP_HEADERS)
    assert_error(r, 400, code="malformed_encoding")


@pytest.mark.parametrize("coding", ["br", "deflate", "compress", "gzip, br"])
def test_other_content_codings_are_415(client: TestClient, coding: str) -> None:
    r = client.post(
        "/rank",
        content=orjson.dumps(rank_body(2)),
        headers={**JSON_HEADERS, "content-encoding": coding},
    )
    assert_error(r, 415, code="unsupported_media_type")


# -- fused scores are finite --------------------------------------------------------------------
NAN_FUSIONS = [
    # weights that overflow to +inf and -inf in one sum: inf - inf = NaN
    (
        {
            "method": "weighted_sum",
            "weights": {
                "click": {"weight": -1e308, "transform": "scale", "scale": 1e-300},
                "watch_time": 1e308,
            },
        },
        "fusion.weights.click.weight",
    ),
    (
        {"method": "weighted_sum", "weights": {"watch_time": 1e300, "click": -1e300}},
        "fusion.weights.watch_time",
    ),
    (
        {
            "method": "weighted_product",
            "weights": {
                "click": 1.0,
                "watch_time": {"weight": 1.0, "transform": "scale", "scale": 1e-320},
            },
        },
        "fusion.weights.watch_time.scale",
    ),
    (
        {"method": "rank_sum", "weights": {"click": 1e6, "like": -1e6}, "beta": 1e-320},
        "fusion.beta",
    ),
]


@pytest.mark.parametrize(("fusion", "field"), NAN_FUSIONS)
def test_weights_that_made_nan_scores_are_422(
    client: TestClient, fusion: dict[str, Any], field: str
) -> None:
    r = client.post("/rank", json=rank_body(20, fusion=fusion))
    assert_error(r, 422, field, code="invalid_fusion")
    assert "null" not in r.text


def test_extreme_valid_weights_give_finite_scores(client: TestClient) -> None:
    fusion = {
        "method": "weighted_sum",
        "weights": {
            "click": {"weight": 1e6, "transform": "scale", "scale": 1e-6},
            "watch_time": -1e6,
            "like": {"weight": 1e6, "transform": "log1p"},
        },
    }
    r = client.post("/rank", json=rank_body(50, fusion=fusion))
    assert r.status_code == 200, r.text
    assert all(np.isfinite(it["score"]) for it in r.json()["items"])


def test_a_model_giving_nan_is_a_500_never_a_null_score(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer = client.app.state.reconciler.state.production  # type: ignore[attr-defined]
    real = scorer.score

    def nan_watch(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        preds = real(inputs)
        return {**preds, "watch_time": np.full_like(preds["watch_time"], np.nan)}

    monkeypatch.setattr(scorer, "score", nan_watch)
    r = client.post("/rank", json=rank_body(5, fusion="watchers"))
    assert_error(r, 500, code="internal_error")


# -- the documented examples work on a plain `vidrank serve` -----------------------------------
def readme_example() -> tuple[dict[str, Any], dict[str, Any]]:
    """The README's example request (the curl -d body) and response."""
    text = (ROOT / "README.md").read_text()
    api = text[text.index("## The API") :]
    request = re.search(r"-d '(\{.*?\})'\n```", api, re.S)
    response = re.search(r"```json\n(\{.*?\})\n```", api, re.S)
    assert request and response, "the README's API section lost its example"
    return json.loads(request.group(1)), json.loads(response.group(1))


def test_readme_example_works_on_a_plain_serve(make_client: Callable[..., TestClient]) -> None:
    request, documented = readme_example()
    r = make_client().post("/rank", json=request)  # no profile file, as `vidrank serve`
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) == set(documented)
    assert got["request_id"] == documented["request_id"]
    assert got["fusion"] == documented["fusion"]  # the model's default fusion, as shown
    assert len(got["items"]) == len(documented["items"]) == request["top_k"]
    assert {it["video_id"] for it in got["items"]} <= {c["video_id"] for c in request["candidates"]}


def test_openapi_example_works_on_a_plain_serve(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    spec = client.get("/openapi.json").json()
    examples = spec["components"]["schemas"]["RankRequest"]["examples"]
    assert examples
    for example in examples:
        r = client.post("/rank", json=example)
        assert r.status_code == 200, r.text


# -- every status an operation answers is documented -------------------------------------------
def documented(client: TestClient, method: str, path: str) -> set[str]:
    spec = client.get("/openapi.json").json()
    return set(spec["paths"][path][method]["responses"])


def test_openapi_lists_every_status(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    corrupt_copy(registry_dir, version, "broken", "missing_onnx")
    client = make_client()
    seen: dict[tuple[str, str], set[int]] = {}

    def call(method: str, template: str, url: str, **kw: Any) -> None:
        status = client.request(method, url, **kw).status_code
        seen.setdefault((method, template), set()).add(status)

    call("get", "/models/{version}", f"/models/{version}")
    call("get", "/models/{version}", "/models/nope")
    call("get", "/models/{version}", "/models/broken")
    call("put", "/admin/canary", "/admin/canary", content=b"{", headers={**AUTH, **JSON_HEADERS})
    call("put", "/admin/canary", "/admin/canary", json={"version": 1}, headers=AUTH)
    call("put", "/admin/canary", "/admin/canary", json={"version": "x", "percent": 5}, headers=AUTH)
    call("put", "/admin/canary", "/admin/canary", json={"version": "v", "percent": 5})
    call("post", "/admin/models/{version}/activate", "/admin/models/nope/activate", headers=AUTH)
    call("post", "/admin/models/{version}/activate", "/admin/models/broken/activate", headers=AUTH)
    call("post", "/admin/models/rollback", "/admin/models/rollback", headers=AUTH)
    call("delete", "/admin/canary", "/admin/canary", headers={"Authorization": "Bearer wrong"})
    call("post", "/rank", "/rank", content=b"{", headers=JSON_HEADERS)
    call("post", "/rank", "/rank", content=b"{}", headers={"content-type": "text/plain"})
    call("post", "/rank", "/rank", content=b"{}", headers=GZIP_HEADERS)
    call("post", "/rank", "/rank", json={"user": {}})
    assert seen[("get", "/models/{version}")] == {200, 404, 409}
    assert {400, 422, 404, 401} <= seen[("put", "/admin/canary")]
    for (method, template), statuses in seen.items():
        assert {str(s) for s in statuses} <= documented(client, method, template), template


def test_openapi_declares_no_default_validation_error(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(spec)
    for item in spec["paths"].values():
        for op in item.values():
            for status, resp in op["responses"].items():
                if status != "200":
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/ErrorResponse"), (op["summary"], status)


def test_openapi_states_the_limits(make_client: Callable[..., TestClient]) -> None:
    spec = make_client(max_candidates=77).get("/openapi.json").json()["components"]["schemas"]
    rows = spec["RankRequest"]["properties"]["candidates"]["anyOf"][0]
    assert rows["maxItems"] == 77
    assert spec["ColumnarCandidates"]["properties"]["video_id"]["maxItems"] == 77
    assert {"maxLength": 256, "type": "string"} in spec["Candidate"]["properties"]["video_id"][
        "anyOf"
    ]
    assert spec["RankRequest"]["properties"]["request_id"]["anyOf"][0]["maxLength"] == 128
    assert spec["TaskWeight"]["properties"]["weight"]["maximum"] == 1e6
    assert spec["RankedItem"]["properties"]["score"]["type"] == "number"  # never null


def test_405_allows_every_method_of_the_path(client: TestClient) -> None:
    r = client.post("/admin/canary", headers=AUTH)
    assert_error(r, 405, code="method_not_allowed")
    assert r.headers["allow"] == "DELETE, PUT"
    assert client.get("/rank").headers["allow"] == "POST"


def test_canary_percent_must_be_a_number_not_a_boolean(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    publish_as(registry_dir, version, "v2")
    r = make_client().put("/admin/canary", json={"version": "v2", "percent": True}, headers=AUTH)
    assert_error(r, 422, "percent")


# -- no registry paths in answers ---------------------------------------------------------------
@pytest.mark.parametrize(
    "how",
    ["corrupt_onnx", "checksum_mismatch", "missing_onnx", "missing_manifest", "manifest_not_json"],
)
def test_admin_errors_do_not_carry_the_registry_path(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str, how: str
) -> None:
    corrupt_copy(registry_dir, version, "bad", how)
    client = make_client()
    answers = [
        client.post("/admin/models/nope/activate", headers=AUTH),
        client.post("/admin/models/bad/activate", headers=AUTH),
        client.put("/admin/canary", json={"version": "bad", "percent": 5}, headers=AUTH),
        client.put("/admin/canary", json={"version": "nope", "percent": 5}, headers=AUTH),
        client.get("/models/bad"),
        client.get("/models/nope"),
        client.get("/models"),
    ]
    assert [a.status_code for a in answers[:4]] == [404, 409, 409, 404]
    for a in answers:
        assert str(registry_dir) not in a.text, a.text


def test_broken_aliases_is_a_documented_409_without_the_path(
    make_client: Callable[..., TestClient], registry_dir: Path
) -> None:
    client = make_client()
    (registry_dir / ALIASES_FILE).write_text("{ not json")
    for method, path, r in (
        ("post", "/admin/models/rollback", client.post("/admin/models/rollback", headers=AUTH)),
        ("delete", "/admin/canary", client.delete("/admin/canary", headers=AUTH)),
    ):
        assert_error(r, 409)
        assert ALIASES_FILE in r.text and str(registry_dir) not in r.text
        assert "409" in documented(client, method, path)
    # /models still answers (an operator needs it most then): no aliases, the versions, no path.
    r = client.get("/models")
    assert r.status_code == 200, r.text
    assert r.json()["aliases"] is None and r.json()["versions"]
    assert str(registry_dir) not in r.text


# -- unicode digit ids --------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["³", "٣", "１２", "²³"])
def test_unicode_digit_ids_are_plain_strings(
    client: TestClient, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    body = rank_body(3)
    body["user"]["user_id"] = text
    body["candidates"][0]["video_id"] = text
    body["candidates"][1]["features"]["author_id"] = text
    with caplog.at_level(logging.DEBUG):
        r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    assert text in {it["video_id"] for it in r.json()["items"]}
    assert not [rec for rec in caplog.records if rec.exc_info or rec.levelno >= logging.WARNING]


# -- unknown feature names: bounded work per request -------------------------------------------
def test_unknown_names_cost_a_bounded_number_of_counter_updates(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    labels = metrics.UNKNOWN_FEATURES.labels

    def counting(*names: str) -> Any:
        calls.append(names[0])
        return labels(*names)

    monkeypatch.setattr(metrics.UNKNOWN_FEATURES, "labels", counting)
    body = rank_body(3)
    names = {f"invented_{i}": i for i in range(20_000)}
    body["candidates"][0]["features"].update(names)
    body["user"]["features"].update({f"u{i}": 1 for i in range(100)})
    total = sample("vidrank_unknown_feature_names_total")
    r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text  # unknown names are ignored, never an error
    assert len(calls) <= metrics.UNKNOWN_NAMES_BY_LABEL_PER_REQUEST
    assert sample("vidrank_unknown_feature_names_total") == total + 20_100


def test_unknown_name_labels_stay_bounded(client: TestClient) -> None:
    for batch in range(5):
        body = rank_body(2)
        body["candidates"][0]["features"].update({f"n{batch}_{i}": 1 for i in range(100)})
        assert client.post("/rank", json=body).status_code == 200
    series = {
        s.labels["feature"]
        for m in metrics.UNKNOWN_FEATURES.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert len(series) <= metrics.MAX_UNKNOWN_FEATURE_LABELS + 1
    assert all(len(label) <= metrics.UNKNOWN_LABEL_CHARS for label in series)
