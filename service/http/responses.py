"""HTTP responses: JSON bodies and the exception handlers that give every error one shape.

Domain errors (:class:`~model.core.errors.VidrankError`) leave through one handler and the table
in ``service/errors.py``; FastAPI's own validation errors, 404/405 and client hang-ups are
translated into the same ``{"error": {"code", "message", "details"?}}`` body here.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from model.core.errors import VidrankError
from service.errors import (
    InvalidRequest,
    MalformedBody,
    domain_error_body,
    error_body,
    http_headers,
    http_status,
)

JSON = "application/json"


def json_response(
    content: bytes,
    status: int = 200,
    headers: dict[str, str] | None = None,
    background: BackgroundTask | None = None,
) -> Response:
    """A response whose body is already serialised JSON (``background`` runs once it is sent)."""
    return Response(
        content=content, status_code=status, media_type=JSON, headers=headers, background=background
    )


def error_response(exc: VidrankError) -> Response:
    """The one error body for a domain error, with its status from the table."""
    return json_response(domain_error_body(exc), http_status(exc), http_headers(exc))


def allowed_methods(routes: Sequence[BaseRoute], request: Request, named: str) -> str:
    """Every method some route serves at this path, for a 405's ``Allow``.

    Starlette names only the methods of the first route whose path matched (``named``), so
    ``POST /admin/canary`` would be told ``Allow: PUT`` though DELETE is served there too.
    """
    methods = {m.strip() for m in named.split(",") if m.strip()}
    for route in routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI, routes: Sequence[BaseRoute] = ()) -> None:
    """Route every error the app can meet to the one error body (``routes``: for 405s)."""

    async def domain_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, VidrankError)
        if http_status(exc) == 500:
            raise exc  # not in the table: the middleware's opaque, logged 500
        return error_response(exc)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(MalformedBody("body is not valid JSON"))
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query")]
        return error_response(InvalidRequest(str(first.get("msg")), ".".join(loc) or None))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code)
        body = error_body(
            codes.get(exc.status_code, "http_error"), message or str(exc.detail) or "error"
        )
        headers = exc.headers
        if exc.status_code == 405:
            named = (headers or {}).get("Allow", "")
            headers = {**(headers or {}), "Allow": allowed_methods(routes, request, named)}
        return Response(body, exc.status_code, headers=headers, media_type=JSON)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # The client hung up while sending its body: nothing to answer, nothing to alarm about.
        return json_response(error_body("client_disconnected", "client disconnected"), 400)

    app.add_exception_handler(VidrankError, domain_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
