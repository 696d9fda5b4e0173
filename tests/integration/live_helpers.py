"""A real ``vidrank serve`` subprocess on 127.0.0.1, and request builders for talking to it."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

VIDRANK = Path(sys.executable).with_name("vidrank")
ADMIN_TOKEN = "integration-token"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """``vidrank serve`` in a subprocess; logs go to a file (never a pipe that could fill)."""

    def __init__(
        self,
        registry: Path,
        log_path: Path,
        *,
        workers: int = 1,
        env: dict[str, str] | None = None,
        python_path: Path | None = None,
        executable: Path = VIDRANK,
        cwd: Path | None = None,
        test_defaults: bool = True,
    ) -> None:
        self.registry = registry
        self.executable = executable
        self.cwd = cwd
        self.log_path = log_path
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        defaults = {
            "VIDRANK_ADMIN_TOKEN": ADMIN_TOKEN,
            "VIDRANK_POLL_INTERVAL_S": "0.5",
            "VIDRANK_ORT_INTRA_OP_THREADS": "1",
            "VIDRANK_LOG_LEVEL": "info",
        }
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("VIDRANK_")}
        self.env = {
            **(os.environ if test_defaults else inherited),
            **(defaults if test_defaults else {}),
            **(env or {}),
        }
        if python_path is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(python_path), self.env.get("PYTHONPATH")) if p
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> None:
        cmd = [str(self.executable), "serve", "--registry", str(self.registry)]
        cmd += ["--port", str(self.port)]
        cmd += ["--host", "127.0.0.1", "--workers", str(self.workers)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=self.cwd, stdout=self._log, stderr=self._log
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.logs()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def rank_body(n: int, user_id: Any = 42, seed: int = 0) -> dict[str, Any]:
    """A /rank request with ``n`` distinct candidates carrying the default schema's features."""
    rng = random.Random(seed)
    return {
        "user": {"user_id": user_id, "features": {"fans_user_num": 8, "register_days": 300}},
        "context": {"hour": 21, "tab": 2},
        "candidates": [
            {
                "video_id": v,
                "features": {
                    "author_id": rng.randrange(5000),
                    "music_id": rng.randrange(3000),
                    "tag": f"{rng.randrange(60)},{rng.randrange(60)}",
                    "duration_s": round(rng.uniform(5, 600), 2),
                    "upload_age_days": rng.randrange(400),
                },
            }
            for v in rng.sample(range(1, 10_000_000), n)
        ],
    }
