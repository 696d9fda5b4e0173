"""Health, models, admin auth, activation (good and bad bundles), rollback and canary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import AUTH, rank_body
from model.core.registry import Registry
from tests.service.service_helpers import corrupt_copy, publish_as, sample

HEALTH = ["/healthz", "/v2/health/live"]
READY = ["/readyz", "/v2/health/ready"]


def test_health_and_readiness_with_a_model(client: TestClient, version: str) -> None:
    for path in HEALTH:
        assert client.get(path).json() == {"status": "ok"}
    for path in READY:
        r = client.get(path)
        assert r.status_code == 200
        assert r.json() == {"status": "ready", "model_version": version}


def test_not_ready_until_a_model_is_activated(
    make_client: Callable[..., TestClient], tmp_path: Path, registry_dir: Path, version: str
) -> None:
    empty = tmp_path / "empty-registry"
    client = make_client(registry=empty)
    for path in HEALTH:
        assert client.get(path).status_code == 200  # alive, just not ready
    for path in READY:
        r = client.get(path)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_ready"
    r = client.post("/rank", json=rank_body(3))
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
    # A version published but not activated is still not ready (no all([]) == True).
    Registry(empty).publish(registry_dir / "versions" / version)
    client.app.state.reconciler.poll_once()  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 503
    Registry(empty).activate(version)
    client.app.state.reconciler.poll_once()  # type: ignore[attr-defined]
    assert client.get("/readyz").status_code == 200
    assert client.post("/rank", json=rank_body(3)).json()["model_version"] == version


def test_models_listing_and_manifest(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    publish_as(registry_dir, version, "v2")
    corrupt_copy(registry_dir, version, "broken", "manifest_not_json")
    client = make_client()
    body = client.get("/models").json()
    versions = {v["version"]: v for v in body["versions"]}
    assert set(versions) == {version, "v2", "broken"}
    assert versions[version]["aliases"] == ["production"]
    assert versions[version]["valid"] is True
    assert versions[version]["metrics"] and versions[version]["size_bytes"] > 0
    assert versions["broken"]["valid"] is False and versions["broken"]["error"]
    assert body["aliases"]["production"] == version
    assert body["serving"] == {"production": version, "canary": None, "shadow": None}
    manifest = client.get(f"/models/{version}").json()
    assert manifest["version"] == version and "feature_schema" in manifest
    r = client.get("/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    assert client.get("/models/..%2F..%2Fetc").status_code == 404
    assert client.get("/models/broken").status_code == 409


# -- admin auth ----------------------------------------------------------------------------------
ADMIN_CALLS = [
    ("post", "/admin/models/v-tiny/activate", None),
    ("post", "/admin/models/rollback", None),
    ("put", "/admin/canary", {"version": "v-tiny", "percent": 10}),
    ("delete", "/admin/canary", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_CALLS)
def test_admin_auth(
    make_client: Callable[..., TestClient], method: str, path: str, body: dict | None
) -> None:
    disabled = make_client(admin_token=None)
    r = disabled.request(method, path, json=body, headers=AUTH)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    client = make_client()
    r = client.request(method, path, json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.request(method, path, json=body, headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    r = client.request(method, path, json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.request(method, path, json=body, headers=AUTH)
    assert r.status_code in (200, 409), r.text  # authorised (409: e.g. nothing to roll back)


def test_empty_admin_token_means_disabled(make_client: Callable[..., TestClient]) -> None:
    client = make_client(admin_token="")
    r = client.post("/admin/models/rollback", headers={"Authorization": "Bearer "})
    assert r.status_code == 403


# -- activation ----------------------------------------------------------------------------------
def test_activate_and_rollback(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    publish_as(registry_dir, version, "v2")
    client = make_client()
    swaps = sample("vidrank_model_swaps_total", {"trigger": "admin"})
    r = client.post("/admin/models/v2/activate", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["aliases"]["production"] == "v2"
    assert r.json()["aliases"]["previous"] == [version]
    assert r.json()["serving"]["production"] == "v2"
    assert Registry(registry_dir).read_aliases().production == "v2"  # written for the fleet
    assert client.post("/rank", json=rank_body(5)).json()["model_version"] == "v2"
    assert sample("vidrank_model_swaps_total", {"trigger": "admin"}) == swaps + 1
    assert sample("vidrank_model_info", {"version": "v2", "role": "production"}) == 1
    assert sample("vidrank_model_info", {"version": version, "role": "production"}) == 0
    r = client.post("/admin/models/rollback", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["aliases"]["production"] == version
    assert client.post("/rank", json=rank_body(5)).json()["model_version"] == version
    r = client.post("/admin/models/rollback", headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_roll_back"


def test_activate_unknown_version(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    r = client.post("/admin/models/nope/activate", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"
    r = client.post("/admin/models/..bad/activate", headers=AUTH)
    assert r.status_code == 404


@pytest.mark.parametrize(
    "how",
    [
        "corrupt_onnx",
        "checksum_mismatch",
        "incompatible_schema",
        "inputs_mismatch",
        "missing_onnx",
        "missing_manifest",
        "manifest_not_json",
    ],
)
def test_bad_bundle_is_409_and_old_model_keeps_serving(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str, how: str
) -> None:
    corrupt_copy(registry_dir, version, "bad", how)
    client = make_client()
    failures = sample("vidrank_model_swap_failures_total", {"trigger": "admin"})
    aliases_before = Registry(registry_dir).read_aliases()
    r = client.post("/admin/models/bad/activate", headers=AUTH)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_bundle" and "bad" in err["message"]
    assert "Traceback" not in r.text
    # Nothing changed: not here, not in the registry (other replicas never see it).
    assert Registry(registry_dir).read_aliases() == aliases_before
    assert client.get("/readyz").status_code == 200
    assert client.post("/rank", json=rank_body(5)).json()["model_version"] == version
    assert sample("vidrank_model_swap_failures_total", {"trigger": "admin"}) == failures + 1
    # Same for a canary.
    r = client.put("/admin/canary", json={"version": "bad", "percent": 50}, headers=AUTH)
    assert r.status_code == 409
    assert Registry(registry_dir).read_aliases().canary is None


def test_incompatible_schema_reason(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    corrupt_copy(registry_dir, version, "bad", "incompatible_schema")
    r = make_client().post("/admin/models/bad/activate", headers=AUTH)
    assert "item_num" in r.json()["error"]["message"]


# -- canary --------------------------------------------------------------------------------------
def test_canary_set_sticky_share_and_clear(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str
) -> None:
    publish_as(registry_dir, version, "v2")
    client = make_client()
    r = client.put("/admin/canary", json={"version": "v2", "percent": 30}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["aliases"]["canary"] == {"version": "v2", "percent": 30.0}
    assert r.json()["serving"]["canary"] == {"version": "v2", "percent": 30.0}
    # Stickiness: one user sees one version, every time.
    for user in (1, "u-17", 123456):
        seen = {
            client.post("/rank", json=rank_body(3, user_id=user, seed=i)).json()["model_version"]
            for i in range(50)
        }
        assert len(seen) == 1
    # Share: about 30% of users.
    served = [
        client.post("/rank", json=rank_body(1, user_id=u)).json()["model_version"]
        for u in range(400)
    ]
    share = served.count("v2") / len(served)
    assert 0.22 < share < 0.38, share
    # 42 and "42" are the same user.
    same = {
        client.post("/rank", json=rank_body(1, user_id=u)).json()["model_version"]
        for u in (77, "77")
    }
    assert len(same) == 1
    r = client.delete("/admin/canary", headers=AUTH)
    assert r.status_code == 200 and r.json()["aliases"]["canary"] is None
    versions = {
        client.post("/rank", json=rank_body(1, user_id=u)).json()["model_version"]
        for u in range(100)
    }
    assert versions == {version}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": "v2", "percent": 0}, "percent"),
        ({"version": "v2", "percent": 101}, "percent"),
        ({"version": "v2"}, "percent"),
        ({"percent": 5}, "version"),
        ({"version": "v2", "percent": 5, "extra": 1}, "extra"),
    ],
)
def test_canary_body_validation(
    make_client: Callable[..., TestClient], body: dict, field: str
) -> None:
    r = make_client().put("/admin/canary", json=body, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == field


def test_canary_of_production_is_a_conflict(
    make_client: Callable[..., TestClient], version: str
) -> None:
    r = make_client().put("/admin/canary", json={"version": version, "percent": 5}, headers=AUTH)
    assert r.status_code == 409


def test_admin_malformed_body(make_client: Callable[..., TestClient]) -> None:
    r = make_client().put(
        "/admin/canary", content=b"{nope", headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"
