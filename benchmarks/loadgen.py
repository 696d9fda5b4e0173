"""Load generators: wrk with a Lua script (preferred) and a small Python keep-alive fallback.

Both send pre-built ``POST /rank`` bodies over keep-alive connections for a fixed duration and
report throughput and the latency distribution. wrk is a C event loop that costs the server's
cores little; the Python client is used only when wrk is missing, and the results say so.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.stats import percentiles_ms

LUA_SCRIPT = Path(__file__).with_name("rank.lua")
STATUS_SCRIPT = Path(__file__).with_name("rank_status.lua")  # rank.lua + responses by status
WRK_INSTALL_HINT = (
    "wrk is not installed: `sudo apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk` "
    "(macOS). Falling back to a Python keep-alive client, which costs the server CPU and "
    "understates throughput."
)
WRK_MARKER = "WRK_JSON "
STATUS_MARKER = "WRK_STATUS "


@dataclass
class LoadResult:
    """One load run against one endpoint."""

    client: str  # "wrk" or "python"
    connections: int
    duration_s: float
    requests: int
    rps: float
    latency_ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)  # with rank_status.lua only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def find_wrk() -> str | None:
    """Path of the wrk binary, or None."""
    return shutil.which("wrk")


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    """One JSON body per line, the format rank.lua reads."""
    for body in bodies:
        if b"\n" in body:
            raise ValueError("request bodies must be single-line JSON")
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path


def run_load(
    url: str,
    bodies_file: Path,
    connections: int,
    duration_s: float,
    wrk: str | None,
    path: str = "/rank",
) -> LoadResult:
    """Run wrk when available, else the Python client."""
    if wrk is not None:
        return run_wrk(wrk, url, bodies_file, connections, duration_s, path)
    bodies = [line for line in bodies_file.read_bytes().splitlines() if line]
    return run_python(url, bodies, connections, duration_s, path)


# -- wrk ---------------------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    url: str,
    bodies_file: Path,
    connections: int,
    duration_s: float,
    path: str = "/rank",
    *,
    threads: int = 1,
    timeout_s: float = 10.0,
    statuses: bool = False,
) -> LoadResult:
    """``wrk -tT -cC -dD --latency -s rank.lua URL -- bodies path`` and its parsed summary.

    One wrk thread drives all connections by default: a single event loop keeps up with a few
    thousand requests per second and leaves the other cores to the server. ``statuses`` counts
    responses by status (rank_status.lua; the overload rows).
    """
    seconds = max(1, round(duration_s))
    script = STATUS_SCRIPT if statuses else LUA_SCRIPT
    cmd = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        f"{timeout_s:g}s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        str(bodies_file),
        path,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.strip()}")
    return parse_wrk(proc.stdout, connections)


def parse_wrk(stdout: str, connections: int) -> LoadResult:
    """The LoadResult from the WRK_JSON line that rank.lua's done() prints (and the WRK_STATUS
    line of rank_status.lua)."""
    lines = stdout.splitlines()
    for line in lines:
        if line.startswith(WRK_MARKER):
            data = json.loads(line[len(WRK_MARKER) :])
            break
    else:
        raise RuntimeError(f"no {WRK_MARKER.strip()} line in wrk output:\n{stdout}")
    duration = data["duration_us"] / 1e6
    lat = data["latency_us"]
    keys = ("min", "mean", "p50", "p90", "p99", "p999", "max")
    return LoadResult(
        client="wrk",
        connections=connections,
        duration_s=duration,
        requests=int(data["requests"]),
        rps=data["requests"] / duration if duration else 0.0,
        latency_ms={k: lat[k] / 1000.0 for k in keys},
        errors={k: int(v) for k, v in data["errors"].items()},
        statuses=next(
            (json.loads(x[len(STATUS_MARKER) :]) for x in lines if x.startswith(STATUS_MARKER)),
            {},
        ),
    )


# -- Python fallback ---------------------------------------------------------------------------


class _Worker(threading.Thread):
    """One keep-alive connection sending bodies back to back until the deadline."""

    def __init__(self, url: str, path: str, bodies: list[bytes], offset: int, deadline: float):
        super().__init__(daemon=True)
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path, self.bodies, self.offset, self.deadline = path, bodies, offset, deadline
        self.latencies: list[float] = []
        self.errors = {"status": 0, "socket": 0}

    def run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        headers = {"Content-Type": "application/json"}
        i = self.offset
        while time.perf_counter() < self.deadline:
            body = self.bodies[i % len(self.bodies)]
            i += 1
            start = time.perf_counter()
            try:
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                self.errors["socket"] += 1
                conn.close()
                conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                continue
            self.latencies.append(time.perf_counter() - start)
            if resp.status >= 400:
                self.errors["status"] += 1
        conn.close()


def run_python(
    url: str, bodies: list[bytes], connections: int, duration_s: float, path: str = "/rank"
) -> LoadResult:
    """A thread per keep-alive connection; latency per request with perf_counter."""
    start = time.perf_counter()
    deadline = start + duration_s
    workers = [_Worker(url, path, bodies, 7 * i, deadline) for i in range(connections)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    latencies = [x for w in workers for x in w.latencies]
    errors = {k: sum(w.errors[k] for w in workers) for k in ("status", "socket")}
    return LoadResult(
        client="python",
        connections=connections,
        duration_s=elapsed,
        requests=len(latencies),
        rps=len(latencies) / elapsed if elapsed else 0.0,
        latency_ms=percentiles_ms(latencies),
        errors=errors,
    )
