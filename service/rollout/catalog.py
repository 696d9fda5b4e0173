"""What /models and /models/{version} report: registry contents and manifest metadata.

Published versions are immutable, so each manifest summary is read once and cached (without
hashing model.onnx: listing must stay cheap however many versions there are).
"""

from __future__ import annotations

import threading
from typing import Any

from model.core.bundle import BundleError
from model.core.registry import Aliases, Registry, RegistryError, VersionNotFound
from service.rollout.canary import RolloutMonitor
from service.rollout.reconciler import Reconciler
from service.rollout.shadow import ShadowScorer

HISTORY_ENTRIES = 20  # the latest lines of history.jsonl that /models shows


class Catalog:
    """Read-only views of the registry for the HTTP API."""

    def __init__(
        self,
        registry: Registry,
        reconciler: Reconciler,
        shadow: ShadowScorer,
        monitor: RolloutMonitor,
    ) -> None:
        self.registry = registry
        self.reconciler = reconciler
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

        ``registry`` says whether this process could read the aliases on its last poll and
        whether it serves what they name; a broken aliases file shows there (and as null
        ``aliases``) rather than failing the call.
        """
        try:
            aliases: Aliases | None = self.registry.read_aliases()
        except RegistryError:
            aliases = None
        roles = (
            ("production", aliases.production if aliases else None),
            ("canary", aliases.canary.version if aliases and aliases.canary else None),
            ("shadow", aliases.shadow.version if aliases and aliases.shadow else None),
        )
        versions = []
        for v in self.registry.versions():
            entry = dict(self._summary(v))
            entry["aliases"] = [role for role, name in roles if name is not None and name == v]
            versions.append(entry)
        return {
            "versions": versions,
            "aliases": aliases.to_dict() if aliases else None,
            "serving": self.reconciler.describe(),
            "shadow": self.shadow.describe(),
            "canary_health": self.monitor.health,
            "history": self.registry.history.tail(HISTORY_ENTRIES),
            "registry": self.reconciler.status(),
            "feature_store": self.reconciler.describe_features(),
        }

    def manifest(self, version: str) -> dict[str, Any]:
        """A version's manifest; VersionNotFound (404) or BundleError (409) otherwise."""
        if not self.registry.has(version):
            raise VersionNotFound(f"version {version!r} is not published")
        return self.registry.bundle(version, verify=False).manifest
