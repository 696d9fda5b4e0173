"""Consistency checks of the deployment files: docker/k8s/*.yaml, docker/compose.yaml,
docker/fusion_profiles.toml, docker/nginx.conf and its loopback template.

Static checks need only pyyaml. With nginx installed (.ci/run installs it), the loopback template
is also rendered and run for real: `nginx -t`, then a few requests through it to stub upstreams to
prove the retry policy (POST /rank is retried on another replica, /admin/ never is). The `vidrank`
CLI's help is checked for the flags the manifests use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from benchmarks.harness import (
    NGINX_MISSING,
    NGINX_TEMPLATE,
    Processes,
    find_nginx,
    free_port,
    http_json,
    nginx_cmd,
    render_nginx,
    start_nginx,
    upstream_servers,
    write_nginx_conf,
)
from service.http.server import GRACEFUL_TIMEOUT_S
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"
COMPOSE = DOCKER / "compose.yaml"
NGINX_CONF = DOCKER / "nginx.conf"
FUSION = DOCKER / "fusion_profiles.toml"
DOCKERFILE = ROOT / "Dockerfile"

# Every setting an operator can pass (service/settings.py; docs/internals.md).
SETTINGS_ENV = {f"VIDRANK_{name.upper()}" for name in Settings.model_fields}
FUSION_METHODS = {"weighted_sum", "weighted_product", "rank_sum"}
HEADS = {"click", "watch_time", "like"}


# --------------------------------------------------------------------------------------------
# loading helpers
# --------------------------------------------------------------------------------------------


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest, for every document in docker/k8s except the kustomization."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for fname, doc in _k8s_docs():
        if doc.get("kind") == "Kustomization":
            continue
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{fname}: missing {key}"
        ident = (doc["kind"], doc["metadata"]["name"])
        assert ident not in out, f"duplicate {ident}"
        out[ident] = doc
    return out


def _one(k8s: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for (k, _), doc in k8s.items() if k == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def deployment(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return _one(k8s, "Deployment")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _configmap_env(k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]) -> dict:
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef")
        assert ref, f"only configMapRef envFrom expected: {src}"
        env.update(k8s[("ConfigMap", ref["name"])]["data"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
    return env


def _stage_names() -> set[str]:
    return {
        m.group(1).lower()
        for m in re.finditer(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE.read_text(), re.M | re.I)
    }


def _port_matches(port: int | str, container_port: dict[str, Any]) -> bool:
    return port in (container_port["name"], container_port["containerPort"])


def test_readme_configuration_table_lists_every_setting() -> None:
    """The README's configuration table and service.settings.Settings name the same variables."""
    assert Settings.model_config.get("env_prefix") == "VIDRANK_"
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") : readme.index("### Fusion profiles")]
    documented = set(re.findall(r"^\| `(VIDRANK_[A-Z0-9_]+)`", table, flags=re.M))
    internal = {"VIDRANK_METRICS_MULTIPROC_DIR"}  # set by the multi-worker supervisor itself
    assert documented == SETTINGS_ENV - internal


# --------------------------------------------------------------------------------------------
# k8s
# --------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} | {p.name for p in K8S.glob("*.yml")}
    files.discard("kustomization.yaml")
    listed = kust["resources"]
    assert len(listed) == len(set(listed)), "duplicate resources"
    assert set(listed) == files


def test_every_manifest_is_labelled(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    for (kind, name), doc in k8s.items():
        labels = doc["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "vidrank", (kind, name)


def test_probes_ports_and_service(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    cport, hport = container["ports"]
    assert cport == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert hport == {"name": "health", "containerPort": 8081, "protocol": "TCP"}
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    # Probes go to the health listener, which accepts whatever the /rank load.
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port_matches(get["port"], hport), probe
    # The startup probe must leave time for a model load before liveness can kill the pod.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    service = _one(k8s, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    (sport,) = service["spec"]["ports"]
    assert sport["port"] == 80
    assert _port_matches(sport["targetPort"], cport)
    # The container listens where VIDRANK_PORT says.
    env = _configmap_env(k8s, container)
    assert int(env.get("VIDRANK_PORT", 8000)) == cport["containerPort"]
    assert int(env["VIDRANK_HEALTH_PORT"]) == hport["containerPort"]
    assert env.get("VIDRANK_HOST") == "0.0.0.0"


def test_selectors_match_pod_labels(
    k8s: dict[tuple[str, str], dict[str, Any]], deployment: dict[str, Any]
) -> None:
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    match = deployment["spec"]["selector"]["matchLabels"]
    assert match.items() <= pod_labels.items()
    service = _one(k8s, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = _one(k8s, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    spread = deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    # The training Job's pods must not be picked up by the Service.
    job = k8s[("Job", "vidrank-train")]
    job_labels = job["spec"]["template"]["metadata"].get("labels", {})
    assert not service["spec"]["selector"].items() <= job_labels.items()


def test_env_names_are_settings(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    names: set[str] = set()
    for (kind, _), doc in k8s.items():
        if kind not in {"Deployment", "Job"}:
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in c.get("env", [])}
            for src in c.get("envFrom", []):
                names |= set(k8s[("ConfigMap", src["configMapRef"]["name"])]["data"])
    assert names, "no env at all?"
    unknown = {n for n in names if n.startswith("VIDRANK_")} - SETTINGS_ENV
    assert not unknown, unknown
    # Anything non-VIDRANK_ would be a typo or a setting the service does not read.
    assert all(n.startswith("VIDRANK_") for n in names), names
    env = _configmap_env(k8s, container)
    assert env["VIDRANK_REGISTRY"] == "/registry"
    assert env["VIDRANK_WORKERS"] == "1"
    assert env["VIDRANK_FUSION_PROFILES"] == "/etc/vidrank/fusion_profiles.toml"
    assert "VIDRANK_ADMIN_TOKEN" not in env, "the admin token must come from the Secret"


def test_admin_token_from_a_mounted_secret_file(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    """The token comes from a Secret mounted as a directory (so updates reach the file and a
    rotation needs no restart), never from an env var (fixed at start)."""
    names = {e["name"] for e in container["env"]}
    assert "VIDRANK_ADMIN_TOKEN" not in names
    (item,) = [e for e in container["env"] if e["name"] == "VIDRANK_ADMIN_TOKEN_FILE"]
    path = Path(item["value"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    assert mount.get("readOnly") is True and "subPath" not in mount
    spec = _one(k8s, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = k8s[("Secret", volume["secret"]["secretName"])]
    key = path.name
    assert key in secret.get("stringData", {}) or key in secret.get("data", {})


def test_images_match_dockerfile_targets(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    stages = _stage_names()
    assert {"serve", "train"} <= stages
    assert container["image"] == "vidrank:serve"
    (job_container,) = k8s[("Job", "vidrank-train")]["spec"]["template"]["spec"]["containers"]
    assert job_container["image"] == "vidrank:train"
    for (kind, _), doc in k8s.items():
        if kind in {"Deployment", "Job"}:
            for c in doc["spec"]["template"]["spec"]["containers"]:
                repo, _, tag = c["image"].rpartition(":")
                assert repo == "vidrank" and tag in stages, c["image"]


def quantity(value: str) -> float:
    """A Kubernetes resource quantity ("500m", "2", "512Mi", "1Gi") as a number of units."""
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, scale in suffixes.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def test_deployment_rollout_and_lifecycle(deployment: dict[str, Any], container: dict) -> None:
    spec = deployment["spec"]
    assert spec["replicas"] >= 2  # one pod lost (node, rollout, crash) is not an outage
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and int(command[1]) > 0
    # The kubelet's SIGKILL must not cut the drain short: preStop, then the server's own drain.
    assert grace >= int(command[1]) + GRACEFUL_TIMEOUT_S


def test_ranker_resources_fit_what_it_runs(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    """Requests within limits; the CPU request covers the cores the pod's settings use, so the
    HPA's utilisation is measured against real capacity."""
    res = container["resources"]
    for kind in ("cpu", "memory"):
        assert 0 < quantity(res["requests"][kind]) <= quantity(res["limits"][kind]), kind
    env = _configmap_env(k8s, container)
    cores = int(env.get("VIDRANK_WORKERS", "1")) * int(env.get("VIDRANK_ORT_INTRA_OP_THREADS", "1"))
    assert quantity(res["requests"]["cpu"]) >= cores


def test_pod_security(k8s: dict[tuple[str, str], dict[str, Any]], container: dict) -> None:
    for (kind, name), doc in k8s.items():
        if kind not in {"Deployment", "Job"}:
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    deployment = _one(k8s, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]]


def test_registry_pvc_mounts(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    pvc = _one(k8s, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    registry_path = _configmap_env(k8s, container)["VIDRANK_REGISTRY"]
    for (kind, name), doc in k8s.items():
        if kind not in {"Deployment", "Job"}:
            continue
        pod = doc["spec"]["template"]["spec"]
        claim_vols = {
            v["name"]
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        }
        assert claim_vols, f"{name} does not use the registry PVC"
        (c,) = pod["containers"]
        mounts = [m for m in c["volumeMounts"] if m["name"] in claim_vols]
        assert [m["mountPath"] for m in mounts] == [registry_path], name
        # The admin API (Deployment) and the trainer (Job) both write the registry.
        assert not mounts[0].get("readOnly", False), name


def test_fusion_profiles_configmap_mount(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    path = PurePosixPath(_configmap_env(k8s, container)["VIDRANK_FUSION_PROFILES"])
    deployment = _one(k8s, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent)]
    # A subPath mount would never see ConfigMap updates (no hot reload).
    assert "subPath" not in mount and mount.get("readOnly") is True
    cm = k8s[("ConfigMap", volumes[mount["name"]]["configMap"]["name"])]
    assert path.name in cm["data"]
    # Same profiles as the compose deployment.
    assert tomllib.loads(cm["data"][path.name]) == tomllib.loads(FUSION.read_text())


def test_hpa_targets_deployment(
    k8s: dict[tuple[str, str], dict[str, Any]], deployment: dict[str, Any]
) -> None:
    hpa = _one(k8s, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        "apps/v1",
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    # Utilization is relative to requests: the container must have a CPU request.
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["cpu"]


def test_training_job(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    job = k8s[("Job", "vidrank-train")]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    args = c["args"]
    assert args[0] == "train"
    assert args[args.index("--registry") + 1] == "/registry"
    assert args[args.index("--simulate") + 1] == "1000000"
    assert args[args.index("--nproc") + 1] == "2"


def test_feature_store_from_the_secret_and_a_publishing_job(
    k8s: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]
) -> None:
    (item,) = [e for e in container["env"] if e["name"] == "VIDRANK_FEATURE_STORE"]
    ref = item["valueFrom"]["secretKeyRef"]
    secret = k8s[("Secret", ref["name"])]
    url = secret["stringData"][ref["key"]]
    assert Settings(feature_store=url).feature_store == "embedded"  # a value the service takes
    env = _configmap_env(k8s, container)
    assert float(env["VIDRANK_FEATURE_TIMEOUT_MS"]) > 0
    assert env["VIDRANK_FEATURE_STORE_REQUIRED"] in ("true", "false")
    job = k8s[("Job", "vidrank-features")]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (init,) = pod["initContainers"]
    (publish,) = pod["containers"]
    assert init["image"] == publish["image"] == "vidrank:train"
    assert (
        init["args"][0] == "simulate" and init["args"][init["args"].index("--out") + 1] == "/data"
    )
    (store,) = [e for e in publish["env"] if e["name"] == "VIDRANK_FEATURE_STORE"]
    assert store["valueFrom"]["secretKeyRef"] == ref  # the same store the rankers read
    script = publish["args"][0]
    for fragment in ("features publish --data /data --registry /registry",
                     '--redis "$VIDRANK_FEATURE_STORE"', "--if-empty"):  # fmt: skip
        assert fragment in script, fragment
    mounts = {m["name"]: m["mountPath"] for m in publish["volumeMounts"]}
    assert mounts == {"registry": "/registry", "data": "/data"}
    claims = {
        v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]
    }
    assert claims["registry"] == "vidrank-registry"
    # The job's pods are not ranker endpoints.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels.get("app.kubernetes.io/component") == "feature-publisher"


def test_namespace(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust.get("namespace") == _one(k8s, "Namespace")["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# fusion profiles
# --------------------------------------------------------------------------------------------


def test_fusion_profiles_file() -> None:
    cfg = tomllib.loads(FUSION.read_text())
    profiles = cfg["profiles"]
    assert 2 <= len(profiles) <= 5
    assert cfg["default"] in profiles
    for name, prof in profiles.items():
        assert prof["method"] in FUSION_METHODS, name
        assert set(prof["weights"]) <= HEADS and prof["weights"], name
        for head, w in prof["weights"].items():
            weight = w["weight"] if isinstance(w, dict) else w
            assert isinstance(weight, int | float) and weight >= 0, (name, head)
            if isinstance(w, dict):
                assert set(w) <= {"weight", "transform"}, (name, head)


def test_fusion_profiles_load_in_the_service() -> None:
    from model.core.fusion import parse_profiles

    cfg = tomllib.loads(FUSION.read_text())
    profiles, default = parse_profiles(cfg)
    assert set(profiles) == set(cfg["profiles"])
    assert default == cfg["default"]


# --------------------------------------------------------------------------------------------
# compose
# --------------------------------------------------------------------------------------------


def _compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_build_targets(compose: dict[str, Any]) -> None:
    stages = _stage_names()
    expected = {"trainer": ("train", "vidrank:train"), "ranker": ("serve", "vidrank:serve")}
    for name, (target, image) in expected.items():
        svc = compose["services"][name]
        build = svc["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        assert build["target"] == target and target in stages
        assert svc["image"] == image


def test_compose_trainer(compose: dict[str, Any]) -> None:
    trainer = compose["services"]["trainer"]
    cmd = trainer["command"]
    assert isinstance(cmd, list) and cmd[0] == "train"
    assert cmd[cmd.index("--registry") + 1] == "/registry"
    assert "--simulate" in cmd and "--if-empty" in cmd
    assert "registry:/registry" in trainer["volumes"]
    assert trainer.get("restart", "no") == "no"


def test_compose_ranker(compose: dict[str, Any]) -> None:
    ranker = compose["services"]["ranker"]
    assert ranker["deploy"]["replicas"] >= 2  # nginx has another replica to retry on
    assert ranker["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    # Replicas cannot share a host port; nginx is the only published entry point.
    assert "ports" not in ranker
    env = _compose_env(ranker)
    assert set(env) <= SETTINGS_ENV, set(env) - SETTINGS_ENV
    assert env["VIDRANK_REGISTRY"] == "/registry"
    assert env["VIDRANK_HOST"] == "0.0.0.0"
    port = env.get("VIDRANK_PORT", "8000")
    assert port == "8000" and "8000" in [str(p) for p in ranker["expose"]]
    assert env["VIDRANK_ADMIN_TOKEN"].startswith("${VIDRANK_ADMIN_TOKEN")
    # Healthcheck: python urllib (no curl in slim) against this replica's own port.
    test = ranker["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "python"
    text = " ".join(test)
    health = env["VIDRANK_HEALTH_PORT"]  # the probe's own listener
    assert f"http://127.0.0.1:{health}/readyz" in text
    # Volumes: the shared registry (rw) and the fusion profiles (ro, file exists).
    volumes = ranker["volumes"]
    assert "registry:/registry" in volumes
    profiles_path = env["VIDRANK_FUSION_PROFILES"]
    (mount,) = [v for v in volumes if v.split(":")[1] == profiles_path]
    src, _, mode = mount.split(":")
    assert mode == "ro"
    assert (COMPOSE.parent / src).resolve() == FUSION.resolve()
    assert "registry" in compose["volumes"]


def test_compose_redis_and_feature_publisher(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert "redis-cli" in redis["healthcheck"]["test"] and "ping" in redis["healthcheck"]["test"]
    assert "--lazyfree-lazy-expire" in redis["command"]
    features = services["features"]
    assert features["image"] == "vidrank:train" and features.get("restart") == "no"
    assert features["depends_on"]["redis"]["condition"] == "service_healthy"
    script = features["command"][-1]
    url = _compose_env(services["ranker"])["VIDRANK_FEATURE_STORE"]
    assert f"vidrank features publish --data /tmp/tables --redis {url} --if-empty" in script
    assert url.startswith("redis://redis:") and Settings(feature_store=url).feature_store == url
    ranker = services["ranker"]
    assert ranker["depends_on"]["features"]["condition"] == "service_completed_successfully"
    assert "redis-data" in compose["volumes"]


def test_compose_nginx(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    assert nginx["image"] == "nginx:1.27-alpine"
    assert nginx["ports"] == ["8080:80"]
    assert nginx["depends_on"]["ranker"]["condition"] == "service_healthy"
    (mount,) = [v for v in nginx["volumes"] if v.split(":")[1] == "/etc/nginx/nginx.conf"]
    src, _, mode = mount.split(":")
    assert mode == "ro" and (COMPOSE.parent / src).resolve() == NGINX_CONF.resolve()
    # The upstream names the ranker service on the port the replicas listen on.
    conf = parse_nginx(NGINX_CONF.read_text())
    servers = [d.args for d in _upstream(conf).children if d.name == "server"]
    assert servers and all(args[0] == "ranker:8000" for args in servers)


# --------------------------------------------------------------------------------------------
# nginx: a tiny parser (directives, blocks, quotes, comments)
# --------------------------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    children: list[Directive]
    is_block: bool

    def find(self, name: str) -> list[Directive]:
        return [c for c in self.children if c.name == name]

    def opt(self, name: str) -> Directive | None:
        found = self.find(name)
        return found[-1] if found else None

    def get(self, name: str) -> Directive:
        found = self.opt(name)
        assert found is not None, f"{self.name} {' '.join(self.args)}: no {name}"
        return found


_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<comment>\#[^\n]*)
      | '(?P<sq>(?:[^'\\]|\\.)*)'
      | "(?P<dq>(?:[^"\\]|\\.)*)"
      | (?P<punct>[{};])
      | (?P<word>[^\s{};'"]+)
    )""",
    re.X | re.S,
)


def _tokens(text: str) -> Iterator[tuple[str, str]]:
    pos = 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"cannot tokenize at {text[pos : pos + 40]!r}")
            return
        pos = m.end()
        if m.group("comment") is not None:
            continue
        if m.group("punct") is not None:
            yield "punct", m.group("punct")
        elif m.group("sq") is not None:
            yield "word", m.group("sq")
        elif m.group("dq") is not None:
            yield "word", m.group("dq")
        elif m.group("word") is not None:
            yield "word", m.group("word")


def parse_nginx(text: str) -> Directive:
    root = Directive("<main>", [], [], True)
    stack = [root]
    words: list[str] = []
    for kind, tok in _tokens(text):
        if kind == "word":
            words.append(tok)
        elif tok == ";":
            assert words, "empty directive"
            stack[-1].children.append(Directive(words[0], words[1:], [], False))
            words = []
        elif tok == "{":
            block = Directive(words[0], words[1:], [], True)
            stack[-1].children.append(block)
            stack.append(block)
            words = []
        else:  # }
            assert not words and len(stack) > 1, "unbalanced braces"
            stack.pop()
    assert len(stack) == 1 and not words, "unterminated block or directive"
    return root


def _http(conf: Directive) -> Directive:
    (http,) = conf.find("http")
    return http


def _upstream(conf: Directive) -> Directive:
    ups = [u for u in _http(conf).find("upstream") if u.args == ["vidrank"]]
    assert len(ups) == 1
    return ups[0]


def _server(conf: Directive) -> Directive:
    (server,) = _http(conf).find("server")
    return server


def _locations(conf: Directive) -> dict[str, Directive]:
    return {" ".join(loc.args): loc for loc in _server(conf).find("location")}


@pytest.fixture(scope="module", params=["nginx.conf", "loopback template"])
def nginx_conf(request: pytest.FixtureRequest) -> Directive:
    if request.param == "nginx.conf":
        return parse_nginx(NGINX_CONF.read_text())
    rendered = render_nginx(Path("/tmp/x"), "127.0.0.1:18080", ["server 127.0.0.1:18001;"])
    return parse_nginx(rendered)


def test_nginx_parser() -> None:
    conf = parse_nginx(
        '# c\nevents { }\nhttp { log_format j escape=json \'{"a":"$b"}\';'
        ' server { location = /x { proxy_set_header Connection ""; } } }'
    )
    http = _http(conf)
    assert http.get("log_format").args == ["j", "escape=json", '{"a":"$b"}']
    loc = _locations(conf)["= /x"]
    assert loc.get("proxy_set_header").args == ["Connection", ""]


def test_nginx_upstream_keepalive(nginx_conf: Directive) -> None:
    ups = _upstream(nginx_conf)
    assert int(ups.get("keepalive").args[0]) == 64
    # Must stay under uvicorn's idle keep-alive (5s) to avoid reusing a closing connection.
    assert int(ups.get("keepalive_timeout").args[0].rstrip("s")) < 5
    server = _server(nginx_conf)
    assert server.get("proxy_http_version").args == ["1.1"]
    headers = {d.args[0].lower(): d.args[1:] for d in server.find("proxy_set_header")}
    assert headers["connection"] == [""]
    # Every proxied location goes to the upstream, and none overrides the keep-alive headers.
    for name, loc in _locations(nginx_conf).items():
        if loc.opt("proxy_pass"):
            assert loc.get("proxy_pass").args == ["http://vidrank"], name
        assert not loc.find("proxy_set_header") and not loc.find("proxy_http_version"), name


def test_nginx_retry_policy(nginx_conf: Directive) -> None:
    locs = _locations(nginx_conf)
    rank = locs["= /rank"]
    nxt = rank.get("proxy_next_upstream").args
    assert set(nxt) == {"error", "timeout", "http_502", "http_503", "non_idempotent"}
    assert rank.get("proxy_next_upstream_tries").args == ["3"]
    # Only /rank may resend a POST that reached a replica.
    for name, loc in locs.items():
        if name != "= /rank":
            for d in loc.find("proxy_next_upstream"):
                assert "non_idempotent" not in d.args, name
    assert not any(
        "non_idempotent" in d.args for d in _server(nginx_conf).find("proxy_next_upstream")
    )
    assert not any(
        "non_idempotent" in d.args for d in _http(nginx_conf).find("proxy_next_upstream")
    )
    # Admin calls are not retried at all.
    assert locs["/admin/"].get("proxy_next_upstream").args == ["off"]
    assert locs["/admin/"].opt("proxy_pass")
    assert "/" in locs


def test_nginx_limits_timeouts_and_json_log(nginx_conf: Directive) -> None:
    http = _http(nginx_conf)
    assert http.get("client_max_body_size")
    server = _server(nginx_conf)
    for name in ("proxy_connect_timeout", "proxy_send_timeout", "proxy_read_timeout"):
        assert server.opt(name) or http.opt(name), name
    (fmt,) = http.find("log_format")
    assert fmt.args[1] == "escape=json"
    # The format must be valid JSON once nginx substitutes its variables.
    sample = re.sub(r"\$[a-z_0-9]+", "0", "".join(fmt.args[2:]))
    assert isinstance(json.loads(sample), dict)
    (log,) = http.find("access_log")
    assert log.args[1] == fmt.args[0]
    events = nginx_conf.find("events")
    assert events and events[0].opt("worker_connections")


def test_loopback_template_matches_nginx_conf() -> None:
    conf = parse_nginx(NGINX_CONF.read_text())
    tmpl = parse_nginx(render_nginx(Path("/p"), "127.0.0.1:1", ["server 127.0.0.1:2;"]))

    def shape(block: Directive, skip: set[str]) -> list[tuple[str, tuple[str, ...]]]:
        return sorted(
            (d.name, tuple(d.args)) for d in block.children if not d.is_block and d.name not in skip
        )

    # Only paths, listen address, workers and DNS may differ.
    env_specific = {
        "access_log",
        "error_log",
        "pid",
        "daemon",
        "worker_processes",
        "resolver",
        "resolver_timeout",
        "listen",
        "server",
        "zone",
        "client_body_temp_path",
        "proxy_temp_path",
        "fastcgi_temp_path",
        "uwsgi_temp_path",
        "scgi_temp_path",
    }
    assert shape(_http(conf), env_specific) == shape(_http(tmpl), env_specific)
    assert shape(_upstream(conf), env_specific) == shape(_upstream(tmpl), env_specific)
    assert shape(_server(conf), env_specific) == shape(_server(tmpl), env_specific)
    locs_c, locs_t = _locations(conf), _locations(tmpl)
    assert locs_c.keys() == locs_t.keys()
    for name in locs_c:
        assert shape(locs_c[name], set()) == shape(locs_t[name], set()), name
    # The template keeps every runtime path under the prefix.
    raw = NGINX_TEMPLATE.read_text()
    for placeholder in ("{{PREFIX}}", "{{LISTEN}}", "{{UPSTREAMS}}"):
        assert placeholder in raw
    code = "\n".join(line.split("#", 1)[0] for line in raw.splitlines())
    assert code.count("{{UPSTREAMS}}") == raw.count("{{UPSTREAMS}}"), "placeholder in a comment"
    main = {d.name: d.args for d in tmpl.children if not d.is_block}
    assert main["daemon"] == ["off"]
    assert main["pid"] == ["/p/nginx.pid"]
    for d in _http(tmpl).children:
        if d.name.endswith("_temp_path") or d.name == "access_log":
            assert d.args[0].startswith("/p/"), d.name


# --------------------------------------------------------------------------------------------
# real nginx on loopback (skipped without nginx)
# --------------------------------------------------------------------------------------------

NGINX = find_nginx()
needs_nginx = pytest.mark.skipif(NGINX is None, reason=NGINX_MISSING)


class _Stub:
    """An HTTP/1.1 keep-alive upstream that answers every request with one fixed status."""

    def __init__(self, name: str, status: int) -> None:
        self.name, self.status = name, status
        self.hits: list[tuple[str, str, dict[str, str]]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                stub.hits.append((self.command, self.path, dict(self.headers)))
                body = json.dumps({"upstream": stub.name}).encode()
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.hits if m == method and p == path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def run_nginx(tmp_path: Path) -> Iterator[Callable[[list[str]], int]]:
    """Starts nginx in front of the given upstream ``server`` lines; returns its port."""
    with Processes() as procs:

        def start(upstreams: list[str]) -> int:
            assert NGINX
            port = free_port()
            procs.add(start_nginx(NGINX, tmp_path / f"nginx{len(procs.started)}", port, upstreams))
            return port

        yield start


@needs_nginx
def test_nginx_accepts_rendered_template(tmp_path: Path) -> None:
    prefix = tmp_path / "ngx"
    write_nginx_conf(prefix, "127.0.0.1:18080", upstream_servers((18001, 18002, 18003)))
    assert NGINX
    done = subprocess.run(
        nginx_cmd(NGINX, prefix, "-t"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


@needs_nginx
def test_nginx_retries_rank_but_never_admin(run_nginx: Callable[[list[str]], int]) -> None:
    bad, good = _Stub("bad", 503), _Stub("good", 200)
    try:
        # max_fails=0: the failing replica is never parked, so it keeps being picked in turn.
        port = run_nginx([f"server 127.0.0.1:{s.port} max_fails=0;" for s in (bad, good)])
        body = json.dumps({"user": {"user_id": "u1"}, "candidates": [{"video_id": "v1"}]})
        n = 8
        for _ in range(n):
            status, payload = http_json(port, "POST", "/rank", body.encode())
            assert (status, payload) == (200, {"upstream": "good"})
        assert good.count("POST", "/rank") == n
        assert bad.count("POST", "/rank") >= 1, "the failing replica was never tried"

        statuses = [http_json(port, "POST", "/admin/models/rollback", b"{}")[0] for _ in range(n)]
        # Each admin request reached exactly one replica: a 503 came back to the client as is.
        assert statuses.count(503) == bad.count("POST", "/admin/models/rollback") >= 1
        assert statuses.count(200) == good.count("POST", "/admin/models/rollback")
        assert len(statuses) == n

        # GETs are retried too.
        for _ in range(4):
            assert http_json(port, "GET", "/models")[0] == 200
        # Upstream keep-alive headers and request ids reach the replicas.
        for _, _, headers in good.hits:
            assert "close" not in headers.get("Connection", "").lower()
            assert headers.get("X-Request-ID")
    finally:
        bad.close()
        good.close()


@needs_nginx
def test_nginx_gateway_errors_are_json(run_nginx: Callable[[list[str]], int]) -> None:
    dead = free_port()  # nothing listens there
    port = run_nginx([f"server 127.0.0.1:{dead};"])
    status, payload = http_json(port, "POST", "/rank", b"{}")
    assert status == 502
    assert payload["error"]["code"] == "bad_gateway"


# --------------------------------------------------------------------------------------------
# the CLI contract the manifests rely on (skipped until the CLI imports)
# --------------------------------------------------------------------------------------------


def _cli_help(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    code = "import sys; from model.cli import main; sys.argv = ['vidrank', *sys.argv[1:]]; main()"
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_serve_options() -> None:
    out = _cli_help("serve")
    for opt in ("--registry", "--host", "--port", "--workers"):
        assert opt in out, opt


def test_cli_train_options_used_by_compose_and_k8s() -> None:
    out = _cli_help("train")
    for opt in ("--registry", "--simulate", "--if-empty", "--nproc"):
        assert opt in out, opt
    out = _cli_help("features", "publish")
    for opt in ("--data", "--registry", "--redis", "--if-empty", "--snapshot", "--as-of"):
        assert opt in out, opt
    out = _cli_help("simulate")
    for opt in ("--out", "--impressions", "--seed"):
        assert opt in out, opt
