"""The FastAPI application: HTTP in, domain calls, HTTP out (``create_app(settings)``).

Routes stay thin: /rank hands the raw body to :class:`service.ranking.Ranker` in a worker thread;
health, models and admin call the model manager and the catalog. Every error, including FastAPI's
own validation errors and 404/405, leaves as ``{"error": {"code", "message", "details"?}}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from model.core.bundle import BundleError
from model.core.features import FeatureError
from model.core.fusion import FusionError, FusionSpec, ProfileStore, TaskTerm
from model.core.registry import Registry, RegistryError
from service import metrics
from service.admin import admin_router
from service.catalog import Catalog
from service.errors import (
    InvalidRequest,
    MalformedBody,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    error_body,
    error_field,
    error_message,
    error_status,
    field_details,
)
from service.manager import ModelManager
from service.middleware import AccessMiddleware
from service.ranking import Ranker
from service.schemas import ErrorResponse, RankRequest, RankResponse, Status
from service.scorer import WARMUP_MAX, WARMUP_SIZES
from service.settings import Settings

log = logging.getLogger("vidrank.app")

JSON = "application/json"
# Requests ranked at once per process: one can parse (holding the GIL) while another runs the
# graph (releasing it); more would only oversubscribe the cores onnxruntime already uses.
RANK_CONCURRENCY = 2
# With one worker per core (workers > 1, one intra-op thread each) the core is the limit: a second
# rank thread per worker only adds GIL hand-offs and cache contention. Measured at c=8 with 500
# candidates on 2 cores: 10-20% less CPU per request and a lower p50 than with 2.
RANK_CONCURRENCY_PER_CORE_WORKER = 1
# The profile store needs a fallback; requests always pass the serving bundle's default instead.
_PLACEHOLDER_FUSION = FusionSpec("weighted_sum", {"click": TaskTerm(1.0)})
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Body is not JSON"),
        (413, "Body too large"),
        (415, "Body is not declared as JSON"),
        (422, "Invalid request; details.field names the offending field"),
        (503, "No model is ready"),
    )
}


def json_response(
    content: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(content=content, status_code=status, media_type=JSON, headers=headers)


def error_response(exc: BaseException) -> Response:
    """The one error body for a domain exception (the table in service/errors.py)."""
    status, code = error_status(exc)
    details: dict[str, Any] | None = field_details(error_field(exc))
    extra = getattr(exc, "details", None)
    if isinstance(extra, dict):
        details = {**(details or {}), **extra}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return json_response(error_body(code, error_message(exc), details), status, headers)


def _warmup_sizes(settings: Settings) -> tuple[int, ...]:
    """Typical sizes and the largest allowed one (capped): no first request pays for a shape."""
    largest = min(settings.max_candidates, WARMUP_MAX)
    return tuple(sorted({min(n, largest) for n in (*WARMUP_SIZES, largest)}))


def create_app(settings: Settings) -> FastAPI:
    """Build the service for ``settings`` (nothing here reads the environment)."""
    registry = Registry(settings.registry)
    manager = ModelManager(registry, settings.intra_op_threads(), _warmup_sizes(settings))
    profiles = (
        ProfileStore(settings.fusion_profiles, _PLACEHOLDER_FUSION)
        if settings.fusion_profiles is not None
        else None
    )
    ranker = Ranker(manager, profiles, settings.max_candidates)
    catalog = Catalog(registry, manager)
    limiter = anyio.CapacityLimiter(
        RANK_CONCURRENCY_PER_CORE_WORKER if settings.workers > 1 else RANK_CONCURRENCY
    )
    max_body = settings.max_body_bytes()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if profiles is not None and profiles.last_error:
            metrics.PROFILE_RELOAD_FAILURES.inc()
            log.warning(
                "fusion profiles not loaded", extra={"fields": {"error": profiles.last_error}}
            )
        await anyio.to_thread.run_sync(manager.poll_once, "startup")
        if not manager.ready:
            log.warning(
                "no model ready at start-up; polling the registry",
                extra={"fields": {"registry": str(settings.registry)}},
            )
        manager.start_polling(settings.poll_interval_s)
        yield
        await anyio.to_thread.run_sync(manager.stop_polling)

    app = FastAPI(
        title="vidrank",
        summary="Online multi-task (MMoE) ranking for video recommendation.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.manager = manager
    app.state.ranker = ranker
    _install_error_handlers(app)
    app.add_middleware(AccessMiddleware)

    @app.post(
        "/rank",
        summary="Rank candidate videos for one user",
        response_model=RankResponse,
        responses=_ERROR_RESPONSES,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {JSON: {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
            }
        },
    )
    async def rank(request: Request) -> Response:
        _check_content_type(request)
        body = await _read_body(request, max_body)
        result = await anyio.to_thread.run_sync(
            ranker.rank, body, request.state.request_id, limiter=limiter
        )
        request.state.request_id = result.request_id
        request.state.model_version = result.model_version
        request.state.candidates = result.candidates
        return json_response(result.body)

    @app.get("/healthz", response_model=Status, summary="Liveness")
    @app.get("/v2/health/live", response_model=Status, include_in_schema=False)
    async def live() -> Response:
        return json_response(b'{"status":"ok"}')

    @app.get("/readyz", response_model=Status, summary="Readiness", responses=_ERROR_RESPONSES)
    @app.get("/v2/health/ready", response_model=Status, include_in_schema=False)
    async def ready() -> Response:
        production = manager.state.production
        if production is None:
            raise NotReady("no model is loaded and warmed yet")
        return json_response(
            b'{"status":"ready","model_version":"%s"}' % production.version.encode()
        )

    @app.get("/models", summary="Registry versions, aliases and what this process serves")
    def models() -> dict[str, Any]:
        return catalog.models()

    @app.get("/models/{version}", summary="A version's manifest")
    def model_manifest(version: str) -> dict[str, Any]:
        return catalog.manifest(version)

    @app.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def prometheus() -> Response:
        data, content_type = metrics.exposition(settings.metrics_multiproc_dir)
        return Response(content=data, media_type=content_type)

    app.include_router(admin_router(settings, manager))
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _check_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        return
    media = ctype.split(";", 1)[0].strip().lower()
    if media != JSON and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(f"send Content-Type: {JSON} (got {media or 'nothing'})")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _install_error_handlers(app: FastAPI) -> None:
    async def domain_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    for cls in (ServiceError, FusionError, FeatureError, BundleError, RegistryError):
        app.add_exception_handler(cls, domain_error)

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
        return Response(body, exc.status_code, headers=exc.headers, media_type=JSON)

    async def client_gone(request: Request, exc: Exception) -> Response:
        # The client hung up while sending its body: nothing to answer, nothing to alarm about.
        return json_response(error_body("client_disconnected", "client disconnected"), 400)

    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus the /rank request model (parsed by hand, so not inferred)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        request_schema = RankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request_schema.pop("$defs", {}))
        components["RankRequest"] = request_schema
        app.openapi_schema = schema
    return app.openapi_schema
