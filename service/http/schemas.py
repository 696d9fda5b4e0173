"""The public API as pydantic models: OpenAPI documentation and the admin request bodies.

``POST /rank`` does not validate through these models (it parses with orjson and validates
columns without a Python object per candidate, see ``service/scoring/request.py``), but they
describe what it accepts and returns, with its limits, and /docs renders them. What a schema cannot
say is in the descriptions: video ids must be unique, and feature values are checked against the
serving model's feature schema (its manifest), so their types depend on the model.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from model.core.features import MAX_STRING_CHARS
from model.core.fusion import MAX_WEIGHT, METHODS, MIN_BETA, MIN_SCALE, TRANSFORMS
from model.core.tasks import TASKS
from service.scoring.request import MAX_ID_CHARS, MAX_REQUEST_ID_LEN, REQUEST_ID_PATTERN

# The integers the JSON parser (orjson) reads as integers; beyond them a number is a float,
# which no id or top_k accepts.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
Id = Annotated[str, Field(max_length=MAX_ID_CHARS)] | Annotated[int, Field(ge=INT_MIN, le=INT_MAX)]
FEATURES_DOC = (
    "Feature values by name, checked against the serving model's feature schema (see "
    "GET /models/{version}): numbers for numeric features; integers or strings of at most "
    f"{MAX_STRING_CHARS} characters (no booleans) for categorical ones; a list of those or a "
    "comma-separated string for tag lists; null for not sent. A missing feature takes the feature "
    "store's value, else its default; an unknown name is ignored (and counted), whatever its value."
)
Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT, strict=True)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class User(_Strict):
    user_id: Id = Field(description="Also the user_id feature; selects the canary bucket.")
    features: dict[str, Any] | None = Field(
        None,
        description="User features by name; they override the feature store's; missing ones "
        "come from the store, else the schema's defaults. " + FEATURES_DOC,
    )


class Candidate(_Strict):
    video_id: Id = Field(description='Unique within the request (42 and "42" are one id).')
    features: dict[str, Any] | None = Field(
        None,
        description="Item features by name, overriding the store's (null: not sent). Omit to "
        "rank by id with stored features. " + FEATURES_DOC,
    )


class ColumnarCandidates(_Strict):
    """The same candidates as columns: one list per feature, all as long as ``video_id``."""

    video_id: list[Id] = Field(description="Unique ids, one per candidate.")
    features: dict[str, list[Any]] | None = Field(
        None, description="One list per feature, as long as video_id. " + FEATURES_DOC
    )


class TaskWeight(_Strict):
    weight: Weight
    transform: str = Field("identity", json_schema_extra={"enum": list(TRANSFORMS)})
    scale: float = Field(1.0, ge=MIN_SCALE, description="transform 'scale' only: x / scale.")


class FusionParams(_Strict):
    method: str = Field(json_schema_extra={"enum": list(METHODS)})
    weights: dict[str, Weight | TaskWeight] = Field(
        json_schema_extra={"propertyNames": {"enum": list(TASKS)}},
        description="Per task: a weight, or a weight with a transform; at least one non-zero.",
    )
    epsilon: float = Field(1e-6, gt=0, description="weighted_product: added before the log.")
    beta: float = Field(
        1.0, ge=MIN_BETA, description="rank_sum: score = sum_k w_k / (rank_k + beta)."
    )


class FusionProfile(_Strict):
    profile: str = Field(description="A profile of the server's profile file.")


class RankRequest(_Strict):
    request_id: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_REQUEST_ID_LEN,
        pattern=REQUEST_ID_PATTERN,
        description="Echoed in the body and the x-request-id header; generated if absent. "
        "Printable, no space at either end.",
    )
    user: User
    context: dict[str, Any] | None = Field(None, description="Context features. " + FEATURES_DOC)
    candidates: list[Candidate] | ColumnarCandidates = Field(
        description="Up to VIDRANK_MAX_CANDIDATES candidates, as rows or columns."
    )
    fusion: str | FusionProfile | FusionParams | None = Field(
        None,
        description="A profile name (of the server's profile file), or method + weights; "
        "default: the profile file's default, else the model's default fusion.",
    )
    top_k: int | None = Field(None, ge=1, le=INT_MAX, description="Return only the best top_k.")
    explain: bool = Field(
        False,
        description=(
            "Add to every item each task's contribution to its score (they add up to it): "
            "w*t(p) for weighted_sum, w*log(t(p)+epsilon) for weighted_product, "
            "w/(rank+beta) for rank_sum. Off by default, and free when off."
        ),
    )

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
                    "top_k": 10,
                }
            ]
        },
    )


class Predictions(BaseModel):
    click: float = Field(description="P(click).")
    watch_time: float = Field(description="Expected watch seconds per impression.")
    like: float = Field(description="P(like).")


class Contributions(BaseModel):
    click: float | None
    watch_time: float | None
    like: float | None


class RankedItem(BaseModel):
    video_id: str | int
    score: float = Field(description="The fused score; always a finite number.")
    predictions: Predictions
    explain: Contributions | None = Field(
        None, description='Only with "explain": true: per-task terms that add up to score.'
    )


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


class CanaryPolicyIn(_Strict):
    """Bounds past which the canary is removed automatically; unset ones take the settings."""

    max_error_ratio: float | None = Field(
        None, gt=0, le=1, description="Canary server errors / canary requests in the window."
    )
    max_p99_ratio: float | None = Field(
        None, gt=0, description="Canary p99 ranking latency / production's."
    )
    max_psi: float | None = Field(
        None, gt=0, description="PSI of any task's predictions vs the canary's training data."
    )
    min_requests: int | None = Field(
        None, ge=1, description="Canary requests in the window before any bound is judged."
    )
    window_s: float | None = Field(None, gt=0, description="How far back to look (seconds).")


_REASON = Field(None, max_length=500, description="Why; recorded in the registry's history.")


class Reason(_Strict):
    reason: str | None = _REASON


class CanaryRequest(_Strict):
    version: str
    percent: float = Field(
        gt=0, le=100, strict=True, description="Percent of users (stable by user_id)."
    )
    policy: CanaryPolicyIn | None = None
    reason: str | None = _REASON


class ShadowRequest(_Strict):
    version: str
    percent: float = Field(
        gt=0, le=100, strict=True, description="Percent of requests also scored by VERSION."
    )
    reason: str | None = _REASON


class Status(BaseModel):
    status: str
    model_version: str | None = None


class CanaryOut(BaseModel):
    version: str
    percent: float


class AliasesOut(BaseModel):
    production: str | None
    previous: list[str]
    canary: dict[str, Any] | None = Field(
        description='{"version", "percent"} and "policy" (its rollback bounds) when it has one.'
    )
    shadow: CanaryOut | None = None
    updated_at: str | None


class FeatureStoreState(BaseModel):
    backend: str = Field(description="embedded, redis or off.")
    snapshot: str | None = Field(description="The active feature snapshot served here.")
    required: bool
    status: str = Field(description="ok, or degraded: <reason>.")
    lacks: dict[str, list[str]] = Field(
        description="Per served version: the user/item features it reads that the store lacks."
    )


class Serving(BaseModel):
    """What this process serves right now."""

    production: str | None
    canary: CanaryOut | None
    shadow: CanaryOut | None = None


class AdminResult(BaseModel):
    aliases: AliasesOut
    serving: Serving
    feature_store: FeatureStoreState


class FeatureStoreResult(BaseModel):
    feature_store: FeatureStoreState


class VersionSummary(BaseModel):
    version: str
    valid: bool = Field(description="False when the bundle cannot be read; see error.")
    aliases: list[str] = Field(description="production and/or canary, when it is one.")
    created_at: str | None = None
    size_bytes: int | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None


class RetryOut(BaseModel):
    attempts: int
    retry_in_s: float


class RegistryStatus(BaseModel):
    """What this process's last poll made of the registry."""

    status: str = Field(description="ok, aliases_missing, aliases_invalid or unreadable.")
    error: str | None = Field(description="The fault that kept the served versions, if any.")
    since: str | None = Field(description="When the fault began (UTC, ISO 8601).")
    desired: dict[str, str] = Field(description="{role: version} the aliases name.")
    converged: bool = Field(description="Whether this process serves what the aliases name.")
    retrying: dict[str, RetryOut] = Field(description="Aliased versions that failed to load.")


class ModelsOut(BaseModel):
    versions: list[VersionSummary] = Field(description="Oldest first.")
    aliases: AliasesOut | None = Field(
        description="The registry's aliases; null while aliases.json is missing or unreadable."
    )
    serving: Serving
    registry: RegistryStatus
    feature_store: FeatureStoreState
    shadow: dict[str, Any] | None = Field(
        None, description="How the shadow version compares with production (this process)."
    )
    canary_health: dict[str, Any] | None = Field(
        None, description="The canary policy's last judgement (this process)."
    )
    history: list[dict[str, Any]] = Field(
        default_factory=list, description="The latest changes of the aliases, oldest first."
    )
