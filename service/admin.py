"""Admin endpoints: activate, rollback, canary, shadow. Bearer-token protected, never open.

No token configured → 403 for every call; no ``Authorization`` header → 401; a wrong token →
403. The comparison is constant-time. Handlers are plain ``def`` so loading a model (seconds)
runs in the thread pool, not in the event loop. Every call may give a ``reason``, which the
registry's history records with the actor ``admin-api``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header

from model.core.policy import CanaryPolicy
from model.core.registry import Aliases
from service.errors import Forbidden, Unauthorized
from service.logging import log_fields
from service.manager import ModelManager
from service.schemas import AdminResult, CanaryRequest, ErrorResponse, Reason, ShadowRequest
from service.settings import Settings

log = logging.getLogger("vidrank.admin")

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No bearer token"},
    403: {"model": ErrorResponse, "description": "Wrong token, or admin disabled"},
    404: {"model": ErrorResponse, "description": "Unknown version"},
    409: {"model": ErrorResponse, "description": "The version failed to load; nothing changed"},
    422: {"model": ErrorResponse, "description": "Invalid body; details.field names the field"},
}


def bearer_guard(settings: Settings) -> Callable[..., None]:
    """The dependency that checks ``Authorization: Bearer <VIDRANK_ADMIN_TOKEN>``."""
    token = settings.admin_token.get_secret_value().encode() if settings.admin_token else None

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            raise Forbidden("admin API disabled: VIDRANK_ADMIN_TOKEN is not set")
        if not authorization:
            raise Unauthorized("missing 'Authorization: Bearer <token>' header")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthorized("expected 'Authorization: Bearer <token>'")
        if not secrets.compare_digest(credential.strip().encode(), token):
            raise Forbidden("invalid admin token")

    return require_admin


def admin_router(settings: Settings, manager: ModelManager) -> APIRouter:
    """Routes under /admin, guarded by ``VIDRANK_ADMIN_TOKEN``."""
    guard = Depends(bearer_guard(settings))
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[guard], responses=_RESPONSES)

    def result(action: str, aliases: Aliases, **fields: Any) -> dict[str, Any]:
        serving = manager.describe()
        log_fields(log, logging.INFO, "admin", action=action, serving=serving, **fields)
        return {"aliases": aliases.to_dict(), "serving": serving}

    @router.post("/models/{version}/activate", response_model=AdminResult)
    def activate(version: str, body: Reason | None = None) -> dict[str, Any]:
        """Load, verify and warm VERSION, then make it production (here and in the registry)."""
        reason = body.reason if body else None
        return result("activate", manager.activate(version, reason), version=version)

    @router.post("/models/rollback", response_model=AdminResult)
    def rollback(body: Reason | None = None) -> dict[str, Any]:
        """Return production to the previous version (loaded and warmed first)."""
        return result("rollback", manager.rollback(body.reason if body else None))

    @router.put("/canary", response_model=AdminResult)
    def set_canary(body: CanaryRequest) -> dict[str, Any]:
        """Send ``percent`` of users (stable by user_id) to ``version``, judged by ``policy``."""
        bounds = body.policy.model_dump(exclude_none=True) if body.policy is not None else {}
        policy = CanaryPolicy.from_dict(bounds) if bounds else None
        aliases = manager.set_canary(body.version, body.percent, policy, body.reason)
        return result("set_canary", aliases, version=body.version, percent=body.percent)

    @router.delete("/canary", response_model=AdminResult)
    def clear_canary(body: Reason | None = None) -> dict[str, Any]:
        """Stop the canary."""
        return result("clear_canary", manager.clear_canary(body.reason if body else None))

    @router.put("/shadow", response_model=AdminResult)
    def set_shadow(body: ShadowRequest) -> dict[str, Any]:
        """Also score ``percent`` of requests with ``version``, off the response path."""
        aliases = manager.set_shadow(body.version, body.percent, body.reason)
        return result("set_shadow", aliases, version=body.version, percent=body.percent)

    @router.delete("/shadow", response_model=AdminResult)
    def clear_shadow(body: Reason | None = None) -> dict[str, Any]:
        """Stop shadow scoring."""
        return result("clear_shadow", manager.clear_shadow(body.reason if body else None))

    return router
