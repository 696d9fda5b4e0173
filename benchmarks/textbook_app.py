"""The baseline: POST /rank written the way most services are first written.

Pydantic models for the request and the response, a Python loop over the candidates that builds
one feature row per candidate, the rows turned into columns for the same feature encoder, the
same ONNX model in onnxruntime (default session options), and a Python loop that fuses the three
predictions and builds one response object per candidate. Nothing here is slow on purpose; it is
simply not tuned. Served by plain uvicorn::

    VIDRANK_BENCH_BUNDLE=registry/versions/v1 \\
        uvicorn benchmarks.textbook_app:create_app_from_env --factory --port 8001 --workers 2
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any

import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel, Field

from model.core.bundle import load_bundle

BUNDLE_ENV = "VIDRANK_BENCH_BUNDLE"
TASKS = ("click", "watch_time", "like")
FeatureValue = str | int | float | list[str | int] | None


class User(BaseModel):
    user_id: str | int
    features: dict[str, FeatureValue] = Field(default_factory=dict)


class Candidate(BaseModel):
    video_id: str | int
    features: dict[str, FeatureValue] = Field(default_factory=dict)


class RankRequest(BaseModel):
    request_id: str | None = None
    user: User
    context: dict[str, FeatureValue] | None = None
    candidates: list[Candidate] = Field(min_length=1, max_length=2000)
    top_k: int | None = None


class Predictions(BaseModel):
    click: float
    watch_time: float
    like: float


class RankedItem(BaseModel):
    video_id: str | int
    score: float
    predictions: Predictions


class RankResponse(BaseModel):
    request_id: str
    model_version: str
    items: list[RankedItem]


class TextbookRanker:
    """Bundle + onnxruntime session + a per-candidate Python pipeline."""

    def __init__(self, bundle_dir: Path) -> None:
        self.bundle = load_bundle(bundle_dir)
        self.schema = self.bundle.schema
        self.session = ort.InferenceSession(
            str(self.bundle.onnx_path), providers=["CPUExecutionProvider"]
        )
        self.item_features = [n for n in self.schema.names("item") if n != "video_id"]
        self.weights = _weights(self.bundle.default_fusion)
        self.product = self.bundle.default_fusion.get("method") == "weighted_product"
        self.epsilon = float(self.bundle.default_fusion.get("epsilon", 1e-6))

    def rank(self, req: RankRequest) -> RankResponse:
        user = {"user_id": req.user.user_id, **req.user.features}
        rows = []
        for cand in req.candidates:  # one feature row per candidate
            row: dict[str, Any] = {"video_id": cand.video_id}
            for name in self.item_features:
                row[name] = cand.features.get(name)
            rows.append(row)
        columns = {name: [row[name] for row in rows] for name in ["video_id", *self.item_features]}
        inputs = self.schema.encode(user, req.context or {}, columns, len(rows))
        feed = {i.name: inputs[i.name] for i in self.session.get_inputs()}
        outputs = dict(zip(TASKS, self.session.run(list(TASKS), feed), strict=True))
        items = []
        for i, cand in enumerate(req.candidates):
            preds = {task: float(outputs[task][i]) for task in TASKS}
            score = 0.0
            for task, spec in self.weights.items():
                value = _transform(preds[task], spec)
                if self.product:  # log of prod (t + eps)^w: same order, no underflow
                    value = math.log(value + self.epsilon)
                score += float(spec["weight"]) * value
            items.append(
                RankedItem(video_id=cand.video_id, score=score, predictions=Predictions(**preds))
            )
        items.sort(key=lambda item: item.score, reverse=True)
        return RankResponse(
            request_id=req.request_id or str(uuid.uuid4()),
            model_version=self.bundle.version,
            items=items[: req.top_k] if req.top_k else items,
        )


def _weights(default_fusion: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's fusion terms as {task: {weight, transform, scale}}."""
    out: dict[str, dict[str, Any]] = {}
    for task, value in default_fusion.get("weights", {}).items():
        out[task] = value if isinstance(value, dict) else {"weight": value}
    return out or {task: {"weight": 1.0} for task in TASKS}


def _transform(p: float, spec: dict[str, Any]) -> float:
    transform = spec.get("transform", "identity")
    if transform == "log1p":
        return math.log1p(p)
    if transform == "scale":
        return p / spec.get("scale", 1.0)
    return p


def create_app(bundle_dir: Path) -> FastAPI:
    """The textbook FastAPI app serving one bundle directory."""
    ranker = TextbookRanker(bundle_dir)
    app = FastAPI(title="textbook ranker")

    @app.post("/rank", response_model=RankResponse)
    def rank(req: RankRequest) -> RankResponse:
        return ranker.rank(req)

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    # warm up once, as any service would before taking traffic
    ranker.rank(RankRequest(user=User(user_id=0), candidates=[Candidate(video_id=1)]))
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn ``--factory`` entry point: the bundle directory comes from $VIDRANK_BENCH_BUNDLE."""
    return create_app(Path(os.environ[BUNDLE_ENV]))
