"""Pure-ASGI middleware: request id, security headers, access log line, request metrics, and the
last-resort 500.

Every response says ``X-Content-Type-Options: nosniff``; every response but the docs pages also
``Cache-Control: no-store`` (rankings and admin results are per request, never to be cached by
a proxy) and ``Content-Security-Policy: default-src 'none'`` (JSON needs nothing loaded; the docs
pages set their own policy, ``service/http/docs.py``).

Pure ASGI rather than ``BaseHTTPMiddleware`` because it sits on every /rank call and costs a few
microseconds this way.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import error_body
from service.http.docs import DOC_PATHS
from service.logging import ACCESS_LOGGER
from service.scoring.request import valid_request_id

access_log = logging.getLogger(ACCESS_LOGGER)
error_log = logging.getLogger("vidrank.error")

QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})
_JSON_HEADERS = [(b"content-type", b"application/json")]
_NOSNIFF = [(b"x-content-type-options", b"nosniff")]
_API_HEADERS = [
    *_NOSNIFF,
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
]


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            rid = value.decode("latin-1")
            return rid if valid_request_id(rid) else None
    return None


class AccessMiddleware:
    """Assigns ``scope["state"]["request_id"]``, logs one JSON line and counts every request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = _client_request_id(scope) or uuid.uuid4().hex
        security = _NOSNIFF if scope["path"] in DOC_PATHS else _API_HEADERS
        status = 500
        started = False
        written: float | None = None  # when the last body byte went out

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started, written
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                rid = state["request_id"].encode("latin-1", "replace")
                message["headers"] = [
                    *message.get("headers", ()),
                    *security,
                    (b"x-request-id", rid),
                ]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                written = time.perf_counter()

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # Anything no exception handler claimed: log the traceback, answer a bare 500.
            rid = state["request_id"]
            error_log.exception("unhandled error", extra={"fields": {"request_id": rid}})
            status = 500
            if not started:
                body = error_body("internal_error", f"internal error (request id {rid})")
                rid_header = (b"x-request-id", rid.encode("latin-1", "replace"))
                headers = [*_JSON_HEADERS, *_API_HEADERS, rid_header]
                await send({"type": "http.response.start", "status": 500, "headers": headers})
                await send({"type": "http.response.body", "body": body})
        finally:
            # Latency ends when the response is written, not when background tasks (shadow
            # scoring's enqueue) have run after it.
            self._record(scope, state, status, (written or time.perf_counter()) - start)

    @staticmethod
    def _record(scope: Scope, state: dict[str, Any], status: int, elapsed: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"
        metrics.HTTP_REQUESTS.labels(path, scope["method"], str(status)).inc()
        metrics.HTTP_LATENCY.labels(path).observe(elapsed)
        level = logging.DEBUG if path in QUIET_ROUTES and status < 500 else logging.INFO
        if access_log.isEnabledFor(level):
            fields = {
                "request_id": state.get("request_id"),
                "route": path,
                "method": scope["method"],
                "status": status,
                "latency_ms": round(elapsed * 1000, 3),
            }
            if "model_version" in state:
                fields["model_version"] = state["model_version"]
                fields["candidates"] = state.get("candidates")
            access_log.log(level, "request", extra={"fields": fields})
