"""Real ``vidrank serve`` processes under registry faults, hostile clients, a killed supervisor
and overload (issue 10). Raw sockets where a well-behaved client library would hide the fault."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from benchmarks.harness import AUTH, HOST, Server, free_port, listening, rank_body, wait_until
from tests.integration.conftest import LIVE_ENV, unwritable_copy

Start = Callable[..., Server]
POLL_S = float(LIVE_ENV["VIDRANK_POLL_INTERVAL_S"])


# -- helpers -------------------------------------------------------------------------------------


class Traffic:
    """Clients ranking back to back in threads until stopped; every outcome recorded."""

    def __init__(self, url: str, clients: int = 2, n: int = 20) -> None:
        self.url, self.n = url, n
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, seed: int) -> None:
        body = rank_body(self.n, seed=seed)
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    r = http.post("/rank", json=body)
                except httpx.HTTPError as e:
                    self.failures.append(repr(e))
                    continue
                self.statuses.append(r.status_code)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")

    def wait_for_requests(self, n: int, min_seconds: float = 0.0) -> None:
        """Return once ``n`` more requests are answered and at least ``min_seconds`` passed."""
        start, seen = time.monotonic(), len(self.statuses)
        wait_until(
            lambda: len(self.statuses) >= seen + n and time.monotonic() - start >= min_seconds,
            60 + min_seconds,
            f"{n} more requests answered",
        )

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of the server's /metrics (0 when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def registry_status(url: str) -> str:
    """The server's registry status as /models reports it (ok, aliases_missing, ...)."""
    return str(httpx.get(f"{url}/models", timeout=10).json()["registry"]["status"])


def queued(url: str) -> float:
    """/rank requests admitted and not yet scoring (reading their body, or waiting for a slot)."""
    return metric(url, "vidrank_rank_queue")


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start = time.monotonic()
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - start


def raw(port: int, payload: bytes = b"") -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    if payload:
        sock.sendall(payload)
    return sock


# -- defect 2: a missing aliases file or registry directory keeps the fleet serving ----------


def test_registry_outage_keeps_serving(
    start_server: Start, live_registry: Path, version: str
) -> None:
    """The measured outage: aliases.json gone for several polls (15 s outage, 2,405 of 3,506
    requests failed). Now every request succeeds, and the fault is visible."""
    server = start_server(live_registry)  # polls every 0.5 s
    aliases = live_registry / "aliases.json"
    saved = aliases.read_bytes()
    with Traffic(server.url) as traffic:
        traffic.wait_for_requests(5)
        aliases.unlink()
        wait_until(
            lambda: registry_status(server.url) == "aliases_missing", 30, "fault seen", server
        )
        models = httpx.get(f"{server.url}/models", timeout=10).json()
        registry_ok = metric(server.url, "vidrank_registry_ok")
        traffic.wait_for_requests(10, min_seconds=5 * POLL_S)  # the outage lasts five polls
        moved = live_registry.with_name("registry-unmounted")
        live_registry.rename(moved)  # the whole volume gone
        traffic.wait_for_requests(10, min_seconds=4 * POLL_S)
        moved.rename(live_registry)
        aliases.write_bytes(saved)
        wait_until(lambda: registry_status(server.url) == "ok", 30, "recovered", server)
        traffic.wait_for_requests(5)
    assert not traffic.failures, traffic.failures[:3]
    assert len(traffic.statuses) > 20
    # While the file was missing: the same version served, the fault visible.
    assert models["serving"]["production"] == version
    assert models["registry"]["status"] == "aliases_missing" and registry_ok == 0
    assert httpx.get(f"{server.url}/models").json()["registry"]["status"] == "ok"
    assert metric(server.url, "vidrank_registry_faults_total", 'reason="aliases_missing"') >= 1
    warnings = [r for r in server.log_records() if r.get("msg", "").startswith("registry fault")]
    assert warnings and warnings[0]["level"] == "warning"


# -- defect 4: a version that shows up after its alias is picked up without a restart ----------


def test_alias_ahead_of_its_version_converges(
    start_server: Start, live_registry: Path, version: str
) -> None:
    from model.core.registry import Registry

    server = start_server(live_registry)
    versions = live_registry / "versions"
    shutil.copytree(versions / version, live_registry / "staging-v3")
    # The alias names v3 before the version directory is visible (a lagging NFS client).
    data = json.loads((live_registry / "aliases.json").read_text())
    data.update(production="v3", previous=[*data["previous"], version])
    (live_registry / "aliases.json").write_text(json.dumps(data))

    def status() -> dict:
        return dict(httpx.get(f"{server.url}/models").json()["registry"])

    wait_until(lambda: "v3" in status()["retrying"], 30, "v3 retried", server)
    assert status()["converged"] is False
    assert metric(server.url, "vidrank_model_desired", 'role="production",version="v3"') == 1
    assert metric(server.url, "vidrank_model_converged") == 0
    manifest = json.loads((live_registry / "staging-v3" / "manifest.json").read_text())
    manifest["version"] = "v3"
    (live_registry / "staging-v3" / "manifest.json").write_text(json.dumps(manifest))
    (live_registry / "staging-v3").rename(versions / "v3")
    assert Registry(live_registry).has("v3")
    wait_until(  # back-off: 2 s, then 4 s ...
        lambda: httpx.post(f"{server.url}/rank", json=rank_body(3)).json()["model_version"] == "v3",
        30,
        "v3 served",
        server,
    )
    assert metric(server.url, "vidrank_model_converged") == 1
    assert any(
        r.get("msg") == "aliased version not loaded; will retry" for r in server.log_records()
    )


# -- defect 6: a read-only registry answers 503 and leaves the process consistent ---------------


@pytest.fixture
def readonly_registry(live_registry: Path) -> Iterator[tuple[Path, list[str]]]:
    """A copy of the registry that the server process cannot write (``unwritable_copy``)."""
    with unwritable_copy(live_registry) as copy:
        yield copy


def test_readonly_registry_admin_is_503_and_consistent(
    tmp_path: Path, readonly_registry: tuple[Path, list[str]], version: str
) -> None:
    from benchmarks.harness import child_env, serve_cmd

    registry, prefix = readonly_registry
    # As the server's user, the registry really is unwritable (PermissionError on the lock).
    probe = [*prefix, sys.executable, "-c", f"open({str(registry / '.lock')!r}, 'a')"]
    done = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "PermissionError" in done.stderr, done.stderr
    port = free_port()
    cmd = [*prefix, *serve_cmd(registry, port)]
    server = Server("ro", cmd, port, tmp_path / "ro.log", child_env(LIVE_ENV))
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as http:
            for call in (
                lambda: http.post("/admin/models/v2/activate"),
                lambda: http.put("/admin/canary", json={"version": "v2", "percent": 10}),
            ):
                r = call()
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "registry_unavailable"
            models = http.get("/models").json()
            assert models["serving"]["production"] == models["aliases"]["production"] == version
            assert http.post("/rank", json=rank_body(3)).json()["model_version"] == version
        assert "Traceback" not in server.logs()
        assert not any(r.get("level") == "error" for r in server.log_records())
    finally:
        server.stop()


TIMEOUT = "X-Request-Timeout-Ms"


# -- defect 8: stalled clients are bounded in time and in number ---------------------------------

BOUNDS = {
    "VIDRANK_HEADER_TIMEOUT_S": "1",
    "VIDRANK_BODY_TIMEOUT_S": "1",
    "VIDRANK_MAX_CONNECTIONS": "64",
}


def test_stalled_requests_are_answered_408_and_closed(
    start_server: Start, live_registry: Path
) -> None:
    server = start_server(live_registry, env=BOUNDS)
    silent = raw(server.port)  # sends nothing: closed after the header timeout + the grace
    # Sends nothing for longer than the header timeout, then a whole request: a client whose
    # first segment TCP had to resend is served (protocol.SILENT_GRACE_S).
    late, late_since = raw(server.port), time.monotonic()
    cases = {
        "partial headers": b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: appl",
        "partial body": b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5000\r\n\r\n" + json.dumps(rank_body(1)).encode()[:40],
    }
    socks = {name: raw(server.port, payload) for name, payload in cases.items()}
    # A keep-alive connection's second request stalls after one header line.
    keep = raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    keep.settimeout(10)
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += keep.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x")
    socks["stalled second request"] = keep
    for name, sock in socks.items():
        with sock:
            data, took = read_until_closed(sock, timeout_s=15)  # the bound is 1 s (+1 s grace)
        assert data.startswith(b"HTTP/1.1 408"), (name, data[:200])
        assert took < 5, (name, took)
        body = json.loads(data.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_timeout", name
        assert b"connection: close" in data.lower(), name
    with late:
        time.sleep(max(0.0, late_since + 2 - time.monotonic()))  # twice the header timeout
        late.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data, _ = read_until_closed(late, timeout_s=10)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    with silent:
        data, took = read_until_closed(silent, timeout_s=20)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert metric(server.url, "vidrank_connections_closed_total", 'reason="header_timeout"') >= 3
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_stalled_connections_give_way_to_liveness_and_real_clients(
    start_server: Start, live_registry: Path
) -> None:
    """1,100 stalled connections against one worker capped at 1,024: the longest idle give way
    (408, closed), so /healthz answers within a probe's 1 s and a real /rank is ranked."""
    stalled, cap = 1100, 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < stalled + 256:  # this test process holds every one of them
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(stalled + 256, hard), hard))
    env = {"VIDRANK_HEADER_TIMEOUT_S": "120", "VIDRANK_MAX_CONNECTIONS": str(cap)}
    server = start_server(live_registry, env=env)
    payloads = [b"", b"GET /healthz HTTP/1.1\r\n", b"POST /rank HTTP/1.1\r\nHost: x\r\nConte"]
    socks = [raw(server.port, payloads[i % 3]) for i in range(stalled)]
    try:
        closed = 'reason="made_room"'
        room = stalled - cap
        wait_until(
            lambda: metric(server.url, "vidrank_connections_closed_total", closed) >= room,
            60,
            f"{room} stalled connections closed to make room",
            server,
        )
        probes = [httpx.get(f"{server.url}/healthz", timeout=1).status_code for _ in range(5)]
        ranked = httpx.post(f"{server.url}/rank", json=rank_body(5), timeout=10)
        first, _ = read_until_closed(socks[0], timeout_s=10)  # the longest idle went first
    finally:
        for sock in socks:
            sock.close()
    assert probes == [200] * 5
    assert ranked.status_code == 200, ranked.text
    assert first.startswith(b"HTTP/1.1 408"), first[:200]
    assert json.loads(first.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    assert metric(server.url, "vidrank_connections_closed_total", 'reason="max_connections"') == 0


def test_oversized_headers_are_refused(start_server: Start, live_registry: Path) -> None:
    server = start_server(live_registry, env=BOUNDS)
    with raw(server.port, b"GET /healthz HTTP/1.1\r\n") as sock:
        with contextlib.suppress(OSError):  # the server may close while we still send
            for i in range(2000):
                sock.sendall(b"X-Filler-%d: %s\r\n" % (i, b"a" * 100))
        data, _ = read_until_closed(sock, timeout_s=15)
    assert data.startswith(b"HTTP/1.1 431"), data[:100]


# -- defect 9: workers die with their supervisor -------------------------------------------------


def test_killing_the_supervisor_stops_its_workers(start_server: Start, live_registry: Path) -> None:
    server = start_server(live_registry, workers=2)
    workers = [psutil.Process(pid) for pid in server.worker_pids() if pid != server.pid]
    assert len(workers) == 2
    metrics_dir = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_dir.is_dir()
    assert httpx.post(f"{server.url}/rank", json=rank_body(3), timeout=10).status_code == 200
    server.signal(signal.SIGKILL)  # the supervisor only: no chance to stop anything
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, [p.pid for p in alive]
    assert not listening(server.port)
    wait_until(lambda: not metrics_dir.exists(), 5, f"{metrics_dir} removed")


# -- overload: shedding, deadlines and liveness --------------------------------------------------


def test_overload_sheds_fast_and_liveness_stays_up(
    start_server: Start, live_registry: Path
) -> None:
    """More concurrent work than the queue holds: the excess gets 503 + Retry-After at once, a
    tight deadline gets 504, nothing else fails, and /healthz on the health port answers within
    the liveness probe's timeout (docker/k8s: 2 s) throughout."""
    n = 20_000
    health = free_port()
    env = {"VIDRANK_MAX_QUEUE": "2", "VIDRANK_MAX_CANDIDATES": str(n)}
    server = start_server(live_registry, env={**env, "VIDRANK_HEALTH_PORT": str(health)})
    body = json.dumps(rank_body(n)).encode()
    headers = {"content-type": "application/json"}
    patient = {**headers, "X-Request-Timeout-Ms": "60000"}  # only the probes below are late
    statuses: list[int] = []
    sheds: list[httpx.Response] = []
    stop = threading.Event()

    resets: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post("/rank", content=body, headers=patient)
                except httpx.TransportError as exc:  # turned away while connecting (the kernel)
                    resets.append(type(exc).__name__)
                    time.sleep(0.05)
                    continue
                statuses.append(r.status_code)
                if r.status_code == 503:
                    sheds.append(r)
                    time.sleep(0.05)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for t in threads:
        t.start()
    probes: list[int] = []
    late: list[int] = []
    turned_away = 0
    try:
        wait_until(lambda: len(sheds) > 0, 60, "the queue full (a request shed)", server)
        for _ in range(20):
            probes.append(httpx.get(f"http://{HOST}:{health}/healthz", timeout=2).status_code)
            try:  # a full worker accepts no connection: TCP retries its SYN (1 s, 3 s, ...)
                r = httpx.post(
                    f"{server.url}/rank",
                    content=body,
                    headers={**headers, "X-Request-Timeout-Ms": "5"},
                    timeout=httpx.Timeout(60, connect=4),
                )
                late.append(r.status_code)
            except httpx.TransportError:
                turned_away += 1
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert probes == [200] * 20
    assert set(statuses) == {200, 503}, set(statuses)
    # A worker with no place accepts no connection: a shed client reconnecting may be turned
    # away by the kernel (a reset when its SYN-cookie connection cannot be queued) - never
    # most of the time.
    assert len(resets) < len(statuses), (len(resets), len(statuses))
    for r in sheds[:5]:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    # A full queue sheds the late probes before their deadline is looked at: 503 or 504 - if
    # they get in at all (a connect the kernel keeps turning away gives up after 4 s).
    assert set(late) <= {200, 503, 504}, late
    assert len(late) + turned_away == 20 and late, (late, turned_away)
    assert metric(server.url, "vidrank_rank_shed_total", 'reason="queue_full"') == len(
        sheds
    ) + late.count(503)
    assert metric(server.url, "vidrank_rank_shed_total", 'reason="deadline"') == late.count(504)


def test_a_shed_is_decided_at_the_head_and_its_body_skipped(
    start_server: Start, live_registry: Path
) -> None:
    """With every place taken (two requests still sending their bodies hold them), a third
    POST /rank gets its 503 as soon as its headers are in, before any of its body is sent; the
    body, junk that would be a 400 if parsed, is then skipped and the connection ends cleanly
    (the client's retry comes through the acceptor, which waits for a place)."""
    env = {"VIDRANK_MAX_QUEUE": "0", "VIDRANK_BODY_TIMEOUT_S": "120"}  # 2 rank slots, no queue
    server = start_server(live_registry, env=env)
    head = b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    size = 4 << 20
    holders = [raw(server.port, head + b"Content-Length: 100\r\n\r\n{") for _ in range(2)]
    try:
        wait_until(lambda: queued(server.url) >= 2, 30, "two requests reading their bodies", server)
        with raw(server.port, head + b"Content-Length: %d\r\n\r\n" % size) as sock:
            sock.settimeout(10)
            answer = sock.recv(65536)  # nothing of the body sent yet
            sock.sendall(b"x" * size)
            after = b""
            while chunk := sock.recv(65536):  # until the server closes (EOF, not a reset)
                after += chunk
        pauses = metric(server.url, "vidrank_accept_pauses_total")
    finally:
        for sock in holders:
            sock.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"retry-after: 1" in answer.lower() and b"connection: close" in answer.lower()
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "overloaded"
    assert after == b""  # the junk body was never parsed: no 400 after the 503
    assert metric(server.url, "vidrank_rank_shed_total", 'reason="queue_full"') == 1
    assert pauses >= 1  # full: the worker stopped accepting (the trickle let these two in)


def test_probes_on_the_health_port_while_every_place_is_taken(
    start_server: Start, live_registry: Path
) -> None:
    """VIDRANK_HEALTH_PORT serves liveness and readiness on a listener that always accepts:
    with every /rank place taken (the main port accepting nothing but its trickle), probes
    there answer at once; anything else there is a 404."""
    health = free_port()
    env = {
        "VIDRANK_MAX_QUEUE": "0",
        "VIDRANK_BODY_TIMEOUT_S": "120",
        "VIDRANK_HEALTH_PORT": str(health),
    }
    server = start_server(live_registry, env=env)
    head = b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    holders = [raw(server.port, head + b"Content-Length: 100\r\n\r\n{") for _ in range(2)]
    probes: list[tuple[int, str]] = []
    try:
        wait_until(lambda: queued(server.url) >= 2, 30, "two requests reading their bodies", server)
        with httpx.Client(base_url=f"http://{HOST}:{health}", timeout=2) as http:
            for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready") * 5:
                r = http.get(path)
                probes.append((r.status_code, r.json()["status"]))
            elsewhere = [http.post("/rank", json=rank_body(3)), http.get("/models")]
    finally:
        for sock in holders:
            sock.close()
    assert probes == [(200, "ok"), (200, "ready"), (200, "ok"), (200, "ready")] * 5
    assert [r.status_code for r in elsewhere] == [404, 404]
    assert elsewhere[0].json()["error"]["code"] == "not_found"


def test_a_deadline_that_passes_while_waiting_is_504(
    start_server: Start, live_registry: Path
) -> None:
    """Both rank slots are kept busy and the queue has room: a request whose deadline passes
    while it waits gets 504 ``deadline_exceeded`` and its work never starts."""
    n = 20_000
    server = start_server(live_registry, env={"VIDRANK_MAX_CANDIDATES": str(n)})
    body = json.dumps(rank_body(n)).encode()
    headers = {"content-type": "application/json"}
    stop = threading.Event()
    busy: list[int] = []

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                r = http.post("/rank", content=body, headers={**headers, TIMEOUT: "60000"})
                busy.append(r.status_code)

    threads = [threading.Thread(target=client) for _ in range(4)]  # both slots busy, 2 waiting
    for t in threads:
        t.start()
    late: list[httpx.Response] = []
    try:
        wait_until(lambda: queued(server.url) >= 2, 60, "both slots busy, two waiting", server)
        for _ in range(5):
            late.append(
                httpx.post(
                    f"{server.url}/rank",
                    content=body,
                    headers={**headers, TIMEOUT: "5"},
                    timeout=60,
                )
            )
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(busy) == {200}, set(busy)
    assert [r.status_code for r in late] == [504] * 5
    assert {r.json()["error"]["code"] for r in late} == {"deadline_exceeded"}
    assert metric(server.url, "vidrank_rank_shed_total", 'reason="deadline"') == 5


def test_a_request_whose_client_left_is_not_scored(
    start_server: Start, live_registry: Path
) -> None:
    n = 20_000
    env = {"VIDRANK_MAX_CANDIDATES": str(n), "VIDRANK_REQUEST_TIMEOUT_MS": "0"}  # no deadline
    server = start_server(live_registry, env=env)
    body = json.dumps(rank_body(n)).encode()
    request = (
        b"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    # Both slots busy with big requests and four more waiting (each 20k-candidate ranking takes
    # a good fraction of a second even on a fast machine), then one more that hangs up while it
    # waits behind them.
    busy = [raw(server.port, request) for _ in range(6)]
    wait_until(lambda: queued(server.url) >= 3, 60, "requests waiting for a slot", server)
    with raw(server.port, request):
        time.sleep(0.2)  # the scenario: a client that hangs up 0.2 s after sending its request
    for sock in busy:
        with sock:
            sock.settimeout(120)
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
    gone = 'reason="client_gone"'
    wait_until(lambda: metric(server.url, "vidrank_rank_shed_total", gone) >= 1, 30, "shed", server)
    assert metric(server.url, "vidrank_rank_shed_total", gone) == 1
    ranked = metric(server.url, "vidrank_rank_requests_total", 'model_version="v-tiny"')
    assert ranked == 6


# -- metrics on their own port -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_on_a_separate_port(start_server: Start, live_registry: Path, workers: int) -> None:
    port = free_port()
    server = start_server(live_registry, workers=workers, env={"VIDRANK_METRICS_PORT": str(port)})
    assert httpx.post(f"{server.url}/rank", json=rank_body(3), timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 404
    text = httpx.get(f"http://{HOST}:{port}/metrics", timeout=10).text
    assert 'vidrank_http_requests_total{method="POST",route="/rank",status="200"}' in text
