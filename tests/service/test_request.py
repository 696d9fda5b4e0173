"""Request decoding (service/scoring/request.py) and Settings, without an app."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.harness import rank_body, to_columnar
from model.core.features import default_schema
from service.errors import InvalidRequest, MalformedBody
from service.scoring.request import SchemaView, encoder_input, parse_request
from service.settings import Settings

SCHEMA = default_schema()
VIEW = SchemaView.of(SCHEMA)


def encoded(body: dict[str, Any]) -> dict[str, np.ndarray]:
    req = parse_request(orjson.dumps(body), 5000)
    given = encoder_input(req, VIEW)
    return SCHEMA.encode(given.user, given.context, given.items, given.n)


def test_parse_basic_fields() -> None:
    body = rank_body(3, request_id="r", top_k=2)
    req = parse_request(orjson.dumps(body), 10)
    assert (req.request_id, req.user_id, req.n, req.top_k, req.columnar) == ("r", 42, 3, 2, False)
    assert req.user["user_id"] == 42 and req.user["fans_user_num"] == 8
    given = encoder_input(req, VIEW)
    assert given.video_ids == [c["video_id"] for c in rank_body(3)["candidates"]]
    assert given.unknown == set()
    # Columns reach the encoder as the body's lists; it hands homogeneous ones to numpy in one
    # call (tests/model/core/test_features.py::test_homogeneous_columns_take_the_numpy_path).
    assert given.items["duration_s"] == [c["features"]["duration_s"] for c in body["candidates"]]
    assert given.items["video_id"] == given.video_ids


def test_unknown_names_collected() -> None:
    body = rank_body(3)
    body["candidates"][1]["features"]["colour"] = "red"
    req = parse_request(orjson.dumps(body), 10)
    assert encoder_input(req, VIEW).unknown == {"colour"}
    req = parse_request(orjson.dumps(to_columnar(body)), 10)
    assert encoder_input(req, VIEW).unknown == {"colour"}
    body["user"]["features"]["shoe_size"] = 44  # user and context names are collected too
    body["context"] = {"weather": "rain", "hour": 3}
    req = parse_request(orjson.dumps(body), 10)
    assert encoder_input(req, VIEW).unknown == {"colour", "shoe_size", "weather"}


def test_integral_float_ids_accepted_fractional_rejected() -> None:
    body = rank_body(12)
    for c in body["candidates"]:
        c["features"]["author_id"] = 5
    body["candidates"][10]["features"]["author_id"] = 5.0
    a = encoded(body)
    body["candidates"][10]["features"]["author_id"] = 5
    np.testing.assert_array_equal(a["item_cat"], encoded(body)["item_cat"])
    body["candidates"][11]["features"]["author_id"] = 5.5  # after 8 ints: must not truncate to 5
    with pytest.raises(Exception, match=r"5\.5"):
        encoded(body)


def test_malformed_and_non_finite() -> None:
    with pytest.raises(MalformedBody):
        parse_request(b"{", 10)
    with pytest.raises(InvalidRequest) as e:
        parse_request(b'{"user": {"user_id": 1}, "candidates": [], "top_k": NaN}', 10)
    assert e.value.field == "top_k"


@st.composite
def sparse_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Requests whose candidates carry random subsets of features, some null."""
    n = draw(st.integers(0, 12))
    body = rank_body(n, seed=draw(st.integers(0, 1000)))
    for c in body["candidates"]:
        feats = c["features"]
        for name in list(feats):
            choice = draw(st.sampled_from(["keep", "keep", "drop", "null"]))
            if choice == "drop":
                del feats[name]
            elif choice == "null":
                feats[name] = None
        if draw(st.booleans()) and not feats:
            del c["features"]
    return body


@settings(max_examples=60, deadline=None)
@given(body=sparse_requests())
def test_rows_and_columns_encode_identically(body: dict[str, Any]) -> None:
    rows, cols = encoded(body), encoded(to_columnar(body))
    assert rows.keys() == cols.keys()
    for key in rows:
        np.testing.assert_array_equal(rows[key], cols[key])


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIDRANK_MAX_CANDIDATES", "77")
    monkeypatch.setenv("VIDRANK_ADMIN_TOKEN", "")
    monkeypatch.setenv("VIDRANK_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("VIDRANK_WORKERS", "3")
    s = Settings()
    assert s.max_candidates == 77
    assert s.admin_token is None  # empty means unset, never "the empty password"
    assert s.log_level == "debug"
    assert s.intra_op_threads() == 1  # one per worker when there are several
    assert Settings(workers=1, ort_intra_op_threads=3).intra_op_threads() == 3
    assert "secret" not in repr(Settings(admin_token="secret"))
    with pytest.raises(ValueError):
        Settings(max_candidates=0)
