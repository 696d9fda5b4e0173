"""Service configuration: one ``Settings`` object, read from ``VIDRANK_*`` environment variables.

Nothing else in the service reads ``os.environ``: ``vidrank serve`` builds a ``Settings`` and hands
it to ``run_server`` / ``create_app``, and tests build their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.core.policy import CanaryPolicy

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Settings(BaseSettings):
    """Everything an operator can configure (see the README's configuration table)."""

    model_config = SettingsConfigDict(env_prefix="VIDRANK_", extra="ignore", frozen=True)

    registry: Path = Field(Path("registry"), description="Model registry directory.")
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Port (0 picks a free one).")
    workers: int = Field(1, ge=1, le=256, description="Worker processes (one per core).")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /admin; unset means admin answers 403."
    )
    admin_token_file: Path | None = Field(
        None,
        description="File of admin bearer tokens, one per line (re-read when it changes).",
    )
    fusion_profiles: Path | None = Field(None, description="TOML file of fusion profiles.")
    max_candidates: int = Field(2000, ge=1, le=1_000_000, description="Candidates per request.")
    ort_intra_op_threads: int = Field(
        0, ge=0, le=256, description="onnxruntime intra-op threads; 0 = auto."
    )
    poll_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often the registry's aliases are polled."
    )
    log_level: LogLevel = Field("info", description="Log level.")
    # Rollout safety (README "Rolling out a model safely").
    shadow_queue_size: int = Field(
        64, ge=1, le=100_000, description="Shadow requests waiting to be scored; more are dropped."
    )
    rollout_window_s: float = Field(
        300.0, gt=0, le=86_400, description="Rolling window of the drift (PSI) and canary checks."
    )
    rollout_check_interval_s: float = Field(
        5.0, gt=0, le=3600, description="How often PSI gauges are refreshed and canaries judged."
    )
    canary_auto_rollback: bool = Field(True, description="Remove a canary that breaks its policy.")
    canary_max_error_ratio: float = Field(
        0.02, gt=0, le=1, description="Canary server errors / canary requests over the window."
    )
    canary_max_p99_ratio: float = Field(
        2.0, gt=0, description="Canary p99 ranking latency / production's over the window."
    )
    canary_max_psi: float = Field(
        0.25, gt=0, description="PSI of any task's predictions vs the canary's training data."
    )
    canary_min_requests: int = Field(
        200, ge=1, description="Canary requests in the window before the policy is judged."
    )
    max_queue: int = Field(
        8, ge=0, le=100_000, description="/rank requests waiting per worker; more get 503."
    )
    accept_backlog: int = Field(
        1,
        ge=1,
        le=65_535,
        description="Listen backlog while /rank places are all taken (no connection is "
        "accepted until one frees): beyond it new connections wait for their TCP retry.",
    )
    request_timeout_ms: int = Field(
        1000, ge=0, le=600_000, description="Default /rank deadline in ms; 0 = none."
    )
    header_timeout_s: float = Field(
        5.0, gt=0, le=300, description="Request line + headers must arrive within this; else 408."
    )
    body_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A request body must arrive within this; else 408."
    )
    max_connections: int = Field(
        1024, ge=1, le=1_000_000, description="Open connections per worker; more get 503."
    )
    docs: bool = Field(True, description="Serve /docs, /redoc and /openapi.json.")
    health_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also serve /healthz and /readyz (only) on this port, on a listener that "
        "accepts whatever the load: point liveness/readiness probes here.",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Serve /metrics on this port instead of the main one."
    )
    feature_store: str = Field(
        "embedded",
        description="Where /rank looks features up by id: embedded (snapshots in the registry), "
        "redis://host:port/db, or off.",
    )
    feature_timeout_ms: float = Field(
        20.0,
        gt=0,
        le=10_000,
        description="Budget of one feature lookup (one deadline across the Redis round trip).",
    )
    feature_store_required: bool = Field(
        False, description="A store failure answers 503 (and /readyz follows the store)."
    )
    feature_cache: Path | None = Field(
        None,
        description="Directory of snapshots encoded per model (default <registry>/features/"
        ".encoded); the workers sharing it share one memory-mapped copy.",
    )
    # Not in the public table: set by the multi-worker supervisor for its workers.
    metrics_multiproc_dir: Path | None = Field(
        None, description="prometheus-client multiprocess directory (set by the supervisor)."
    )

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_unset(cls, v: SecretStr | None) -> SecretStr | None:
        # VIDRANK_ADMIN_TOKEN="" must not turn into "the empty string is the password".
        return v if v is not None and v.get_secret_value() else None

    @model_validator(mode="after")
    def _metrics_port_differs(self) -> Settings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("metrics_port must differ from port")
        return self

    @field_validator("feature_store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        v = v.strip()
        if v.lower() in ("embedded", "off"):
            return v.lower()
        if v.startswith(("redis://", "rediss://", "unix://")):
            return v
        raise ValueError("must be embedded, off, or a redis://host:port/db URL")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    def feature_store_display(self) -> str:
        """The store setting for logs: a Redis URL without its password."""
        parts = urlsplit(self.feature_store)
        if parts.password is None:
            return self.feature_store
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))

    def intra_op_threads(self) -> int:
        """Resolved onnxruntime intra-op threads: explicit, else 1 per worker or all cores."""
        if self.ort_intra_op_threads > 0:
            return self.ort_intra_op_threads
        if self.workers > 1:
            return 1  # one worker per core: more threads per worker would only oversubscribe
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

    def max_body_bytes(self) -> int:
        """Largest /rank body accepted: generous per candidate, so only abuse is refused."""
        return (1 << 20) + 8192 * self.max_candidates

    def canary_policy(self) -> CanaryPolicy:
        """The default canary policy; a canary's own policy (in aliases.json) overrides fields."""
        return CanaryPolicy(
            max_error_ratio=self.canary_max_error_ratio,
            max_p99_ratio=self.canary_max_p99_ratio,
            max_psi=self.canary_max_psi,
            min_requests=self.canary_min_requests,
            window_s=self.rollout_window_s,
        )
