"""Admin endpoints: activate, rollback, canary. Bearer-token protected, never open by default.

No token configured (neither ``VIDRANK_ADMIN_TOKEN`` nor ``VIDRANK_ADMIN_TOKEN_FILE``) → 403
for every call; no ``Authorization`` header → 401; a wrong token → 403. Several tokens may be
valid at once (``service/http/tokens.py``); comparisons are constant-time. Handlers are plain
``def`` so loading a model (seconds) runs in the thread pool, not in the event loop. A registry that
cannot be written answers 503 before any model is loaded. Every change may give a ``reason``,
which the registry's history records with the actor ``admin-api``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from model.core.policy import CanaryPolicy
from model.core.registry import Aliases
from service.errors import Forbidden, Unauthorized
from service.http.routes import error_responses
from service.http.schemas import (
    AdminResult,
    CanaryRequest,
    FeatureStoreResult,
    Reason,
    ShadowRequest,
)
from service.http.tokens import AdminTokens
from service.logging import log_fields
from service.rollout.reconciler import Reconciler
from service.settings import Settings

log = logging.getLogger("vidrank.admin")

# Every admin call: auth, and a registry whose state forbids the change (e.g. a broken
# aliases.json). The rest per operation, so the OpenAPI lists exactly what each can answer.
_AUTH_AND_STATE = error_responses(
    (401, "No bearer token (unauthorized)"),
    (403, "Wrong token, or admin disabled (forbidden)"),
    (409, "The registry's state forbids it, or the version failed to load; nothing changed"),
    (503, "The registry cannot be written; nothing changed (registry_unavailable)"),
)
# Declares the bearer scheme in the OpenAPI document; the checks and errors are our own.
_BEARER = HTTPBearer(
    auto_error=False, description="A token of VIDRANK_ADMIN_TOKEN or VIDRANK_ADMIN_TOKEN_FILE"
)
_UNKNOWN_VERSION = error_responses((404, "Unknown version (version_not_found)"))
_BAD_BODY = error_responses(
    (400, "Body is not JSON (malformed_json)"),
    (422, "Invalid body; details.field names the field (invalid_request)"),
)


def admin_guard(settings: Settings) -> Callable[..., None]:
    """The dependency every admin route runs: 403 disabled, 401 no bearer token, 403 wrong."""
    secret = settings.admin_token.get_secret_value() if settings.admin_token else None
    tokens = AdminTokens(secret, settings.admin_token_file)

    def require_admin(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if not tokens.configured:
            raise Forbidden("admin API disabled: no admin token is configured")
        if credentials is None or not credentials.credentials.strip():
            raise Unauthorized("expected an 'Authorization: Bearer <token>' header")
        if not tokens.check(credentials.credentials.strip().encode()):
            raise Forbidden("invalid admin token")

    return require_admin


def admin_router(settings: Settings, reconciler: Reconciler) -> APIRouter:
    """Routes under /admin, guarded by the admin token(s)."""
    router = APIRouter(
        prefix="/admin",
        tags=["admin"],
        dependencies=[Depends(admin_guard(settings))],
        responses=_AUTH_AND_STATE,
    )

    def result(action: str, aliases: Aliases, **fields: Any) -> dict[str, Any]:
        serving, features = reconciler.describe(), reconciler.describe_features()
        log_fields(
            log, logging.INFO, "admin", action=action, serving=serving,
            feature_store=features, **fields,
        )  # fmt: skip
        return {"aliases": aliases.to_dict(), "serving": serving, "feature_store": features}

    _model_routes(router, reconciler, result)
    _rollout_routes(router, reconciler, result)
    _feature_routes(router, reconciler)
    return router


Result = Callable[..., dict[str, Any]]


def _reason(body: Reason | None) -> str | None:
    return body.reason if body is not None else None


def _model_routes(router: APIRouter, reconciler: Reconciler, result: Result) -> None:
    """Production: activate a version, roll back."""

    @router.post(
        "/models/{version}/activate",
        operation_id="activate",
        response_model=AdminResult,
        responses=_UNKNOWN_VERSION | _BAD_BODY,
    )
    def activate(version: str, body: Reason | None = None) -> dict[str, Any]:
        """Load, verify and warm VERSION, then make it production (here and in the registry)."""
        return result("activate", reconciler.activate(version, _reason(body)), version=version)

    @router.post(
        "/models/rollback",
        operation_id="rollback",
        response_model=AdminResult,
        responses=_UNKNOWN_VERSION | _BAD_BODY,
    )
    def rollback(body: Reason | None = None) -> dict[str, Any]:
        """Return production to the previous version (loaded and warmed first)."""
        return result("rollback", reconciler.rollback(_reason(body)))


def _rollout_routes(router: APIRouter, reconciler: Reconciler, result: Result) -> None:
    """Canary (with its policy) and shadow."""

    @router.put(
        "/canary",
        operation_id="set_canary",
        response_model=AdminResult,
        responses=_UNKNOWN_VERSION | _BAD_BODY,
    )
    def set_canary(body: CanaryRequest) -> dict[str, Any]:
        """Send ``percent`` of users (stable by user_id) to ``version``, judged by ``policy``."""
        bounds = body.policy.model_dump(exclude_none=True) if body.policy is not None else {}
        policy = CanaryPolicy.from_dict(bounds) if bounds else None
        aliases = reconciler.set_canary(body.version, body.percent, policy, body.reason)
        return result("set_canary", aliases, version=body.version, percent=body.percent)

    @router.delete(
        "/canary", operation_id="clear_canary", response_model=AdminResult, responses=_BAD_BODY
    )
    def clear_canary(body: Reason | None = None) -> dict[str, Any]:
        """Stop the canary."""
        return result("clear_canary", reconciler.clear_canary(_reason(body)))

    @router.put(
        "/shadow",
        operation_id="set_shadow",
        response_model=AdminResult,
        responses=_UNKNOWN_VERSION | _BAD_BODY,
    )
    def set_shadow(body: ShadowRequest) -> dict[str, Any]:
        """Also score ``percent`` of requests with ``version``, off the response path."""
        aliases = reconciler.set_shadow(body.version, body.percent, body.reason)
        return result("set_shadow", aliases, version=body.version, percent=body.percent)

    @router.delete(
        "/shadow", operation_id="clear_shadow", response_model=AdminResult, responses=_BAD_BODY
    )
    def clear_shadow(body: Reason | None = None) -> dict[str, Any]:
        """Stop shadow scoring."""
        return result("clear_shadow", reconciler.clear_shadow(_reason(body)))


def _feature_routes(router: APIRouter, reconciler: Reconciler) -> None:
    """The feature-store routes under /admin."""

    @router.post(
        "/features/{snapshot}/activate",
        operation_id="activate_snapshot",
        response_model=FeatureStoreResult,
        responses=error_responses((404, "Unknown snapshot (snapshot_not_found)")),
    )
    def activate_snapshot(snapshot: str) -> dict[str, Any]:
        """Load, verify and prepare feature SNAPSHOT for the served versions, then make it active
        (here and in the store; every replica converges on it)."""
        features = reconciler.activate_snapshot(snapshot)
        log_fields(log, logging.INFO, "admin", action="activate_snapshot", feature_store=features)
        return {"feature_store": features}
