"""``python -m benchmarks.run`` (``make bench``): floor, vidrank, textbook and model graphs.

One run on one machine, in this order (nothing else of the harness runs while a server is
measured):

1. train (or reload) the default-config MMoE on simulated impressions and publish it, fp32
   and int8 (``--quantize``), to a registry of its own;
2. build realistic requests from the held-out impressions for each candidate count N;
3. floor: ``session.run`` on pre-encoded inputs in-process, 1 and 2 intra-op threads (and the
   int8 graph with 1); the encoder alone; one /rank stage by stage (parse, fetch, encode, run,
   fuse, serialise: benchmarks/stages.py);
4. model graphs: fused (published) vs trained-layout vs naive export of the same weights, fp32
   and int8: latency, parity, op census before/after onnxruntime's optimiser, held-out AUC;
5. vidrank: a real ``vidrank serve`` process, POST /rank over loopback, p50/p99 at c=1 (rows
   and columnar bodies) and throughput at c=8 with one worker per core; the int8 bundle the
   same way; then the textbook app (benchmarks/textbook_app.py) under plain uvicorn;
6. shadow: p50 at c=1 and req/s at c=8 at the reference N with no shadow and with a 100 %
   shadow, in turns on one server (benchmarks/shadow.py);
7. features: at 500 candidates, features in the request vs ids + embedded store vs ids + Redis
   (benchmarks/features.py), and a snapshot of a million videos: load time and memory per worker;
8. lifecycle: start-to-ready, RSS of one worker, RSS through model swaps;
9. overload: 500 candidates, 2 workers, c=8, c=64 then c=512 (15 s each) with
   benchmarks/overload.py, answered and shed latencies apart, client timeouts at 2 s, the wait to
   connect; the same loads with wrk (benchmarks/rank_status.lua: responses counted by status,
   ``--timeout 2s``); then c=512 again with shedding off (the behaviour before issue 10).

Load comes from wrk and rank.lua (one client thread, pre-built bodies); without wrk a Python
keep-alive client is used and the results say so. No assertion here is timed: targets are
reported as met or missed, with the figures.

Writes ``<out>/<machine>-<date>.json``, ``<out>/latest.md`` and ``<out>/latency.png``.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import graphs, report, shadow
from benchmarks.encode import measure_encode
from benchmarks.floor import measure_floor
from benchmarks.harness import (
    ADMIN_TOKEN,
    Server,
    busy_cpu_seconds,
    child_env,
    cpu_seconds,
    free_port,
    python_cmd,
    rss_bytes,
    start_vidrank,
)
from benchmarks.loadgen import (
    WRK_INSTALL_HINT,
    LoadResult,
    find_wrk,
    run_load,
    run_wrk,
    write_bodies,
)
from benchmarks.machine import machine_info, machine_slug, usable_cores
from benchmarks.memory import model_footprint, publish_copy, swap_rss
from benchmarks.model_setup import SWAP_VERSION, BenchModel, prepare_model
from benchmarks.overload import run_overload
from benchmarks.stages import measure_stages
from benchmarks.workload import Workload, build_workload
from model.core.registry import Registry
from model.simulator.world import SimConfig, simulate, write_simulation
from service.http.accept import PRESSURE_S

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("floor", "graphs", "vidrank", "textbook", "shadow", "features", "lifecycle", "overload")
# What shedding off means for the comparison row: a queue nothing fills, no deadline.
NO_SHEDDING = {"VIDRANK_MAX_QUEUE": "100000", "VIDRANK_REQUEST_TIMEOUT_MS": "0"}


@dataclass
class BenchSettings:
    """How much to measure; ``full`` and ``quick`` are the two presets."""

    ns: list[int] = field(default_factory=lambda: [100, 500, 1000])
    per_n: int = 64  # distinct requests per N, cycled by the load generator
    floor_s: float = 3.0  # seconds of session.run per (threads, N)
    graph_s: float = 2.0  # seconds per (graph, N)
    http_s: float = 10.0  # seconds per HTTP load run
    warmup_s: float = 2.0  # seconds of traffic before each server's measured runs
    impressions: int = 200_000
    epochs: int = 3
    small: bool = False
    workers: int = 0  # 0 = one per core
    connections: int = 8
    starts: int = 3  # vidrank starts timed for start-to-ready (the median is reported)
    overload_s: float = 15.0  # seconds per overload run
    overload_connections: int = 512
    overload_workers: int = 2
    store_videos: int = 1_000_000  # videos in the large embedded snapshot (features part)
    client: str = "auto"  # auto | wrk | python
    skip: list[str] = field(default_factory=list)
    out_dir: Path = ROOT / "benchmarks" / "results"
    # trained model, exported graphs, request files, server logs: kept between runs, not in git
    work_dir: Path = Path(tempfile.gettempdir()) / "vidrank-bench"
    notes: list[str] = field(default_factory=list)


QUICK: dict[str, Any] = {
    "ns": [100, 500],
    "per_n": 16,
    "floor_s": 1.0,
    "graph_s": 0.5,
    "http_s": 3.0,
    "warmup_s": 1.0,
    "impressions": 50_000,
    "epochs": 1,
    "overload_s": 5.0,
    "store_videos": 200_000,
}


def parse_args(argv: list[str] | None) -> BenchSettings:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a fast, small run (N=100,500, 3 s runs)")
    p.add_argument("--ns", help="candidate counts, e.g. 100,500,1000")
    p.add_argument("--per-n", type=int, help="distinct requests per N")
    p.add_argument("--http-seconds", type=float, help="seconds per HTTP load run")
    p.add_argument("--floor-seconds", type=float, help="seconds per in-process timing")
    p.add_argument("--impressions", type=int, help="simulated impressions to train on")
    p.add_argument("--epochs", type=int, help="maximum training epochs")
    p.add_argument("--small", action="store_true", help="tiny model config (smoke tests)")
    p.add_argument("--workers", type=int, help="server workers (default: one per core)")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--starts", type=int, help="server starts timed for start-to-ready")
    p.add_argument("--overload-seconds", type=float, help="seconds per overload run (15)")
    p.add_argument("--overload-connections", type=int, help="connections of the overload (512)")
    p.add_argument("--store-videos", type=int, help="videos in the large feature snapshot")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    p.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    p.add_argument("--work-dir", type=Path, help="cache for the model, graphs, requests, logs")
    a = p.parse_args(argv)
    s = BenchSettings(**QUICK) if a.quick else BenchSettings()
    updates: dict[str, Any] = {
        "ns": [int(x) for x in a.ns.split(",")] if a.ns else None,
        "per_n": a.per_n,
        "http_s": a.http_seconds,
        "floor_s": a.floor_seconds,
        "graph_s": a.floor_seconds,
        "impressions": a.impressions,
        "epochs": a.epochs,
        "workers": a.workers,
        "starts": a.starts,
        "overload_s": a.overload_seconds,
        "overload_connections": a.overload_connections,
        "store_videos": a.store_videos,
        "out_dir": a.out,
        "work_dir": a.work_dir,
    }
    s = replace(s, **{k: v for k, v in updates.items() if v is not None})
    s.warmup_s = min(s.warmup_s, s.http_s)
    s.starts = max(1, s.starts)
    s.small, s.client = a.small, a.client
    s.skip = [x for x in a.skip.split(",") if x]
    if unknown := set(s.skip) - set(PARTS):
        p.error(f"unknown parts to skip: {sorted(unknown)}")
    return s


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- in-process parts ---------------------------------------------------------------------------


def run_floor(s: BenchSettings, bm: BenchModel, wl: Workload) -> dict[str, Any]:
    log("floor: session.run on pre-encoded inputs (1 and 2 threads; int8 with 1)")
    encoded = {n: wl.encoded(n) for n in s.ns}
    graphs_by_name = {f"threads{t}": (bm.bundle_dir / "model.onnx", t) for t in (1, 2)}
    if bm.int8_version is not None:
        graphs_by_name["int8_threads1"] = (bm.bundle_of(bm.int8_version) / "model.onnx", 1)
    return measure_floor(graphs_by_name, encoded, s.floor_s)


def run_graphs(s: BenchSettings, bm: BenchModel, wl: Workload) -> dict[str, Any]:
    log("model graphs: fused vs naive, fp32 vs int8")
    paths = graphs.export_graphs(bm.model, bm.schema, s.work_dir / "graphs")
    encoded = {n: wl.encoded(n) for n in s.ns}
    some = [e for n in s.ns for e in encoded[n][:4]]
    return {
        "latency": graphs.time_graphs(paths, encoded, s.graph_s),
        "parity": graphs.parity(paths, some),
        "census": {name: graphs.op_census(path) for name, path in paths.items()},
        "optimised_ops": {name: graphs.optimised_census(path) for name, path in paths.items()},
        "heldout": graphs.heldout_auc(paths, bm.test, bm.schema),
    }


# -- HTTP parts ---------------------------------------------------------------------------------


def start_vidrank_on(
    s: BenchSettings,
    bm: BenchModel,
    workers: int,
    tag: str = "",
    version: str | None = None,
    poll_interval_s: float = 3600,
    env_extra: dict[str, str] | None = None,
) -> Server:
    """``vidrank serve`` on the benchmark registry, serving ``version`` (default: fp32)."""
    Registry(bm.registry).activate(version or bm.version)
    env = child_env(
        {
            "VIDRANK_LOG_LEVEL": "warning",
            "VIDRANK_ADMIN_TOKEN": ADMIN_TOKEN,
            "VIDRANK_POLL_INTERVAL_S": str(poll_interval_s),
            "MALLOC_ARENA_MAX": "2",  # as the serving image sets it (Dockerfile)
            **(env_extra or {}),
        }
    )
    name = f"vidrank{tag}-w{workers}"
    log = s.work_dir / f"{name}.log"
    return start_vidrank(bm.registry, log, workers=workers, env=env, cwd=ROOT, name=name)


def start_textbook(s: BenchSettings, bm: BenchModel, workers: int) -> Server:
    port = free_port()
    cmd = python_cmd(
        "-m", "uvicorn", "benchmarks.textbook_app:create_app_from_env", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        "--log-level", "warning",
    )  # fmt: skip
    env = child_env({"VIDRANK_BENCH_BUNDLE": str(bm.bundle_dir)})
    name = f"textbook-w{workers}"
    return Server(name, cmd, port, s.work_dir / f"{name}.log", env, cwd=ROOT)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def load_run(
    server: Server, bodies: Path, connections: int, seconds: float, wrk: str | None
) -> dict[str, Any]:
    """One load run, with the CPU time each server process and the client used."""
    pids = server.worker_pids()
    cpu0 = {pid: cpu_seconds(pid) or 0.0 for pid in pids}
    client0 = _children_cpu() + time.process_time()
    busy0 = busy_cpu_seconds()
    result = run_load(server.url, bodies, connections, seconds, wrk).to_dict()
    busy = busy_cpu_seconds() - busy0
    client = _children_cpu() + time.process_time() - client0
    used = {pid: (cpu_seconds(pid) or 0.0) - cpu0[pid] for pid in pids}
    total = sum(used.values()) or 1.0
    result["server_cpu_s"] = {str(pid): round(v, 3) for pid, v in used.items()}
    result["worker_cpu_share"] = [round(v / total, 3) for v in used.values()]
    result["client_cpu_s"] = round(client, 3)
    # CPU that neither the server nor the client used: other processes on the machine (noise).
    other = max(0.0, busy - sum(used.values()) - client)
    result["background_cores"] = round(other / max(result["duration_s"], 1e-9), 3)
    return result


def run_http(
    name: str, server: Server, s: BenchSettings, wl: Workload, wrk: str | None
) -> dict[str, Any]:
    """c=1 latency and c=8 throughput for each N against a running server."""
    out: dict[str, Any] = {
        "workers": len(server.worker_pids()),
        "start_to_ready_s": server.start_to_ready_s,
        "latency_c1": {},
        "throughput_c8": {},
    }
    if name == "vidrank":  # the columnar candidate format, same requests
        out["latency_c1_columnar"] = {}
    for n in s.ns:
        bodies = write_bodies(s.work_dir / f"bodies-{n}.jsonl", wl.json_lines(n))
        log(f"{name}: N={n} warm-up, c=1, c={s.connections}")
        load_run(server, bodies, 1, s.warmup_s, wrk)
        out["latency_c1"][str(n)] = load_run(server, bodies, 1, s.http_s, wrk)
        out["throughput_c8"][str(n)] = load_run(server, bodies, s.connections, s.http_s, wrk)
        if "latency_c1_columnar" in out:
            lines = wl.json_lines(n, columnar=True)
            columnar = write_bodies(s.work_dir / f"bodies-{n}-columnar.jsonl", lines)
            out["latency_c1_columnar"][str(n)] = load_run(server, columnar, 1, s.http_s, wrk)
        for key in ("latency_c1", "throughput_c8", "latency_c1_columnar"):
            errors = out.get(key, {}).get(str(n), {}).get("errors", {})
            if sum(errors.values()):
                s.notes.append(f"{name} N={n} {key}: errors {errors}")
    out["rss"] = server.rss()
    return out


def measure_server(
    name: str, s: BenchSettings, bm: BenchModel, wl: Workload, wrk: str | None, workers: int
) -> dict[str, Any]:
    log(f"{name}: starting with {workers} workers")
    if name == "textbook":
        server = start_textbook(s, bm, workers)
    else:
        version = bm.int8_version if name == "vidrank_int8" else bm.version
        server = start_vidrank_on(s, bm, workers, version=version)
    try:
        return run_http(name, server, s, wl, wrk)
    finally:
        server.stop()


def run_shadow(
    s: BenchSettings, bm: BenchModel, wl: Workload, wrk: str | None, workers: int
) -> dict[str, Any]:
    """No shadow vs a 100 % shadow (a copy of the model) on one server, at the reference N."""
    n = report.ref_n({"settings": {"ns": s.ns}})
    log(f"shadow: N={n}, none vs 100 % shadow, {shadow.ROUNDS} rounds, {workers} workers")
    copy = publish_copy(bm.registry, bm.version, SWAP_VERSION)
    Registry(bm.registry).clear_shadow()  # a run that was interrupted may have left one
    # An admin call reaches one worker; the others follow the registry within a poll interval.
    poll_s = shadow.POLL_INTERVAL_S
    server = start_vidrank_on(s, bm, workers, tag="-shadow", poll_interval_s=poll_s)
    try:
        bodies = write_bodies(s.work_dir / f"bodies-{n}.jsonl", wl.json_lines(n))
        load_run(server, bodies, 1, s.warmup_s, wrk)

        def one_run(connections: int) -> dict[str, Any]:
            return load_run(server, bodies, connections, s.http_s, wrk)

        runs = shadow.measure(server, copy, one_run, s.connections)
    finally:
        server.stop()
    return {"n": n, "runs": runs, "summary": shadow.summarise(runs, usable_cores())}


def run_lifecycle(
    s: BenchSettings, bm: BenchModel, wl: Workload, wrk: str | None
) -> dict[str, Any]:
    """Start-to-ready (median of ``starts``), one worker's RSS under traffic, RSS through swaps."""
    log("lifecycle: start-to-ready, RSS, swaps (1 worker)")
    starts: list[float] = []
    for i in range(s.starts):
        server = start_vidrank_on(s, bm, 1, tag=f"-start{i}")
        assert server.start_to_ready_s is not None  # start_vidrank waits until it is ready
        starts.append(server.start_to_ready_s)
        if i < s.starts - 1:
            server.stop()
    try:
        n = report.ref_n({"settings": {"ns": s.ns}})
        bodies = write_bodies(s.work_dir / f"bodies-{n}.jsonl", wl.json_lines(n))
        run_load(server.url, bodies, 1, max(1.0, s.warmup_s), wrk)
        rss = rss_bytes(server.worker_pids()[0])
        other = publish_copy(bm.registry, bm.version, SWAP_VERSION)
        swap = swap_rss(server, [other, bm.version, other, bm.version], ADMIN_TOKEN)
    finally:
        server.stop()
    return {
        "start_to_ready_runs_s": starts,
        "start_to_ready_s": sorted(starts)[len(starts) // 2],
        "rss_one_worker_bytes": rss,
        "model_footprint": model_footprint(bm.bundle_dir),
        "swap": swap,
    }


def run_overload_part(
    s: BenchSettings, bm: BenchModel, wl: Workload, wrk: str | None
) -> dict[str, Any]:
    """c=8, c=64 and c=``overload_connections`` (the Python client, answers and sheds timed
    apart; then wrk at the same loads, responses counted by status); then the overload with
    shedding off."""
    n = report.ref_n({"settings": {"ns": s.ns}})
    bodies = wl.json_lines(n)
    w, c, secs = s.overload_workers, s.overload_connections, s.overload_s
    out: dict[str, Any] = {"n": n, "workers": w, "connections": c, "seconds": secs}
    steps = (("c8", 8), ("c64", 64), ("overload", c)) if c > 64 else (("c8", 8), ("overload", c))
    for key, env, loads in (("shedding", None, steps), ("no_shedding", NO_SHEDDING, steps[-1:])):
        log(f"overload ({key}): N={n}, {w} workers, c={[x for _, x in loads]}, {secs:.0f} s each")
        server = start_vidrank_on(s, bm, w, tag=f"-{key}", env_extra=env)
        try:
            run_overload(server.port, bodies, 8, s.warmup_s)
            out[key] = {
                name: run_overload(server.port, bodies, conns, secs).to_dict()
                for name, conns in loads
            }
            if wrk is not None and key == "shedding":
                log(f"overload (wrk): c={[x for _, x in loads]}, {secs:.0f} s each")
                path = write_bodies(s.work_dir / f"overload-bodies-{n}.jsonl", bodies)
                out["wrk"] = {
                    name: wrk_overload_row(wrk_from_calm(wrk, server.url, path, conns, secs))
                    for name, conns in loads
                }
            out[key]["loadavg_after"] = os.getloadavg()[0]
        finally:
            server.stop()
    return out


def wrk_from_calm(wrk: str, url: str, bodies: Path, connections: int, secs: float) -> LoadResult:
    """wrk's overload run on workers calm again (no place missing for longer than PRESSURE_S):
    its clients arrive as one burst of new connections, as on a server that was idle."""
    time.sleep(PRESSURE_S + 0.5)
    return run_wrk(wrk, url, bodies, connections, secs, threads=2, timeout_s=2.0, statuses=True)


def wrk_overload_row(r: LoadResult) -> dict[str, Any]:
    """A wrk overload run: answers (200) and sheds (503) counted apart; wrk's latencies are of
    all responses together, and a timeout is a request unanswered after 2 s."""
    answered = r.statuses.get("200", 0)
    return {
        "connections": r.connections,
        "duration_s": round(r.duration_s, 2),
        "answered": answered,
        "shed": r.statuses.get("503", 0),
        "other": r.statuses.get("other", 0),
        "answered_rps": round(answered / r.duration_s, 1) if r.duration_s else 0.0,
        "all_ms": r.latency_ms,
        "timeouts": r.errors.get("timeout", 0),
        "socket_errors": sum(r.errors.get(k, 0) for k in ("connect", "read", "write")),
    }


def run_features(
    s: BenchSettings, bm: BenchModel, wl: Workload, wrk: str | None, workers: int
) -> dict[str, Any]:
    from benchmarks import features

    n = report.ref_n({"settings": {"ns": s.ns}})
    sim_dir = s.work_dir / "sim-world-0"  # the bench model's world (it depends on the seed only)
    if not (sim_dir / "video_features_basic_sim.parquet").exists():
        write_simulation(simulate(SimConfig(n_impressions=2000, seed=0)), sim_dir)
    log(f"features: N={n}, features in the request vs ids + embedded vs ids + Redis")
    floor = features.floor_sampler(bm.bundle_dir / "model.onnx", wl.encoded(n))
    rows = features.run_feature_rows(
        s, bm.registry, sim_dir, wl.json_lines(n), floor, wrk, workers, n, bm.bundle_dir
    )
    Registry(bm.registry).activate(bm.version)
    log(f"features: a snapshot of {s.store_videos:,} videos (publish, start, memory per worker)")
    million = features.run_million(s, bm.registry, bm.version, wrk)
    return {"rows": rows, "million": million}


# -- main ---------------------------------------------------------------------------------------


def pick_client(s: BenchSettings) -> str | None:
    """The wrk binary to use, or None for the Python client (with a hint when wrk is missing)."""
    if s.client == "python":
        s.notes.append("load generator: Python keep-alive client (--client python)")
        return None
    wrk = find_wrk()
    if wrk is None:
        if s.client == "wrk":
            raise SystemExit(WRK_INSTALL_HINT)
        print(WRK_INSTALL_HINT, file=sys.stderr)
        s.notes.append(
            "wrk was not installed: the Python keep-alive fallback client was used; it shares "
            "the CPU with the server, so latency is overstated and throughput understated"
        )
    return wrk


def model_description(bm: BenchModel) -> str:
    c = bm.config
    return (
        f"MMoE {c.n_experts} experts of {list(c.expert_hidden)}, towers {list(c.tower_hidden)}, "
        f"{c.embedding_dim}-dim embeddings; test click AUC {bm.metrics.get('click_auc', 0):.4f}, "
        f"like AUC {bm.metrics.get('like_auc', 0):.4f}"
    )


def run(s: BenchSettings) -> dict[str, Any]:
    s.work_dir.mkdir(parents=True, exist_ok=True)
    wrk = pick_client(s)
    workers = s.workers or usable_cores()
    started = datetime.now(UTC)
    log(f"training/loading the model ({s.impressions} impressions, {s.epochs} epochs)")
    bm = prepare_model(s.work_dir, s.impressions, s.epochs, s.small)
    wl = build_workload(bm.test, bm.schema, s.ns, s.per_n)
    results: dict[str, Any] = {
        "schema_version": 1,
        "created_at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(wrk),
        "model": {
            "description": model_description(bm),
            "mmoe_config": bm.config.to_dict(),
            "onnx_bytes": (bm.bundle_dir / "model.onnx").stat().st_size,
            "metrics": {k: bm.metrics.get(k) for k in ("click_auc", "like_auc", "watch_rmse")},
        },
    }
    if "floor" not in s.skip:
        results["floor"] = run_floor(s, bm, wl)
        log("encode: FeatureSchema.encode per request, in-process (warm key caches)")
        results["encode"] = measure_encode(wl.schema, wl.bodies)
        log("stages: one /rank in-process, parse / fetch / encode / run / fuse / serialise")
        results["stages"] = measure_stages(bm.bundle_dir, {n: wl.json_lines(n) for n in s.ns})
    if "graphs" not in s.skip:
        results["graphs"] = run_graphs(s, bm, wl)
    for name in ("vidrank", "vidrank_int8", "textbook"):
        if name == "vidrank_int8" and bm.int8_version is None:
            s.notes.append(f"int8 not measured: {bm.int8_note}")
            continue
        if name.split("_")[0] not in s.skip:
            results[name] = measure_server(name, s, bm, wl, wrk, workers)
    if "shadow" not in s.skip:
        results["shadow"] = run_shadow(s, bm, wl, wrk, workers)
    if "features" not in s.skip:
        results["features"] = run_features(s, bm, wl, wrk, workers)
    if "lifecycle" not in s.skip:
        results["lifecycle"] = run_lifecycle(s, bm, wl, wrk)
    if "overload" not in s.skip:
        results["overload"] = run_overload_part(s, bm, wl, wrk)
    results["settings"] = {
        **{k: v for k, v in asdict(s).items() if k not in ("out_dir", "work_dir")},
        "workers": workers,
        "http_seconds": s.http_s,
        "load_generator": "wrk" if wrk else "python-fallback",
        "duration_s": round((datetime.now(UTC) - started).total_seconds(), 1),
    }
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["targets"] = report.targets(results)
    return results


def write_outputs(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    json_path = out_dir / f"{machine_slug(results['machine'])}-{date}.json"
    return {
        "json": report.write_json(results, json_path),
        "markdown": _write_text(out_dir / "latest.md", report.markdown(results)),
        "plot": report.plot(results, out_dir / "latency.png"),
    }


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    results = run(s)
    paths = write_outputs(results, s.out_dir)
    print(report.markdown(results))
    for kind, path in paths.items():
        log(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
