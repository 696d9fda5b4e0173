"""Multi-replica rollout on loopback: real `vidrank serve` replicas behind real nginx.

``python -m benchmarks.rollout`` trains a small model into a temporary registry (or uses
``--registry R``, whose production version is the starting point), publishes the same bundle
under a second version name, starts N replicas (``vidrank serve``, VIDRANK_POLL_INTERVAL_S=0.5)
on free 127.0.0.1 ports, renders docker/nginx.loopback.conf.template into a temporary prefix,
starts nginx in front of them, and sends continuous /rank traffic through nginx from a few client
threads while it:

1. activates the second version with ``vidrank models activate`` - every replica must serve it
   within the poll interval (plus load and warm-up), with no failed request;
2. SIGKILLs one replica - nginx routes around it (``/rank`` is retried on another replica,
   ``proxy_next_upstream ... non_idempotent``); failed requests are counted;
3. rolls back with ``vidrank models rollback`` - the surviving replicas converge again.

It prints a report (requests and failures per phase, time to converge per replica, the requests
nginx retried) and exits non-zero when a check fails. ``tests/deploy/test_rollout.py`` drives
the same code. Everything stays on loopback; traffic is bounded in rate, count and time; every
process started here runs in its own process group and is stopped on the way out, failure or not.

This module is self-contained (standard library, httpx and ``model.core.registry``) so the test can
load it by path.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from model.core.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
NGINX_TEMPLATE = ROOT / "docker" / "nginx.loopback.conf.template"
HOST = "127.0.0.1"
SECOND_SUFFIX = "-next"
# Generous, not a performance target: a replica notices the change at its next poll, then loads,
# verifies and warms the bundle, on a machine that is also serving the traffic.
CONVERGE_MARGIN_S = 2.0
PHASES = ("baseline", "activate", "kill", "rollback")


# -- configuration and report ------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutConfig:
    """What to run and for how long (the defaults take about 10 s once the replicas are up)."""

    registry: Path
    workdir: Path
    replicas: int = 3
    poll_interval_s: float = 0.5
    clients: int = 4
    rate_per_s: float = 120.0  # all client threads together
    max_requests: int = 20_000  # hard cap on requests sent
    candidates: int = 20
    baseline_s: float = 1.0
    settle_s: float = 1.0  # traffic kept flowing after a convergence
    after_kill_s: float = 3.0  # longer than nginx's fail_timeout (2s): the dead peer is re-tried
    start_timeout_s: float = 60.0
    converge_timeout_s: float = 15.0
    deadline_s: float = 120.0  # the whole run, traffic included

    @property
    def converge_bound_s(self) -> float:
        return self.poll_interval_s + CONVERGE_MARGIN_S


@dataclass
class PhaseReport:
    """Traffic that completed during one phase, and the convergence it waited for."""

    name: str
    target_version: str
    requests: int = 0
    failures: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    converge_s: dict[str, float] = field(default_factory=dict)  # replica -> seconds
    stale_after_converge: int = 0  # responses of another version once all had converged

    @property
    def max_converge_s(self) -> float | None:
        return max(self.converge_s.values()) if self.converge_s else None


@dataclass
class RolloutReport:
    """Everything ``run_rollout`` measured."""

    replicas: int
    poll_interval_s: float
    converge_bound_s: float
    phases: list[PhaseReport]
    killed: str
    nginx_retried: int  # /rank requests nginx sent to more than one replica
    errors: list[str]  # a sample of failure descriptions
    duration_s: float
    ports: dict[str, int]  # replica name (and "nginx") -> 127.0.0.1 port

    @property
    def requests(self) -> int:
        return sum(p.requests for p in self.phases)

    @property
    def failures(self) -> int:
        return sum(p.failures for p in self.phases)

    def phase(self, name: str) -> PhaseReport:
        return next(p for p in self.phases if p.name == name)

    def problems(self) -> list[str]:
        """The checks that failed (empty when the rollout behaved)."""
        out = []
        for p in self.phases:
            if p.failures:
                out.append(f"{p.name}: {p.failures} failed request(s)")
            if p.requests == 0:
                out.append(f"{p.name}: no traffic completed")
            worst = p.max_converge_s
            if worst is not None and worst > self.converge_bound_s:
                out.append(f"{p.name}: converged in {worst:.2f}s > {self.converge_bound_s:.2f}s")
            if p.stale_after_converge:
                out.append(f"{p.name}: {p.stale_after_converge} stale response(s) after converging")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "requests": self.requests, "failures": self.failures}

    def to_text(self) -> str:
        lines = [
            f"rollout on loopback: {self.replicas} replicas behind nginx, poll interval "
            f"{self.poll_interval_s}s (converge bound {self.converge_bound_s:.1f}s)",
            f"{'phase':10s} {'version':16s} {'requests':>8s} {'failed':>6s}  "
            "converge (s from the aliases.json write)",
        ]
        for p in self.phases:
            conv = " ".join(f"{r}={s:.2f}" for r, s in p.converge_s.items()) or "-"
            lines.append(
                f"{p.name:10s} {p.target_version:16s} {p.requests:8d} {p.failures:6d}  {conv}"
            )
            served = ", ".join(f"{v}: {n}" for v, n in sorted(p.versions.items()))
            lines.append(f"{'':10s} responses by model_version: {served or '-'}")
        lines += [
            f"total: {self.requests} requests, {self.failures} failed, {self.duration_s:.1f}s; "
            f"killed {self.killed}; nginx retried {self.nginx_retried} /rank request(s)",
        ]
        lines += [f"  error: {e}" for e in self.errors]
        problems = self.problems()
        lines.append("result: " + ("OK" if not problems else "FAILED: " + "; ".join(problems)))
        return "\n".join(lines)


# -- processes ---------------------------------------------------------------------------------


NGINX_MISSING = (
    "nginx is not installed: .ci/run installs Debian's nginx-light; to run these tests locally, "
    "apt-get install nginx-light"
)


def find_nginx() -> str | None:
    """The nginx binary (PATH, then the usual sbin directories), or None."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def vidrank_cmd() -> list[str]:
    """How to run the ``vidrank`` CLI of this interpreter's environment."""
    script = Path(sys.executable).with_name("vidrank")
    return [str(script)] if script.exists() else [sys.executable, "-m", "model.cli"]


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class Proc:
    """A child process in its own process group (so stopping it reaches its children too)."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict[str, str]) -> None:
        self.name, self.log = name, log
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)  # group id = pid (start_new_session)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the group, wait, then SIGKILL whatever is left of it."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_s)
        self.signal_group(signal.SIGKILL)  # stragglers (e.g. nginx workers), even if leader died
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class Processes:
    """Every process a run started, stopped in reverse order by ``stop_all`` (context exit)."""

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def start(self, name: str, cmd: list[str], log: Path, env: dict[str, str]) -> Proc:
        proc = Proc(name, cmd, log, env)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def http_get_json(port: int, path: str, timeout: float = 2.0) -> tuple[int, Any]:
    """(status, JSON body) of a GET to 127.0.0.1:port; raises httpx errors."""
    r = httpx.get(f"http://{HOST}:{port}{path}", timeout=timeout, trust_env=False)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


def wait_until(check: Any, timeout_s: float, what: str, proc: Proc | None = None) -> None:
    """Call ``check()`` until it returns True; raise TimeoutError (with a log tail) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        with contextlib.suppress(httpx.HTTPError, OSError):
            if check():
                return
        time.sleep(0.05)
    tail = f":\n{proc.tail()}" if proc is not None else ""
    raise TimeoutError(f"{what} not within {timeout_s}s{tail}")


@dataclass
class Replica:
    name: str
    port: int
    proc: Proc

    def served_version(self) -> str | None:
        """The production version /readyz reports (None when not ready)."""
        status, body = http_get_json(self.port, "/readyz", timeout=1.0)
        return body.get("model_version") if status == 200 and isinstance(body, dict) else None


def start_replicas(cfg: RolloutConfig, ports: list[int], procs: Processes) -> list[Replica]:
    """Start one ``vidrank serve`` per port (all at once); the caller waits for readiness."""
    env = dict(
        os.environ,
        VIDRANK_POLL_INTERVAL_S=str(cfg.poll_interval_s),
        VIDRANK_ORT_INTRA_OP_THREADS="1",
        VIDRANK_WORKERS="1",
        VIDRANK_LOG_LEVEL="warning",
    )
    replicas = []
    for i, port in enumerate(ports):
        cmd = [*vidrank_cmd(), "serve", "--registry", str(cfg.registry)]
        cmd += ["--host", HOST, "--port", str(port)]
        name = f"r{i}"
        replicas.append(
            Replica(name, port, procs.start(name, cmd, cfg.workdir / f"{name}.log", env))
        )
    return replicas


def wait_ready(replicas: list[Replica], timeout_s: float) -> None:
    for r in replicas:
        wait_until(lambda r=r: r.served_version() is not None, timeout_s, f"{r.name} ready", r.proc)


def render_nginx(prefix: Path, listen_port: int, upstream_ports: list[int]) -> Path:
    """Write the loopback template, filled in, to ``prefix/nginx.conf``."""
    servers = [f"server {HOST}:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports]
    text = NGINX_TEMPLATE.read_text()
    for key, value in (
        ("PREFIX", str(prefix)),
        ("LISTEN", f"{HOST}:{listen_port}"),
        ("UPSTREAMS", "\n        ".join(servers)),
    ):
        text = text.replace("{{" + key + "}}", value)
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return conf


def start_nginx(
    nginx: str, prefix: Path, listen_port: int, upstream_ports: list[int], procs: Processes
) -> Proc:
    """Start nginx (foreground, ``daemon off``) and wait until it accepts connections."""
    conf = render_nginx(prefix, listen_port, upstream_ports)
    cmd = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
    proc = procs.start("nginx", cmd, prefix / "stdout.log", dict(os.environ))

    def listening() -> bool:
        socket.create_connection((HOST, listen_port), timeout=0.2).close()
        return True

    try:
        wait_until(listening, 10.0, "nginx listening", proc)
    except Exception as e:
        proc.stop()
        log = prefix / "error.log"
        raise RuntimeError(f"nginx did not start: {log.read_text() if log.exists() else ''}") from e
    return proc


def nginx_retried(access_log: Path) -> int:
    """/rank requests whose $upstream_addr lists more than one replica (nginx retried them)."""
    retried = 0
    with contextlib.suppress(OSError):
        for line in access_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("uri") == "/rank" and "," in str(entry.get("upstream_addr", "")):
                    retried += 1
    return retried


# -- registry operations through the CLI -------------------------------------------------------


def models_cli(registry: Path, *args: str) -> datetime:
    """Run ``vidrank models ARGS --registry R``; returns the new aliases' ``updated_at``."""
    cmd = [*vidrank_cmd(), "models", *args, "--registry", str(registry)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    aliases = json.loads(done.stdout)
    return datetime.fromisoformat(aliases["updated_at"].replace("Z", "+00:00"))


def publish_second(registry: Path, version: str) -> str:
    """Publish ``version``'s bundle again under a new name (same weights, new version)."""
    reg = Registry(registry)
    name = version + SECOND_SUFFIX
    if not reg.has(name):
        reg.publish(reg.version_dir(version), version=name)
    return name


# -- traffic -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One /rank request through nginx."""

    end: float  # time.monotonic() when it completed
    status: int  # HTTP status; 0 when no response arrived
    version: str | None
    error: str | None


def rank_body(rng: random.Random, n: int) -> dict[str, Any]:
    """A /rank request for one user with ``n`` candidates (default-schema feature names)."""
    return {
        "user": {
            "user_id": rng.randrange(100_000),
            "features": {
                "user_active_degree": rng.choice(["high_active", "full_active", "middle_active"]),
                "is_video_author": rng.randrange(2),
                "follow_user_num": rng.randrange(500),
                "fans_user_num": rng.randrange(500),
                "register_days": rng.randrange(2000),
            },
        },
        "context": {"hour": rng.randrange(24), "day_of_week": rng.randrange(7), "tab": 1},
        "candidates": [
            {
                "video_id": video_id,
                "features": {
                    "author_id": rng.randrange(5000),
                    "video_type": rng.choice(["NORMAL", "AD"]),
                    "music_id": rng.randrange(3000),
                    "tag": f"{rng.randrange(60)},{rng.randrange(60)}",
                    "duration_s": round(rng.uniform(5, 600), 1),
                    "upload_age_days": rng.randrange(400),
                },
            }
            for video_id in rng.sample(range(10_000_000), n)  # distinct: duplicates are a 422
        ],
    }


class Traffic:
    """Client threads sending /rank through nginx at a bounded rate until stopped."""

    def __init__(self, port: int, cfg: RolloutConfig) -> None:
        self.port, self.cfg = port, cfg
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sent = 0
        self._deadline = time.monotonic() + cfg.deadline_s
        self._threads = [
            threading.Thread(
                target=self._client, args=(i,), name=f"rollout-client-{i}", daemon=True
            )
            for i in range(cfg.clients)
        ]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _take_ticket(self) -> bool:
        with self._lock:
            if self._sent >= self.cfg.max_requests or time.monotonic() > self._deadline:
                return False
            self._sent += 1
            return True

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        period = self.cfg.clients / self.cfg.rate_per_s
        url = f"http://{HOST}:{self.port}/rank"
        with httpx.Client(timeout=15.0, trust_env=False) as client:  # one keep-alive connection
            next_at = time.monotonic()
            while not self._stop.is_set() and self._take_ticket():
                body = rank_body(rng, self.cfg.candidates)
                outcome = self._send(client, url, body)
                with self._lock:
                    self.outcomes.append(outcome)
                next_at = max(next_at + period, time.monotonic())
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    @staticmethod
    def _send(client: httpx.Client, url: str, body: dict[str, Any]) -> Outcome:
        try:
            r = client.post(url, json=body)
        except httpx.HTTPError as e:
            return Outcome(time.monotonic(), 0, None, f"{type(e).__name__}: {e}")
        end = time.monotonic()
        if r.status_code != 200:
            return Outcome(end, r.status_code, None, f"HTTP {r.status_code}: {r.text[:200]}")
        version = r.json().get("model_version")
        return Outcome(end, 200, version, None)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


# -- the rollout -------------------------------------------------------------------------------


def wait_converged(
    replicas: list[Replica], version: str, since: datetime, timeout_s: float
) -> tuple[dict[str, float], float]:
    """Poll every replica's /readyz until all serve ``version``.

    Returns (seconds from ``since`` - the aliases' ``updated_at`` - until each replica was first
    seen serving it, the monotonic time at which the last one was).
    """
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(replicas):
        if time.monotonic() > deadline:
            missing = [r.name for r in replicas if r.name not in seen]
            raise TimeoutError(f"{missing} did not serve {version} within {timeout_s}s")
        for r in replicas:
            if r.name not in seen:
                with contextlib.suppress(httpx.HTTPError):
                    if r.served_version() == version:
                        seen[r.name] = max(0.0, time.time() - since.timestamp())
        time.sleep(0.02)
    return dict(sorted(seen.items())), time.monotonic()


@dataclass
class _Phase:
    report: PhaseReport
    start: float
    converged_at: float | None = None
    old_version: str | None = None


def _tally(phases: list[_Phase], outcomes: list[Outcome], end: float, grace_s: float) -> list[str]:
    """Attribute outcomes to phases by completion time; returns sample error messages."""
    bounds = [p.start for p in phases[1:]] + [end]
    errors: list[str] = []
    for phase, stop in zip(phases, bounds, strict=True):
        rep = phase.report
        mine = [o for o in outcomes if phase.start <= o.end < stop]
        rep.requests = len(mine)
        rep.failures = sum(1 for o in mine if o.status != 200)
        rep.versions = dict(Counter(o.version for o in mine if o.version is not None))
        if phase.converged_at is not None:
            after = phase.converged_at + grace_s
            rep.stale_after_converge = sum(
                1 for o in mine if o.end > after and o.version not in (None, rep.target_version)
            )
        errors += [f"{rep.name}: {o.error}" for o in mine if o.error][:5]
    return errors


def run_rollout(cfg: RolloutConfig, log: Any = print) -> RolloutReport:
    """Run the three phases against ``cfg.registry`` (its production is the first version)."""
    nginx = find_nginx()
    if nginx is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    first = Registry(cfg.registry).read_aliases().production
    if first is None:
        raise RuntimeError(f"registry {cfg.registry} has no production version")
    second = publish_second(cfg.registry, first)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    *ports, listen = free_ports(cfg.replicas + 1)
    started = time.monotonic()
    with Processes() as procs:  # on the way out, failure or not: nginx, then the replicas
        replicas = start_replicas(cfg, ports, procs)
        wait_ready(replicas, cfg.start_timeout_s)
        start_nginx(nginx, cfg.workdir / "nginx", listen, ports, procs)
        log(f"{len(replicas)} replicas ready on {ports}; nginx on {listen}; serving {first}")
        with Traffic(listen, cfg) as traffic:
            phases, killed = _phases(cfg, replicas, traffic, first, second, log)
            end = time.monotonic()
    errors = _tally(phases, traffic.snapshot(), end, grace_s=1.0)
    return RolloutReport(
        replicas=cfg.replicas,
        poll_interval_s=cfg.poll_interval_s,
        converge_bound_s=cfg.converge_bound_s,
        phases=[p.report for p in phases],
        killed=killed,
        nginx_retried=nginx_retried(cfg.workdir / "nginx" / "access.log"),
        errors=errors[:10],
        duration_s=round(time.monotonic() - started, 2),
        ports={**{r.name: r.port for r in replicas}, "nginx": listen},
    )


def _phases(
    cfg: RolloutConfig,
    replicas: list[Replica],
    traffic: Traffic,
    first: str,
    second: str,
    log: Any,
) -> tuple[list[_Phase], str]:
    """Baseline, activate, kill, rollback - while ``traffic`` flows."""
    phases = [_Phase(PhaseReport(PHASES[0], first), time.monotonic())]
    time.sleep(cfg.baseline_s)

    phases.append(_Phase(PhaseReport(PHASES[1], second), time.monotonic()))
    _converge(cfg, phases[-1], replicas, ("activate", second))
    log(f"activate {second}: all replicas serve it after {phases[-1].report.max_converge_s:.2f}s")
    time.sleep(cfg.settle_s)

    victim, survivors = replicas[0], replicas[1:]
    phases.append(_Phase(PhaseReport(PHASES[2], second), time.monotonic()))
    victim.proc.signal_group(signal.SIGKILL)
    log(f"SIGKILL {victim.name} (pid {victim.proc.pid}, port {victim.port})")
    time.sleep(cfg.after_kill_s)

    phases.append(_Phase(PhaseReport(PHASES[3], first), time.monotonic()))
    _converge(cfg, phases[-1], survivors, ("rollback",))
    log(f"rollback to {first}: survivors serve it after {phases[-1].report.max_converge_s:.2f}s")
    time.sleep(cfg.settle_s)
    return phases, victim.name


def _converge(
    cfg: RolloutConfig, phase: _Phase, replicas: list[Replica], command: tuple[str, ...]
) -> None:
    """Run ``vidrank models COMMAND`` and wait until ``replicas`` serve the phase's target."""
    updated = models_cli(cfg.registry, *command)
    target = phase.report.target_version
    conv, phase.converged_at = wait_converged(replicas, target, updated, cfg.converge_timeout_s)
    phase.report.converge_s = conv


# -- command line ------------------------------------------------------------------------------


def train_small(registry: Path, impressions: int) -> None:
    """``vidrank train --small --simulate N``: the first version of a fresh registry."""
    cmd = [*vidrank_cmd(), "train", "--registry", str(registry), "--small"]
    cmd += ["--simulate", str(impressions), "--epochs", "1", "--version", "v1", "--activate"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)


@contextlib.contextmanager
def _workspace(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="vidrank-rollout-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rollout", description=__doc__)
    parser.add_argument(
        "--registry",
        type=Path,
        help="Use this registry: its production is the first version; a second is published "
        "next to it and the run ends with the first back in production (default: train one).",
    )
    parser.add_argument("--impressions", type=int, default=20_000, help="Simulated, to train.")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=120.0, help="Requests/s, all clients.")
    parser.add_argument("--workdir", type=Path, help="Keep logs here (default: a temp dir).")
    parser.add_argument("--json", type=Path, help="Also write the report as JSON.")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be >= 2 (one is killed)")
    with _workspace(args.workdir) as work:
        registry = args.registry
        if registry is None:
            registry = work / "registry"
            print(f"training a small model ({args.impressions} simulated impressions)...")
            train_small(registry, args.impressions)
        cfg = RolloutConfig(
            registry=registry,
            workdir=work / "run",
            replicas=args.replicas,
            poll_interval_s=args.poll_interval,
            clients=args.clients,
            rate_per_s=args.rate,
        )
        report = run_rollout(cfg)
    print(report.to_text())
    if args.json:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 1 if report.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
