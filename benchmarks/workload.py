"""Realistic /rank requests drawn from the simulator's impression log.

A request takes the user and context of one logged impression and N distinct candidate videos
sampled from the log (so popular videos appear as often as the recommender would retrieve them),
each with the item features it was logged with. The same requests are sent to every path: as
JSON bodies to the HTTP servers and, encoded with the bundle's feature schema, to the in-process
onnxruntime floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from benchmarks.harness import to_columnar
from model.core.features import FeatureSchema
from model.simulator.world import SimConfig, simulate, write_simulation
from model.training.data import load_impressions
from service.scoring.request import SchemaView, encoder_input, parse_request

Body = dict[str, Any]


@dataclass(frozen=True)
class Workload:
    """Request bodies per candidate count, built from one impression frame."""

    schema: FeatureSchema
    bodies: dict[int, list[Body]]

    def json_lines(self, n: int, columnar: bool = False) -> list[bytes]:
        """The bodies for ``n`` candidates serialised as single-line JSON."""
        return [dumps(to_columnar(b) if columnar else b) for b in self.bodies[n]]

    def encoded(self, n: int) -> list[dict[str, np.ndarray]]:
        """The bodies for ``n`` candidates encoded as model inputs (for the floor)."""
        return [encode_body(self.schema, b) for b in self.bodies[n]]


def simulated_frame(cache_dir: Path, impressions: int, seed: int = 0) -> pd.DataFrame:
    """The impression frame of a simulated world (written once into ``cache_dir``)."""
    sim_dir = cache_dir / f"sim-{impressions}-{seed}"
    if not (sim_dir / "log_standard_sim.parquet").exists():
        write_simulation(simulate(SimConfig(n_impressions=impressions, seed=seed)), sim_dir)
    return load_impressions(sim_dir)


def build_workload(
    frame: pd.DataFrame, schema: FeatureSchema, ns: list[int], per_n: int, seed: int = 0
) -> Workload:
    """``per_n`` distinct requests for each candidate count in ``ns``."""
    rng = np.random.default_rng(seed)
    bodies = {
        n: [_request(frame, schema, n, rng, f"bench-{n}-{i}") for i in range(per_n)] for n in ns
    }
    return Workload(schema=schema, bodies=bodies)


def _value(x: Any) -> Any:
    """A JSON-native scalar (numpy scalars -> int/float/str)."""
    return x.item() if isinstance(x, np.generic) else x


def _request(
    frame: pd.DataFrame, schema: FeatureSchema, n: int, rng: np.random.Generator, rid: str
) -> Body:
    row = frame.iloc[int(rng.integers(len(frame)))]
    user_features = {k: _value(row[k]) for k in schema.names("user") if k != "user_id" and k in row}
    context = {k: _value(row[k]) for k in schema.names("context") if k in row}
    picks = _distinct_videos(frame, n, rng)
    item_names = [k for k in schema.names("item") if k != "video_id" and k in frame.columns]
    columns = {k: frame[k].to_numpy()[picks].tolist() for k in ["video_id", *item_names]}
    candidates = [
        {"video_id": vid, "features": {k: columns[k][i] for k in item_names}}
        for i, vid in enumerate(columns["video_id"])
    ]
    return {
        "request_id": rid,
        "user": {"user_id": _value(row["user_id"]), "features": user_features},
        "context": context,
        "candidates": candidates,
    }


def _distinct_videos(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> np.ndarray:
    """Row positions of ``n`` impressions with distinct video ids, sampled by exposure."""
    videos = frame["video_id"].to_numpy()
    rows = rng.integers(len(frame), size=n * 8)
    _, first = np.unique(videos[rows], return_index=True)
    if len(first) < n:
        _, first_all = np.unique(videos, return_index=True)
        if len(first_all) < n:
            raise ValueError(f"the log has {len(first_all)} distinct videos, fewer than {n}")
        return rng.permutation(first_all)[:n]
    return rows[rng.permutation(first)[:n]]


def encode_body(schema: FeatureSchema, body: Body) -> dict[str, np.ndarray]:
    """Model inputs for a body, through the service's own parse -> columns -> encode path."""
    req = parse_request(orjson.dumps(body), max(len(body["candidates"]), 1))
    given = encoder_input(req, SchemaView.of(schema))
    return schema.encode(given.user, given.context, given.items, given.n)


def dumps(body: Body) -> bytes:
    """Compact single-line JSON."""
    return orjson.dumps(body)
