"""Helpers for the service tests: settings, extra and broken versions, metric samples.

Request bodies and the admin token come from ``benchmarks.harness``, as in the live tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from benchmarks.harness import ADMIN_TOKEN
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


def settings_for(registry: Path, **overrides: Any) -> Settings:
    """Settings for tests: the poller effectively off and no default deadline (on a busy 2-core
    machine a request can wait a second for the CPU) unless a test asks for them."""
    values: dict[str, Any] = {
        "registry": registry,
        "admin_token": ADMIN_TOKEN,
        "poll_interval_s": 3600.0,
        "ort_intra_op_threads": 1,
        "request_timeout_ms": 0,
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


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a Prometheus sample (0 when absent)."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value
