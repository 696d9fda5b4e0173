"""The serving image's environment, built the way the Dockerfile's serve stage builds it.

There is no Docker engine on the CI machine, so this test does what the serve stage does: a fresh
virtualenv with only ``.[serve]`` installed (no torch, no pandas), then ``vidrank serve`` from it
against a real bundle, and a real ``POST /rank`` over loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from packaging.utils import canonicalize_name
from packaging.version import Version

from benchmarks.harness import child_env, start_vidrank
from tests.deploy.test_lock import locked

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
# What `python -m venv` puts there itself, and the project.
VENV_SEEDED = frozenset({"pip", "setuptools", "vidrank"})


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project installed with the ``serve`` extra only (non-editable), at
    the lock's versions (``-c requirements.lock``, as the Dockerfile's serve stage installs)."""
    venv = tmp_path_factory.mktemp("serve-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "-c", str(LOCK)]
    subprocess.run([*pip, f"{ROOT}[serve]"], check=True, cwd=venv.parent, timeout=600)
    return venv


@pytest.fixture
def server(serve_venv: Path, registry_copy: Path, tmp_path: Path) -> Iterator[str]:
    live = start_vidrank(
        registry_copy,
        tmp_path / "serve.log",
        # the image's defaults: no VIDRANK_* from the tests or the shell
        env=child_env({"VIDRANK_LOG_LEVEL": "info"}, drop_prefix="VIDRANK_"),
        executable=serve_venv / "bin" / "vidrank",
        cwd=tmp_path,  # not the repo: the installed package must be what runs
    )
    try:
        yield live.url
    finally:
        code = live.stop()
    assert code == 0, live.logs()  # SIGTERM: drained and exited cleanly


def test_serve_extra_has_no_torch(serve_venv: Path) -> None:
    python = str(serve_venv / "bin" / "python")
    for heavy in ("torch", "pandas", "onnx"):
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{heavy}') is None)"
        assert subprocess.run([python, "-c", code]).returncode == 1, f"{heavy} is installed"


def test_serve_venv_runs_the_locked_versions(serve_venv: Path) -> None:
    """Every package the serve extra brought is at the version CI tested, as in the image."""
    listed = subprocess.run(
        [str(serve_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {canonicalize_name(p["name"]): Version(p["version"]) for p in json.loads(listed)}
    assert {"fastapi", "onnxruntime", "numpy"} <= installed.keys()
    pins = locked()
    wrong = {
        name: (str(pins.get(name)), str(version))
        for name, version in installed.items()
        if name not in VENV_SEEDED and pins.get(name) != version
    }
    assert not wrong, f"(locked, installed) differ: {wrong}"


def test_serve_only_venv_ranks_a_request(server: str) -> None:
    body = {
        "user": {"user_id": 7, "features": {"user_active_degree": "high_active"}},
        "context": {"hour": 21},
        "candidates": [
            {"video_id": 1, "features": {"duration_s": 30, "tag": "3,9"}},
            {"video_id": 2, "features": {"duration_s": 300, "video_type": "AD"}},
            {"video_id": 3},
        ],
    }
    r = httpx.post(f"{server}/rank", json=body, timeout=10)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert sorted(i["video_id"] for i in items) == [1, 2, 3]
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= i["predictions"]["click"] <= 1 for i in items)
