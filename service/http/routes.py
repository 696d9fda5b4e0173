"""The public routes, one router per concern: /rank, health, /models, /metrics.

Routes stay thin: /rank hands the raw body to :class:`service.ranking.ranking.Ranker` in a worker
thread; health and models ask the reconciler and the catalog. Admin routes live in
``service/http/admin.py``. Errors are raised as domain errors and answered by
``service/http/responses.py``.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from service import metrics
from service.errors import NotReady
from service.http import body
from service.http.admission import (
    MAX_TIMEOUT_MS,
    TICKET,
    TIMEOUT_HEADER,
    Admission,
    request_deadline,
)
from service.http.responses import JSON, json_response
from service.http.schemas import ErrorResponse, ModelsOut, RankResponse, Status
from service.ranking.ranking import Ranker, RankResult
from service.rollout.catalog import Catalog
from service.rollout.reconciler import Reconciler
from service.rollout.shadow import ShadowScorer
from service.settings import Settings

# Requests ranked at once per process: one can parse (holding the GIL) while another runs the
# graph (releasing it); more would only oversubscribe the cores onnxruntime already uses.
RANK_CONCURRENCY = 2
# With one worker per core (workers > 1, one intra-op thread each) the core is the limit: a second
# rank thread per worker only adds GIL hand-offs and cache contention. Measured at c=8 with 500
# candidates on 2 cores: 10-20% less CPU per request and a lower p50 than with 2.
RANK_CONCURRENCY_PER_CORE_WORKER = 1


def error_responses(*statuses: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for error statuses, each with the one error body."""
    return {code: {"model": ErrorResponse, "description": text} for code, text in statuses}


RANK_RESPONSES = error_responses(
    (400, "Body is not JSON (malformed_json) or not valid gzip (malformed_encoding)"),
    (413, "Body too large, as sent or once decompressed (payload_too_large)"),
    (415, "Body not declared as JSON, or in a coding other than gzip (unsupported_media_type)"),
    (422, "Invalid request (invalid_request, invalid_feature, invalid_fusion); details.field"),
    (408, "The body did not arrive in time (request_timeout)"),
    (503, "No model is ready (not_ready), or this worker is overloaded (overloaded; Retry-After)"),
    (504, "The deadline passed before ranking started (deadline_exceeded)"),
)
# The body is parsed by hand (service/scoring/request.py); the docs point at the pydantic model
# instead.
_RANK_BODY = {
    "requestBody": {
        "required": True,
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/RankRequest"}}},
    },
    "parameters": [
        {
            "name": TIMEOUT_HEADER,
            "in": "header",
            "required": False,
            "description": "Deadline in ms from the request's arrival (default: the server's); "
            "work that cannot start in time is dropped with 504.",
            "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TIMEOUT_MS},
        }
    ],
}
# OpenAPI links: the versions /models lists are what /models/{version} and activation take
# (schemathesis' stateful phase follows them, so fuzzing reaches real versions).
_FIRST_VERSION = {"version": "$response.body#/versions/0/version"}
MODEL_LINKS = {
    "manifest": {"operationId": "manifest", "parameters": _FIRST_VERSION},
    "activate": {"operationId": "activate", "parameters": _FIRST_VERSION},
}
_RANK_DESCRIPTION = (
    "The body must be sent as `Content-Type: application/json`; it may be compressed with "
    "`Content-Encoding: gzip`. Limits and the error of each are in the README's Reliability "
    "section."
)


def rank_slots(settings: Settings) -> int:
    """Requests ranked at once per worker process."""
    return RANK_CONCURRENCY_PER_CORE_WORKER if settings.workers > 1 else RANK_CONCURRENCY


def rank_router(
    ranker: Ranker, settings: Settings, admission: Admission, shadow: ShadowScorer
) -> APIRouter:
    """POST /rank: content type, size and admission checked here, everything else in the ranker.

    A request sampled for shadow scoring is queued by a background task, which Starlette runs
    after the response has been sent: the client never waits for it.
    """
    router = APIRouter()
    max_body = settings.max_body_bytes()

    def decode_and_rank(raw: bytes, coding: str, request_id: str) -> RankResult:
        return ranker.rank(body.decode(raw, coding, max_body), request_id)

    @router.post(
        "/rank",
        operation_id="rank",
        summary="Rank candidate videos for one user",
        description=_RANK_DESCRIPTION,
        response_model=RankResponse,
        responses=RANK_RESPONSES,
        openapi_extra=_RANK_BODY,
    )
    async def rank(request: Request) -> Response:
        state = request.scope["state"]
        async with admission.admit(state.get(TICKET)) as ticket:  # first: every exit releases
            body.check_content_type(request)
            coding = body.content_coding(request)
            deadline = request_deadline(
                request.headers.get(TIMEOUT_HEADER),
                settings.request_timeout_ms,
                state.get("arrived_at"),
            )
            raw = await body.read_body(request, max_body)
            result = await admission.run(
                ticket, deadline, decode_and_rank, raw, coding, request.state.request_id
            )
        request.state.request_id = result.request_id
        request.state.model_version = result.model_version
        request.state.candidates = result.candidates
        background = BackgroundTask(shadow.submit, result.shadow) if result.shadow else None
        return json_response(result.body, background=background)

    return router


# Served on VIDRANK_HEALTH_PORT as well, where nothing else is (service/http/server.py).
HEALTH_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})


def health_router(reconciler: Reconciler, settings: Settings) -> APIRouter:
    """Liveness and readiness, under the k8s-style and the KServe v2 paths.

    With ``VIDRANK_FEATURE_STORE_REQUIRED`` readiness also needs the feature store (a snapshot
    loaded; for Redis, a PING within the budget), so a balancer stops sending to a replica that
    would answer 503.
    """
    router = APIRouter()
    store_required = settings.feature_store_required and settings.feature_store != "off"

    @router.get("/healthz", response_model=Status, summary="Liveness", operation_id="live")
    @router.get("/v2/health/live", response_model=Status, include_in_schema=False)
    async def live() -> Response:
        return json_response(b'{"status":"ok"}')

    @router.get(
        "/readyz",
        operation_id="ready",
        response_model=Status,
        summary="Readiness",
        responses=error_responses((503, "No model is ready (not_ready)")),
    )
    @router.get("/v2/health/ready", response_model=Status, include_in_schema=False)
    async def ready() -> Response:
        production = reconciler.state.production
        if production is None:
            raise NotReady("no model is loaded and warmed yet")
        if store_required:
            why = await anyio.to_thread.run_sync(reconciler.features_ready)
            if why is not None:
                raise NotReady(f"the feature store is required: {why}")
        return json_response(
            b'{"status":"ready","model_version":"%s"}' % production.version.encode()
        )

    return router


def models_router(catalog: Catalog) -> APIRouter:
    """Read-only views of the registry and of what this process serves."""
    router = APIRouter()

    @router.get(
        "/models",
        operation_id="models",
        summary="Registry versions, aliases and what this process serves",
        response_model=ModelsOut,
        responses={
            200: {"description": "Versions, aliases, what is served", "links": MODEL_LINKS},
        },
    )
    def models() -> dict[str, Any]:
        return catalog.models()

    @router.get(
        "/models/{version}",
        operation_id="manifest",
        summary="A version's manifest",
        responses=error_responses(
            (404, "No such version (version_not_found, invalid_version_name)"),
            (409, "The version's bundle is invalid (invalid_bundle)"),
        ),
    )
    def model_manifest(version: str) -> dict[str, Any]:
        return catalog.manifest(version)

    return router


def metrics_router(settings: Settings) -> APIRouter:
    """Prometheus exposition (aggregated over workers when they share a multiprocess dir).

    Empty when ``metrics_port`` is set: the server then serves /metrics on that port only.
    """
    router = APIRouter()
    if settings.metrics_port is not None:
        return router

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    def prometheus() -> Response:
        data, content_type = metrics.exposition(settings.metrics_multiproc_dir)
        return Response(content=data, media_type=content_type)

    return router
