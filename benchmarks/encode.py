"""The encode stage alone: ``FeatureSchema.encode`` per request, in-process, warm key caches.

The bodies go through the service's parse -> columns path once, outside the timing, so what is
timed is the encoder as a /rank request calls it (features in the request). One run encodes each
distinct body of a size once; a run's time per request is its time / the number of bodies; the
medians over many runs are reported in µs, wall clock and the thread's CPU time (steadier on a
shared machine). ``python -m benchmarks.encode`` measures it on its own, like
``make bench-quick`` would, without the servers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from benchmarks.workload import Body, build_workload
from model.core.features import FeatureSchema, default_schema
from model.training.sources import simulated_impressions
from service.scoring.request import SchemaView, encoder_input, parse_request

Args = tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]


def encoder_args(schema: FeatureSchema, bodies: Sequence[Body]) -> list[Args]:
    """What the service hands ``FeatureSchema.encode`` for each body."""
    view, out = SchemaView.of(schema), []
    for body in bodies:
        given = encoder_input(parse_request(orjson.dumps(body), len(body["candidates"])), view)
        out.append((given.user, given.context, given.items, given.n))
    return out


def measure_encode(
    schema: FeatureSchema, bodies: Mapping[int, Sequence[Body]], runs: int = 300
) -> dict[str, dict[str, float]]:
    """Median µs per request of ``schema.encode`` for each candidate count (warm caches)."""
    out = {}
    for n, some in bodies.items():
        args = encoder_args(schema, some)
        for a in args:  # warm: the key caches hold what a running service holds
            schema.encode(*a)
        wall, cpu = [], []
        for _ in range(runs):
            t, c = time.perf_counter(), time.thread_time()
            for a in args:
                schema.encode(*a)
            cpu.append((time.thread_time() - c) / len(args) * 1e6)
            wall.append((time.perf_counter() - t) / len(args) * 1e6)
        out[str(n)] = {
            "median_us": statistics.median(wall),
            "cpu_median_us": statistics.median(cpu),
            "runs": runs,
            "requests": len(args),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.encode", description=__doc__)
    p.add_argument("--impressions", type=int, default=50_000, help="simulated impressions")
    p.add_argument("--ns", default="100,500", help="candidate counts")
    p.add_argument("--per-n", type=int, default=16, help="distinct requests per count")
    p.add_argument("--runs", type=int, default=300, help="runs per count (medians over them)")
    a = p.parse_args(argv)
    frame = simulated_impressions(a.impressions, seed=0)
    schema = default_schema()
    numeric = [f.name for f in schema.features if f.kind == "numeric"]
    schema = schema.fit({k: frame[k].to_numpy() for k in numeric})
    ns = [int(x) for x in a.ns.split(",")]
    wl = build_workload(frame, schema, ns, a.per_n)
    for n, r in measure_encode(schema, wl.bodies, a.runs).items():
        print(
            f"encode, {n} candidates: median {r['median_us']:.0f} µs wall, "
            f"{r['cpu_median_us']:.0f} µs CPU ({r['runs']} runs x {r['requests']} requests)"
        )


if __name__ == "__main__":
    main()
