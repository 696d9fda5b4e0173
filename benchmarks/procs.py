"""Server processes under test: start, wait until ready, measure RSS and CPU time, stop.

Each server is started in its own session (process group), so stopping it ends exactly the
processes this harness started - the group leader and the workers it forked - and nothing else.
RSS and CPU times are read from /proc (Linux).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A TCP port that is free right now on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(url_host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; raises OSError when nothing listens."""
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_post(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body) of a POST with a JSON body."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request("POST", path, body=body, headers=all_headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- /proc -------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident set size of one process (VmRSS), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process so far."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def busy_cpu_seconds() -> float:
    """CPU seconds all processes on the machine spent busy so far (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (by scanning /proc/*/stat for the parent id)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return sorted(out)


# -- servers -----------------------------------------------------------------------------------


@dataclass
class Server:
    """A running HTTP server process (and its workers)."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    start_to_ready_s: float
    log_path: Path
    host: str = "127.0.0.1"
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers, or the server itself if it has none.

        Helpers of a multi-worker supervisor (multiprocessing's resource tracker) do not count.
        """
        kids = [p for p in descendants(self.proc.pid) if _is_worker(p)]
        return kids or [self.proc.pid]

    def rss(self) -> dict[str, int | None]:
        """RSS in bytes of the main process and of each worker."""
        out: dict[str, int | None] = {"main": rss_bytes(self.proc.pid)}
        for i, pid in enumerate(p for p in self.worker_pids() if p != self.proc.pid):
            out[f"worker{i}"] = rss_bytes(pid)
        return out

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it lingers."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)
        except ProcessLookupError:
            pass


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return "python" in cmdline and "resource_tracker" not in cmdline


def start_server(
    name: str,
    cmd: list[str],
    port: int,
    log_dir: Path,
    env: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    timeout_s: float = 60.0,
    cwd: Path | None = None,
) -> Server:
    """Start ``cmd`` and return once ``ready_path`` answers 200 (start-to-ready is measured)."""
    log_path = log_dir / f"{name}.log"
    log = log_path.open("wb")
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        start_new_session=True,
    )
    log.close()
    server = Server(name=name, proc=proc, port=port, start_to_ready_s=0.0, log_path=log_path)
    deadline = start + timeout_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
        try:
            status, _ = http_get("127.0.0.1", port, ready_path, timeout=1.0)
        except OSError:
            status = 0
        if status == 200:
            server.start_to_ready_s = time.perf_counter() - start
            return server
        time.sleep(0.01)
    server.stop()
    raise RuntimeError(f"{name} was not ready within {timeout_s:.0f}s; see {log_path}")


def python_cmd(*args: str) -> list[str]:
    """``[this python, *args]``: servers run in the harness's own environment."""
    return [sys.executable, *args]


class RssSampler(threading.Thread):
    """Samples the RSS of a set of processes every ``interval_s`` until stopped; keeps the peak."""

    def __init__(self, pids: list[int], interval_s: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval_s = pids, interval_s
        self.peak: dict[int, int] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for pid in self.pids:
                rss = rss_bytes(pid)
                if rss is not None and rss > self.peak.get(pid, 0):
                    self.peak[pid] = rss
            time.sleep(self.interval_s)

    def stop(self) -> dict[int, int]:
        self._stop_event.set()
        self.join()
        return self.peak
