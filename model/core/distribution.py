"""Prediction distributions over fixed bins: what training stores, what serving compares.

One set of bin edges serves every task (numpy + stdlib only): fine steps below 0.1 for
probabilities (likes sit around 1-5 %), coarser up to 1, then seconds up to ten minutes for the
expected watch time. A task whose values never leave [0, 1] leaves the seconds bins empty, and a
bin empty on both sides adds nothing to the population stability index, so one layout costs
nothing in accuracy and lets the service bin a request's predictions once for both the
Prometheus histogram (``vidrank_prediction``) and the drift window.

Bins follow Prometheus' ``le`` convention: bin ``i`` holds values ``<= edges[i]`` (and above the
previous edge); one more bin at the end holds everything above the last edge.

At training time the manifest stores each task's counts on held-out data
(``prediction_distribution``, see :func:`reference_section`); the service reads it back with
:meth:`Reference.from_manifest` (``None`` for older bundles without it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from model.core.errors import VidrankError

MANIFEST_KEY: Final = "prediction_distribution"

PROBABILITY_EDGES: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4,
    0.5, 0.6, 0.7, 0.8, 0.9, 1.0,
)  # fmt: skip
SECONDS_EDGES: Final[tuple[float, ...]] = (
    2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip
PREDICTION_EDGES: Final[tuple[float, ...]] = PROBABILITY_EDGES + SECONDS_EDGES


class DistributionError(VidrankError, ValueError):
    """A malformed ``prediction_distribution`` section."""

    code = "invalid_bundle"


def bin_counts(values: npt.ArrayLike, edges: np.ndarray) -> np.ndarray:
    """int64 counts of ``values`` per bin (``len(edges) + 1`` bins, ``le`` convention).

    One ``searchsorted`` and one ``bincount``: O(n log b), no Python loop. NaN lands in the last
    bin (numpy sorts NaN above everything), which is where a broken head should show up.
    """
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64).ravel(), side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64, copy=False)


def reference_section(
    predictions: Mapping[str, npt.ArrayLike],
    source: str,
    edges: tuple[float, ...] = PREDICTION_EDGES,
) -> dict[str, Any]:
    """The manifest's ``prediction_distribution``: per-task counts of held-out predictions."""
    e = np.asarray(edges, dtype=np.float64)
    counts = {task: bin_counts(values, e).tolist() for task, values in predictions.items()}
    rows = {len(np.asarray(v).ravel()) for v in predictions.values()}
    return {
        "edges": list(edges),
        "counts": counts,
        "rows": max(rows, default=0),
        "source": source,
    }


@dataclass(frozen=True)
class Reference:
    """A bundle's stored prediction distribution: bin edges and per-task counts."""

    edges: np.ndarray  # float64, strictly increasing
    counts: Mapping[str, np.ndarray]  # task -> int64 [len(edges) + 1]
    rows: int
    source: str

    @classmethod
    def parse(cls, section: Any) -> Reference:
        """Parse and check a manifest section; raises ``DistributionError`` naming the key."""
        where = MANIFEST_KEY
        if not isinstance(section, Mapping):
            raise DistributionError("must be an object", where)
        edges = _edges(section.get("edges"), f"{where}.edges")
        raw = section.get("counts")
        if not isinstance(raw, Mapping) or not raw:
            raise DistributionError("must map task names to bin counts", f"{where}.counts")
        counts = {
            str(task): _counts(values, len(edges) + 1, f"{where}.counts.{task}")
            for task, values in raw.items()
        }
        rows = section.get("rows", 0)
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise DistributionError("must be a non-negative integer", f"{where}.rows")
        return cls(edges, counts, rows, str(section.get("source", "")))

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Reference | None:
        """The manifest's reference, or None when it has none (bundles before this section)."""
        section = manifest.get(MANIFEST_KEY)
        return None if section is None else cls.parse(section)

    def same_edges(self, edges: np.ndarray) -> bool:
        """Whether this reference bins exactly like ``edges``."""
        return self.edges.shape == edges.shape and bool(np.array_equal(self.edges, edges))


def _edges(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise DistributionError("must be a non-empty list of numbers", where)
    if not all(_finite(v) for v in value):
        raise DistributionError("must hold finite numbers only", where)
    edges = np.asarray(value, dtype=np.float64)
    if (np.diff(edges) <= 0).any():
        raise DistributionError("must be strictly increasing", where)
    return edges


def _counts(value: Any, n_bins: int, where: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != n_bins:
        raise DistributionError(f"must be a list of {n_bins} counts (one per bin)", where)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise DistributionError("must hold non-negative integers", where)
    return np.asarray(value, dtype=np.int64)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
