"""Fixtures that run real ``vidrank serve`` processes on loopback (``benchmarks.harness``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from benchmarks.harness import ADMIN_TOKEN, Processes, Server, child_env, start_vidrank

NOBODY = 65534
# What every live test server runs with, unless a test overrides it.
LIVE_ENV = {
    "VIDRANK_ADMIN_TOKEN": ADMIN_TOKEN,
    "VIDRANK_POLL_INTERVAL_S": "0.5",
    "VIDRANK_ORT_INTRA_OP_THREADS": "1",
    "VIDRANK_LOG_LEVEL": "info",
    # No default deadline: on a busy 2-core machine a big test body can take a second to arrive;
    # the tests of deadlines set their own.
    "VIDRANK_REQUEST_TIMEOUT_MS": "0",
}


@pytest.fixture
def live_registry(registry_copy: Path, tiny_bundle: tuple[Path, str]) -> Path:
    """A private copy of the tiny registry, with the same bundle also published as ``v2``."""
    from model.core.registry import Registry

    Registry(registry_copy).publish(registry_copy / "versions" / tiny_bundle[1], version="v2")
    return registry_copy


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Factory of ready servers (logs in ``tmp_path``); any still running at teardown are stopped.

    ``env`` adds to LIVE_ENV; ``python_path`` goes first on the server's PYTHONPATH.
    """
    with Processes() as procs:

        def start(
            registry: Path,
            *,
            workers: int = 1,
            env: Mapping[str, str] | None = None,
            python_path: Path | None = None,
        ) -> Server:
            log = tmp_path / f"server-{len(procs.started)}.log"
            full_env = child_env({**LIVE_ENV, **(env or {})}, python_path=python_path)
            return procs.add(start_vidrank(registry, log, workers=workers, env=full_env))

        yield start


@contextlib.contextmanager
def unwritable_copy(registry: Path) -> Iterator[tuple[Path, list[str]]]:
    """A copy of ``registry`` that a process run with the yielded command prefix cannot write.

    As root (which ignores permissions) the prefix runs the process as ``nobody``.
    """
    base = Path(tempfile.mkdtemp(prefix="vidrank-ro-"))
    os.chmod(base, 0o755)
    copy = base / "registry"
    shutil.copytree(registry, copy)
    for path in [copy, *copy.rglob("*")]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to run the server unprivileged")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    try:
        yield copy, prefix
    finally:
        for path in [copy, *copy.rglob("*")]:
            with contextlib.suppress(OSError):
                os.chmod(path, 0o755)
        shutil.rmtree(base, ignore_errors=True)
