"""Feature-store benchmark rows: features in the request vs ids + embedded store vs ids + Redis.

At one candidate count (500 by default), in one run, each server with the same workers:
``vidrank serve`` with the store off and full bodies (features in the request), then with ids-only
bodies and the embedded store (a snapshot of the benchmark's simulated world in its registry),
then with ids-only bodies and Redis on loopback (a real ``redis-server`` started here). c=1 p50
and c=8 req/s each; the onnxruntime floor of the same model is the reference.

Then a snapshot of one million videos (synthetic ids and values; 100k users): publish time, start
to ready with a cold and a warm encoded cache, and memory: each worker's RSS, USS and PSS after
ids-only traffic over random videos, with 1 and 2 workers, against the same servers with the
store off. "Extra per additional worker" is the growth of the workers' summed PSS from 1 to 2
workers with the snapshot, minus the same growth without it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil

from benchmarks.harness import (
    RedisServer,
    Server,
    child_env,
    cpu_seconds,
    find_redis_server,
    start_vidrank,
)
from benchmarks.loadgen import run_load, write_bodies
from benchmarks.stages import STAGES, measure_stages
from model.core.registry import Registry
from model.core.store.embedded import SnapshotStore
from model.core.store.redis_store import RedisSnapshots, connect
from model.core.store.snapshot import build_tables
from model.training.feature_tables import feature_columns
from service.scoring.features import FeatureView
from service.scoring.scorer import Scorer


def ids_only(body: dict[str, Any]) -> dict[str, Any]:
    """The request without any stored feature: ids and context only."""
    return {
        **body,
        "user": {"user_id": body["user"]["user_id"]},
        "candidates": [{"video_id": c["video_id"]} for c in body["candidates"]],
    }


def _serve(registry: Path, log: Path, workers: int, env: dict[str, str]) -> Server:
    full = child_env({"VIDRANK_LOG_LEVEL": "warning", "VIDRANK_POLL_INTERVAL_S": "3600",
                      "MALLOC_ARENA_MAX": "2", **env})  # fmt: skip
    return start_vidrank(registry, log, workers=workers, env=full, name=log.stem)


ROUNDS = 3


def _run(
    server: Server,
    bodies: Path,
    connections: int,
    seconds: float,
    wrk: str | None,
    extra_pids: tuple[int, ...] = (),
) -> dict:
    """One load run, with the CPU seconds the server's workers (and ``extra_pids``: Redis) used."""
    pids = [*server.worker_pids(), *extra_pids]
    before = sum(cpu_seconds(p) or 0.0 for p in pids)
    out = run_load(server.url, bodies, connections, seconds, wrk).to_dict()
    out["cpu_s"] = sum(cpu_seconds(p) or 0.0 for p in pids) - before
    return out


def measure_interleaved(
    servers: dict[str, tuple[Server, Path]],
    floor: Callable[[float], tuple[float, float]] | None,
    s: Any,
    wrk: str | None,
    rounds: int = ROUNDS,
    redis_pids: tuple[int, ...] = (),
) -> dict[str, Any]:
    """c=1 p50 and c=8 req/s of each server, and the floor, measured in turns over ``rounds``.

    Round-robin, like the floor's own timing: load on a shared machine then falls on every row
    alike instead of on whichever ran during it. p50 and the floor are medians of the rounds'
    medians, req/s the mean of the rounds.
    """
    per: dict[str, dict[str, list[float]]] = {
        k: {"p50": [], "p99": [], "rps": [], "cpu_ms": []} for k in servers
    }
    floors: list[tuple[float, float]] = []
    errors: dict[str, int] = dict.fromkeys(servers, 0)
    for server, bodies in servers.values():
        _run(server, bodies, 1, s.warmup_s, wrk)
    for _ in range(rounds):
        if floor is not None:
            floors.append(floor(s.floor_s / rounds))
        for name, (server, bodies) in servers.items():
            c1 = _run(server, bodies, 1, s.http_s / rounds, wrk)
            extra = redis_pids if name == "redis" else ()
            c8 = _run(server, bodies, s.connections, s.http_s / rounds, wrk, extra)
            per[name]["cpu_ms"].append(1e3 * c8["cpu_s"] / max(1, c8["requests"]))
            per[name]["p50"].append(c1["latency_ms"]["p50"])
            per[name]["p99"].append(c1["latency_ms"]["p99"])
            per[name]["rps"].append(c8["rps"])
            errors[name] += sum(c1["errors"].values()) + sum(c8["errors"].values())
    out: dict[str, Any] = {
        "floor_p50_ms": float(np.median([f[0] for f in floors])) if floors else None,
        "floor_cpu_ms": float(np.median([f[1] for f in floors])) if floors else None,
    }
    for name, (_, bodies) in servers.items():
        lines = bodies.read_bytes().splitlines()
        out[name] = {
            "p50_ms": float(np.median(per[name]["p50"])),
            "p99_ms": float(np.median(per[name]["p99"])),
            "rps_c8": float(np.mean(per[name]["rps"])),
            "cpu_ms_per_request": float(np.median(per[name]["cpu_ms"])),
            "rounds": per[name],
            "errors": {"total": errors[name]},
            "body_bytes": sum(map(len, lines)) // max(1, len(lines)),
        }
    return out


def store_stages(
    bundle_dir: Path, registry: Path, redis_url: str | None, ids_lines: list[bytes], n: int
) -> dict[str, dict[str, float]]:
    """Per-stage µs of an ids-only /rank in-process (benchmarks/stages.py) against the embedded
    store's active snapshot and, with ``redis_url``, Redis's: where the ids paths' time goes."""
    from service.rollout.feature_source import EmbeddedSource, RedisSource

    def embedded(scorer: Scorer) -> FeatureView:
        return EmbeddedSource(SnapshotStore(registry), None, True).load("bench", [scorer])

    def redis(scorer: Scorer) -> FeatureView:
        assert redis_url is not None
        source = RedisSource(redis_url, 5.0, True)
        return source.poll(source.initial(), [scorer]) or source.initial()

    views: dict[str, Callable[[Scorer], FeatureView]] = {"embedded": embedded}
    if redis_url is not None:
        views["redis"] = redis
    return {
        name: measure_stages(bundle_dir, {n: ids_lines}, view_for=view)[str(n)]
        for name, view in views.items()
    }


def run_feature_rows(
    s: Any,
    registry: Path,
    sim_dir: Path,
    full_lines: list[bytes],
    floor: Callable[[float], tuple[float, float]] | None,
    wrk: str | None,
    workers: int,
    n: int,
    bundle_dir: Path | None = None,
) -> dict[str, Any]:
    """The three rows at ``n`` candidates (see the module docstring), and with ``bundle_dir``
    the in-process stages of the two ids paths (``store_stages``)."""
    columns, source = feature_columns(sim_dir)
    tables = build_tables(columns)
    store = SnapshotStore(registry)
    if not store.has("bench"):
        store.publish(tables, "bench", source)
    store.activate("bench")
    full = write_bodies(s.work_dir / f"features-full-{n}.jsonl", full_lines)
    ids_lines = [orjson.dumps(ids_only(orjson.loads(b))) for b in full_lines]
    ids = write_bodies(s.work_dir / f"features-ids-{n}.jsonl", ids_lines)
    runs = [("request", full, {"VIDRANK_FEATURE_STORE": "off"}), ("embedded", ids, {})]
    redis = None
    if find_redis_server() is not None:
        shutil.rmtree(s.work_dir / "redis-bench", ignore_errors=True)
        redis = RedisServer(s.work_dir / "redis-bench")
        rs = RedisSnapshots(connect(redis.url, 30.0))
        rs.publish(tables, "bench", source)
        rs.activate("bench")
        runs.append(("redis", ids, {"VIDRANK_FEATURE_STORE": redis.url}))
    stages = {}
    if bundle_dir is not None:  # before any server starts: in-process, on a quiet machine
        stages = store_stages(
            bundle_dir, registry, redis.url if redis is not None else None, ids_lines, n
        )
    servers: dict[str, tuple[Server, Path]] = {}
    try:
        for name, bodies, env in runs:
            log = s.work_dir / f"features-{name}.log"
            servers[name] = (_serve(registry, log, workers, env), bodies)
        extra = (redis.pid,) if redis is not None else ()
        out = measure_interleaved(servers, floor, s, wrk, redis_pids=extra)
    finally:
        for server, _ in servers.values():
            server.stop()
        if redis is not None:
            redis.stop()
    return {"n": n, "workers": workers, **out, "stages": stages}


# -- one million videos ------------------------------------------------------------------------


def million_tables(n_videos: int, n_users: int, seed: int = 0) -> dict:
    """Synthetic user and video tables of the default schema's columns."""
    rng = np.random.default_rng(seed)
    tags = np.array([",".join(map(str, rng.choice(60, k, replace=False))) for k in
                     rng.integers(1, 4, 5000)], dtype=object)  # fmt: skip
    items = {
        "video_id": np.arange(n_videos, dtype=np.int64) * 7 + 11,
        "author_id": rng.integers(0, 200_000, n_videos),
        "video_type": np.where(rng.random(n_videos) < 0.05, "AD", "NORMAL").astype(object),
        "music_id": rng.integers(0, 50_000, n_videos),
        "tag": tags[rng.integers(0, len(tags), n_videos)],
        "duration_s": rng.uniform(3, 300, n_videos).astype(np.float32),
        "upload_age_days": rng.integers(0, 400, n_videos).astype(np.float32),
    }
    users = {
        "user_id": np.arange(n_users, dtype=np.int64),
        "user_active_degree": rng.choice(["high_active", "UNKNOWN"], n_users).astype(object),
        "is_video_author": rng.integers(0, 2, n_users),
        "follow_user_num": rng.integers(0, 500, n_users).astype(np.float32),
        "fans_user_num": rng.integers(0, 500, n_users).astype(np.float32),
        "register_days": rng.integers(1, 900, n_users).astype(np.float32),
    }
    return build_tables({"user": users, "item": items})


def _memory(server: Server) -> list[dict[str, int]]:
    out = []
    for pid in server.worker_pids():
        m = psutil.Process(pid).memory_full_info()
        out.append({"rss": int(m.rss), "uss": int(m.uss), "pss": int(m.pss)})
    return out


def _random_ids_bodies(path: Path, n: int, count: int, n_videos: int) -> Path:
    rng = np.random.default_rng(1)
    lines = []
    for i in range(count):
        vids = (rng.choice(n_videos, n, replace=False) * 7 + 11).tolist()
        body = {"user": {"user_id": int(i)}, "candidates": {"video_id": vids}}
        lines.append(orjson.dumps(body))
    return write_bodies(path, lines)


def run_million(s: Any, source_registry: Path, version: str, wrk: str | None) -> dict[str, Any]:
    """Publish, start-to-ready and memory with a snapshot of ``s.store_videos`` videos."""
    n_videos = s.store_videos
    home = s.work_dir / "million"
    shutil.rmtree(home, ignore_errors=True)
    registry = Registry(home / "registry")
    registry.publish(Registry(source_registry).version_dir(version), version)
    registry.activate(version)
    start = time.perf_counter()
    tables = million_tables(n_videos, min(100_000, n_videos))
    store = SnapshotStore(registry.root)
    store.publish(tables, "m1", {"synthetic": True})
    store.activate("m1")
    out: dict[str, Any] = {"videos": n_videos, "publish_s": round(time.perf_counter() - start, 2)}
    out["snapshot_bytes"] = sum(p.stat().st_size for p in store.path("m1").iterdir())
    bodies = _random_ids_bodies(home / "ids.jsonl", min(500, n_videos), 64, n_videos)
    for label, env in (("cold", {}), ("warm", {}), ("off", {"VIDRANK_FEATURE_STORE": "off"})):
        server = _serve(registry.root, home / f"start-{label}.log", 1, env)
        out[f"start_to_ready_{label}_s"] = round(server.start_to_ready_s or 0.0, 2)
        server.stop()
    out["cache_bytes"] = sum(p.stat().st_size for p in store.encoded_root.rglob("*.npy"))
    for label, env in (("store", {}), ("off", {"VIDRANK_FEATURE_STORE": "off"})):
        for workers in (1, 2):
            server = _serve(registry.root, home / f"mem-{label}-{workers}.log", workers, env)
            try:
                run_load(server.url, bodies, 2, max(3.0, s.warmup_s * 2), wrk)
                out[f"memory_{label}_w{workers}"] = _memory(server)
            finally:
                server.stop()
    pss = {k: sum(w["pss"] for w in v) for k, v in out.items() if k.startswith("memory_")}
    out["extra_pss_per_worker_bytes"] = (pss["memory_store_w2"] - pss["memory_store_w1"]) - (
        pss["memory_off_w2"] - pss["memory_off_w1"]
    )
    out["store_pss_one_worker_bytes"] = pss["memory_store_w1"] - pss["memory_off_w1"]
    return out


ROWS = (
    ("request", "features in the request"),
    ("embedded", "ids + embedded store"),
    ("redis", "ids + Redis"),
)


def markdown(rows: dict[str, Any], million: dict[str, Any]) -> list[str]:
    """The section of latest.md (the floor: measured in turns with the rows)."""
    floor_p50 = rows.get("floor_p50_ms")
    lines = [
        f"## Feature store, {rows['n']} candidates, {rows['workers']} workers",
        "",
        "| request | body bytes | c=1 p50 ms | p99 ms | × floor | req/s c=8 | CPU ms/req (c=8) "
        "| errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, label in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        ratio = f"{r['p50_ms'] / floor_p50:.2f}" if floor_p50 else "?"
        lines.append(
            f"| {label} | {r['body_bytes']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ratio} | "
            f"{r['rps_c8']:.0f} | {r.get('cpu_ms_per_request', 0):.2f} | "
            f"{sum(r['errors'].values())} |"
        )
    if floor_p50:
        cpu = rows.get("floor_cpu_ms") or 0.0
        lines.append(
            f"| onnxruntime floor (1 thread, in turns) | | {floor_p50:.2f} | | 1.00 | | "
            f"{cpu:.2f} | |"
        )
    if rows.get("stages"):
        lines += ["", *stages_lines(rows["stages"], rows["n"])]
    if million:
        lines += ["", million_text(million)]
    return lines


def stages_lines(stages: dict[str, dict[str, float]], n: int) -> list[str]:
    """The ids paths' in-process stages (µs, medians), as a table under the rows."""
    head = ["ids path", *STAGES, "total"]
    lines = [
        f"Where an ids-only /rank goes at {n} candidates (µs per stage, in-process, medians; fetch"
        " = Redis's round trip; benchmarks/stages.py):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    labels = {"embedded": "embedded store", "redis": "Redis"}
    for name, by_stage in stages.items():
        values = [f"{by_stage.get(k, 0):.0f}" for k in (*STAGES, "total")]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(values) + " |")
    return lines


def million_text(m: dict[str, Any]) -> str:
    mb = 1 << 20
    per_worker = "; ".join(
        f"{k[7:]}: " + ", ".join(f"{w['rss'] / mb:.0f}/{w['uss'] / mb:.0f}/{w['pss'] / mb:.0f}"
                                 for w in v)
        for k, v in m.items()
        if k.startswith("memory_")
    )  # fmt: skip
    return (
        f"A snapshot of {m['videos']:,} videos, embedded: publish {m['publish_s']} s "
        f"({m['snapshot_bytes'] / mb:.0f} MB), encoded cache {m['cache_bytes'] / mb:.0f} MB; "
        f"start to ready {m['start_to_ready_cold_s']} s with a cold cache, "
        f"{m['start_to_ready_warm_s']} s warm, {m['start_to_ready_off_s']} s without a store; "
        f"the snapshot's PSS with one worker {m['store_pss_one_worker_bytes'] / mb:.1f} MB, "
        f"extra PSS per additional worker {m['extra_pss_per_worker_bytes'] / mb:.1f} MB; "
        f"per-worker RSS/USS/PSS in MB after ids traffic: {per_worker}."
    )


def floor_sampler(
    model: Path, encoded: list[dict[str, np.ndarray]]
) -> Callable[[float], tuple[float, float]]:
    """A function timing ``session.run`` (1 thread, the service's options) for some seconds:
    (median wall ms, median thread-CPU ms) - the floor, sampled in turns with the HTTP rows."""
    from benchmarks.floor import sample_session, session

    sess = session(model, 1)

    def sample(seconds: float) -> tuple[float, float]:
        wall, cpu = sample_session(sess, encoded, seconds)
        return float(np.median(wall) * 1e3), float(np.median(cpu) * 1e3)

    return sample
