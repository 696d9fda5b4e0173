"""The FastAPI application: ``create_app(settings)`` wires the reconciler, routers, middleware.

The routes live in ``service/http/routes.py`` (rank, health, models, metrics) and
``service/http/admin.py``; the error handlers in ``service/http/responses.py``. Every error,
including FastAPI's own validation errors and 404/405, leaves as ``{"error": {"code", "message",
"details"?}}``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from model.core.fusion import ProfileStore
from model.core.registry import Registry
from service.http.admin import admin_router
from service.http.admission import Admission
from service.http.deadlines import ReadDeadlineMiddleware
from service.http.docs import docs_router
from service.http.middleware import AccessMiddleware
from service.http.responses import JSON, install_error_handlers
from service.http.routes import (
    health_router,
    metrics_router,
    models_router,
    rank_router,
    rank_slots,
)
from service.http.schemas import RankRequest
from service.ranking.ranking import Ranker, profiles_failed
from service.rollout.canary import RolloutMonitor, Traffic
from service.rollout.catalog import Catalog
from service.rollout.drift import DriftMonitor
from service.rollout.feature_source import build_source
from service.rollout.reconciler import Reconciler
from service.rollout.shadow import ShadowScorer
from service.scoring.scorer import WARMUP_MAX, WARMUP_SIZES
from service.settings import Settings

log = logging.getLogger("vidrank.app")


def create_app(settings: Settings) -> FastAPI:
    """Build the service for ``settings`` (nothing here reads the environment)."""
    registry = Registry(settings.registry)
    reconciler = Reconciler(
        registry,
        settings.intra_op_threads(),
        _warmup_sizes(settings),
        features=build_source(settings),
    )
    profiles = None
    if settings.fusion_profiles is not None:  # requests fall back to the bundle's default fusion
        profiles = ProfileStore(settings.fusion_profiles, on_failure=profiles_failed)
    drift = DriftMonitor(settings.rollout_window_s)
    traffic = Traffic(settings.rollout_window_s)
    ranker = Ranker(reconciler, profiles, settings.max_candidates, drift, traffic)
    shadow = ShadowScorer(reconciler, drift, profiles, settings.shadow_queue_size)
    monitor = RolloutMonitor(
        reconciler, drift, traffic, settings.canary_policy(), settings.canary_auto_rollback
    )
    admission = Admission(rank_slots(settings), settings.max_queue)

    app = FastAPI(
        title="vidrank",
        summary="Online multi-task (MMoE) ranking for video recommendation.",
        version="0.1.0",
        lifespan=_lifespan(settings, reconciler, shadow, monitor),
        docs_url=None,  # served by service/http/docs.py, with a Content-Security-Policy
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.settings = settings
    app.state.reconciler = reconciler
    app.state.ranker = ranker
    app.state.shadow = shadow
    app.state.monitor = monitor
    app.state.admission = admission  # the server's protocol sheds with it too
    routers = [
        rank_router(ranker, settings, admission, shadow),
        health_router(reconciler, settings),
        models_router(Catalog(registry, reconciler, shadow, monitor)),
        metrics_router(settings),
        admin_router(settings, reconciler),
    ]
    if settings.docs:
        routers.append(docs_router(app.title, "/openapi.json"))
    install_error_handlers(app, [route for router in routers for route in router.routes])
    app.add_middleware(ReadDeadlineMiddleware, body_timeout_s=settings.body_timeout_s)
    app.add_middleware(AccessMiddleware)  # added last: outermost, sees every response
    for router in routers:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _lifespan(
    settings: Settings, reconciler: Reconciler, shadow: ShadowScorer, monitor: RolloutMonitor
) -> Any:
    """Start-up: load what the registry serves (or keep polling for it), start the shadow
    worker and the rollout monitor; shut-down: stop them all.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(reconciler.poll_once, "startup")
        if not reconciler.ready:
            log.warning(
                "no model ready at start-up; polling the registry",
                extra={"fields": {"registry": str(settings.registry)}},
            )
        reconciler.start_polling(settings.poll_interval_s)
        shadow.start()
        monitor.start(settings.rollout_check_interval_s)
        yield
        await anyio.to_thread.run_sync(monitor.stop)
        await anyio.to_thread.run_sync(shadow.stop)
        await anyio.to_thread.run_sync(reconciler.stop_polling)

    return lifespan


def _warmup_sizes(settings: Settings) -> tuple[int, ...]:
    """Typical sizes and the largest allowed one (capped): no first request pays for a shape."""
    largest = min(settings.max_candidates, WARMUP_MAX)
    return tuple(sorted({min(n, largest) for n in (*WARMUP_SIZES, largest)}))


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
        _limit_candidates(components, app.state.settings.max_candidates)
        _own_validation_errors(schema)
        app.openapi_schema = schema
    return app.openapi_schema


def _limit_candidates(components: dict[str, Any], max_candidates: int) -> None:
    """Write this server's VIDRANK_MAX_CANDIDATES into both candidate layouts."""
    for variant in components["RankRequest"]["properties"]["candidates"]["anyOf"]:
        if variant.get("type") == "array":
            variant["maxItems"] = max_candidates
    components["ColumnarCandidates"]["properties"]["video_id"]["maxItems"] = max_candidates


def _own_validation_errors(schema: dict[str, Any]) -> None:
    """Drop FastAPI's default 422 (``HTTPValidationError``): this service never answers it.

    Every 422 is the one error body; the operations that can answer 422 declare it themselves,
    and FastAPI adds its own only to operations whose parameters cannot fail (path strings).
    """
    default_422 = {"$ref": "#/components/schemas/HTTPValidationError"}
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            r422 = operation.get("responses", {}).get("422", {})
            if r422.get("content", {}).get(JSON, {}).get("schema") == default_422:
                del operation["responses"]["422"]
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
