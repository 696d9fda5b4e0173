"""Rollout safety through the app (TestClient): explain, shadow admin and comparison, drift
metrics and PSI, the canary policy's automatic rollback, the history in /models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from benchmarks.harness import AUTH, rank_body, wait_until
from model.core.registry import Registry
from model.core.tasks import TASKS
from tests.conftest import SHIFTED_VERSION
from tests.service.service_helpers import publish_as, sample

# The background threads stay idle: tests call the monitor themselves.
QUIET = {"rollout_check_interval_s": 3600.0}


@pytest.fixture
def rollout_client(
    make_client: Callable[..., TestClient], registry_dir: Path, version: str, shifted_bundle: Path
) -> TestClient:
    """An app on a registry with ``v2`` (same weights) and ``v-shifted`` (like head shifted)."""
    publish_as(registry_dir, version, "v2")
    Registry(registry_dir).publish(shifted_bundle)
    return make_client(**QUIET)


def rank(client: TestClient, n: int = 60, **extra: Any) -> dict[str, Any]:
    r = client.post("/rank", json=rank_body(n, **extra))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def rank_heldout(client: TestClient, bodies: list[dict], count: int) -> set[str]:
    """``count`` requests from the held-out traffic (cycling through it); the versions that
    answered."""
    versions = set()
    for i in range(count):
        r = client.post("/rank", json=bodies[i % len(bodies)])
        assert r.status_code == 200, r.text
        versions.add(r.json()["model_version"])
    return versions


# -- explanations --------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", [None, "clicky", "watchers", "ranks"])
def test_explanations_add_up_to_the_score(client: TestClient, fusion: str | None) -> None:
    resp = rank(client, 200, fusion=fusion, explain=True, top_k=50)
    assert len(resp["items"]) == 50
    for item in resp["items"]:
        terms = item["explain"]
        assert set(terms) == set(TASKS)
        total = 0.0
        for task in TASKS:  # in the order the service adds them: exact
            total += terms[task]
        assert total == item["score"]
    if fusion == "clicky":  # weighted_sum of click only: the other tasks contribute nothing
        item = resp["items"][0]
        assert item["explain"] == {"click": item["score"], "watch_time": 0.0, "like": 0.0}


def test_explain_is_off_by_default_and_checked(client: TestClient) -> None:
    assert all("explain" not in it for it in rank(client)["items"])
    assert all("explain" not in it for it in rank(client, explain=False)["items"])
    r = client.post("/rank", json=rank_body(3, explain="yes"))
    assert r.status_code == 422
    assert r.json()["error"]["details"]["field"] == "explain"
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "explain" in schema["RankRequest"]["properties"]
    assert "explain" in schema["RankedItem"]["properties"]


# -- shadow --------------------------------------------------------------------------------------


def test_shadow_admin_validation(rollout_client: TestClient, version: str) -> None:
    put = rollout_client.put
    assert put("/admin/shadow", json={"version": "v2", "percent": 10}).status_code == 401
    cases = [
        ({"version": "v2", "percent": 0}, 422, "percent"),
        ({"version": "v2", "percent": 101}, 422, "percent"),
        ({"version": "v2"}, 422, "percent"),
        ({"version": "v2", "percent": 5, "extra": 1}, 422, "extra"),
        ({"version": "nope", "percent": 5}, 404, None),
        ({"version": version, "percent": 5}, 409, None),
    ]
    for body, status, field in cases:
        r = put("/admin/shadow", json=body, headers=AUTH)
        assert r.status_code == status, (body, r.text)
        if field:
            assert r.json()["error"]["details"]["field"] == field
    assert Registry(rollout_client.app.state.settings.registry).read_aliases().shadow is None


def test_shadow_compares_every_sampled_request(rollout_client: TestClient, version: str) -> None:
    r = rollout_client.put(
        "/admin/shadow", json={"version": "v2", "percent": 100, "reason": "compare"}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    assert r.json()["aliases"]["shadow"] == {"version": "v2", "percent": 100.0}
    assert r.json()["serving"]["shadow"] == {"version": "v2", "percent": 100.0}
    labels = {"version": version, "shadow": "v2"}
    before = sample("vidrank_shadow_kendall_tau_count", labels)
    for i in range(20):
        assert rank(rollout_client, 80, user_id=i, seed=i)["model_version"] == version

    def compared() -> int:
        return int(rollout_client.get("/models").json()["shadow"]["compared"])

    wait_until(lambda: compared() == 20, 20, "20 shadow comparisons")
    shadow = rollout_client.get("/models").json()["shadow"]
    # The same weights: the same ranking, the same predictions.
    assert shadow["version"] == "v2" and shadow["percent"] == 100.0
    assert shadow["mean_top10_overlap"] == 1.0 and shadow["mean_kendall_tau"] == pytest.approx(1)
    assert shadow["mean_abs_diff"] == {"click": 0.0, "watch_time": 0.0, "like": 0.0}
    assert shadow["dropped"] == shadow["failed"] == 0
    assert sample("vidrank_shadow_kendall_tau_count", labels) == before + 20
    assert sample("vidrank_shadow_top10_overlap_bucket", {**labels, "le": "0.9"}) == 0
    # The shadow's own predictions are counted in its drift histograms too (updated by the
    # rollout monitor, off the request path).
    rollout_client.app.state.monitor.check_once()
    assert sample("vidrank_prediction_count", {"task": "like", "version": "v2"}) >= 20 * 80


def test_shadow_of_a_shifted_version_shows_the_difference(
    rollout_client: TestClient, version: str
) -> None:
    body = {"version": SHIFTED_VERSION, "percent": 100}
    assert rollout_client.put("/admin/shadow", json=body, headers=AUTH).status_code == 200
    for i in range(10):
        rank(rollout_client, 50, user_id=i, seed=i)
    wait_until(
        lambda: rollout_client.get("/models").json()["shadow"]["compared"] == 10, 20, "comparisons"
    )
    diff = rollout_client.get("/models").json()["shadow"]["mean_abs_diff"]
    assert diff["click"] == 0.0 and diff["watch_time"] == 0.0
    assert diff["like"] > 0.05  # 2 points of logit on a ~2 % probability
    r = rollout_client.request("DELETE", "/admin/shadow", json={"reason": "seen"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["serving"]["shadow"] is None
    assert rollout_client.get("/models").json()["shadow"] is None


def test_shadow_sampling_share(rollout_client: TestClient) -> None:
    rollout_client.put("/admin/shadow", json={"version": "v2", "percent": 30}, headers=AUTH)
    for i in range(200):
        rank(rollout_client, 5, user_id=i, seed=i)
    shadow = rollout_client.app.state.shadow
    wait_until(lambda: shadow._queue.qsize() == 0, 20, "an empty queue")
    s = rollout_client.get("/models").json()["shadow"]
    sampled = s["compared"] + s["dropped"] + s["stale"] + s["failed"]
    assert 30 <= sampled <= 90  # 30 % of 200 is 60; binomial sd ~6.5


# -- drift and canary rollback ------------------------------------------------------------------


def test_drift_histograms_and_psi_move_with_the_predictions(
    rollout_client: TestClient, version: str, heldout_bodies: list[dict]
) -> None:
    monitor = rollout_client.app.state.monitor
    count = {"task": "like", "version": version}
    before = sample("vidrank_prediction_count", count)
    rank_heldout(rollout_client, heldout_bodies, 12)
    assert sample("vidrank_prediction_count", count) == before  # not on the request path
    monitor.check_once()
    assert sample("vidrank_prediction_count", count) == before + 1200
    calm = sample("vidrank_prediction_psi", {"task": "like", "version": version})
    assert 0 <= calm < 0.1  # served like its held-out data
    low_likes = {**count, "le": "0.05"}
    assert sample("vidrank_prediction_bucket", low_likes) == sample(
        "vidrank_prediction_count", count
    )
    # Activate the export whose like head is shifted: its predictions move, and so does its PSI.
    r = rollout_client.post(f"/admin/models/{SHIFTED_VERSION}/activate", headers=AUTH)
    assert r.status_code == 200
    shifted = {"task": "like", "version": SHIFTED_VERSION}
    shifted_before = sample("vidrank_prediction_count", shifted)  # other tests' apps count too
    rank_heldout(rollout_client, heldout_bodies, 12)
    monitor.check_once()
    assert sample("vidrank_prediction_psi", shifted) > 1.0
    assert sample("vidrank_prediction_psi", {"task": "click", "version": SHIFTED_VERSION}) < 0.1
    # Its like histogram sits above the old one's buckets ...
    assert sample("vidrank_prediction_bucket", {**shifted, "le": "0.05"}) == 0
    assert sample("vidrank_prediction_count", shifted) == shifted_before + 1200
    # ... and the version no longer served has left the exposition.
    assert sample("vidrank_prediction_count", count) == 0
    assert sample("vidrank_prediction_psi", {"task": "like", "version": version}) == 0


def canary(client: TestClient, version: str, percent: float, **policy: Any) -> None:
    body = {"version": version, "percent": percent, "policy": policy, "reason": "try it"}
    r = client.put("/admin/canary", json=body, headers=AUTH)
    assert r.status_code == 200, r.text


def test_shifted_canary_is_rolled_back_by_its_psi_bound(
    rollout_client: TestClient, version: str
) -> None:
    monitor = rollout_client.app.state.monitor
    canary(rollout_client, SHIFTED_VERSION, 100, max_psi=0.5, min_requests=10)
    assert monitor.check_once() is None  # a new canary: its windows start now
    before = sample("vidrank_canary_rollbacks_total", {"reason": "psi"})
    for i in range(9):
        assert rank(rollout_client, 100, user_id=i, seed=i)["model_version"] == SHIFTED_VERSION
    assert monitor.check_once() is None  # 9 < min_requests: not judged yet
    rank(rollout_client, 100, user_id=9, seed=9)
    verdict = monitor.check_once()
    assert verdict is not None and verdict.reason == "psi" and "like" in verdict.detail
    assert sample("vidrank_canary_rollbacks_total", {"reason": "psi"}) == before + 1
    aliases = Registry(rollout_client.app.state.settings.registry).read_aliases()
    assert aliases.canary is None and aliases.production == version  # production untouched
    assert rank(rollout_client)["model_version"] == version
    models = rollout_client.get("/models").json()
    assert models["serving"]["canary"] is None
    health = models["canary_health"]  # the judgement that removed it
    assert health["version"] == SHIFTED_VERSION and health["requests"] == 10
    assert health["verdict"]["reason"] == "psi" and health["psi"]["like"] > 0.5
    assert health["policy"]["max_psi"] == 0.5 and health["policy"]["max_p99_ratio"] == 2.0
    last = models["history"][-1]
    assert last["action"] == "auto_rollback" and last["actor"] == "auto-rollback"
    assert last["from"] == SHIFTED_VERSION and last["to"] is None
    assert last["reason"].startswith("psi: PSI of like")
    assert models["history"][-2]["action"] == "canary_set"
    assert models["history"][-2]["actor"] == "admin-api"
    assert models["history"][-2]["reason"] == "try it"


def test_healthy_canary_is_kept_and_a_policy_can_be_off(
    rollout_client: TestClient, version: str, heldout_bodies: list[dict]
) -> None:
    monitor = rollout_client.app.state.monitor
    canary(rollout_client, "v2", 100, max_psi=0.5, min_requests=10)
    monitor.check_once()
    assert rank_heldout(rollout_client, heldout_bodies, 30) == {"v2"}
    assert monitor.check_once() is None
    assert Registry(rollout_client.app.state.settings.registry).read_aliases().canary is not None


def test_auto_rollback_disabled_judges_but_keeps(
    make_client: Callable[..., TestClient], registry_dir: Path, shifted_bundle: Path
) -> None:
    Registry(registry_dir).publish(shifted_bundle)
    client = make_client(canary_auto_rollback=False, canary_min_requests=5, **QUIET)
    monitor = client.app.state.monitor
    canary(client, SHIFTED_VERSION, 100)
    monitor.check_once()
    for i in range(5):
        rank(client, 100, user_id=i, seed=i)
    verdict = monitor.check_once()
    assert verdict is not None and verdict.reason == "psi"  # the settings' bound (0.25)
    assert Registry(registry_dir).read_aliases().canary is not None


def test_canary_policy_validation(rollout_client: TestClient) -> None:
    for policy, field in (
        ({"max_psi": 0}, "policy.max_psi"),
        ({"max_error_ratio": 1.5}, "policy.max_error_ratio"),
        ({"min_requests": 0}, "policy.min_requests"),
        ({"max_latency": 2}, "policy.max_latency"),
    ):
        body = {"version": "v2", "percent": 10, "policy": policy}
        r = rollout_client.put("/admin/canary", json=body, headers=AUTH)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"]["field"] == field
    body = {"version": "v2", "percent": 10, "policy": {}}
    r = rollout_client.put("/admin/canary", json=body, headers=AUTH)
    assert r.status_code == 200 and r.json()["aliases"]["canary"] == {
        "version": "v2",
        "percent": 10,
    }


def test_models_lists_history_and_shadow_alias(rollout_client: TestClient, version: str) -> None:
    c = rollout_client
    c.post("/admin/models/v2/activate", json={"reason": "better AUC"}, headers=AUTH)
    c.put("/admin/shadow", json={"version": version, "percent": 5}, headers=AUTH)
    c.post("/admin/models/rollback", headers=AUTH)  # no body: no reason
    models = c.get("/models").json()
    history = [(h["action"], h["from"], h["to"], h["reason"]) for h in models["history"]]
    assert history[-3:] == [
        ("activate", version, "v2", "better AUC"),
        ("shadow_set", None, version, None),
        ("rollback", "v2", version, None),
    ]
    # Rolling back onto the shadowed version ended the shadow.
    assert models["aliases"]["shadow"] is None and models["shadow"] is None
    c.put("/admin/shadow", json={"version": "v2", "percent": 5}, headers=AUTH)
    by_name = {v["version"]: v for v in c.get("/models").json()["versions"]}
    assert by_name["v2"]["aliases"] == ["shadow"]
