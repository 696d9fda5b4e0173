"""Results: targets checked against the measurements; the JSON, the markdown table, the plot."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks.stats import ratio

MB = 1024 * 1024


@dataclass
class Target:
    """One target from issue 4 with the figure measured for it."""

    id: str
    description: str
    target: str
    measured: float | None
    unit: str
    met: bool | None
    note: str = ""


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _check(value: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if value is None else bool(ok(value))


def ref_n(results: dict[str, Any]) -> int:
    """The candidate count the targets are stated at: 500, or the middle one measured."""
    ns: list[int] = results["settings"]["ns"]
    return 500 if 500 in ns else ns[len(ns) // 2]


def latency_targets(r: dict[str, Any], n: str) -> list[Target]:
    floor = _get(r, "floor", "threads1", n, "p50")
    p50 = _get(r, "vidrank", "latency_c1", n, "latency_ms", "p50")
    p99 = _get(r, "vidrank", "latency_c1", n, "latency_ms", "p99")
    vs_floor, tail = ratio(p50, floor), ratio(p99, p50)
    return [
        Target(
            "p50_vs_floor", f"vidrank p50 at {n} candidates / floor (1 thread)", "<= 1.15",
            vs_floor, "x", _check(vs_floor, lambda x: x <= 1.15),
            f"p50 {p50:.2f} ms vs floor {floor:.2f} ms" if p50 and floor else "",
        ),
        Target(
            "p99_vs_p50", f"vidrank p99 / p50 at {n} candidates", "<= 1.5", tail, "x",
            _check(tail, lambda x: x <= 1.5),
        ),
    ]  # fmt: skip


def throughput_targets(r: dict[str, Any], n: str) -> list[Target]:
    floor = _get(r, "floor", "threads1", n, "p50")
    cores = r["machine"]["cores"]
    limit = cores / (floor / 1000.0) if floor else None
    rps = _get(r, "vidrank", "throughput_c8", n, "rps")
    textbook = _get(r, "textbook", "throughput_c8", n, "rps")
    of_limit, vs_textbook = ratio(rps, limit), ratio(rps, textbook)
    return [
        Target(
            "throughput_vs_limit", f"vidrank req/s at {n} candidates, c=8 / (cores / floor)",
            ">= 0.8", of_limit, "x", _check(of_limit, lambda x: x >= 0.8),
            f"{rps:.0f} req/s vs limit {limit:.0f} req/s" if rps and limit else "",
        ),
        Target(
            "throughput_vs_textbook", f"vidrank req/s / textbook req/s at {n} candidates",
            ">= 3", vs_textbook, "x", _check(vs_textbook, lambda x: x >= 3.0),
        ),
    ]  # fmt: skip


def graph_targets(r: dict[str, Any], n: str) -> list[Target]:
    lat = _get(r, "graphs", "latency") or {}
    naive = _get(lat, "naive_fp32", n, "p50")
    fp32 = ratio(naive, _get(lat, "fused_fp32", n, "p50"))
    int8 = ratio(naive, _get(lat, "fused_int8", n, "p50"))
    naive_cpu = _get(lat, "naive_fp32", n, "cpu_p50")
    fp32_cpu = ratio(naive_cpu, _get(lat, "fused_fp32", n, "cpu_p50"))
    int8_cpu = ratio(naive_cpu, _get(lat, "fused_int8", n, "cpu_p50"))
    diff = _get(r, "graphs", "parity", "naive_fp32")
    max_diff = max(diff.values()) if diff else None
    deltas = _get(r, "graphs", "heldout", "delta", "fused_int8") or {}
    drop = max((-d for d in deltas.values()), default=None)
    return [
        Target(
            "fused_vs_naive_fp32", f"naive fp32 / fused fp32 at {n} (CPU time)", ">= 1.5",
            fp32_cpu, "x", _check(fp32_cpu, lambda x: x >= 1.5), f"wall-clock ratio {_fmt(fp32)}",
        ),
        Target(
            "fused_naive_parity", "max |fused - naive| over outputs (fp32)", "<= 1e-5",
            max_diff, "", _check(max_diff, lambda x: x <= 1e-5),
        ),
        Target(
            "fused_int8_vs_naive", f"naive fp32 / fused int8 at {n} (CPU time)", ">= 2", int8_cpu,
            "x", _check(int8_cpu, lambda x: x >= 2.0), f"wall-clock ratio {_fmt(int8)}",
        ),
        Target(
            "int8_auc_drop", "held-out AUC drop (fp32 - int8), worst of click/like", "<= 0.002",
            drop, "", _check(drop, lambda x: x <= 0.002),
            ", ".join(f"{t} {d:+.4f}" for t, d in deltas.items()),
        ),
    ]  # fmt: skip


def lifecycle_targets(r: dict[str, Any]) -> list[Target]:
    rss = _get(r, "lifecycle", "rss_one_worker_bytes")
    start = _get(r, "lifecycle", "start_to_ready_s")
    extra = _get(r, "lifecycle", "swap", "peak_extra_bytes")
    model = _get(r, "lifecycle", "model_footprint", "footprint_bytes")
    # One extra model is the floor (the old session serves until the new one is warm); the rest
    # is what loading costs on top (issue 18's goal: <= 1.2).
    swap = ratio(extra, model)
    return [
        Target(
            "rss_one_worker", "RSS of one worker with the default model", "<= 250 MB",
            rss / MB if rss else None, "MB", _check(rss, lambda x: x <= 250 * MB),
        ),
        Target(
            "start_to_ready", "process start to /readyz 200 (1 worker)", "<= 3 s", start, "s",
            _check(start, lambda x: x <= 3.0),
        ),
        Target(
            "swap_extra", "peak extra RSS during a swap / one model's footprint", "<= 1.2",
            swap, "x", _check(swap, lambda x: x <= 1.2),
            f"peak +{extra / MB:.1f} MB, one model {model / MB:.1f} MB" if extra and model else "",
        ),
    ]  # fmt: skip


def shadow_targets(r: dict[str, Any]) -> list[Target]:
    sm = _get(r, "shadow", "summary") or {}
    n = _get(r, "shadow", "n")
    p50, rps, bound = sm.get("p50_ratio"), sm.get("rps_ratio"), sm.get("rps_ratio_bound")
    none, shadow = sm.get("none") or {}, sm.get("shadow") or {}
    return [
        Target(
            "shadow_p50", f"p50 at {n} candidates, c=1: 100 % shadow / none", "<= 1.1 (noise)",
            p50, "x", _check(p50, lambda x: x <= 1.1),
            f"{_fmt(shadow.get('p50_ms_c1'))} vs {_fmt(none.get('p50_ms_c1'))} ms"
            if p50 else "",
        ),
        Target(
            "shadow_throughput", f"req/s at {n} candidates, c=8: 100 % shadow / none",
            f">= {_fmt(bound)} (the shadow's own work)", rps, "x",
            None if bound is None else _check(rps, lambda x: x >= bound - 0.03),
            f"{_fmt(shadow.get('rps_c8'), 0)} vs {_fmt(none.get('rps_c8'), 0)} req/s; "
            f"{_fmt(shadow.get('compared_share_c8'))} of requests compared at "
            f"{_fmt(shadow.get('shadow_ms_per_compared'))} CPU ms each" if rps else "",
        ),
    ]  # fmt: skip


def overload_targets(r: dict[str, Any]) -> list[Target]:
    """Issues 10 and 18: answered throughput kept under overload (Python client and wrk), at
    c=512 answered p99 <= 10x the c=8 p50, no timeouts, sheds fast; c=8 no shed."""
    c = _get(r, "overload", "connections") or 512
    c8 = _get(r, "overload", "shedding", "c8") or {}
    over = _get(r, "overload", "shedding", "overload") or {}
    base = _get(c8, "answered_ms", "p50")
    p99 = _get(over, "answered_ms", "p99")
    tail = ratio(p99, base)
    shed_p99 = _get(over, "shed_ms", "p99")
    timeouts, c8_shed = over.get("timeouts"), c8.get("shed")
    goodput: list[Target] = []
    for client, runs in (
        ("", _get(r, "overload", "shedding")),
        (" (wrk)", _get(r, "overload", "wrk")),
    ):
        runs = runs or {}
        low = _get(runs, "c8", "answered_rps")
        for name, conns in (("c64", 64), ("overload", c)):
            high = _get(runs, name, "answered_rps")
            kept = ratio(high, low)
            goodput.append(
                Target(
                    f"goodput_{name}{'_wrk' if client else ''}",
                    f"answered req/s at c={conns} / at c=8{client}",
                    ">= 0.9",
                    kept,
                    "x",
                    _check(kept, lambda x: x >= 0.9),
                    f"{high:.0f} vs {low:.0f} req/s" if high is not None and low else "",
                )
            )
    return [
        *goodput,
        Target(
            "overload_answered_p99", f"answered p99 at c={c} / answered p50 at c=8", "<= 10",
            tail, "x", _check(tail, lambda x: x <= 10),
            f"p99 {p99:.1f} ms vs p50 {base:.1f} ms" if p99 and base else "",
        ),
        Target(
            "overload_timeouts", f"client timeouts (2 s) at c={c}", "0", timeouts, "",
            _check(timeouts, lambda x: x == 0),
        ),
        Target(
            "overload_shed_p99", f"p99 of a shed (503) at c={c}", "<= 5 ms", shed_p99, "ms",
            _check(shed_p99, lambda x: x <= 5.0), f"{over.get('shed', 0)} sheds",
        ),
        Target(
            "overload_c8_no_shed", "sheds at c=8", "0", c8_shed, "",
            _check(c8_shed, lambda x: x == 0),
        ),
    ]  # fmt: skip


def feature_targets(r: dict[str, Any]) -> list[Target]:
    """Issue 11: ids + embedded store vs the floor, ids + Redis vs features in the request."""
    rows, million = _get(r, "features", "rows") or {}, _get(r, "features", "million") or {}
    n = str(rows.get("n", ""))
    floor = rows.get("floor_p50_ms")  # measured in turns with the rows
    p50 = {k: _get(rows, k, "p50_ms") for k in ("request", "embedded", "redis")}
    rps = {k: _get(rows, k, "rps_c8") for k in ("request", "redis")}
    emb = ratio(p50["embedded"], floor)
    above = p50["redis"] - p50["request"] if p50["redis"] and p50["request"] else None
    share = ratio(rps["redis"], rps["request"])
    load = million.get("start_to_ready_cold_s")
    extra = million.get("extra_pss_per_worker_bytes")
    return [
        Target("fs_embedded_vs_floor", f"ids + embedded p50 at {n} / floor", "<= 1.3", emb, "x",
               _check(emb, lambda x: x <= 1.3)),
        Target("fs_redis_p50", "ids + Redis p50 - features-in-request p50", "<= 1.0 ms", above,
               "ms", _check(above, lambda x: x <= 1.0)),
        Target("fs_redis_rps", "ids + Redis req/s (c=8) / features in the request", ">= 0.85",
               share, "x", _check(share, lambda x: x >= 0.85)),
        Target("fs_million_load", "1M-video snapshot: start to ready (cold cache)", "<= 5 s",
               load, "s", _check(load, lambda x: x <= 5.0)),
        Target("fs_million_rss", "1M-video snapshot: extra PSS per additional worker", "<= 20 MB",
               extra / MB if extra is not None else None, "MB",
               _check(extra, lambda x: x <= 20 * MB)),
    ]  # fmt: skip


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issues 4, 10 and 11, measured (None where the run did not measure it)."""
    n = str(ref_n(results))
    found = [
        *latency_targets(results, n),
        *throughput_targets(results, n),
        *graph_targets(results, n),
        *shadow_targets(results),
        *lifecycle_targets(results),
        *overload_targets(results),
        *feature_targets(results),
    ]
    return [asdict(t) for t in found]


# -- files ---------------------------------------------------------------------------------------


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opts = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    path.write_bytes(orjson.dumps(results, option=opts) + b"\n")
    return path


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def latency_table(r: dict[str, Any]) -> list[str]:
    header = [
        "N", "floor 1t p50", "floor 2t p50", "vidrank p50", "vidrank p99", "vidrank/floor",
        "vidrank columnar p50", "textbook p50", "textbook p99", "textbook/floor",
        "int8 floor p50", "vidrank int8 p50", "vidrank int8 p99", "encode µs",
    ]  # fmt: skip
    rows = []
    for n in map(str, r["settings"]["ns"]):
        f1 = _get(r, "floor", "threads1", n, "p50")
        v = _get(r, "vidrank", "latency_c1", n, "latency_ms") or {}
        col = _get(r, "vidrank", "latency_c1_columnar", n, "latency_ms", "p50")
        t = _get(r, "textbook", "latency_c1", n, "latency_ms") or {}
        q = _get(r, "vidrank_int8", "latency_c1", n, "latency_ms") or {}
        rows.append(
            [
                n, _fmt(f1), _fmt(_get(r, "floor", "threads2", n, "p50")),
                _fmt(v.get("p50")), _fmt(v.get("p99")), _fmt(ratio(v.get("p50"), f1)) + "×",
                _fmt(col), _fmt(t.get("p50")), _fmt(t.get("p99")),
                _fmt(ratio(t.get("p50"), f1)) + "×",
                _fmt(_get(r, "floor", "int8_threads1", n, "p50")), _fmt(q.get("p50")),
                _fmt(q.get("p99")), _fmt(_get(r, "encode", n, "median_us"), 0),
            ]
        )  # fmt: skip
    return _table(header, rows)


def stages_table(r: dict[str, Any]) -> list[str]:
    """Per-stage µs of one /rank in-process (benchmarks/stages.py), when measured."""
    if "stages" not in r:
        return []
    from benchmarks.stages import STAGES

    rows = [
        [n, *(_fmt(by_stage.get(stage), 0) for stage in (*STAGES, "total"))]
        for n, by_stage in r["stages"].items()
    ]
    return [
        "## Where a /rank goes (µs per stage, in-process, features in the request; medians)",
        "",
        *_table(["N", *STAGES, "total"], rows),
        "",
    ]


def background_note(r: dict[str, Any]) -> str:
    """How busy the rest of the machine was during the HTTP runs (other processes' CPU)."""
    seen = [
        run.get("background_cores", 0.0)
        for name in ("vidrank", "vidrank_int8", "textbook")
        for key in ("latency_c1", "throughput_c8", "latency_c1_columnar")
        for run in (_get(r, name, key) or {}).values()
    ]
    if not seen:
        return ""
    median = sorted(seen)[len(seen) // 2]
    start = _fmt((r["machine"].get("loadavg_at_start") or [None])[0])
    end = _fmt((r["machine"].get("loadavg_at_end") or [None])[0])
    return (
        f"Other processes used {max(seen):.2f} cores at most (median {median:.2f}) during the "
        f"HTTP runs; load average {start} at start, {end} at end."
    )


def cpu_per_request(run: dict[str, Any]) -> float | None:
    """Server CPU milliseconds per request in a load run (all workers)."""
    used = run.get("server_cpu_s")
    if not used or not run.get("requests"):
        return None
    return float(sum(used.values())) * 1000.0 / run["requests"]


def throughput_table(r: dict[str, Any]) -> list[str]:
    cores = r["machine"]["cores"]
    header = ["N", "limit (cores/floor)", "vidrank req/s", "of limit", "textbook req/s",
              "vidrank/textbook", "vidrank p50 @c8", "textbook p50 @c8",
              "vidrank int8 req/s", "vidrank CPU ms/req", "textbook CPU ms/req",
              "vidrank req/s on idle cores"]  # fmt: skip
    rows = []
    for n in map(str, r["settings"]["ns"]):
        f1 = _get(r, "floor", "threads1", n, "p50")
        limit = cores / (f1 / 1000.0) if f1 else None
        v = _get(r, "vidrank", "throughput_c8", n) or {}
        t = _get(r, "textbook", "throughput_c8", n) or {}
        rows.append(
            [
                n, _fmt(limit, 0), _fmt(v.get("rps"), 0), _fmt(ratio(v.get("rps"), limit)),
                _fmt(t.get("rps"), 0), _fmt(ratio(v.get("rps"), t.get("rps"))) + "×",
                _fmt(_get(v, "latency_ms", "p50")), _fmt(_get(t, "latency_ms", "p50")),
                _fmt(_get(r, "vidrank_int8", "throughput_c8", n, "rps"), 0),
                _fmt(cpu_per_request(v)), _fmt(cpu_per_request(t)),
                _fmt(ratio(cores * 1000.0, cpu_per_request(v)), 0),
            ]
        )  # fmt: skip
    return _table(header, rows)


def shadow_table(r: dict[str, Any]) -> list[str]:
    sm = _get(r, "shadow", "summary")
    if not sm:
        return []
    header = ["shadow", "p50 @c1", "p99 @c1", "req/s @c8", "CPU ms/req @c8",
              "compared @c1", "compared @c8", "shadow CPU ms/compared",
              "shadow wall ms/compared", "errors"]  # fmt: skip
    rows = [
        [
            mode, _fmt(m["p50_ms_c1"]), _fmt(m["p99_ms_c1"]), _fmt(m["rps_c8"], 0),
            _fmt(m["cpu_ms_per_request_c8"]), _fmt(m["compared_share_c1"]),
            _fmt(m["compared_share_c8"]), _fmt(m["shadow_ms_per_compared"]),
            _fmt(m.get("shadow_wall_ms_per_compared")), str(m["errors"]),
        ]
        for mode, m in ((k, sm[k]) for k in ("none", "shadow"))
    ]  # fmt: skip
    rounds = len(r["shadow"]["runs"]["none"])
    return [
        f"## Shadow scoring at {r['shadow']['n']} candidates (medians of {rounds} alternating "
        "runs per mode, one server)",
        "",
        *_table(header, rows),
        "",
    ]


def overload_table(r: dict[str, Any]) -> list[str]:
    o = r.get("overload")
    if not o:
        return []
    header = [
        "run", "connections", "answered req/s", "answered p50", "answered p99", "sheds (503)",
        "shed p50", "shed p99", "timeouts (2 s)", "connects: p50 / p99 wait", "other",
    ]  # fmt: skip
    rows = []
    for key, label in (("shedding", "shedding on"), ("no_shedding", "shedding off")):
        for run in (o.get(key) or {}).values():
            if not isinstance(run, dict):
                continue
            a, sh, cw = (
                run.get("answered_ms") or {},
                run.get("shed_ms") or {},
                run.get("connect_ms") or {},
            )
            other = {k: v for k, v in run["statuses"].items() if k not in ("200", "503")}
            rows.append(
                [
                    label, str(run["connections"]), _fmt(run["answered_rps"], 0),
                    _fmt(a.get("p50")), _fmt(a.get("p99")), str(run["shed"]),
                    _fmt(sh.get("p50")), _fmt(sh.get("p99")), str(run["timeouts"]),
                    f"{run.get('connects', 0)}: {_fmt(cw.get('p50'))} / {_fmt(cw.get('p99'))}",
                    ", ".join(f"{k}: {v}" for k, v in other.items()) + (
                        f" errors {run['errors']}" if run["errors"] else ""
                    ) or "–",
                ]
            )  # fmt: skip
    title = (
        f"## Overload: {o['n']} candidates, {o['workers']} workers, {o['seconds']:.0f} s per run "
        "(benchmarks/overload.py, ms)"
    )
    lines = [title, "", *_table(header, rows), ""]
    wrk_runs = o.get("wrk") or {}
    if wrk_runs:
        header = [
            "connections", "answered req/s", "answered", "sheds (503)", "other", "all p50",
            "all p99", "timeouts (2 s)", "socket errors",
        ]  # fmt: skip
        rows = [
            [
                str(w["connections"]), _fmt(w["answered_rps"], 0), str(w["answered"]),
                str(w["shed"]), str(w["other"]), _fmt(w["all_ms"].get("p50")),
                _fmt(w["all_ms"].get("p99")), str(w["timeouts"]), str(w["socket_errors"]),
            ]
            for w in wrk_runs.values()
        ]  # fmt: skip
        lines += [
            "wrk (`-t2 --timeout 2s`, benchmarks/rank_status.lua; each load starts on workers "
            "calm again, so its clients arrive as one burst of new connections; its latencies "
            "are of all responses, answers and sheds together):",
            "",
            *_table(header, rows),
            "",
        ]
    return lines


def graph_table(r: dict[str, Any]) -> list[str]:
    lat = _get(r, "graphs", "latency") or {}
    names = list(lat)
    header = [
        "N", *[f"{g} p50 (cpu)" for g in names], "naive/fused fp32", "trained/fused fp32",
        "naive fp32/fused int8",
    ]  # fmt: skip
    rows = []
    for n in map(str, r["settings"]["ns"]):
        p = {g: _get(lat, g, n, "cpu_p50") for g in names}
        wall = {g: _get(lat, g, n, "p50") for g in names}
        rows.append(
            [
                n, *[f"{_fmt(wall[g])} ({_fmt(p[g])})" for g in names],
                _fmt(ratio(p.get("naive_fp32"), p.get("fused_fp32"))) + "×",
                _fmt(ratio(p.get("trained_fp32"), p.get("fused_fp32"))) + "×",
                _fmt(ratio(p.get("naive_fp32"), p.get("fused_int8"))) + "×",
            ]
        )  # fmt: skip
    return _table(header, rows)


MATMUL_KERNELS = ("Gemm", "FusedGemm", "MatMul", "FusedMatMul", "DynamicQuantizeMatMul",
                  "MatMulIntegerToFloat", "MatMulInteger", "Relu", "Add", "Mul")  # fmt: skip


def census_table(r: dict[str, Any]) -> list[str]:
    census = _get(r, "graphs", "census") or {}
    optimised = _get(r, "graphs", "optimised_ops") or {}
    rows = []
    for g, c in census.items():
        ops = optimised.get(g, {})
        kernels = ", ".join(f"{ops[k]} {k}" for k in MATMUL_KERNELS if ops.get(k))
        row = [g, str(len(c["float_matmuls"])), str(c["int8_matmuls"]), _fmt(c["size_bytes"] / MB)]
        rows.append([*row, kernels])
    header = ["graph", "float MatMul/Gemm", "int8 matmuls", "file MB", "onnxruntime runs"]
    return _table(header, rows)


def targets_table(r: dict[str, Any]) -> list[str]:
    rows = []
    for t in r["targets"]:
        met = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        measured = _fmt(t["measured"], 3 if t["unit"] != "MB" else 0)
        value = f"{measured} {t['unit']}".strip()
        rows.append([t["description"], t["target"], value, met, t["note"]])
    return _table(["target", "goal", "measured", "", "note"], rows)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    s = r["settings"]
    model = r.get("model", {})
    lines = [
        f"# vidrank benchmark — {r['created_at']}",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, AVX2 {'yes' if m['avx2'] else 'no'}, "
        f"AVX-512 VNNI {'yes' if m['flags'].get('avx512_vnni') else 'no'}; Python {m['python']}, "
        f"onnxruntime {m['packages'].get('onnxruntime')}, load average at start "
        f"{_fmt(m['loadavg_at_start'][0]) if m.get('loadavg_at_start') else '?'}.",
        f"Model: {model.get('description', '?')}. Load generator: {s['load_generator']}; "
        f"{s['http_seconds']} s per HTTP run, {s['workers']} workers. Latencies in ms (medians "
        "and percentiles of one run).",
        "",
        "## Targets",
        "",
        *targets_table(r),
        "",
        "## Latency at concurrency 1 (ms)",
        "",
        *latency_table(r),
        "",
        *stages_table(r),
        f"## Throughput at concurrency 8, {s['workers']} workers",
        "",
        *throughput_table(r),
        "",
        *shadow_table(r),
        "## Model graphs (onnxruntime, 1 thread, ms: wall p50 (thread CPU p50); ratios of CPU)",
        "",
        *graph_table(r),
        "",
        *census_table(r),
        "",
        *overload_table(r),
    ]
    if "features" in r:
        from benchmarks.features import markdown as features_markdown

        lines += [*features_markdown(r["features"]["rows"], r["features"]["million"]), ""]
    notes = [background_note(r), *s.get("notes", [])]
    lines += [f"- {note}" for note in notes if note]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], path: Path) -> Path:
    """Latency vs candidates for the floor, vidrank and textbook (p50 solid, p99 dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = r["settings"]["ns"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    floor = [_get(r, "floor", "threads1", str(n), "p50") for n in ns]
    ax.plot(ns, floor, "k-o", label="floor: session.run, 1 thread (p50)")
    int8 = [_get(r, "floor", "int8_threads1", str(n), "p50") for n in ns]
    if any(y is not None for y in int8):
        ax.plot(ns, int8, "--o", color="gray", label="floor, int8 graph (p50)")
    series = (("vidrank", "tab:blue"), ("vidrank_int8", "tab:cyan"), ("textbook", "tab:red"))
    for name, color in series:
        for q, style in (("p50", "-o"), ("p99", ":s")):
            ys = [_get(r, name, "latency_c1", str(n), "latency_ms", q) for n in ns]
            if any(y is not None for y in ys):
                ax.plot(ns, ys, style, color=color, label=f"{name} POST /rank ({q}, c=1)")
    ax.set_xlabel("candidates per request")
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_yscale("log")  # the textbook p99 is 10-100x the floor: a linear axis hides the rest
    ax.set_title(f"vidrank latency — {r['machine']['cpu_model']}, {r['machine']['cores']} cores")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
