"""Helpers for the service tests: settings, extra/broken versions, request builders."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from model.core.bundle import MANIFEST_FILE, MODEL_FILE
from model.core.registry import Registry
from service.settings import Settings

PROFILES = """\
default = "clicky"

[profiles.clicky]
method = "weighted_sum"
weights = { click = 1.0 }

[profiles.watchers]
method = "weighted_product"
weights = { click = 0.5, watch_time = { weight = 1.0, transform = "log1p" }, like = 0.2 }

[profiles.ranks]
method = "rank_sum"
weights = { click = 1.0, watch_time = 1.0, like = 0.5 }
beta = 2.0
"""

ADMIN_TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def settings_for(registry: Path, **overrides: Any) -> Settings:
    """Settings for tests: the poller effectively off unless a test asks for it."""
    values: dict[str, Any] = {
        "registry": registry,
        "admin_token": ADMIN_TOKEN,
        "poll_interval_s": 3600.0,
        "ort_intra_op_threads": 1,
    }
    values.update(overrides)
    return Settings(**values)


def publish_as(registry: Path, source_version: str, name: str) -> str:
    """Publish an existing version's bundle again under another name (same weights)."""
    return Registry(registry).publish(registry / "versions" / source_version, version=name)


def corrupt_copy(registry: Path, source_version: str, name: str, how: str) -> str:
    """Publish ``source_version`` as ``name``, then break it in place in one of several ways."""
    publish_as(registry, source_version, name)
    d = registry / "versions" / name
    if how == "corrupt_onnx":  # valid manifest describing garbage bytes of the right checksum
        data = b"\x08\x07this is not an onnx graph" * 100
        (d / MODEL_FILE).write_bytes(data)
        _rewrite_checksum(d)
    elif how == "checksum_mismatch":
        data = bytearray((d / MODEL_FILE).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (d / MODEL_FILE).write_bytes(bytes(data))
    elif how == "incompatible_schema":  # manifest declares an input the graph lacks
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        feats = manifest["feature_schema"]["features"]
        feats.append({**feats[-1], "name": "brand_new_numeric"})
        manifest["inputs"] = _specs_after_adding(manifest)
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif how == "inputs_mismatch":  # manifest inputs disagree with its own schema
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        manifest["inputs"] = manifest["inputs"][:-1]
        (d / MANIFEST_FILE).write_text(json.dumps(manifest))
    elif how == "missing_onnx":
        (d / MODEL_FILE).unlink()
    elif how == "missing_manifest":
        (d / MANIFEST_FILE).unlink()
    elif how == "manifest_not_json":
        (d / MANIFEST_FILE).write_text("{ not json")
    else:
        raise ValueError(how)
    return name


def _rewrite_checksum(d: Path) -> None:
    from model.core.bundle import sha256_file

    manifest = json.loads((d / MANIFEST_FILE).read_text())
    manifest["sha256"] = sha256_file(d / MODEL_FILE)
    manifest["size_bytes"] = (d / MODEL_FILE).stat().st_size
    (d / MANIFEST_FILE).write_text(json.dumps(manifest))


def _specs_after_adding(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    from model.core.features import FeatureSchema

    return FeatureSchema.from_dict(manifest["feature_schema"]).input_specs()


# -- requests ------------------------------------------------------------------------------------
def candidate(rng: random.Random, video_id: Any) -> dict[str, Any]:
    """A candidate with every item feature of the default schema, realistic values."""
    return {
        "video_id": video_id,
        "features": {
            "author_id": rng.randrange(5000),
            "video_type": rng.choice(["NORMAL", "NORMAL", "AD"]),
            "music_id": rng.randrange(3000),
            "tag": ",".join(str(rng.randrange(60)) for _ in range(rng.randrange(1, 4))),
            "duration_s": round(rng.uniform(5, 600), 3),
            "upload_age_days": rng.randrange(400),
        },
    }


def rank_body(n: int, user_id: Any = 42, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """A realistic /rank request with ``n`` distinct candidates."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 10_000_000), n)
    body: dict[str, Any] = {
        "user": {
            "user_id": user_id,
            "features": {
                "user_active_degree": "high_active",
                "is_video_author": 0,
                "follow_user_num": 21,
                "fans_user_num": 8,
                "register_days": 594,
            },
        },
        "context": {"hour": 20, "day_of_week": 3, "tab": 1},
        "candidates": [candidate(rng, v) for v in ids],
    }
    body.update(extra)
    return body


def to_columnar(body: dict[str, Any]) -> dict[str, Any]:
    """The same request with columnar candidates (None where a row lacks a feature)."""
    cands = body["candidates"]
    names: list[str] = []
    for c in cands:
        for k in c.get("features") or {}:
            if k not in names:
                names.append(k)
    out = dict(body)
    out["candidates"] = {
        "video_id": [c["video_id"] for c in cands],
        "features": {k: [(c.get("features") or {}).get(k) for c in cands] for k in names},
    }
    return out


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a Prometheus sample (0 when absent)."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
