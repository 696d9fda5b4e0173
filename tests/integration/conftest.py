"""Fixtures that run real ``vidrank serve`` processes on loopback."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _load_helpers() -> None:
    """Register ``live_helpers`` for the test modules (the suite runs in importlib mode)."""
    if "live_helpers" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "live_helpers", Path(__file__).with_name("live_helpers.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["live_helpers"] = module
    spec.loader.exec_module(module)


_load_helpers()

from live_helpers import LiveServer  # noqa: E402


@pytest.fixture
def live_registry(tiny_bundle: tuple[Path, str], tmp_path: Path) -> Path:
    """A private copy of the tiny registry, with the same bundle also published as ``v2``."""
    from model.registry import Registry

    src, version = tiny_bundle
    dest = tmp_path / "registry"
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".lock", ".tmp-*"))
    Registry(dest).publish(dest / "versions" / version, version="v2")
    return dest


@pytest.fixture
def version(tiny_bundle: tuple[Path, str]) -> str:
    return tiny_bundle[1]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory of started servers; any still running at teardown are stopped."""
    servers: list[LiveServer] = []

    def start(registry: Path, **kwargs: Any) -> LiveServer:
        server = LiveServer(registry, tmp_path / f"server-{len(servers)}.log", **kwargs)
        servers.append(server)
        server.start()
        return server

    yield start
    for s in servers:
        s.stop()
