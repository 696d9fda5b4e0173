"""What /models and /models/{version} report: registry contents and manifest metadata.

Published versions are immutable, so each manifest summary is read once and cached (without
hashing model.onnx: listing must stay cheap however many versions there are).
"""

from __future__ import annotations

import threading
from typing import Any

from model.core.bundle import BundleError
from model.core.registry import Registry, RegistryError, VersionNotFound
from service.canary import RolloutMonitor
from service.manager import ModelManager
from service.shadow import ShadowScorer

HISTORY_ENTRIES = 20  # the latest lines of history.jsonl that /models shows


class Catalog:
    """Read-only views of the registry for the HTTP API."""

    def __init__(
        self,
        registry: Registry,
        manager: ModelManager,
        shadow: ShadowScorer,
        monitor: RolloutMonitor,
    ) -> None:
        self.registry = registry
        self.manager = manager
        self.shadow = shadow
        self.monitor = monitor
        self._summaries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _summary(self, version: str) -> dict[str, Any]:
        with self._lock:
            cached = self._summaries.get(version)
        if cached is not None:
            return cached
        try:
            b = self.registry.bundle(version, verify=False)
            summary: dict[str, Any] = {
                "version": version,
                "created_at": b.manifest.get("created_at"),
                "size_bytes": b.size_bytes,
                "metrics": b.metrics,
                "valid": True,
            }
        except (BundleError, RegistryError) as e:
            # Not cached: a version directory that is being repaired may become valid.
            return {"version": version, "valid": False, "error": str(e)}
        with self._lock:
            self._summaries[version] = summary
        return summary

    def models(self) -> dict[str, Any]:
        """Versions (oldest first) with training metrics, the aliases, what is served here, how
        the shadow compares and how the canary was last judged (this process), and the latest
        changes from the registry's history.
        """
        aliases = self.registry.read_aliases()
        roles = (
            ("production", aliases.production),
            ("canary", aliases.canary.version if aliases.canary else None),
            ("shadow", aliases.shadow.version if aliases.shadow else None),
        )
        versions = []
        for v in self.registry.versions():
            entry = dict(self._summary(v))
            entry["aliases"] = [role for role, name in roles if name == v]
            versions.append(entry)
        return {
            "versions": versions,
            "aliases": aliases.to_dict(),
            "serving": self.manager.describe(),
            "shadow": self.shadow.describe(),
            "canary_health": self.monitor.health,
            "history": self.registry.history.tail(HISTORY_ENTRIES),
        }

    def manifest(self, version: str) -> dict[str, Any]:
        """A version's manifest; VersionNotFound (404) or BundleError (409) otherwise."""
        if not self.registry.has(version):
            raise VersionNotFound(f"version {version!r} is not published")
        return self.registry.bundle(version, verify=False).manifest
