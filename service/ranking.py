"""POST /rank without HTTP: bytes in, bytes out.

parse (orjson) → pick the version (canary by user) → resolve the fusion → build item columns →
encode (vectorised) → session.run → fuse → stable sort → top_k → serialise (orjson). Everything
here is blocking and runs in a worker thread, never in the event loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from model.core.features import FeatureError
from model.core.fusion import FusionSpec, ProfileStore, fuse, rank_order, resolve
from service import metrics
from service.errors import InvalidRequest
from service.manager import ModelManager
from service.request import Items, RankRequest, items_of, parse_request
from service.scorer import Scorer

log = logging.getLogger("vidrank.rank")


@dataclass(slots=True)
class RankResult:
    """The serialised response plus what the access log records."""

    body: bytes
    request_id: str
    model_version: str
    candidates: int


class Ranker:
    """Ranks candidates with whatever version the manager serves for the request's user."""

    def __init__(
        self, manager: ModelManager, profiles: ProfileStore | None, max_candidates: int
    ) -> None:
        self.manager = manager
        self.profiles = profiles
        self.max_candidates = max_candidates
        self._profile_failures = profiles.reload_failures if profiles is not None else 0

    def rank(self, body: bytes, request_id: str) -> RankResult:
        """Rank one request; raises domain errors (InvalidRequest, FusionError, NotReady ...)."""
        req = parse_request(body, self.max_candidates)
        scorer = self.manager.state.pick(req.user_id)
        spec = resolve(self.profiles, req.fusion, scorer.default_fusion)
        self._check_profiles()
        try:
            items = items_of(req, scorer.view)
        except FeatureError as e:
            raise InvalidRequest(e.message, feature_path(e, req.columnar)) from None
        unknown = items.unknown | (req.user.keys() - scorer.view.user - {"user_id"})
        unknown |= req.context.keys() - scorer.view.context
        if unknown:
            metrics.count_unknown_features(unknown)
        rid = req.request_id or request_id
        metrics.CANDIDATES.observe(req.n)
        metrics.RANK_BY_VERSION.labels(scorer.version).inc()
        if req.n == 0:
            body_out = _serialise(rid, scorer.version, spec, [], None, None, {})
        else:
            preds = self._predict(req, items, scorer)
            scores = fuse(spec, preds)
            order = rank_order(scores)[: req.top_k]
            body_out = _serialise(rid, scorer.version, spec, items.video_ids, order, scores, preds)
        return RankResult(body_out, rid, scorer.version, req.n)

    def _predict(self, req: RankRequest, items: Items, scorer: Scorer) -> dict[str, np.ndarray]:
        try:
            inputs = scorer.schema.encode(req.user, req.context, items.columns, req.n)
        except FeatureError as e:
            raise InvalidRequest(e.message, feature_path(e, req.columnar)) from None
        except (TypeError, ValueError, OverflowError, AttributeError) as e:
            # Not a FeatureError: find the column the encoder choked on to name it.
            raise self._locate(req, items, scorer, e) from None
        start = time.perf_counter()
        preds = scorer.score(inputs)
        metrics.INFERENCE_SECONDS.observe(time.perf_counter() - start)
        return preds

    def _locate(
        self, req: RankRequest, items: Items, scorer: Scorer, exc: Exception
    ) -> InvalidRequest:
        log.warning("feature encoding failed", exc_info=exc)
        schema = scorer.schema
        for entity, columns, n in (
            ("user", {k: [v] for k, v in req.user.items()}, 1),
            ("context", {k: [v] for k, v in req.context.items()}, 1),
            ("item", items.columns, req.n),
        ):
            for name, col in columns.items():
                try:
                    schema.encode_entity(entity, {name: col}, n)
                except Exception:
                    err = FeatureError(name, "invalid value(s)", entity=entity)
                    return InvalidRequest("invalid value(s)", feature_path(err, req.columnar))
        return InvalidRequest("invalid feature values", "candidates")

    def _check_profiles(self) -> None:
        """Count and log profile-file reload failures (the store keeps the last good file)."""
        store = self.profiles
        if store is not None and store.reload_failures != self._profile_failures:
            metrics.PROFILE_RELOAD_FAILURES.inc(store.reload_failures - self._profile_failures)
            self._profile_failures = store.reload_failures
            log.warning(
                "fusion profiles reload failed", extra={"fields": {"error": store.last_error}}
            )


def feature_path(e: FeatureError, columnar: bool) -> str:
    """The request field a FeatureError points at."""
    if e.entity == "user":
        return "user.user_id" if e.feature == "user_id" else f"user.features.{e.feature}"
    if e.entity == "context":
        return f"context.{e.feature}"
    row = e.row
    if columnar:
        base = (
            "candidates.video_id" if e.feature == "video_id" else f"candidates.features.{e.feature}"
        )
        return base if row is None else f"{base}[{row}]"
    where = f"candidates[{'*' if row is None else row}]"
    return f"{where}.video_id" if e.feature == "video_id" else f"{where}.features.{e.feature}"


def fusion_view(spec: FusionSpec) -> dict[str, Any]:
    """The fusion applied, as the response reports it."""
    out: dict[str, Any] = {
        "method": spec.method,
        "weights": {task: term.to_value() for task, term in spec.terms.items()},
    }
    if spec.method == "weighted_product":
        out["epsilon"] = spec.epsilon
    elif spec.method == "rank_sum":
        out["beta"] = spec.beta
    if spec.name is not None:
        out["profile"] = spec.name
    return out


def _serialise(
    request_id: str,
    version: str,
    spec: FusionSpec,
    video_ids: list[Any],
    order: np.ndarray | None,
    scores: np.ndarray | None,
    preds: dict[str, np.ndarray],
) -> bytes:
    items: list[dict[str, Any]] = []
    if order is not None and scores is not None and len(order):
        # float32 predictions become the exact float64 values, so a client recomputing the
        # fused score from them gets the same number the service sorted by.
        idx = order.tolist()
        ids = [video_ids[i] for i in idx]
        click = preds["click"][order].tolist()
        watch = preds["watch_time"][order].tolist()
        like = preds["like"][order].tolist()
        items = [
            {"video_id": v, "score": s, "predictions": {"click": c, "watch_time": w, "like": lk}}
            for v, s, c, w, lk in zip(ids, scores[order].tolist(), click, watch, like, strict=True)
        ]
    return orjson.dumps(
        {
            "request_id": request_id,
            "model_version": version,
            "fusion": fusion_view(spec),
            "items": items,
        }
    )
