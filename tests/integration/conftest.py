"""Fixtures that run real ``vidrank serve`` processes on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.live_helpers import LiveServer


@pytest.fixture
def live_registry(registry_copy: Path, tiny_bundle: tuple[Path, str]) -> Path:
    """A private copy of the tiny registry, with the same bundle also published as ``v2``."""
    from model.core.registry import Registry

    Registry(registry_copy).publish(registry_copy / "versions" / tiny_bundle[1], version="v2")
    return registry_copy


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
