"""The public API as pydantic models: OpenAPI documentation and the admin request bodies.

``POST /rank`` does not validate through these models (it parses with orjson and validates
columns without a Python object per candidate, see ``service/request.py``), but they describe
exactly what it accepts and returns, and /docs renders them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.core.fusion import METHODS, TRANSFORMS
from model.core.tasks import TASKS

FeatureValue = str | int | float | list[str | int] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class User(_Strict):
    user_id: str | int = Field(description="Also the user_id feature; selects the canary bucket.")
    features: dict[str, FeatureValue] | None = Field(
        None,
        description="User features by name; they override the feature store's; missing ones "
        "come from the store, else the schema's defaults.",
    )


class Candidate(_Strict):
    video_id: str | int = Field(description="Unique within the request; echoed as sent.")
    features: dict[str, FeatureValue] | None = Field(
        None,
        description="Item features by name, overriding the store's (null: not sent); unknown "
        "names are ignored (and counted). Omit to rank by id with stored features.",
    )


class ColumnarCandidates(_Strict):
    """The same candidates as columns: one list per feature, all as long as ``video_id``."""

    video_id: list[str | int]
    features: dict[str, list[FeatureValue]] | None = None


class TaskWeight(_Strict):
    weight: float
    transform: str = Field("identity", json_schema_extra={"enum": list(TRANSFORMS)})
    scale: float = 1.0


class FusionParams(_Strict):
    method: str = Field(json_schema_extra={"enum": list(METHODS)})
    weights: dict[str, float | TaskWeight] = Field(
        json_schema_extra={"propertyNames": {"enum": list(TASKS)}},
        description="Per task: a weight, or a weight with a transform.",
    )
    epsilon: float = Field(1e-6, description="weighted_product: added before the log.")
    beta: float = Field(1.0, description="rank_sum: score = sum_k w_k / (rank_k + beta).")


class FusionProfile(_Strict):
    profile: str


class RankRequest(_Strict):
    request_id: str | None = Field(None, max_length=128, description="Echoed; generated if absent.")
    user: User
    context: dict[str, FeatureValue] | None = Field(None, description="Context features.")
    candidates: list[Candidate] | ColumnarCandidates = Field(
        description="Up to VIDRANK_MAX_CANDIDATES candidates, as rows or columns."
    )
    fusion: str | FusionProfile | FusionParams | None = Field(
        None, description="A profile name, or method + weights; default: the default profile."
    )
    top_k: int | None = Field(None, ge=1, description="Return only the best top_k.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "user": {"user_id": 42, "features": {"user_active_degree": "high_active"}},
                    "context": {"hour": 20, "tab": 1},
                    "candidates": [
                        {"video_id": 1001, "features": {"duration_s": 35.0, "tag": "12,65"}},
                        {"video_id": 1002, "features": {"duration_s": 610.0}},
                    ],
                    "fusion": "balanced",
                    "top_k": 10,
                }
            ]
        },
    )


class Predictions(BaseModel):
    click: float = Field(description="P(click).")
    watch_time: float = Field(description="Expected watch seconds per impression.")
    like: float = Field(description="P(like).")


class RankedItem(BaseModel):
    video_id: str | int
    score: float | None
    predictions: Predictions


class AppliedFusion(BaseModel):
    method: str
    weights: dict[str, Any]
    epsilon: float | None = None
    beta: float | None = None
    profile: str | None = None


class RankResponse(BaseModel):
    request_id: str
    model_version: str
    fusion: AppliedFusion
    items: list[RankedItem] = Field(description="Sorted by descending score; ties by input order.")
    feature_snapshot: str | None = Field(
        None, description="The feature snapshot whose stored features were used (if any)."
    )
    degraded: list[str] | None = Field(
        None,
        description='["feature_store"] when the store failed and the request was scored with '
        "its own features and schema defaults.",
    )


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CanaryRequest(_Strict):
    version: str
    percent: float = Field(gt=0, le=100, description="Percent of users (stable by user_id).")


class Status(BaseModel):
    status: str
    model_version: str | None = None


class AliasesOut(BaseModel):
    production: str | None
    previous: list[str]
    canary: dict[str, Any] | None
    updated_at: str | None


class FeatureStoreState(BaseModel):
    backend: str = Field(description="embedded, redis or off.")
    snapshot: str | None = Field(description="The active feature snapshot served here.")
    required: bool
    status: str = Field(description="ok, or degraded: <reason>.")
    lacks: dict[str, list[str]] = Field(
        description="Per served version: the user/item features it reads that the store lacks."
    )


class AdminResult(BaseModel):
    aliases: AliasesOut
    serving: dict[str, Any]
    feature_store: FeatureStoreState


class FeatureStoreResult(BaseModel):
    feature_store: FeatureStoreState
