"""The one error base and the one table (service/errors.py), without an app."""

from __future__ import annotations

import orjson
import pytest

import service.http.app  # noqa: F401  (imports every module that defines a domain error)
from model.core.bundle import BundleError
from model.core.errors import VidrankError
from model.core.features import FeatureError
from model.core.fusion import FusionError
from model.core.registry import (
    InvalidCanary,
    InvalidVersionName,
    NothingToRollBack,
    RegistryError,
    VersionExists,
    VersionNotFound,
)
from service.errors import (
    HTTP_STATUS,
    Forbidden,
    InvalidRequest,
    MalformedBody,
    NotReady,
    PayloadTooLarge,
    SwapFailed,
    Unauthorized,
    UnsupportedMediaType,
    domain_error_body,
    http_status,
)


def _all_subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_all_subclasses(sub)}
    return out


def test_every_domain_error_has_a_status_and_its_own_code() -> None:
    # Every error the service can raise: the core's and its own. model.training's errors (e.g.
    # TooLittleData) never reach HTTP - import-linter keeps training out of the service - and
    # whether they are imported here depends on which tests ran first in this process.
    classes = {
        c
        for c in _all_subclasses(VidrankError)
        if c.__module__.startswith(("model.core.", "service."))
    }
    assert {FeatureError, FusionError, BundleError, RegistryError, InvalidRequest} <= classes
    for cls in classes:
        assert any(c in HTTP_STATUS for c in cls.__mro__), f"{cls.__name__} has no HTTP status"
        assert cls.code != VidrankError.code, f"{cls.__name__} has no code"


# The wire contract: (error, status, code), as the API has always answered.
CASES = [
    (InvalidRequest("m", "top_k"), 422, "invalid_request"),
    (MalformedBody("m"), 400, "malformed_json"),
    (UnsupportedMediaType("m"), 415, "unsupported_media_type"),
    (PayloadTooLarge("m"), 413, "payload_too_large"),
    (NotReady("m"), 503, "not_ready"),
    (SwapFailed("m"), 409, "invalid_bundle"),
    (Unauthorized("m"), 401, "unauthorized"),
    (Forbidden("m"), 403, "forbidden"),
    (FusionError("fusion.method", "m"), 422, "invalid_fusion"),
    (FeatureError("duration_s", "m", entity="item", row=3), 422, "invalid_feature"),
    (VersionNotFound("m"), 404, "version_not_found"),
    (InvalidVersionName("m"), 404, "version_not_found"),
    (InvalidCanary("m"), 422, "invalid_request"),
    (NothingToRollBack("m"), 409, "nothing_to_roll_back"),
    (BundleError("m"), 409, "invalid_bundle"),
    (VersionExists("m"), 409, "registry_conflict"),
    (RegistryError("m"), 409, "registry_conflict"),
]


@pytest.mark.parametrize(("exc", "status", "code"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_status_and_code(exc: VidrankError, status: int, code: str) -> None:
    assert (http_status(exc), exc.code) == (status, code)
    err = orjson.loads(domain_error_body(exc))["error"]
    assert (err["code"], err["message"]) == (code, "m")
    assert err.get("details") == ({"field": exc.field} if exc.field else None)


def test_details_merge_with_the_field() -> None:
    exc = InvalidRequest("duplicate video_id(s): 5", "candidates", {"duplicates": [5]})
    err = orjson.loads(domain_error_body(exc))["error"]
    assert err["details"] == {"field": "candidates", "duplicates": [5]}


def test_unmapped_domain_error_is_a_500() -> None:
    class Stray(VidrankError):
        code = "stray"

    assert http_status(Stray("m")) == 500


def test_messages_and_str_keep_their_shape() -> None:
    e = FeatureError("duration_s", "must be a finite number", entity="item", row=3)
    assert (e.message, e.field, str(e)) == (
        "must be a finite number",
        None,
        "item.duration_s[3]: must be a finite number",
    )
    f = FusionError("fusion.weights.clik", "unknown task")
    assert (f.message, f.field, str(f)) == ("unknown task", "fusion.weights.clik", str(f))
    assert str(f) == "fusion.weights.clik: unknown task"
    assert BundleError("bad graph").reason == "bad graph" == str(BundleError("bad graph"))
    assert isinstance(e, ValueError) and isinstance(f, ValueError)  # callers catching ValueError
