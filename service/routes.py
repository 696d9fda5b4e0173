"""The public routes, one router per concern: /rank, health, /models, /metrics.

Routes stay thin: /rank hands the raw body to :class:`service.ranking.Ranker` in a worker thread;
health and models ask the model manager and the catalog. Admin routes live in
``service/admin.py``. Errors are raised as domain errors and answered by ``service/responses.py``.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import metrics
from service.catalog import Catalog
from service.errors import NotReady, PayloadTooLarge, UnsupportedMediaType
from service.manager import ModelManager
from service.ranking import Ranker
from service.responses import JSON, json_response
from service.schemas import ErrorResponse, RankResponse, Status
from service.settings import Settings

# Requests ranked at once per process: one can parse (holding the GIL) while another runs the
# graph (releasing it); more would only oversubscribe the cores onnxruntime already uses.
RANK_CONCURRENCY = 2
# With one worker per core (workers > 1, one intra-op thread each) the core is the limit: a second
# rank thread per worker only adds GIL hand-offs and cache contention. Measured at c=8 with 500
# candidates on 2 cores: 10-20% less CPU per request and a lower p50 than with 2.
RANK_CONCURRENCY_PER_CORE_WORKER = 1
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Body is not JSON"),
        (413, "Body too large"),
        (415, "Body is not declared as JSON"),
        (422, "Invalid request; details.field names the offending field"),
        (503, "No model is ready"),
    )
}
# The body is parsed by hand (service/request.py); the docs point at the pydantic model instead.
_RANK_BODY = {
    "requestBody": {
        "required": True,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
    }
}


def rank_router(ranker: Ranker, settings: Settings) -> APIRouter:
    """POST /rank: content type and size checked here, everything else in the ranker."""
    router = APIRouter()
    limiter = anyio.CapacityLimiter(
        RANK_CONCURRENCY_PER_CORE_WORKER if settings.workers > 1 else RANK_CONCURRENCY
    )
    max_body = settings.max_body_bytes()

    @router.post(
        "/rank",
        summary="Rank candidate videos for one user",
        response_model=RankResponse,
        responses=ERROR_RESPONSES,
        openapi_extra=_RANK_BODY,
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

    return router


def health_router(manager: ModelManager, settings: Settings) -> APIRouter:
    """Liveness and readiness, under the k8s-style and the KServe v2 paths.

    With ``VIDRANK_FEATURE_STORE_REQUIRED`` readiness also needs the feature store (a snapshot
    loaded; for Redis, a PING within the budget), so a balancer stops sending to a replica that
    would answer 503.
    """
    router = APIRouter()
    store_required = settings.feature_store_required and settings.feature_store != "off"

    @router.get("/healthz", response_model=Status, summary="Liveness")
    @router.get("/v2/health/live", response_model=Status, include_in_schema=False)
    async def live() -> Response:
        return json_response(b'{"status":"ok"}')

    @router.get("/readyz", response_model=Status, summary="Readiness", responses=ERROR_RESPONSES)
    @router.get("/v2/health/ready", response_model=Status, include_in_schema=False)
    async def ready() -> Response:
        production = manager.state.production
        if production is None:
            raise NotReady("no model is loaded and warmed yet")
        if store_required:
            why = await anyio.to_thread.run_sync(manager.features_ready)
            if why is not None:
                raise NotReady(f"the feature store is required: {why}")
        return json_response(
            b'{"status":"ready","model_version":"%s"}' % production.version.encode()
        )

    return router


def models_router(catalog: Catalog) -> APIRouter:
    """Read-only views of the registry and of what this process serves."""
    router = APIRouter()

    @router.get("/models", summary="Registry versions, aliases and what this process serves")
    def models() -> dict[str, Any]:
        return catalog.models()

    @router.get("/models/{version}", summary="A version's manifest")
    def model_manifest(version: str) -> dict[str, Any]:
        return catalog.manifest(version)

    return router


def metrics_router(settings: Settings) -> APIRouter:
    """Prometheus exposition (aggregated over workers when they share a multiprocess dir)."""
    router = APIRouter()

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def prometheus() -> Response:
        data, content_type = metrics.exposition(settings.metrics_multiproc_dir)
        return Response(content=data, media_type=content_type)

    return router


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
