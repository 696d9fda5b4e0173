"""The service's own domain errors and the one table that maps every domain error to HTTP.

Every error derives from :class:`model.core.errors.VidrankError` (``code``, ``message``,
``field``, ``details``), so the response needs no per-class code: the table below says only
which HTTP status each class gets (the most specific class in the table wins, by MRO). Every
error response has one shape, ``{"error": {"code", "message", "details"?}}``, where ``details``
carries the offending field path (``candidates[3].features.duration_s``) when there is one plus
the error's own details. Exceptions that are not domain errors become a 500 that says "internal
error" and the request id, never the exception text (``service/http/middleware.py``). No FastAPI
here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from model.core.bundle import BundleError
from model.core.distribution import DistributionError
from model.core.errors import VidrankError
from model.core.features import FeatureError
from model.core.fusion import FusionError
from model.core.policy import InvalidPolicy
from model.core.registry import (
    InvalidCanary,
    InvalidShadow,
    InvalidVersionName,
    NothingToRollBack,
    RegistryError,
    RegistryUnavailable,
    VersionNotFound,
)
from model.core.store.snapshot import SnapshotError, SnapshotNotFound, StoreUnavailable


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


class Overloaded(VidrankError):
    """This worker's /rank queue is full: shed at once, retry shortly (or elsewhere)."""

    code = "overloaded"


class DeadlineExceeded(VidrankError):
    """The request's deadline passed before its work could start; it was not scored."""

    code = "deadline_exceeded"


class RequestTimeout(VidrankError):
    """The request body did not arrive within the body deadline."""

    code = "request_timeout"


class ClientGone(VidrankError):
    """The client hung up before its request was scored (nobody reads the answer)."""

    code = "client_closed_request"


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
    Overloaded: 503,
    DeadlineExceeded: 504,
    RequestTimeout: 408,
    ClientGone: 499,  # nginx's code for it: logged, never seen by the client
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
    InvalidShadow: 422,
    InvalidPolicy: 422,
    NothingToRollBack: 409,
    RegistryUnavailable: 503,  # read-only or unwritable registry: nothing changed here
    BundleError: 409,
    DistributionError: 409,  # a bundle's stored prediction distribution is malformed
    RegistryError: 409,  # VersionExists and the rest: the registry's state forbids it
}


# Headers an error response carries besides the body.
HTTP_HEADERS: Mapping[type[VidrankError], Mapping[str, str]] = {
    Unauthorized: {"WWW-Authenticate": "Bearer"},
    Overloaded: {"Retry-After": "1"},
    RequestTimeout: {"Connection": "close"},  # the rest of the body may still be on its way
}


def http_headers(exc: VidrankError) -> dict[str, str] | None:
    """The extra headers of a domain error's response (most specific class wins), if any."""
    for cls in type(exc).__mro__:
        headers = HTTP_HEADERS.get(cls)
        if headers is not None:
            return dict(headers)
    return None


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
