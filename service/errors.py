"""Domain errors and the one table that maps them to HTTP status codes (no FastAPI here).

Every error response has one shape, ``{"error": {"code", "message", "details"?}}``, where
``details`` carries the offending field path (``candidates[3].features.duration_s``) when there
is one. ``app.py`` turns exceptions into that body with :func:`error_status` and
:func:`error_body`; unknown exceptions become a 500 that says "internal error" and the request id,
never the exception text.
"""

from __future__ import annotations

from typing import Any

import orjson

from model.core.bundle import BundleError
from model.core.features import FeatureError
from model.core.fusion import FusionError
from model.core.registry import (
    InvalidCanary,
    InvalidVersionName,
    NothingToRollBack,
    RegistryError,
    VersionNotFound,
)


class ServiceError(Exception):
    """Base of the service's own errors: a stable ``code``, a message and an optional field."""

    code = "error"

    def __init__(
        self, message: str, field: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details


class InvalidRequest(ServiceError):
    """The body is JSON but not a valid request; ``field`` names the offending value."""

    code = "invalid_request"


class MalformedBody(ServiceError):
    """The body is not JSON at all."""

    code = "malformed_json"


class UnsupportedMediaType(ServiceError):
    """The body was declared as something other than JSON."""

    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    """The body exceeds the size that ``max_candidates`` candidates could plausibly need."""

    code = "payload_too_large"


class NotReady(ServiceError):
    """No model is loaded and warmed yet."""

    code = "not_ready"


class SwapFailed(ServiceError):
    """A version could not be loaded, verified or warmed; the old model keeps serving."""

    code = "invalid_bundle"


class Unauthorized(ServiceError):
    """An admin call without a bearer token."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """An admin call with a wrong token, or admin disabled (no token configured)."""

    code = "forbidden"


# Most specific first: the first isinstance match wins. (status, code or None = the class's code)
_TABLE: tuple[tuple[type[BaseException], int, str | None], ...] = (
    (InvalidRequest, 422, None),
    (MalformedBody, 400, None),
    (UnsupportedMediaType, 415, None),
    (PayloadTooLarge, 413, None),
    (NotReady, 503, None),
    (SwapFailed, 409, None),
    (Unauthorized, 401, None),
    (Forbidden, 403, None),
    (FusionError, 422, "invalid_fusion"),
    (FeatureError, 422, "invalid_feature"),
    (VersionNotFound, 404, "version_not_found"),
    (InvalidVersionName, 404, "version_not_found"),
    (InvalidCanary, 422, "invalid_request"),
    (NothingToRollBack, 409, "nothing_to_roll_back"),
    (BundleError, 409, "invalid_bundle"),
    (RegistryError, 409, "registry_conflict"),
)


def error_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error code) for a domain exception; (500, "internal_error") otherwise."""
    for cls, status, code in _TABLE:
        if isinstance(exc, cls):
            return status, code or str(getattr(exc, "code", "error"))
    return 500, "internal_error"


def error_message(exc: BaseException) -> str:
    """The client-facing message of a domain exception (never called for a 500)."""
    if isinstance(exc, ServiceError | FusionError):
        return exc.message
    if isinstance(exc, BundleError):
        return exc.reason
    return str(exc)


def error_field(exc: BaseException) -> str | None:
    """The field path a domain exception names, if any."""
    if isinstance(exc, ServiceError | FusionError):
        return exc.field
    return None


def error_body(code: str, message: str, details: Any = None) -> bytes:
    """The one error body, serialised."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return orjson.dumps({"error": err})


def field_details(field: str | None) -> dict[str, str] | None:
    """``details`` for an error that names a field."""
    return {"field": field} if field else None
