"""Admin endpoints: activate, rollback, canary. Bearer-token protected, never open by default.

No token configured (neither ``VIDRANK_ADMIN_TOKEN`` nor ``VIDRANK_ADMIN_TOKEN_FILE``) → 403
for every call; no ``Authorization`` header → 401; a wrong token → 403. Several tokens may be
valid at once (``service/tokens.py``); comparisons are constant-time. Handlers are plain ``def``
so loading a model (seconds) runs in the thread pool, not in the event loop. A registry that
cannot be written answers 503 before any model is loaded.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header

from model.core.registry import Aliases
from service.errors import Forbidden, Unauthorized
from service.logging import log_fields
from service.manager import ModelManager
from service.schemas import AdminResult, CanaryRequest, ErrorResponse
from service.settings import Settings
from service.tokens import AdminTokens

log = logging.getLogger("vidrank.admin")

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No bearer token"},
    403: {"model": ErrorResponse, "description": "Wrong token, or admin disabled"},
    404: {"model": ErrorResponse, "description": "Unknown version"},
    409: {"model": ErrorResponse, "description": "The version failed to load; nothing changed"},
    422: {"model": ErrorResponse, "description": "Invalid body; details.field names the field"},
    503: {"model": ErrorResponse, "description": "The registry cannot be written; nothing changed"},
}


def admin_router(settings: Settings, manager: ModelManager) -> APIRouter:
    """Routes under /admin, guarded by the admin token(s)."""
    secret = settings.admin_token.get_secret_value() if settings.admin_token else None
    tokens = AdminTokens(secret, settings.admin_token_file)

    def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
        if not tokens.configured:
            raise Forbidden("admin API disabled: no admin token is configured")
        if not authorization:
            raise Unauthorized("missing 'Authorization: Bearer <token>' header")
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            raise Unauthorized("expected 'Authorization: Bearer <token>'")
        if not tokens.check(credential.strip().encode()):
            raise Forbidden("invalid admin token")

    router = APIRouter(
        prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=_RESPONSES
    )

    def result(action: str, aliases: Aliases, **fields: Any) -> dict[str, Any]:
        serving = manager.describe()
        log_fields(log, logging.INFO, "admin", action=action, serving=serving, **fields)
        return {"aliases": aliases.to_dict(), "serving": serving}

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

    return router
