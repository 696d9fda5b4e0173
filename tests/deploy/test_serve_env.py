"""The serving image's environment, built the way the Dockerfile's serve stage builds it.

There is no Docker engine on the CI machine, so this test does what the serve stage does: a fresh
virtualenv with only ``.[serve]`` installed (no torch, no pandas), then ``vidrank serve`` from it
against a real bundle, and a real ``POST /rank`` over loopback.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from benchmarks.harness import child_env, start_vidrank

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project installed with the ``serve`` extra only (non-editable)."""
    venv = tmp_path_factory.mktemp("serve-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
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
