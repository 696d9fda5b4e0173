"""Operating safely over the app: security headers, docs switch, admin token file, registry
faults in /models and admin, request deadlines (issue 10)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import AUTH, rank_body
from model.core.registry import Registry
from service.http.docs import CDN, inline_script_hashes
from tests.service.service_helpers import publish_as, sample


def csp_directives(header: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *values = part.split()
        out[name] = values
    return out


# -- security headers and docs -------------------------------------------------------------------


def test_every_api_response_has_security_headers(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    responses = [
        client.post("/rank", json=rank_body(3)),
        client.post("/rank", content=b"{", headers={"content-type": "application/json"}),
        client.get("/healthz"),
        client.get("/models"),
        client.get("/no-such-route"),
        client.post("/admin/models/rollback", headers=AUTH),
        client.post("/admin/models/rollback"),
    ]
    for r in responses:
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url
        assert r.headers["cache-control"] == "no-store", r.request.url
        assert csp_directives(r.headers["content-security-policy"])["default-src"] == ["'none'"]


def test_docs_pages_allow_only_what_they_load(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
    csp = csp_directives(r.headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in csp["script-src"]
    # Every script the page loads is allowed: the CDN's by origin, the inline one by its hash.
    for src in re.findall(r'<script src="([^"]+)"', r.text):
        assert any(src.startswith(origin) for origin in csp["script-src"]), src
    hashes = inline_script_hashes(r.content)
    assert hashes and set(hashes) <= set(csp["script-src"])
    assert csp["connect-src"] == ["'self'"]  # the spec comes from here, nowhere else
    redoc = client.get("/redoc")
    assert redoc.status_code == 200
    assert csp_directives(redoc.headers["content-security-policy"])["script-src"] == [CDN]
    assert client.get("/openapi.json").status_code == 200


def test_docs_can_be_switched_off(make_client: Callable[..., TestClient]) -> None:
    client = make_client(docs=False)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
    assert client.post("/rank", json=rank_body(3)).status_code == 200


def test_metrics_port_setting_moves_metrics_off_the_main_port(
    make_client: Callable[..., TestClient],
) -> None:
    assert make_client().get("/metrics").status_code == 200
    assert make_client(metrics_port=9999).get("/metrics").status_code == 404


# -- admin token file ----------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_admin_token_file_rotation_without_restart(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    tokens = tmp_path / "admin-token"
    tokens.write_text("old-token\n")
    client = make_client(admin_token=None, admin_token_file=tokens)

    def status(token: str) -> int:
        return client.post("/admin/models/rollback", headers=bearer(token)).status_code

    assert status("old-token") == 409  # authorised (nothing to roll back)
    assert status("new-token") == 403
    # Step 1 of a rotation: both tokens valid (comments and blank lines ignored).
    tokens.write_text("# rotation 2026-11\nnew-token\n\n  old-token  \n")
    assert (status("old-token"), status("new-token")) == (409, 409)
    # Step 2: the old token is withdrawn - like a Kubernetes Secret, by an atomic swap.
    fresh = tmp_path / "admin-token.new"
    fresh.write_text("new-token\n")
    os.replace(fresh, tokens)
    assert (status("old-token"), status("new-token")) == (403, 409)
    # A file that disappears grants nothing (admin is still configured, so 403, not open).
    tokens.unlink()
    assert status("new-token") == 403


def test_admin_token_and_token_file_both_count(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    tokens = tmp_path / "admin-token"
    tokens.write_text("from-file\n")
    client = make_client(admin_token_file=tokens)  # plus the env token of the harness
    for headers in (AUTH, bearer("from-file")):
        assert client.post("/admin/models/rollback", headers=headers).status_code == 409
    empty = make_client(admin_token=None, admin_token_file=tmp_path / "missing")
    assert empty.post("/admin/models/rollback", headers=AUTH).status_code == 403


# -- registry faults in the API ------------------------------------------------------------------


def test_models_reports_a_missing_aliases_file(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    client = make_client()
    reconciler = client.app.state.reconciler  # type: ignore[attr-defined]
    (registry_dir / "aliases.json").unlink()
    reconciler.poll_once()
    body = client.get("/models").json()
    assert body["serving"]["production"] == version
    assert body["registry"]["status"] == "aliases_missing"
    assert client.post("/rank", json=rank_body(3)).json()["model_version"] == version
    (registry_dir / "aliases.json").write_text("{ not json")
    reconciler.poll_once()
    r = client.get("/models")
    assert r.status_code == 200, r.text  # a broken file is reported, not a failed call
    assert r.json()["aliases"] is None and r.json()["registry"]["status"] == "aliases_invalid"
    assert client.get("/readyz").status_code == 200


def test_models_reports_desired_and_converged(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    client = make_client()
    status = client.get("/models").json()["registry"]
    assert status["status"] == "ok" and status["converged"] is True
    assert status["desired"] == {"production": version}


def test_admin_on_an_unwritable_registry_is_503_and_changes_nothing(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    publish_as(registry_dir, version, "v2")
    client = make_client()
    Registry(registry_dir).check_writable()
    lock = registry_dir / ".lock"
    lock.unlink()
    lock.mkdir()  # the lock cannot be opened for writing, even by root (see test_live_ops)
    loads = sample("vidrank_model_load_seconds_count")
    r = client.post("/admin/models/v2/activate", headers=AUTH)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "registry_unavailable" and "not writable" in error["message"]
    assert str(registry_dir) not in error["message"]
    assert sample("vidrank_model_load_seconds_count") == loads  # refused before loading v2
    assert client.get("/models").json()["serving"]["production"] == version
    assert Registry(registry_dir).read_aliases().production == version


@pytest.mark.parametrize(
    "content", ["{ not json", '{"production": 5}', '{"production": "v1", "previous": [5]}']
)  # noqa: E501
def test_admin_on_a_malformed_aliases_file_is_409_without_a_path(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str, content: str
) -> None:
    """A name that is not a version name in the file is a broken file, not an unknown version."""
    publish_as(registry_dir, version, "v2")
    client = make_client()
    (registry_dir / "aliases.json").write_text(content)
    r = client.post("/admin/models/v2/activate", headers=AUTH)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "registry_conflict"
    assert str(registry_dir) not in r.text
    assert client.get("/models").json()["serving"]["production"] == version


# -- request deadlines ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "600001", "٣".encode()])
def test_malformed_timeout_header_is_422(client: TestClient, value: str | bytes) -> None:
    r = client.post("/rank", json=rank_body(3), headers={"X-Request-Timeout-Ms": value})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["details"]["field"] == "headers.x-request-timeout-ms"


def test_timeout_header_within_budget_ranks(client: TestClient) -> None:
    r = client.post("/rank", json=rank_body(3), headers={"X-Request-Timeout-Ms": "5000"})
    assert r.status_code == 200
