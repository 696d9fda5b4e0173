"""``vidrank serve``: run the app under uvicorn, in one process or one process per core.

Why not ``uvicorn --workers``: uvicorn 0.54 binds that shared socket without ``IPPROTO_TCP``, so
asyncio never sets TCP_NODELAY on accepted connections and Nagle + delayed ACK add ~45 ms to every
keep-alive request (uvicorn #3149); and with one shared accept queue the kernel may hand all of a
client's connections to one worker. Instead, each worker binds its own ``SO_REUSEPORT`` socket
(the kernel spreads connections over them by 4-tuple hash) with TCP_NODELAY set on the listener,
which Linux copies onto every accepted connection.

The supervisor (workers > 1) spawns fresh interpreters (no fork of a process with threads),
points prometheus-client at a shared multiprocess directory so /metrics aggregates the workers,
restarts a worker that dies, and on SIGTERM/SIGINT forwards SIGTERM to the workers, waits for
them to drain and exits 0. Workers never outlive it: the kernel sends them SIGTERM when it dies
(``PR_SET_PDEATHSIG``), a watchdog thread checks the parent pid as a fallback, and the last
worker to go removes the metrics directory it leaves behind.

Each worker's connections are bounded by ``service/http/protocol.py`` (connection cap, header and
body deadlines). With ``metrics_port`` set, /metrics is served on that port only - by the supervisor
(aggregating its workers) or, with one worker, by the server process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from service.errors import error_body
from service.logging import configure_logging, log_fields
from service.scoring.heap import MMAP_THRESHOLD, TRIM_THRESHOLD, pin_thresholds
from service.settings import Settings

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_CHECK_S = 1.0  # how often the watchdog compares the parent pid (fallback to the prctl)
log = logging.getLogger("vidrank.server")

BACKLOG = 2048
KEEP_ALIVE_S = 75  # idle keep-alive: above common LB/nginx idle timeouts, so they close first
GRACEFUL_TIMEOUT_S = 25  # in-flight requests get this long after SIGTERM (k8s default is 30 s)
CRASH_WINDOW_S = 10.0  # a worker that dies this soon after starting, MAX_FAST_CRASHES times in a
MAX_FAST_CRASHES = 3  # row, is crash-looping (port taken, broken install): give up
# Objects survive far longer than a request here; a larger first generation means fewer
# collections per request (a 500-candidate body allocates thousands of short-lived objects).
GC_THRESHOLD = (50_000, 20, 100)
FD_HEADROOM = 256  # descriptors beyond the connection cap: bundles, snapshots, logs, sockets


def bind_socket(host: str, port: int, *, reuse_port: bool, listen: bool = True) -> socket.socket:
    """A TCP listening socket with TCP_NODELAY (inherited by accepted connections on Linux)."""
    family, _, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE
    )[0]
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on accepted sockets whose proto is TCP.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(addr)
        if listen:
            sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _tune_gc() -> None:
    """Move start-up objects out of the collector's reach and collect young objects less often.

    gc.freeze() keeps the full collections that still happen from walking every module, numpy
    and pydantic object the service loaded (the 100 ms stalls seen in BentoML).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def raise_fd_limit(max_connections: int) -> int:
    """Raise this process's open-file limit towards its hard limit; returns the soft limit.

    A worker holds one descriptor per connection besides its own files: with a soft limit of
    1024 (a common default) the connection cap of 1024 could never be reached, and accept()
    would fail with EMFILE before the cap's oldest-idle rule could make room.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_HEADROOM
    if soft < wanted and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft < wanted:
        log_fields(
            log, logging.WARNING, "open-file limit below the connection cap",
            limit=soft, max_connections=max_connections,
        )  # fmt: skip
    return soft


def serve(settings: Settings, sock: socket.socket) -> None:
    """Run one uvicorn server for ``create_app(settings)`` on ``sock`` until SIGTERM/SIGINT."""
    from service.http.app import create_app

    raise_fd_limit(settings.max_connections)
    if pin_thresholds():  # before the first model loads: then a swap costs about one model
        log_fields(
            log, logging.INFO, "heap thresholds pinned",
            mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD,
        )  # fmt: skip
    else:
        log.warning("not glibc: heap thresholds not pinned; a model swap may hold more memory")
    app = create_app(settings)
    config, health = _configs(settings, app)
    # uvicorn re-raises the signal it shut down for once it is done; with a no-op handler in
    # place that ends the process normally (exit 0) after the drain instead of killing it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    _server(settings, sock, (config, health), app.state.admission).run(sockets=[sock])


def _configs(settings: Settings, app: Any) -> tuple[Any, Any]:
    """uvicorn's config of ``app`` on the main port, and of its probes on the health port (None
    without ``health_port``)."""
    import uvicorn

    from service.http.protocol import ConnectionLimits, guarded_protocol

    bounds = (settings.max_connections, settings.header_timeout_s, settings.body_timeout_s)
    common: dict[str, Any] = {
        "log_config": None,
        "access_log": False,
        "server_header": False,
        "timeout_keep_alive": KEEP_ALIVE_S,
    }
    config = uvicorn.Config(
        app,
        http=guarded_protocol(ConnectionLimits(*bounds, admission=app.state.admission)),
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S,
        **common,
    )
    if settings.health_port is None:
        return config, None
    # Probes on a listener that always accepts (and no admission: nothing there is /rank).
    health = uvicorn.Config(
        health_only(app), http=guarded_protocol(ConnectionLimits(*bounds)), lifespan="off", **common
    )
    health.load()
    return config, health


def _server(
    settings: Settings, sock: socket.socket, configs: tuple[Any, Any], admission: Any
) -> Any:
    """The uvicorn server of ``config``: its main port served by an ``Acceptor``, which accepts
    only while the worker has room for /rank work (service/http/accept.py)."""
    import uvicorn

    from service.http.accept import Acceptor

    config, health = configs

    class _Server(uvicorn.Server):
        def protocol_of(self, config: uvicorn.Config) -> Any:
            def make() -> Any:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=self.server_state, app_state=self.lifespan.state
                )

            return make

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup([])  # uvicorn makes no server of an empty list of sockets
            main = Acceptor(sock, self.protocol_of(self.config), admission, settings.accept_backlog)
            self.servers = [main]  # type: ignore[list-item]
            if health is not None:
                assert settings.health_port is not None
                probes = bind_socket(settings.host, settings.health_port, reuse_port=True)
                loop = asyncio.get_running_loop()
                self.servers.append(await loop.create_server(self.protocol_of(health), sock=probes))
            _tune_gc()
            host, port = sock.getsockname()[:2]
            log_fields(
                log, logging.INFO, "listening",
                host=host, port=port, health_port=settings.health_port, pid=os.getpid(),
            )  # fmt: skip

    return _Server(config)


def health_only(app: Any) -> Any:
    """``app`` for liveness and readiness only (``HEALTH_PATHS``); anything else is a 404."""
    from service.http.routes import HEALTH_PATHS

    not_found = error_body("not_found", "this port serves liveness and readiness only")

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in HEALTH_PATHS:
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(not_found)),
            ]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": not_found})
            return
        await app(scope, receive, send)

    return asgi


def _worker_main(settings: Settings, index: int, parent: int) -> None:
    """Entry point of a spawned worker process."""
    configure_logging(settings.log_level)
    exit_with_parent(parent, settings.metrics_multiproc_dir)
    # Bound but not listening: uvicorn listens once the model is loaded, so a (re)starting
    # worker never queues connections that the ready workers could have served.
    sock = bind_socket(settings.host, settings.port, reuse_port=True, listen=False)
    log_fields(log, logging.INFO, "worker starting", worker=index, pid=os.getpid())
    serve(settings, sock)


class Supervisor:
    """Runs ``settings.workers`` worker processes and keeps them running until told to stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, BaseProcess] = {}
        self.stopping = threading.Event()
        self.started_at: dict[int, float] = {}
        self.fast_crashes = 0

    def _spawn(self, index: int, settings: Settings) -> None:
        proc = self.ctx.Process(
            target=_worker_main, args=(settings, index, os.getpid()), name=f"vidrank-worker-{index}"
        )
        proc.start()
        self.procs[index] = proc
        self.started_at[index] = time.monotonic()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the exit code."""
        s = self.settings
        metrics_dir = Path(tempfile.mkdtemp(prefix="vidrank-metrics-"))
        # Must be in the environment before any worker imports prometheus_client.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        # Holding the port (bound, not listening, so it takes no connections) resolves port 0
        # and keeps the port ours while workers restart.
        holder = bind_socket(s.host, s.port, reuse_port=True, listen=False)
        port = holder.getsockname()[1]
        worker_settings = s.model_copy(update={"port": port, "metrics_multiproc_dir": metrics_dir})
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log_fields(log, logging.INFO, "supervisor starting", workers=s.workers, port=port)
        try:
            if s.metrics_port is not None:
                serve_metrics(s.host, s.metrics_port, metrics_dir)
            for i in range(s.workers):
                self._spawn(i, worker_settings)
            code = self._watch(worker_settings)
        finally:
            self._stop_all()
            holder.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
        log_fields(log, logging.INFO, "supervisor stopped", exit_code=code)
        return code

    def _watch(self, worker_settings: Settings) -> int:
        while not self.stopping.is_set():
            sentinels = [p.sentinel for p in self.procs.values()]
            multiprocessing.connection.wait(sentinels, timeout=0.2)
            for index, proc in list(self.procs.items()):
                if proc.is_alive() or self.stopping.is_set():
                    continue
                _mark_dead(proc.pid)
                lived = time.monotonic() - self.started_at[index]
                self.fast_crashes = self.fast_crashes + 1 if lived < CRASH_WINDOW_S else 0
                log_fields(
                    log, logging.ERROR, "worker died", worker=index, pid=proc.pid,
                    exit_code=proc.exitcode, lived_s=round(lived, 1),
                )  # fmt: skip
                if self.fast_crashes >= MAX_FAST_CRASHES:
                    log.error("workers keep crashing at start-up; stopping")
                    return 1
                self._spawn(index, worker_settings)
        return 0

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for them to drain, kill stragglers."""
        for proc in self.procs.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + GRACEFUL_TIMEOUT_S + 5
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                log_fields(log, logging.ERROR, "worker did not stop; killing", pid=proc.pid)
                proc.kill()
                proc.join(5)
            _mark_dead(proc.pid)


def exit_with_parent(parent: int, metrics_dir: Path | None) -> None:
    """Make this worker stop (SIGTERM: a graceful drain) when the supervisor ``parent`` dies.

    ``PR_SET_PDEATHSIG`` asks the kernel for the signal; it fires when the thread that spawned us
    exits, which for the supervisor is its main thread, i.e. the process. A daemon thread also
    compares ``getppid()`` every second (covers a parent that died before the prctl, and systems
    without it). On the way out the worker removes its metric files and, if it was the last, the
    metrics directory the dead supervisor can no longer clean up.
    """
    if metrics_dir is not None:
        import atexit

        atexit.register(_cleanup_metrics, metrics_dir, parent)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the watchdog alone
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        log_fields(log, logging.ERROR, "supervisor gone; stopping", pid=os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="vidrank-parent-watch", daemon=True).start()


def _cleanup_metrics(metrics_dir: Path, parent: int) -> None:
    """At a worker's exit, when its supervisor is gone: drop its metric files and those of
    workers that died without dropping theirs (killed, or gone before the supervisor), then the
    dir."""
    if os.getppid() == parent:
        return  # the supervisor lives and owns the directory (it restarts workers into it)
    own = os.getpid()
    for path in metrics_dir.glob("*.db"):  # prometheus-client's files: <kind>_<pid>.db
        pid = _file_pid(path)
        if pid == own or (pid is not None and not _alive(pid)):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        metrics_dir.rmdir()  # only succeeds once no live worker has files left


def _file_pid(path: Path) -> int | None:
    """The pid in a prometheus-client multiprocess file name (``histogram_123.db`` -> 123)."""
    tail = path.stem.rpartition("_")[2]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def serve_metrics(host: str, port: int, multiproc_dir: Path | None) -> None:
    """Serve /metrics on ``host:port`` from a daemon thread (prometheus-client's own server)."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server

    registry = REGISTRY
    if multiproc_dir is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(multiproc_dir))
    start_http_server(port, addr=host, registry=registry)
    log_fields(log, logging.INFO, "metrics listening", host=host, port=port)


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live-gauge files (prometheus-client multiprocess mode)."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def run_server(settings: Settings) -> None:
    """Serve ``settings`` until SIGTERM/SIGINT; exits the process non-zero on failure."""
    configure_logging(settings.log_level)
    safe: dict[str, Any] = settings.model_dump(exclude={"admin_token"})
    safe["admin_token_set"] = settings.admin_token is not None
    safe["feature_store"] = settings.feature_store_display()
    log_fields(log, logging.INFO, "starting", settings={k: str(v) for k, v in safe.items()})
    if settings.workers == 1:
        sock = bind_socket(settings.host, settings.port, reuse_port=False, listen=False)
        if settings.metrics_port is not None:
            serve_metrics(settings.host, settings.metrics_port, None)
        serve(settings, sock)
        return
    code = Supervisor(settings).run()
    if code:
        raise SystemExit(code)
