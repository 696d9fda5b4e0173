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

Processes, ports, nginx and request bodies come from ``benchmarks.harness``, as in the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import random
import signal
import subprocess
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

from benchmarks.harness import (
    HOST,
    Processes,
    Server,
    child_env,
    find_nginx,
    free_ports,
    http_json,
    rank_body,
    start_nginx,
    start_vidrank,
    upstream_servers,
    vidrank_cmd,
)
from model.core.registry import Registry

SECOND_SUFFIX = "-next"
# Generous, not a performance target: a replica notices the change at its next poll, then loads,
# verifies and warms the bundle, on a machine that is also serving the traffic.
CONVERGE_MARGIN_S = 2.0
PHASES = ("baseline", "activate", "kill", "rollback")
BASELINE_REQUESTS = 20  # the baseline phase lasts until this much traffic has completed


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


@dataclass
class Replica:
    name: str
    server: Server

    @property
    def port(self) -> int:
        return self.server.port

    def served_version(self) -> str | None:
        """The production version /readyz reports (None when not ready)."""
        status, body = http_json(self.port, "GET", "/readyz", timeout=1.0)
        return body.get("model_version") if status == 200 and isinstance(body, dict) else None


def start_replicas(cfg: RolloutConfig, ports: list[int], procs: Processes) -> list[Replica]:
    """Start one ``vidrank serve`` per port (all at once), then wait until all are ready."""
    env = child_env(
        {
            "VIDRANK_POLL_INTERVAL_S": str(cfg.poll_interval_s),
            "VIDRANK_ORT_INTRA_OP_THREADS": "1",
            "VIDRANK_LOG_LEVEL": "warning",
        }
    )
    replicas = []
    for i, port in enumerate(ports):
        name = f"r{i}"
        log = cfg.workdir / f"{name}.log"
        server = start_vidrank(cfg.registry, log, port=port, env=env, name=name, wait=False)
        replicas.append(Replica(name, procs.add(server)))
    for r in replicas:
        r.server.wait_ready(cfg.start_timeout_s)
    return replicas


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
    cmd = vidrank_cmd("models", *args, "--registry", str(registry))
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
                user, seed = rng.randrange(100_000), rng.randrange(1 << 30)
                body = rank_body(self.cfg.candidates, user_id=user, seed=seed)
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

    def wait_completed(self, count: int, timeout_s: float) -> None:
        """Wait until ``count`` requests have completed (a loaded machine starts slowly)."""
        deadline = time.monotonic() + timeout_s
        while len(self.snapshot()) < count and time.monotonic() < deadline:
            time.sleep(0.05)


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
                with contextlib.suppress(OSError, http.client.HTTPException):
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
        procs.add(start_nginx(nginx, cfg.workdir / "nginx", listen, upstream_servers(ports)))
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
    traffic.wait_completed(BASELINE_REQUESTS, cfg.converge_timeout_s)

    phases.append(_Phase(PhaseReport(PHASES[1], second), time.monotonic()))
    _converge(cfg, phases[-1], replicas, ("activate", second))
    log(f"activate {second}: all replicas serve it after {phases[-1].report.max_converge_s:.2f}s")
    time.sleep(cfg.settle_s)

    victim, survivors = replicas[0], replicas[1:]
    phases.append(_Phase(PhaseReport(PHASES[2], second), time.monotonic()))
    victim.server.signal_group(signal.SIGKILL)
    log(f"SIGKILL {victim.name} (pid {victim.server.pid}, port {victim.port})")
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
    cmd = vidrank_cmd("train", "--registry", str(registry), "--small")
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
