"""Every bad input gets the one error shape, the right status and the offending field's path."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.harness import rank_body, to_columnar

USER = {"user_id": 7}


def body_with(**changes: Any) -> dict[str, Any]:
    """A valid 4-candidate request with top-level fields replaced (None value = removed)."""
    body = rank_body(4)
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def cand_with(index: int, **features: Any) -> dict[str, Any]:
    body = rank_body(4)
    body["candidates"][index]["features"].update(features)
    return body


def assert_error(r: Any, status: int, field: str | None = None, code: str | None = None) -> None:
    """The one error body: {"error": {code, message, details?}}, nothing else, no traceback."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert set(err) <= {"code", "message", "details"}
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text
    if field is not None:
        assert err["details"]["field"] == field, err
    if code is not None:
        assert err["code"] == code


BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    ("no user", body_with(user=None), "user"),
    ("user not object", body_with(user=[1]), "user"),
    ("no user_id", body_with(user={"features": {}}), "user.user_id"),
    ("user_id float", body_with(user={"user_id": 1.5}), "user.user_id"),
    ("user_id bool", body_with(user={"user_id": True}), "user.user_id"),
    ("user_id null", body_with(user={"user_id": None}), "user.user_id"),
    ("user_id list", body_with(user={"user_id": [1]}), "user.user_id"),
    ("user extra field", body_with(user={"user_id": 1, "age": 3}), "user.age"),
    ("user features list", body_with(user={"user_id": 1, "features": [1]}), "user.features"),
    (
        "user numeric 'NaN'",
        body_with(user={"user_id": 1, "features": {"fans_user_num": "NaN"}}),
        "user.features.fans_user_num",
    ),
    ("context list", body_with(context=[1]), "context"),
    ("context float category", body_with(context={"hour": 1.5}), "context.hour"),
    ("no candidates", body_with(candidates=None), "candidates"),
    ("candidates string", body_with(candidates="abc"), "candidates"),
    ("candidate not object", body_with(candidates=[{"video_id": 1}, 5]), "candidates[1]"),
    (
        "no video_id",
        body_with(candidates=[{"video_id": 1}, {"video_id": 2}, {"features": {}}]),
        "candidates[2].video_id",
    ),
    ("video_id float", body_with(candidates=[{"video_id": 1.0}]), "candidates[0].video_id"),
    ("video_id bool", body_with(candidates=[{"video_id": False}]), "candidates[0].video_id"),
    ("video_id null", body_with(candidates=[{"video_id": None}]), "candidates[0].video_id"),
    ("video_id object", body_with(candidates=[{"video_id": {}}]), "candidates[0].video_id"),
    (
        "candidate extra field",
        body_with(candidates=[{"video_id": 1}, {"video_id": 2, "score": 3}]),
        "candidates[1].score",
    ),
    (
        "features list",
        body_with(candidates=[{"video_id": 1}, {"video_id": 2, "features": [1]}]),
        "candidates[1].features",
    ),
    ("numeric 'NaN'", cand_with(3, duration_s="NaN"), "candidates[3].features.duration_s"),
    ("numeric 'inf'", cand_with(2, duration_s="inf"), "candidates[2].features.duration_s"),
    ("numeric string", cand_with(1, duration_s="12"), "candidates[1].features.duration_s"),
    ("numeric bool list", cand_with(1, duration_s=[1]), "candidates[1].features.duration_s"),
    ("categorical float", cand_with(2, author_id=2.5), "candidates[2].features.author_id"),
    ("categorical bool", cand_with(2, author_id=True), "candidates[2].features.author_id"),
    ("numeric bool", cand_with(1, duration_s=False), "candidates[1].features.duration_s"),
    ("context bool", body_with(context={"hour": True}), "context.hour"),
    (
        "user categorical bool",
        body_with(user={"user_id": 1, "features": {"is_video_author": True}}),
        "user.features.is_video_author",
    ),
    ("tag list bool", cand_with(3, tag=[1, True]), "candidates[3].features.tag"),
    ("long category", cand_with(1, video_type="x" * 257), "candidates[1].features.video_type"),
    ("long tag string", cand_with(2, tag="1," * 200), "candidates[2].features.tag"),
    ("long tag in list", cand_with(0, tag=["1", "y" * 300]), "candidates[0].features.tag"),
    ("long user_id", body_with(user={"user_id": "u" * 257}), "user.user_id"),
    (
        "long user category",
        body_with(user={"user_id": 1, "features": {"user_active_degree": "z" * 1000}}),
        "user.features.user_active_degree",
    ),
    ("long context category", body_with(context={"tab": "t" * 300}), "context.tab"),
    (
        "long video_id",
        body_with(candidates=[{"video_id": 1}, {"video_id": "v" * 257}]),
        "candidates[1].video_id",
    ),
    (
        "long columnar video_id",
        body_with(candidates={"video_id": [1, "v" * 10_000]}),
        "candidates.video_id[1]",
    ),
    (
        "long columnar category",
        body_with(candidates={"video_id": [1, 2], "features": {"music_id": ["m", "m" * 257]}}),
        "candidates.features.music_id[1]",
    ),
    ("categorical object", cand_with(0, author_id={"a": 1}), "candidates[0].features.author_id"),
    ("multi object", cand_with(1, tag={"a": 1}), "candidates[1].features.tag"),
    ("multi nested", cand_with(1, tag=[[1]]), "candidates[1].features.tag"),
    ("unknown top-level field", body_with(candidate=[]), "candidate"),
    ("top_k zero", body_with(top_k=0), "top_k"),
    ("top_k negative", body_with(top_k=-3), "top_k"),
    ("top_k float", body_with(top_k=2.5), "top_k"),
    ("top_k string", body_with(top_k="3"), "top_k"),
    ("top_k bool", body_with(top_k=True), "top_k"),
    ("request_id int", body_with(request_id=5), "request_id"),
    ("request_id empty", body_with(request_id=""), "request_id"),
    ("request_id too long", body_with(request_id="x" * 129), "request_id"),
    ("request_id CRLF", body_with(request_id="a\r\nX-Injected: 1"), "request_id"),
    ("request_id NUL", body_with(request_id="a\x00b"), "request_id"),
    ("request_id DEL", body_with(request_id="a\x7f"), "request_id"),
    ("request_id trailing LF", body_with(request_id="abc\n"), "request_id"),
    ("request_id edge space", body_with(request_id=" abc"), "request_id"),
    (
        "unknown task",
        body_with(fusion={"method": "weighted_sum", "weights": {"clik": 1.0}}),
        "fusion.weights.clik",
    ),
    (
        "unknown method",
        body_with(fusion={"method": "max", "weights": {"click": 1.0}}),
        "fusion.method",
    ),
    (
        "weight not a number",
        body_with(fusion={"method": "weighted_sum", "weights": {"click": "x"}}),
        "fusion.weights.click",
    ),
    ("unknown profile", body_with(fusion="no-such-profile"), "fusion.profile"),
    ("fusion number", body_with(fusion=3), "fusion"),
    (
        "columnar video_id not list",
        body_with(candidates={"video_id": 5, "features": {}}),
        "candidates.video_id",
    ),
    (
        "columnar wrong length",
        body_with(candidates={"video_id": [1, 2], "features": {"duration_s": [1.0]}}),
        "candidates.features.duration_s",
    ),
    (
        "columnar value",
        body_with(candidates={"video_id": [1, 2], "features": {"duration_s": [1.0, "NaN"]}}),
        "candidates.features.duration_s[1]",
    ),
    (
        "columnar video_id type",
        body_with(candidates={"video_id": [1, 2.5]}),
        "candidates.video_id[1]",
    ),
    ("columnar extra", body_with(candidates={"video_id": [1], "x": []}), "candidates.x"),
]


@pytest.mark.parametrize(
    ("body", "field"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
def test_bad_body_is_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    assert_error(client.post("/rank", json=body), 422, field)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"user": {"user_id": 1}, "candidates": [{"video_id": 1, "features": {"duration_s": NaN}}]}', "candidates[0].features.duration_s"),  # noqa: E501
        (b'{"user": {"user_id": 1}, "candidates": [{"video_id": 1, "features": {"duration_s": -Infinity}}]}', "candidates[0].features.duration_s"),  # noqa: E501
        (b'{"user": {"user_id": 1}, "candidates": [{"video_id": 1, "features": {"duration_s": 1e400}}]}', "candidates[0].features.duration_s"),  # noqa: E501
        (b'{"user": {"user_id": 1}, "candidates": [], "fusion": {"method": "weighted_sum", "weights": {"click": NaN}}}', "fusion.weights.click"),  # noqa: E501
        (b'{"user": {"user_id": 1}, "candidates": [], "top_k": Infinity}', "top_k"),
        (b'{"user": {"user_id": 1}, "candidates": [], "top_k": 1' + b"0" * 400 + b"}", "top_k"),
        (b'{"user": {"user_id": 1}, "candidates": [], "context": {"x": [[[-Infinity]]]}}', "context.x[0][0][0]"),  # noqa: E501
    ],
)  # fmt: skip
def test_non_finite_literals_name_the_field(client: TestClient, raw: bytes, field: str) -> None:
    r = client.post("/rank", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 422, field)


def test_duplicate_video_ids_are_listed(client: TestClient) -> None:
    body = rank_body(6)
    body["candidates"][4]["video_id"] = body["candidates"][1]["video_id"]
    body["candidates"][5]["video_id"] = str(body["candidates"][2]["video_id"])  # "42" is 42
    r = client.post("/rank", json=body)
    assert_error(r, 422, "candidates")
    dupes = r.json()["error"]["details"]["duplicates"]
    assert body["candidates"][1]["video_id"] in dupes
    assert str(body["candidates"][2]["video_id"]) in dupes
    assert str(body["candidates"][1]["video_id"]) in r.json()["error"]["message"]
    assert_error(client.post("/rank", json=to_columnar(body)), 422, "candidates")


def test_too_many_candidates(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_candidates=10)
    assert client.post("/rank", json=rank_body(10)).status_code == 200
    r = client.post("/rank", json=rank_body(11))
    assert_error(r, 422, "candidates")
    assert "11 > 10" in r.json()["error"]["message"]
    assert_error(client.post("/rank", json=to_columnar(rank_body(11))), 422, "candidates")


@pytest.mark.parametrize(
    ("raw", "ctype", "status", "code"),
    [
        (b'{"user": ', "application/json", 400, "malformed_json"),
        (b"", "application/json", 400, "malformed_json"),
        (b"\xff\xfe{}", "application/json", 400, "malformed_json"),
        (b"user=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
        (b"[1, 2]", "application/json", 422, "invalid_request"),
        (b'"rank me"', "application/json", 422, "invalid_request"),
        (b"null", "application/json; charset=utf-8", 422, "invalid_request"),
    ],
)
def test_malformed_or_wrong_content(
    client: TestClient, raw: bytes, ctype: str, status: int, code: str
) -> None:
    assert_error(
        client.post("/rank", content=raw, headers={"content-type": ctype}), status, code=code
    )


def test_json_without_content_type_is_415_as_documented(client: TestClient) -> None:
    r = client.post("/rank", content=orjson.dumps(rank_body(3)))
    assert_error(r, 415, code="unsupported_media_type")
    assert "no Content-Type" in r.json()["error"]["message"]


def test_body_too_large(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_candidates=1)
    big = b'{"user": {"user_id": 1}, "candidates": [], "request_id": "' + b"x" * 2_000_000 + b'"}'
    r = client.post("/rank", content=big, headers={"content-type": "application/json"})
    assert_error(r, 413, code="payload_too_large")


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, code="not_found")
    assert_error(client.get("/rank"), 405, code="method_not_allowed")
    assert_error(client.delete("/models"), 405, code="method_not_allowed")


def test_internal_error_is_opaque_and_logged(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(body: bytes, request_id: str) -> Any:
        raise RuntimeError("secret detail from deep inside")

    monkeypatch.setattr(client.app.state.ranker, "rank", boom)  # type: ignore[attr-defined]
    with caplog.at_level(logging.ERROR, logger="vidrank.error"):
        r = client.post("/rank", json=rank_body(2), headers={"X-Request-ID": "rid-500"})
    assert_error(r, 500, code="internal_error")
    assert r.json()["error"]["message"] == "internal error (request id rid-500)"
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert r.headers["x-request-id"] == "rid-500"
    logged = [rec for rec in caplog.records if rec.name == "vidrank.error"]
    assert logged and logged[0].exc_info is not None
    assert logged[0].fields["request_id"] == "rid-500"  # type: ignore[attr-defined]


def test_domain_error_without_a_status_is_an_opaque_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model.core.errors import VidrankError

    class Unmapped(VidrankError):
        code = "unmapped"

    def boom(body: bytes, request_id: str) -> Any:
        raise Unmapped("secret detail")

    monkeypatch.setattr(client.app.state.ranker, "rank", boom)  # type: ignore[attr-defined]
    r = client.post("/rank", json=rank_body(2))
    assert_error(r, 500, code="internal_error")
    assert "secret" not in r.text


# -- fuzzing: whatever the values, never a 500 ---------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=6,
)
FEATURES = ["author_id", "video_type", "music_id", "tag", "duration_s", "upload_age_days", "x"]
feature_dicts = st.dictionaries(st.sampled_from(FEATURES), json_values, max_size=4)
TOP_KEYS = ["user", "context", "candidates", "fusion", "top_k", "request_id"]
FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}


def post_raw(client: TestClient, doc: Any) -> Any:
    # The stdlib encoder: hypothesis integers may exceed the 64 bits orjson serialises.
    data = json.dumps(doc).encode()
    return client.post("/rank", content=data, headers={"content-type": "application/json"})


@settings(max_examples=100, **FUZZ)
@given(
    item_values=st.lists(feature_dicts, min_size=1, max_size=4),
    user_value=json_values,
    context_value=json_values,
    columnar=st.booleans(),
)
def test_fuzzed_feature_values_never_500(
    client: TestClient,
    item_values: list[dict[str, Any]],
    user_value: Any,
    context_value: Any,
    columnar: bool,
) -> None:
    body: dict[str, Any] = {
        "user": {"user_id": 3, "features": {"fans_user_num": user_value}},
        "context": {"hour": context_value},
        "candidates": [{"video_id": i, "features": f} for i, f in enumerate(item_values)],
    }
    r = post_raw(client, to_columnar(body) if columnar else body)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert_error(r, 422)
        assert r.json()["error"]["details"]["field"]


@settings(max_examples=60, **FUZZ)
@given(doc=st.dictionaries(st.sampled_from(TOP_KEYS), json_values, max_size=6))
def test_fuzzed_structure_never_500(client: TestClient, doc: dict[str, Any]) -> None:
    r = post_raw(client, doc)
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert_error(r, 422)
