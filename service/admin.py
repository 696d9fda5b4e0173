"""Admin endpoints: activate, rollback, canary. Bearer-token protected, never open by default.

No token configured → 403 for every call; no ``Authorization`` header → 401; a wrong token →
403. The comparison is constant-time. Handlers are plain ``def`` so loading a model (seconds)
runs in the thread pool, not in the event loop.
"""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header

from model.core.registry import Aliases
from service.errors import Forbidden, Unauthorized
from service.logging import log_fields
from service.manager import ModelManager
from service.schemas import AdminResult, CanaryRequest, ErrorResponse, FeatureStoreResult
from service.settings import Settings

log = logging.getLogger("vidrank.admin")

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No bearer token"},
    403: {"model": ErrorResponse, "description": "Wrong token, or admin disabled"},
    404: {"model": ErrorResponse, "description": "Unknown version"},
    409: {"model": ErrorResponse, "description": "The version failed to load; nothing changed"},
    422: {"model": ErrorResponse, "description": "Invalid body; details.field names the field"},
}


def admin_router(settings: Settings, manager: ModelManager) -> APIRouter:
    """Routes under /admin, guarded by ``VIDRANK_ADMIN_TOKEN``."""
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

    router = APIRouter(
        prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=_RESPONSES
    )

    def result(action: str, aliases: Aliases, **fields: Any) -> dict[str, Any]:
        serving, features = manager.describe(), manager.describe_features()
        log_fields(
            log, logging.INFO, "admin", action=action, serving=serving,
            feature_store=features, **fields,
        )  # fmt: skip
        return {"aliases": aliases.to_dict(), "serving": serving, "feature_store": features}

    @router.post("/models/{version}/activate", response_model=AdminResult)
    def activate(version: str) -> dict[str, Any]:
        """Load, verify and warm VERSION, then make it production (here and in the registry)."""
        return result("activate", manager.activate(version), version=version)

    @router.post("/models/rollback", response_model=AdminResult)
    def rollback() -> dict[str, Any]:
        """Return production to the previous version (loaded and warmed first)."""
        return result("rollback", manager.rollback())

    @router.put("/canary", response_model=AdminResult)
    def set_canary(body: CanaryRequest) -> dict[str, Any]:
        """Send ``percent`` of users (stable by user_id) to ``version``."""
        aliases = manager.set_canary(body.version, body.percent)
        return result("set_canary", aliases, version=body.version, percent=body.percent)

    @router.delete("/canary", response_model=AdminResult)
    def clear_canary() -> dict[str, Any]:
        """Stop the canary."""
        return result("clear_canary", manager.clear_canary())

    @router.post("/features/{snapshot}/activate", response_model=FeatureStoreResult)
    def activate_snapshot(snapshot: str) -> dict[str, Any]:
        """Load, verify and prepare feature SNAPSHOT for the served versions, then make it active
        (here and in the store; every replica converges on it)."""
        features = manager.activate_snapshot(snapshot)
        log_fields(log, logging.INFO, "admin", action="activate_snapshot", feature_store=features)
        return {"feature_store": features}

    return router
