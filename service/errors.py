"""The service's own domain errors and the one table that maps every domain error to HTTP.

Every error derives from :class:`model.core.errors.VidrankError` (``code``, ``message``,
``field``, ``details``), so the response needs no per-class code: the table below says only
which HTTP status each class gets (the most specific class in the table wins, by MRO). Every
error response has one shape, ``{"error": {"code", "message", "details"?}}``, where ``details``
carries the offending field path (``candidates[3].features.duration_s``) when there is one plus
the error's own details. Exceptions that are not domain errors become a 500 that says "internal
error" and the request id, never the exception text (``service/middleware.py``). No FastAPI here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from model.core.bundle import BundleError
from model.core.errors import VidrankError
from model.core.features import FeatureError
from model.core.fusion import FusionError
from model.core.registry import (
    InvalidCanary,
    InvalidVersionName,
    NothingToRollBack,
    RegistryError,
    VersionNotFound,
)
from model.core.store.embedded import SnapshotNotFound
from model.core.store.redis_store import StoreUnavailable
from model.core.store.snapshot import SnapshotError


class InvalidRequest(VidrankError):
    """The body is JSON but not a valid request; ``field`` names the offending value."""

    code = "invalid_request"


class MalformedBody(VidrankError):
    """The body is not JSON at all."""

    code = "malformed_json"


class MalformedEncoding(MalformedBody):
    """The body's declared content coding (gzip) does not decode."""

    code = "malformed_encoding"


class UnsupportedMediaType(VidrankError):
    """The body was not declared as JSON, or in a content coding other than gzip."""

    code = "unsupported_media_type"


class PayloadTooLarge(VidrankError):
    """The body exceeds the size that ``max_candidates`` candidates could plausibly need."""

    code = "payload_too_large"


class NotReady(VidrankError):
    """No model is loaded and warmed yet."""

    code = "not_ready"


class SwapFailed(VidrankError):
    """A version could not be loaded, verified or warmed; the old model keeps serving."""

    code = "invalid_bundle"


class FeatureStoreConflict(VidrankError):
    """The feature store lacks features a model reads, and the store is required: refused."""

    code = "feature_store_conflict"


class Unauthorized(VidrankError):
    """An admin call without a bearer token."""

    code = "unauthorized"


class Forbidden(VidrankError):
    """An admin call with a wrong token, or admin disabled (no token configured)."""

    code = "forbidden"


HTTP_STATUS: Mapping[type[VidrankError], int] = {
    InvalidRequest: 422,
    MalformedBody: 400,
    UnsupportedMediaType: 415,
    PayloadTooLarge: 413,
    NotReady: 503,
    SwapFailed: 409,
    FeatureStoreConflict: 409,
    StoreUnavailable: 503,  # only with VIDRANK_FEATURE_STORE_REQUIRED; else a degraded answer
    SnapshotNotFound: 404,
    SnapshotError: 409,
    Unauthorized: 401,
    Forbidden: 403,
    FusionError: 422,
    FeatureError: 422,
    VersionNotFound: 404,
    InvalidVersionName: 404,
    InvalidCanary: 422,
    NothingToRollBack: 409,
    BundleError: 409,
    RegistryError: 409,  # VersionExists and the rest: the registry's state forbids it
}


def http_status(exc: VidrankError) -> int:
    """The HTTP status of a domain error: its most specific class in the table, else 500."""
    for cls in type(exc).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_body(code: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    """The one error body, serialised."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return orjson.dumps({"error": err})


def domain_error_body(exc: VidrankError) -> bytes:
    """The error body of a domain error: its code, message, field and details."""
    details = {"field": exc.field} if exc.field else None
    if exc.details:
        details = {**(details or {}), **exc.details}
    return error_body(exc.code, exc.message, details)
