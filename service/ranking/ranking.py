"""POST /rank without HTTP: bytes in, bytes out.

:meth:`Ranker.rank` reads as the request's way through the service: parse
(``service.scoring.request``) → pick the version (canary by user) and the feature view prepared for
it, from one serving state → resolve the fusion → encode (stored features by id under the request's
own, through the bundle's feature encoder, vectorised: ``service.scoring.features``) → score
(``session.run``) → count the predictions (drift) → fuse (with per-task terms when the request asks
to ``explain``) → stable sort → top_k → serialise (orjson) → maybe sample the request for the shadow
version. Domain errors propagate as they are, except the encoder's, which get the request field they
point at; ``service/errors.py`` turns them all into responses. Each request's outcome and time are
recorded per version for the canary policy. Everything here is blocking and runs in a worker
thread, never in the event loop.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from model.core.errors import VidrankError
from model.core.features import FeatureError
from model.core.fusion import FusionSpec, ProfileStore, fuse, fuse_terms, rank_order, resolve
from model.core.tasks import TASKS
from service import metrics
from service.errors import InvalidRequest, http_status
from service.rollout.canary import Traffic
from service.rollout.drift import DriftMonitor
from service.rollout.reconciler import Reconciler, ServingState
from service.rollout.shadow import ShadowJob
from service.scoring.features import DEGRADED, Encoded, FeatureView
from service.scoring.request import EncoderInput, RankRequest, encoder_input, parse_request
from service.scoring.scorer import Scorer

log = logging.getLogger("vidrank.rank")


@dataclass(slots=True)
class RankResult:
    """The serialised response plus what the access log records (and a sampled shadow job)."""

    body: bytes
    request_id: str
    model_version: str
    candidates: int
    shadow: ShadowJob | None = None


class Ranker:
    """Ranks candidates with whatever version the reconciler serves for the request's user."""

    def __init__(
        self,
        reconciler: Reconciler,
        profiles: ProfileStore | None,
        max_candidates: int,
        drift: DriftMonitor,
        traffic: Traffic,
    ) -> None:
        self.reconciler = reconciler
        self.profiles = profiles
        self.max_candidates = max_candidates
        self.drift = drift
        self.traffic = traffic

    def rank(self, body: bytes, request_id: str) -> RankResult:
        """Rank one request; raises domain errors (InvalidRequest, FusionError, NotReady ...)."""
        req = parse_request(body, self.max_candidates)
        state = self.reconciler.state  # read once: model and features from one swap
        scorer = state.pick(req.user_id)
        start = time.perf_counter()
        try:
            result = self._rank(req, request_id, scorer, state)
        except Exception as e:
            server_side = not isinstance(e, VidrankError) or http_status(e) >= 500
            self.traffic.record(scorer.version, time.perf_counter() - start, server_side)
            raise
        self.traffic.record(scorer.version, time.perf_counter() - start, False)
        return result

    def _rank(
        self, req: RankRequest, request_id: str, scorer: Scorer, state: ServingState
    ) -> RankResult:
        spec = resolve(self.profiles, req.fusion, scorer.default_fusion)
        given = encoder_input(req, scorer.view)
        if given.unknown:
            metrics.count_unknown_features(given.unknown)
        rid = req.request_id or request_id
        metrics.CANDIDATES.observe(req.n)
        metrics.RANK_BY_VERSION.labels(scorer.version).inc()
        items: list[dict[str, Any]] = []
        enc = Encoded({}, state.features.snapshot)
        job = None
        if req.n:
            enc = encode(state.features, scorer, req, given)
            preds = score(scorer, enc.inputs)
            self.drift.observe(scorer, preds)
            scores, terms = fuse_terms(spec, preds) if req.explain else (fuse(spec, preds), None)
            order = rank_order(finite(scores, scorer.version))
            items = ranked_items(given.video_ids, order[: req.top_k], scores, preds, terms)
            job = sample_shadow(state, scorer, req, given, enc.inputs, preds, order)
        body_out = serialise(rid, scorer.version, spec, items, enc)
        return RankResult(body_out, rid, scorer.version, req.n, job)


def sample_shadow(
    state: ServingState,
    scorer: Scorer,
    req: RankRequest,
    given: EncoderInput,
    inputs: dict[str, np.ndarray],
    preds: dict[str, np.ndarray],
    order: np.ndarray,
) -> ShadowJob | None:
    """A shadow job for ``shadow_percent`` of requests (random sampling), else None.

    The shadow scores the served version's tensors (stored features included); a shadow with
    another schema re-encodes the request as sent, without stored features.
    """
    shadow = state.shadow
    if shadow is None or shadow.version == scorer.version:  # e.g. a canary also shadowed
        return None
    if random.random() * 100.0 >= state.shadow_percent:
        return None
    return ShadowJob(scorer, shadow, given, inputs, preds, order, req.fusion)


def encode(features: FeatureView, scorer: Scorer, req: RankRequest, given: EncoderInput) -> Encoded:
    """The model inputs; a bad feature value becomes a 422 naming its request field."""
    try:
        return features.encode(scorer, given)
    except FeatureError as e:
        raise InvalidRequest(e.message, req.field_of(e)) from None


def score(scorer: Scorer, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the graph, timing it for the inference histogram."""
    start = time.perf_counter()
    preds = scorer.score(inputs)
    metrics.INFERENCE_SECONDS.observe(time.perf_counter() - start)
    return preds


def finite(scores: np.ndarray, version: str) -> np.ndarray:
    """The fused scores, checked: a non-finite one is a 500, never a null score in the answer.

    Any valid fusion spec gives finite scores for finite, non-negative predictions (its weights
    are bounded, see ``model/core/fusion.py``), so this fails only for a broken model.
    """
    if not np.isfinite(scores).all():
        raise RuntimeError(f"model {version} gave predictions that fuse to non-finite scores")
    return scores


def profiles_failed(error: str) -> None:
    """ProfileStore's failure callback: count and log it (the store keeps the last good file)."""
    metrics.PROFILE_RELOAD_FAILURES.inc()
    log.warning("fusion profiles failed to load", extra={"fields": {"error": error}})


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


def ranked_items(
    video_ids: list[Any],
    order: np.ndarray,
    scores: np.ndarray,
    preds: dict[str, np.ndarray],
    terms: dict[str, np.ndarray] | None = None,
) -> list[dict[str, Any]]:
    """The response's items in ``order``, each with its fused score and the three predictions.

    With ``terms`` (an explained request) each item also gets ``explain``: every task's
    contribution to the score, which add up to it (0 for a task the fusion does not weigh).
    """
    # float32 predictions become the exact float64 values, so a client recomputing the fused
    # score from them gets the same number the service sorted by.
    ids = [video_ids[i] for i in order.tolist()]
    click = preds["click"][order].tolist()
    watch = preds["watch_time"][order].tolist()
    like = preds["like"][order].tolist()
    items = [
        {"video_id": v, "score": s, "predictions": {"click": c, "watch_time": w, "like": lk}}
        for v, s, c, w, lk in zip(ids, scores[order].tolist(), click, watch, like, strict=True)
    ]
    if terms is not None:
        zero = [0.0] * len(items)
        columns = [terms[t][order].tolist() if t in terms else zero for t in TASKS]
        for item, *values in zip(items, *columns, strict=True):
            item["explain"] = dict(zip(TASKS, values, strict=True))
    return items


def serialise(
    request_id: str,
    version: str,
    spec: FusionSpec,
    items: list[dict[str, Any]],
    features: Encoded | None = None,
) -> bytes:
    """The response body; it names the feature snapshot used and a degraded feature store."""
    out: dict[str, Any] = {
        "request_id": request_id,
        "model_version": version,
        "fusion": fusion_view(spec),
        "items": items,
    }
    if features is not None and features.snapshot is not None:
        out["feature_snapshot"] = features.snapshot
    if features is not None and features.degraded is not None:
        out["degraded"] = list(DEGRADED)
    return orjson.dumps(out)
