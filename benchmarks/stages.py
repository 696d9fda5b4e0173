"""Where a /rank goes, stage by stage, in µs: parse, fetch, encode, run, fuse, serialise.

In-process, one request at a time, through the same functions ``Ranker`` calls (no HTTP, no
event loop): ``parse_request`` + ``encoder_input`` (parse), the feature view's ``encode``
(encode), ``Scorer.score`` (run: onnxruntime), ``fuse`` + ``rank_order`` (fuse),
``ranked_items`` + ``serialise`` (serialise). With features in the request the view is the
store-less one and fetch is 0; with a store's view (``view_for``: benchmarks/features.py measures
ids-only bodies against the embedded store and Redis) fetch is Redis's round trip
(``RedisReader.fetch``, timed inside ``encode`` and taken out of it) and encode the rest: the
rows' decoding and merging and the schema's encoding for Redis, the gather of the pre-encoded
rows for the embedded store. Each stage's median over every run of every body is reported, wall
clock, so the next regression shows which stage it is in. ``python -m benchmarks.stages
BUNDLE_DIR`` measures it on its own.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from model.core.bundle import load_bundle
from model.core.fusion import fuse, rank_order, resolve
from service.ranking.ranking import ranked_items, serialise
from service.scoring.features import FeatureView, RedisView
from service.scoring.request import encoder_input, parse_request
from service.scoring.scorer import Scorer

STAGES = ("parse", "fetch", "encode", "run", "fuse", "serialise")


def _timed(times: dict[str, list[float]], stage: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter_ns()
    out = fn()
    times[stage].append((time.perf_counter_ns() - start) / 1000)
    return out


class _TimedReader:
    """A Redis reader whose round trips (``fetch``) are timed into ``times["fetch"]``."""

    def __init__(self, reader: Any, times: dict[str, list[float]]) -> None:
        self.reader, self.times = reader, times

    def fetch(self, *args: Any) -> Any:
        return _timed(self.times, "fetch", lambda: self.reader.fetch(*args))


def rank_in_stages(
    scorer: Scorer, body: bytes, times: dict[str, list[float]], view: FeatureView | None = None
) -> bytes:
    """One /rank body through the ranker's stages, each timed into ``times``."""
    view = view if view is not None else FeatureView()
    if isinstance(view, RedisView) and view.reader is not None:
        view = replace(view, reader=cast(Any, _TimedReader(view.reader, times)))
    req = _timed(times, "parse", lambda: parse_request(body, 1_000_000))
    given = _timed(times, "parse_columns", lambda: encoder_input(req, scorer.view))
    fetches = len(times["fetch"])
    enc = _timed(times, "encode", lambda: view.encode(scorer, given))
    if len(times["fetch"]) > fetches:  # the round trip ran inside encode: it is not encoding
        times["encode"][-1] -= times["fetch"][-1]
    preds = _timed(times, "run", lambda: scorer.score(enc.inputs))
    spec = resolve(None, req.fusion, scorer.default_fusion)
    order, scores = _timed(times, "fuse", lambda: _fuse(spec, preds))
    return _timed(
        times,
        "serialise",
        lambda: serialise(
            "stages",
            scorer.version,
            spec,
            ranked_items(given.video_ids, order[: req.top_k], scores, preds),
            enc,
        ),
    )


def _fuse(spec: Any, preds: Any) -> tuple[Any, Any]:
    scores = fuse(spec, preds)
    return rank_order(scores), scores


def measure_stages(
    bundle_dir: Path,
    bodies: Mapping[int, Sequence[bytes]],
    runs: int = 30,
    view_for: Callable[[Scorer], FeatureView] | None = None,
) -> dict[str, dict[str, float]]:
    """Median µs per stage for each candidate count (one intra-op thread, warmed up); the
    feature view is ``view_for(scorer)`` (a store's) or none (features in the request)."""
    scorer = Scorer(load_bundle(bundle_dir), 1)
    view = view_for(scorer) if view_for is not None else None
    out: dict[str, dict[str, float]] = {}
    for n, some in bodies.items():
        times: dict[str, list[float]] = {s: [] for s in (*STAGES, "parse_columns")}
        for body in some:  # warm: shapes, key caches
            rank_in_stages(scorer, body, times, view)
        times = {s: [] for s in times}
        for _ in range(runs):
            for body in some:
                rank_in_stages(scorer, body, times, view)
        medians = {s: statistics.median(v) if v else 0.0 for s, v in times.items()}
        medians["parse"] += medians.pop("parse_columns")  # JSON + the request's columns
        medians["total"] = sum(medians[s] for s in STAGES)
        out[str(n)] = {k: round(v, 1) for k, v in medians.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__)
    p.add_argument("bundle", type=Path, help="a published bundle directory")
    p.add_argument("bodies", type=Path, nargs="+", help="JSONL files of /rank bodies, one per N")
    p.add_argument("--runs", type=int, default=30)
    a = p.parse_args(argv)
    bodies = {}
    for path in a.bodies:
        lines = [line for line in path.read_bytes().splitlines() if line]
        bodies[parse_request(lines[0], 1_000_000).n] = lines
    for n, r in measure_stages(a.bundle, bodies, a.runs).items():
        print(f"{n} candidates: " + ", ".join(f"{k} {v:.0f} µs" for k, v in r.items()))


if __name__ == "__main__":
    main()
