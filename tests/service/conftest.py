"""Fixtures for the service tests: a private copy of the tiny registry and started apps."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app


@pytest.fixture
def registry_dir(registry_copy: Path) -> Path:
    """A private copy of the tiny registry (tests change its aliases and add versions)."""
    return registry_copy


@pytest.fixture
def make_client(registry_dir: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory of started TestClients (lifespan run); all are closed at teardown."""
    clients: list[TestClient] = []

    def make(registry: Path | None = None, **overrides: Any) -> TestClient:
        from tests.service.service_helpers import settings_for

        app = create_app(settings_for(registry or registry_dir, **overrides))
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture(scope="session")
def client(
    tiny_bundle: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """One started app on the shared tiny registry, with fusion profiles, for read-only tests.

    Tests that change aliases or add versions use ``make_client`` on a private copy instead.
    """
    from tests.service.service_helpers import PROFILES, settings_for

    profiles = tmp_path_factory.mktemp("profiles") / "profiles.toml"
    profiles.write_text(PROFILES)
    app = create_app(settings_for(tiny_bundle[0], fusion_profiles=profiles))
    with TestClient(app) as c:
        yield c
