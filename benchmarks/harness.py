"""What the tests and the benchmarks share: ports, processes, servers, nginx, HTTP, /rank bodies.

One implementation of each:

- a free loopback port (``free_port``, ``free_ports``);
- how to run the ``vidrank`` CLI of this environment (``vidrank_cmd``, ``serve_cmd``);
- a child process in its own session (process group) whose output goes to a file - never to a
  pipe that could fill - stopped with SIGTERM to its leader (which drains and stops its own
  workers), then SIGKILL to whatever is left of the group (``Proc``, ``Processes``);
- an HTTP server process waited on until ``/readyz`` answers 200, with its workers' pids and
  their RSS and CPU time read through psutil (``Server``, ``start_vidrank``);
- nginx rendered from ``docker/nginx.loopback.conf.template`` in front of loopback upstreams;
- a real ``redis-server`` on a free loopback port with its files in a directory of its own, and
  raw RESP commands to it (``RedisServer``);
- small HTTP calls over ``http.client`` (no client library's overhead in the measurements);
- realistic /rank bodies with the default schema's features, as rows or columns.

Only the standard library and psutil, so importing it costs the tests and benchmarks nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import psutil

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
ADMIN_TOKEN = "harness-admin-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
START_TIMEOUT_S = 60.0
# Long enough for a server to drain in-flight requests after SIGTERM; only a bound.
STOP_TIMEOUT_S = 40.0

# -- ports and commands -------------------------------------------------------------------------


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct TCP ports free right now on ``host`` (all held until all are known)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = HOST) -> int:
    """A TCP port free right now on ``host``."""
    return free_ports(1, host)[0]


def python_cmd(*args: str) -> list[str]:
    """``[this python, *args]``: children run in the caller's own environment."""
    return [sys.executable, *args]


def vidrank_cmd(*args: str, executable: Path | None = None) -> list[str]:
    """``vidrank ARGS`` of this interpreter's environment, or ``executable`` (another venv's).

    Without the ``vidrank`` script next to this interpreter, ``python -m model.cli`` stands in.
    """
    if executable is not None:
        return [str(executable), *args]
    script = Path(sys.executable).with_name("vidrank")
    base = [str(script)] if script.exists() else python_cmd("-m", "model.cli")
    return [*base, *args]


def serve_cmd(
    registry: Path, port: int, workers: int = 1, executable: Path | None = None
) -> list[str]:
    """``vidrank serve`` of ``registry`` on HOST:``port`` with ``workers`` workers."""
    args = ["--registry", str(registry), "--host", HOST, "--port", str(port)]
    return vidrank_cmd("serve", *args, "--workers", str(workers), executable=executable)


def child_env(
    extra: Mapping[str, str] | None = None,
    *,
    drop_prefix: str | None = None,
    python_path: Path | None = None,
) -> dict[str, str]:
    """This process's environment (without variables starting ``drop_prefix``) plus ``extra``.

    ``python_path`` goes first on PYTHONPATH (e.g. a ``sitecustomize`` for the child).
    """
    env = {k: v for k, v in os.environ.items() if not (drop_prefix and k.startswith(drop_prefix))}
    env.update(extra or {})
    if python_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(python_path), env.get("PYTHONPATH")) if p
        )
    return env


# -- HTTP ---------------------------------------------------------------------------------------


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    host: str = HOST,
    timeout: float = 60.0,
) -> tuple[int, bytes]:
    """(status, body) of one request; a body is sent as JSON. Raises OSError when none listens."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        json_type = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers={**json_type, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_json(
    port: int, method: str, path: str, body: bytes | None = None, **kw: Any
) -> tuple[int, Any]:
    """(status, JSON-decoded body, or None when the body is not JSON) of one request."""
    status, raw = http_request(port, method, path, body, **kw)
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, None


def listening(port: int, host: str = HOST) -> bool:
    """Whether something accepts TCP connections on ``host:port`` right now."""
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True


# -- processes ----------------------------------------------------------------------------------


class Proc:
    """A child process in its own session, so stopping it reaches its children too.

    ``env`` is the child's whole environment (default: this process's; see ``child_env``).
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.started_at = time.perf_counter()
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.popen = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Signal the leader only (a supervisor then handles its own workers)."""
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """Signal every process of the session (group id = the leader's pid)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the leader and wait; then SIGKILL whatever is left of the group.

        Returns the leader's exit code (negative: the signal that ended it).
        """
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_s)
        self.signal_group(signal.SIGKILL)  # stragglers, or everything if the leader lingered
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.logs().splitlines()[-n:])

    def log_records(self) -> list[dict[str, Any]]:
        """The log's JSON lines, decoded (other lines are skipped)."""
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out


P = TypeVar("P", bound=Proc)


class Processes:
    """Every process a run started; ``stop_all`` (context exit) stops them in reverse order."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def add(self, proc: P) -> P:
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, proc: Proc | None = None
) -> None:
    """Call ``check()`` until it is True; fail early if ``proc`` exits, with its log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} (log {proc.log_path}):\n"
                f"{proc.tail()}"
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.01)
    tail = f" (log {proc.log_path}):\n{proc.tail()}" if proc is not None else ""
    raise TimeoutError(f"{what}: not within {timeout_s:.0f}s{tail}")


# -- process statistics (psutil) -----------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident set size of one process, or None when it is gone."""
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process so far, or None when it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy so far (every state but idle and iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


def _serves_requests(p: psutil.Process) -> bool:
    """A Python worker, not a helper such as multiprocessing's resource tracker."""
    try:
        cmdline = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "python" in cmdline and "resource_tracker" not in cmdline


# -- servers ------------------------------------------------------------------------------------


class Server(Proc):
    """An HTTP server process on HOST:``port`` (and the workers it forks).

    Started by the constructor, which (with ``wait``) returns once /readyz answers 200 and
    stops the server again if it never does.
    """

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        *,
        wait: bool = True,
        timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        super().__init__(name, cmd, log_path, env, cwd)
        self.host, self.port = HOST, port
        self.start_to_ready_s: float | None = None
        if wait:
            try:
                self.wait_ready(timeout_s)
            except BaseException:
                self.stop()
                raise

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ready(self, path: str = "/readyz") -> bool:
        return http_request(self.port, "GET", path, timeout=1.0)[0] == 200

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S, path: str = "/readyz") -> None:
        """Poll ``path`` until it answers 200; the first time, record start-to-ready."""
        wait_until(lambda: self.ready(path), timeout_s, f"{self.name} ready", self)
        if self.start_to_ready_s is None:
            self.start_to_ready_s = time.perf_counter() - self.started_at

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers, or the server itself if it has none."""
        try:
            family = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            family = []
        return sorted(p.pid for p in family if _serves_requests(p)) or [self.pid]

    def rss(self) -> dict[str, int | None]:
        """RSS in bytes of the main process and of each worker."""
        out: dict[str, int | None] = {"main": rss_bytes(self.pid)}
        workers = [p for p in self.worker_pids() if p != self.pid]
        out.update({f"worker{i}": rss_bytes(pid) for i, pid in enumerate(workers)})
        return out


def start_vidrank(
    registry: Path,
    log_path: Path,
    *,
    port: int | None = None,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    executable: Path | None = None,
    cwd: Path | None = None,
    name: str = "vidrank",
    wait: bool = True,
) -> Server:
    """``vidrank serve`` of ``registry`` on a free loopback port (see ``Server``)."""
    port = port or free_port()
    cmd = serve_cmd(registry, port, workers, executable)
    return Server(name, cmd, port, log_path, env, cwd, wait=wait)


# -- nginx in front of loopback upstreams -------------------------------------------------------

NGINX_TEMPLATE = ROOT / "docker" / "nginx.loopback.conf.template"
NGINX_MISSING = (
    "nginx is not installed: .ci/run installs Debian's nginx-light; to run these tests locally, "
    "apt-get install nginx-light"
)


def find_nginx() -> str | None:
    """The nginx binary (PATH, then the usual sbin directories), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def upstream_servers(
    ports: Iterable[int], params: str = "max_fails=1 fail_timeout=2s"
) -> list[str]:
    """``server`` lines of the upstream block for replicas on loopback ``ports``."""
    return [f"server {HOST}:{p} {params};" for p in ports]


def render_nginx(prefix: Path, listen: str, upstreams: list[str]) -> str:
    """The loopback template with its runtime paths under ``prefix``, filled in."""
    text = NGINX_TEMPLATE.read_text()
    for key, value in (
        ("PREFIX", str(prefix)),
        ("LISTEN", listen),
        ("UPSTREAMS", "\n        ".join(upstreams)),
    ):
        text = text.replace("{{" + key + "}}", value)
    return text


def write_nginx_conf(prefix: Path, listen: str, upstreams: list[str]) -> Path:
    """``render_nginx`` written to ``prefix/nginx.conf``."""
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx(prefix, listen, upstreams))
    return conf


def nginx_cmd(nginx: str, prefix: Path, *extra: str) -> list[str]:
    """nginx on ``prefix/nginx.conf`` with its error log under ``prefix`` (``extra``: e.g. -t)."""
    conf = prefix / "nginx.conf"
    return [nginx, *extra, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]


def start_nginx(nginx: str, prefix: Path, listen_port: int, upstreams: list[str]) -> Proc:
    """nginx (``daemon off``) on HOST:``listen_port``, returned once it accepts connections."""
    write_nginx_conf(prefix, f"{HOST}:{listen_port}", upstreams)
    proc = Proc("nginx", nginx_cmd(nginx, prefix), prefix / "stdout.log")
    try:
        wait_until(lambda: listening(listen_port), 10.0, "nginx listening", proc)
    except Exception as e:
        proc.stop()
        log = prefix / "error.log"
        raise RuntimeError(f"nginx did not start: {log.read_text() if log.exists() else ''}") from e
    return proc


# -- redis-server -------------------------------------------------------------------------------

REDIS_MISSING = (
    "redis-server is not installed: .ci/run installs Debian's redis-server; to run these tests "
    "locally, apt-get install redis-server"
)


def find_redis_server() -> str | None:
    """The redis-server binary (PATH, then /usr/bin and /usr/local/bin), or None."""
    return shutil.which("redis-server") or next(
        (
            p
            for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
            if os.access(p, os.X_OK)
        ),
        None,
    )


def resp(*args: str | bytes) -> bytes:
    """A command in the Redis protocol (RESP arrays of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        data = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class RedisServer(Proc):
    """``redis-server`` on HOST:``port`` (free if None), files in ``directory``; ready on return.

    No automatic snapshots (``save ""``): ``command("SAVE")`` writes ``dump.rdb``, which a server
    started again on the same directory loads. Lazy freeing of expired keys, as a feature store
    with large snapshot hashes should run.
    """

    def __init__(self, directory: Path, port: int | None = None, name: str = "redis") -> None:
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError(REDIS_MISSING)
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.directory = directory
        cmd = [
            binary, "--port", str(self.port), "--bind", HOST, "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--lazyfree-lazy-expire", "yes", "--lazyfree-lazy-user-del", "yes",
        ]  # fmt: skip
        log = directory / f"{name}-{self.port}.log"
        super().__init__(name, cmd, log)
        try:
            wait_until(lambda: self.command("PING") == b"+PONG\r\n", 10.0, f"{name} ready", self)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def command(self, *args: str | bytes, timeout: float = 5.0) -> bytes:
        """Send one command on a fresh connection; the raw reply (first read)."""
        with socket.create_connection((HOST, self.port), timeout=timeout) as s:
            s.sendall(resp(*args))
            return s.recv(1 << 16)

    def restart(self) -> RedisServer:
        """A new server on the same port and directory (it loads ``dump.rdb`` if there is one)."""
        return RedisServer(self.directory, self.port, self.name)


# -- /rank bodies -------------------------------------------------------------------------------


def candidate(rng: random.Random, video_id: Any) -> dict[str, Any]:
    """A candidate with every item feature of the default schema, realistic values."""
    return {
        "video_id": video_id,
        "features": {
            "author_id": rng.randrange(5000),
            "video_type": rng.choice(["NORMAL", "NORMAL", "AD"]),
            "music_id": rng.randrange(3000),
            "tag": ",".join(str(rng.randrange(60)) for _ in range(rng.randrange(1, 4))),
            "duration_s": round(rng.uniform(5, 600), 3),
            "upload_age_days": rng.randrange(400),
        },
    }


def rank_body(n: int, user_id: Any = 42, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """A realistic /rank request with ``n`` distinct candidates (``extra``: more top-level keys)."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 10_000_000), n)  # distinct: duplicates are a 422
    body: dict[str, Any] = {
        "user": {
            "user_id": user_id,
            "features": {
                "user_active_degree": "high_active",
                "is_video_author": 0,
                "follow_user_num": 21,
                "fans_user_num": 8,
                "register_days": 594,
            },
        },
        "context": {"hour": 20, "day_of_week": 3, "tab": 1},
        "candidates": [candidate(rng, v) for v in ids],
    }
    body.update(extra)
    return body


def to_columnar(body: dict[str, Any]) -> dict[str, Any]:
    """The same request with columnar candidates (None where a row lacks a feature)."""
    cands = body["candidates"]
    names: list[str] = []
    for c in cands:
        for k in c.get("features") or {}:
            if k not in names:
                names.append(k)
    columns = {
        "video_id": [c["video_id"] for c in cands],
        "features": {k: [(c.get("features") or {}).get(k) for c in cands] for k in names},
    }
    return {**body, "candidates": columns}
